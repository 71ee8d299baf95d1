"""The `ablate` command line: builds the app from its command groups; one place maps errors to exit codes.

    ablate --help
"""

from __future__ import annotations

import os
import sys

import typer
from typer.core import TyperGroup

from ablate.cli import remote, remote_fleet, results, stages, tools  # noqa: F401 (remote_fleet adds to remote)
from ablate.errors import BadInput
from ablate.results.rundir import Terminated

try:  # typer >= 0.20 vendors click; older typer uses click itself
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import NoArgsIsHelpError, UsageError


def _say(line: str) -> None:
    """One line on stderr, on a line of its own: a progress bar the error cut short ends without a newline."""
    bars = sys.modules.get("tqdm.std")
    if bars is not None and any(not getattr(b, "disable", False) for b in list(bars.tqdm._instances)):
        typer.echo(err=True)
    typer.echo(line, err=True)


def exit_code(exc: BaseException) -> int:
    """The one place an error becomes its line on stderr and its exit code.

    2: bad input or usage (an unknown flag, ``--limit abc``); 1: an unexpected error, shown as one line
    unless ``ABLATE_DEBUG=1``; 130 / 128+N: interrupted by Ctrl-C / terminated by signal N.
    """
    if isinstance(exc, UsageError):
        message = " ".join(exc.format_message().split())
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        _say(f"ablate: error: {message}{hint}")
        return 2
    if isinstance(exc, BadInput):
        _say(f"ablate: error: {exc}")
        return 2
    if isinstance(exc, (KeyboardInterrupt, typer.Abort)):
        _say("ablate: interrupted by SIGINT (Ctrl-C)")
        return 130
    if isinstance(exc, Terminated):
        _say(f"ablate: {exc}")
        return 128 + exc.signum
    if os.environ.get("ABLATE_DEBUG") == "1":
        raise exc
    first = (str(exc).strip().splitlines() or [""])[0]
    _say(f"ablate: error: {type(exc).__name__}: {first} (set ABLATE_DEBUG=1 for the traceback)")
    return 1


class _Commands(TyperGroup):
    """Every command runs through here: typer would turn Ctrl-C into a silent exit 130 before ``main`` sees it."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (BadInput, Terminated, KeyboardInterrupt) as exc:
            raise typer.Exit(exit_code(exc)) from None


app = typer.Typer(
    cls=_Commands,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Staged attention-mask ablation studies on Hugging Face decoder LMs.",
)
stages.register(app)
results.register(app)
tools.register(app)
app.add_typer(remote.remote_app, name="remote")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (``exit_code`` says which, and prints the one line)."""
    try:
        result = typer.main.get_command(app).main(args=argv, prog_name="ablate", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except typer.Exit as exc:
        return exc.exit_code
    except NoArgsIsHelpError as exc:
        typer.echo(exc.format_message())
        return 0
    except (Exception, KeyboardInterrupt, Terminated) as exc:  # noqa: BLE001 - the last line of defence
        return exit_code(exc)


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()

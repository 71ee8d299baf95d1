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


class _Commands(TyperGroup):
    """Every command runs through here: the project's errors become one line and an exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BadInput as exc:
            typer.echo(f"ablate: error: {exc}", err=True)
            raise typer.Exit(2) from None
        except Terminated as exc:
            typer.echo(f"ablate: {exc}", err=True)
            raise typer.Exit(128 + exc.signum) from None


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
    """Run the CLI; the one place that turns errors into exit codes and one-line messages.

    2: bad input or usage (an unknown flag, ``--limit abc``); 1: an unexpected error, shown as one line
    unless ``ABLATE_DEBUG=1``; 130 / 128+N: interrupted by Ctrl-C / terminated by signal N.
    """
    try:
        result = typer.main.get_command(app).main(args=argv, prog_name="ablate", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except typer.Exit as exc:
        return exc.exit_code
    except NoArgsIsHelpError as exc:
        typer.echo(exc.format_message())
        return 0
    except UsageError as exc:
        message = " ".join(exc.format_message().split())
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        typer.echo(f"ablate: error: {message}{hint}", err=True)
        return 2
    except BadInput as exc:
        typer.echo(f"ablate: error: {exc}", err=True)
        return 2
    except (KeyboardInterrupt, typer.Abort):
        typer.echo("ablate: interrupted", err=True)
        return 130
    except Terminated as exc:
        typer.echo(f"ablate: {exc}", err=True)
        return 128 + exc.signum
    except Exception as exc:  # noqa: BLE001 - the last line of defence: no traceback unless asked for
        if os.environ.get("ABLATE_DEBUG") == "1":
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        typer.echo(f"ablate: error: {type(exc).__name__}: {first} (set ABLATE_DEBUG=1 for the traceback)", err=True)
        return 1


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()

"""Typer options generated from a stage's config dataclass: each option is declared once, as a field.

    ablate stage3 --help    # every FinetuneConfig field, its help text, and its real default (YAML over dataclass)

A field's metadata shapes its flag: ``help`` (required), ``flag`` (another
name), ``repeat`` (a repeatable option for a tuple), ``cli: False`` (YAML only,
e.g. a gate). Other tuples are comma-separated strings (``--tasks a,b``,
``--split-range 0.25,0.75``) that the config loader splits. Each option's
default is the real one (the stage YAML over the dataclass; a ``--config`` file
sits between it and the flags), and only the flags
given on the command line reach the loader (click's parameter source), so the
YAML stays the one place a default lives.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from typing import List, Optional

import typer

from ablate.stages.config import stage_defaults

try:  # typer >= 0.20 vendors click; older typer uses click itself
    from typer._click.core import ParameterSource
except ImportError:  # pragma: no cover
    from click.core import ParameterSource

COMMANDLINE = ParameterSource.COMMANDLINE


def _cli_default(value, repeat: bool):
    if isinstance(value, (tuple, list)):
        return list(value) or None if repeat else ",".join(map(str, value))
    return None if value == "" else value


def _base(hint):
    """The type inside ``X | None``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return hint


def field_options(cls, stage: str | None = None, skip: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    hints = typing.get_type_hints(cls)
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    defaults.update(stage_defaults(stage, cls) if stage else {})
    params = []
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        base = _base(hints[f.name])
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        decls = [flag]
        if base is bool:
            annotation, decls = Optional[bool], [f"{flag}/--no-{flag[2:]}"]
        elif typing.get_origin(base) is tuple and f.metadata.get("repeat"):
            annotation = Optional[List[str]]
        elif base in (int, float):
            annotation = Optional[base]
        else:
            annotation = Optional[str]
        default = _cli_default(defaults.get(f.name), bool(f.metadata.get("repeat")))
        option = typer.Option(default, *decls, help=f.metadata["help"], show_default=default is not None)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
    return params


CONFIG_OPTION = inspect.Parameter(
    "config_file", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
    default=typer.Option(None, "--config", help="a study YAML: its top-level fields and this stage's section "
                         "(stage1: ... stage4:) sit between the package defaults and the flags given here"))


def config_command(cls, stage: str | None = None, skip: tuple[str, ...] = ()):
    """Turn ``fn(flags, **own)`` into a Typer command with one option per field of ``cls`` plus ``fn``'s own.

    Every such command takes ``--config FILE`` too (``flags["config_file"]``; ``ablate.stages.study_file``).
    """
    def wrap(fn):
        fields = field_options(cls, stage, skip) + [CONFIG_OPTION]
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
               for name, p in inspect.signature(fn).parameters.items() if name != "flags"]
        names = {p.name for p in fields}

        @functools.wraps(fn)
        def command(ctx: typer.Context, **kwargs):
            given = {k: kwargs.pop(k) for k in names}
            return fn({k: v if ctx.get_parameter_source(k) == COMMANDLINE else None for k, v in given.items()},
                      **kwargs)

        context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
        params = [context] + fields + own
        command.__signature__ = inspect.Signature(params)
        hints = typing.get_type_hints(fn)
        command.__annotations__ = {p.name: hints.get(p.name, p.annotation) for p in params}
        del command.__wrapped__  # Typer must read the generated signature, not fn's
        return command

    return wrap

"""The command line of a tool launcher (``launchers/sample.py``, ``cache_latents.py``, ``transfer.py``): the same
config as training, read the same way.

A tool's config is :class:`~usp_scale.config.schema.JobConfig` plus its own section (``SampleJob.sample``,
``CacheJob.cache``, ``TransferJob.transfer``), of which it reads only some sections. Its command line is the
trainer's: ``--config RECIPE`` (a YAML recipe, e.g. the finetuning recipe of the model being sampled) and trailing
dotted overrides ``key=value``. Flags are aliases of keys (:class:`Alias`: ``--vae`` sets ``vae.path``); ``--help``
prints each with the key it sets and the key's help, ``--help-config`` every key of the tool's sections. An alias
and an override of the same key: the override wins (it comes last). Only the rules whose keys all lie in the
tool's sections run (:func:`usp_scale.config.validate.validate`), and only their required keys must be set.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

from .load import field_docs, format_help, load_config


@dataclass(frozen=True)
class Alias:
    """A flag (with its alternative spellings) that sets config key ``key``: with a value (``metavar``; ``nargs=2``
    sets ``keys``, one value each), or as a switch setting ``const``."""

    flags: Tuple[str, ...]
    key: str = ""
    metavar: str = "VALUE"
    const: Any = None
    keys: Tuple[str, ...] = ()  # nargs = len(keys) > 1: one key per value

    @property
    def targets(self) -> Tuple[str, ...]:
        return self.keys or (self.key,)


def tool_parser(description: str, aliases: Sequence[Alias], sections: Sequence[str], *, schema,
                epilog: str = "") -> argparse.ArgumentParser:
    """The parser of a tool whose config is ``schema`` (a JobConfig subclass) restricted to ``sections``."""
    docs = field_docs(schema)
    p = argparse.ArgumentParser(description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML recipe (e.g. the finetuning recipe of the model); trailing "
                   "key=value arguments and the flags below override it")
    p.add_argument("--help-config", action="store_true",
                   help=f"print every config key this tool reads ({', '.join(sections)}) with its default and help")
    g = p.add_argument_group("flags (each sets the config key shown; key=value arguments do the same)")
    for a in aliases:
        text = f"= {' '.join(a.targets)}" + (f"={a.const!r}" if a.const is not None else "")
        text += f". {docs.get(a.targets[0], '')}".replace("%", "%%")
        if a.const is not None:
            g.add_argument(*a.flags, dest=_dest(a), action="store_const", const=a.const, default=None, help=text)
        else:
            g.add_argument(*a.flags, dest=_dest(a), default=None, metavar=a.metavar,
                           nargs=len(a.keys) if len(a.keys) > 1 else None, help=text)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. eval.steps=50")
    return p


def _dest(a: Alias) -> str:
    return "alias_" + a.flags[0].lstrip("-").replace("-", "_")


def tool_config(args: argparse.Namespace, aliases: Sequence[Alias], sections: Sequence[str], *, schema):
    """The checked config of the parsed command line (aliases first, then the ``key=value`` overrides)."""
    overrides = []
    for a in aliases:
        value = getattr(args, _dest(a))
        if value is None:
            continue
        values = value if len(a.targets) > 1 else [value]
        for key, v in zip(a.targets, values):
            overrides.append(f"{key}={_text(v)}")
    return load_config(args.config, overrides + list(args.overrides), schema=schema, sections=sections)


def _text(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def help_config(schema, sections: Sequence[str]) -> str:
    """``--help-config`` of a tool: the keys of ``sections``."""
    return format_help(schema(), sections=sections)


def sections_of(schema) -> Tuple[str, ...]:
    """Every section and top-level key of ``schema``."""
    return tuple(f.name for f in dataclasses.fields(schema))


def parse_tool_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    return parser.parse_intermixed_args(argv)

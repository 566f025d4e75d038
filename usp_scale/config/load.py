"""YAML recipes + dotted overrides -> a checked :class:`JobConfig`.

A recipe is a YAML mapping whose top-level keys are the job fields and the section names
of :class:`~usp_scale.config.schema.JobConfig`. A recipe may start from another one with
``_base_: relative/or/absolute.yaml`` (bases are applied first, recursively).

Errors name the file and the dotted key: an unknown key, a value of the wrong type, a
required value (``???``) still missing after all overrides, and every value that breaks a rule of
:mod:`usp_scale.config.validate` (ranges, choices, cross-section consistency), each with the file that set it.

:func:`save_config` writes the resolved config with a first-line comment carrying the sha256 of the rest; loading
such a file checks it, so a damaged or truncated resolved config is refused (delete that line to use an edited copy).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import typing
from typing import Any, Iterable, Optional, Sequence

import yaml

from ..fileio import write_text
from .errors import ConfigError
from .schema import MISSING, JobConfig
from .validate import selected
from .validate import validate as run_rules


# Keys that existed once: setting one is an error that says what replaced it.
REMOVED_KEYS = {
    "model.cfg_official_channels": "classifier-free guidance has one implementation (usp_scale.sample.CFGModel) and "
                                   "one switch: eval.cfg_channels=3 (in-training FID) or launchers/sample.py "
                                   "--cfg-channels 3 guides the official three channels",
}
# Keys that moved: setting the old one is an error naming the new one (task-specific fields sit under their task).
MOVED_KEYS = {"smoothing": "cls.smoothing", "mixup": "cls.mixup", "cutmix": "cls.cutmix",
              "use_pretrain_layer": "dit.use_pretrain_layer"}
RESOLVED_HEADER = "# usp_scale resolved config; sha256 of the lines below: "


# --------------------------------------------------------------------------- type checking

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check (and minimally coerce) ``value`` against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: key '{key}' expects a list, got {value!r}")
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        out = [_coerce(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if tp is Any:
        return value
    if value == MISSING:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: key '{key}' expects true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: key '{key}' expects an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: key '{key}' expects a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: key '{key}' expects a string, got {value!r}")
        return value
    raise ConfigError(f"{source}: key '{key}' has unsupported type {_type_name(tp)}")


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _apply_mapping(obj: Any, mapping: dict, source: str, prefix: str = "", origins: Optional[dict] = None) -> None:
    if not isinstance(mapping, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {mapping!r}")
    hints = _hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in mapping.items():
        key = f"{prefix}{k}"
        if key in REMOVED_KEYS:
            raise ConfigError(f"{source}: key '{key}' was removed: {REMOVED_KEYS[key]}")
        if key in MOVED_KEYS:
            new = MOVED_KEYS[key]
            raise ConfigError(f"{source}: key '{key}' moved to '{new}' (a field only the {new.split('.')[0]} task "
                              f"reads sits under its section): write {new}={v!r} (YAML: {new.split('.')[0]}: "
                              f"{{{new.split('.')[1]}: {v!r}}})")
        if k not in names:
            close = [n for n in names if n.startswith(str(k)[:3])]
            hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
            raise ConfigError(f"{source}: unknown key '{key}'{hint}")
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current):
            _apply_mapping(current, v, source, key + ".", origins)
        else:
            setattr(obj, k, _coerce(v, hints[k], key, source))
            if origins is not None:
                origins[key] = source


# --------------------------------------------------------------------------- YAML files

class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key written twice in one mapping (PyYAML keeps the last one silently:
    a repeated ``optim.blr`` would win, a repeated ``data:`` section would drop the first)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    first_line: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            continue  # the base constructor reports an unhashable key
        line = key_node.start_mark.line + 1
        if key in first_line:
            raise ConfigError(f"{key_node.start_mark.name}: line {line}: key '{key}' is written twice in the same "
                              f"mapping (first on line {first_line[key]}); YAML would silently keep only the last "
                              "one: merge the two into one")
        first_line[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def safe_load_unique(text: str, name: str = "<string>") -> Any:
    """``yaml.safe_load`` that refuses duplicate keys, naming ``name`` and the line of the second one."""
    loader = _UniqueKeyLoader(text)
    loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _read_yaml(path: str, seen: tuple = ()) -> list:
    """Return [(source, mapping), ...] with bases first."""
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"{path}: _base_ cycle through {' -> '.join(seen)}")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, "rb") as f:
            raw = f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the config file ({type(e).__name__}: {e})") from e
    _check_resolved(path, raw)
    try:
        data = safe_load_unique(raw, path) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping")
    out = []
    base = data.pop("_base_", None)
    if base is not None:
        bases = base if isinstance(base, list) else [base]
        for b in bases:
            bpath = b if os.path.isabs(b) else os.path.join(os.path.dirname(path), b)
            out.extend(_read_yaml(bpath, seen + (path,)))
    out.append((path, data))
    return out


def _field_type(cfg: Any, key: str) -> Any:
    """The annotation of dotted ``key`` in ``cfg``'s schema (None when there is no such field)."""
    obj, parts = cfg, key.split(".")
    for part in parts[:-1]:
        obj = getattr(obj, part, None)
        if not dataclasses.is_dataclass(obj):
            return None
    return _hints(type(obj)).get(parts[-1]) if dataclasses.is_dataclass(obj) else None


def _parse_override(text: str, cfg: Any = None) -> tuple:
    """``key=value``: a string field takes the text as it is (a path such as ``/data/on`` or ``null`` stays a
    string); every other field reads it as YAML (numbers, booleans, lists)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if cfg is not None and _field_type(cfg, key) is str:
        return key, raw
    value = yaml.safe_load(raw) if raw.strip() != "" else ""
    # YAML reads "1e-4" as a string; accept it as a float.
    if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value):
        value = float(value)
    return key, value


def _nest(key: str, value: Any) -> dict:
    parts = key.split(".")
    out: dict = {parts[-1]: value}
    for p in reversed(parts[:-1]):
        out = {p: out}
    return out


def _check_missing(obj: Any, sources: str, prefix: str = "", sections: Optional[Sequence[str]] = None) -> None:
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            _check_missing(v, sources, f"{prefix}{f.name}.", sections)
        elif v == MISSING and selected(prefix + f.name, sections):
            raise ConfigError(f"required key '{prefix}{f.name}' is missing (set it in {sources} "
                              f"or on the command line as {prefix}{f.name}=...)")


def load_config(path: Optional[str] = None, overrides: Iterable[str] = (), check_missing: bool = True, *,
                schema=JobConfig, sections: Optional[Sequence[str]] = None):
    """Build a config (a :class:`JobConfig`, or the ``schema`` of a tool: a JobConfig subclass with its own section)
    from a YAML recipe and ``key=value`` overrides.

    With ``check_missing`` (the default) the result is also validated (:func:`usp_scale.config.validate.validate`):
    with ``sections`` (a tool's: section names, top-level or dotted keys) only the required keys and the rules that
    lie in them. ``cfg._origins`` maps each key that was set to the file (or "command line") that set it last."""
    cfg = schema()
    origins: dict = {}
    if path:
        for source, mapping in _read_yaml(path):
            _apply_mapping(cfg, mapping, source, origins=origins)
    for text in overrides:
        key, value = _parse_override(text, cfg)
        _apply_mapping(cfg, _nest(key, value), "command line", origins=origins)
    object.__setattr__(cfg, "_origins", origins)
    if check_missing:
        _check_missing(cfg, path or "the config", sections=sections)
        run_rules(cfg, origins, sections=sections)
    return cfg


def config_from_dict(mapping: dict, source: str = "<dict>", validate: bool = False) -> JobConfig:
    """A :class:`JobConfig` from a nested dict (``validate``: also check every rule)."""
    cfg = JobConfig()
    origins: dict = {}
    _apply_mapping(cfg, mapping, source, origins=origins)
    object.__setattr__(cfg, "_origins", origins)
    if validate:
        run_rules(cfg, origins)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _check_resolved(path: str, raw: str) -> None:
    """A file written by :func:`save_config` must still match the sha256 on its first line."""
    if not raw.startswith(RESOLVED_HEADER):
        return
    first, _, body = raw.partition("\n")
    want = first[len(RESOLVED_HEADER):].strip()
    if hashlib.sha256(body.encode()).hexdigest() != want:
        raise ConfigError(f"{path}: this resolved config has changed since usp_scale wrote it (its sha256 does not "
                          "match the first line): it is damaged or truncated. If you edited it on purpose, delete "
                          "the first line.")


def save_config(cfg: JobConfig, path: str) -> str:
    """Write the fully resolved config (atomically, with its sha256 on the first line) and return its path."""
    body = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    return write_text(path, RESOLVED_HEADER + hashlib.sha256(body.encode()).hexdigest() + "\n" + body)


# --------------------------------------------------------------------------- help text

def field_docs(schema=JobConfig) -> dict:
    """Dotted key -> the field's help (``opt(..., help)`` in schema.py), with its allowed values for a choice field."""
    docs: dict = {}

    def walk(cls, prefix=""):
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
                continue
            text = f.metadata.get("help", "")
            if "choices" in f.metadata:
                text += f" [one of: {', '.join(map(str, f.metadata['choices']))}]"
            docs[prefix + f.name] = text
    walk(schema)
    return docs


def format_help(cfg: Optional[JobConfig] = None, sections: Optional[Sequence[str]] = None) -> str:
    """Every key of ``cfg`` (in ``sections``) with its value and help: ``--help-config``."""
    cfg = cfg or JobConfig()
    docs = field_docs(type(cfg))
    flat = {}

    def walk(obj, prefix=""):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                walk(v, f"{prefix}{f.name}.")
            else:
                if selected(prefix + f.name, sections):
                    flat[prefix + f.name] = v

    walk(cfg)
    width = max(len(k) for k in flat)
    return "\n".join(f"  {k:<{width}} = {v!r:<14} {docs.get(k, '')}" for k, v in flat.items())

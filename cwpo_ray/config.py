"""Typed stage configs.

Each stage has one dataclass. Values are layered: dataclass defaults < ``--config``
YAML file < command-line flags < dotted ``key=value`` overrides. Every value is
coerced to its field's type here, so a stage only ever sees typed values, and every
user mistake raises ``ConfigError`` with one line that names the key.

Ours rather than jsonargparse (which layers dataclasses, YAML, flags and dotted overrides too): it
would replace the layering, a small part of this module, but not the checks made before any stage
runs (inputs exist, no placeholder left, no relative output path in a Ray job), and it spells an
override ``--a.b=v`` where every preset, job config and doc here uses ``a.b=v``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A mistake in a config file, flag or override. The CLI prints it and exits 2."""


def option(default: Any = dataclasses.MISSING, help: str = "", *, flag: bool = True,
           must_exist: bool = False, choices: tuple | None = None, factory=None):
    """A config field with its ``--help`` text.

    flag: also exposed as ``--the-name`` on the command line.
    must_exist: a path that must exist before the stage starts (checked for local paths only).
    """
    meta = {"help": help, "flag": flag, "must_exist": must_exist, "choices": choices}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def coerce(key: str, value: Any, tp) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to type ``tp`` or raise ConfigError."""
    inner, optional = unwrap_optional(tp)
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))):
        return None
    tp = inner
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                raise bad from None
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (item_tp, *_rest) = typing.get_args(tp) or (str,)
        if isinstance(value, str):
            text = value.strip()
            items = yaml.safe_load(text) if text.startswith("[") else [v for v in text.split(",") if v.strip()]
            if not isinstance(items, list):
                raise bad
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise bad
        out = [coerce(f"{key}[{i}]", v.strip() if isinstance(v, str) else v, item_tp) for i, v in enumerate(items)]
        return out if origin is list else tuple(out)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} settings, got {value!r}")
        return build(tp, value, prefix=f"{key}.")
    raise ConfigError(f"{key}: unsupported config type {tp!r}")


def build(cls, values: dict[str, Any], prefix: str = ""):
    """Instantiate ``cls`` from a (possibly nested) dict, checking keys and types."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown key '{prefix}{key}' for {cls.__name__} (known: {', '.join(sorted(names))})")
        kwargs[key] = coerce(prefix + key, value, hints[key])
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing required setting {prefix}{missing[0]} (flag --{missing[0].replace('_', '-')})")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return obj


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {p!r} is not a group of settings")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        out.append((key.strip(), value))
    return out


def load_config(cls, config_file: str | None = None, flags: dict[str, Any] | None = None,
                overrides: list[str] | None = None):
    """Layer defaults < YAML file < flags < key=value overrides into a typed ``cls``."""
    tree: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file not found: {config_file}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {config_file} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {config_file} must hold a mapping of settings")
        tree.update(loaded)
    for key, value in (flags or {}).items():
        if value is not None:
            _set_dotted(tree, key, value)
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    check_placeholders(tree, config_file)
    cfg = build(cls, tree)
    check_paths(cfg)
    check_job_paths(cfg)
    return cfg


# What the shipped cluster files and examples use for "fill this in": YOUR-BUCKET, YOUR_PROJECT,
# fs-XXXXXXXX (an EFS id), CHANGE-ME / REPLACE-ME.
PLACEHOLDER = re.compile(r"YOUR[-_][A-Za-z0-9]|\bfs-X{4,}|X{6,}|CHANGE[-_]?ME|REPLACE[-_]?ME")


def check_placeholders(tree: Any, config_file: str | None = None, prefix: str = "") -> None:
    """Refuse a setting that still holds a placeholder (``s3://YOUR-BUCKET/...``, ``fs-XXXXXXXX``).

    Checked on the settings after flags and overrides, so ``key=value`` on the command line can fill
    one in; before any stage runs, so a job does not fail hours in, when the stage that reads it starts.
    """
    if isinstance(tree, dict):
        for key, value in tree.items():
            check_placeholders(value, config_file, f"{prefix}{key}.")
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            check_placeholders(value, config_file, f"{prefix.rstrip('.')}[{i}].")
    elif isinstance(tree, str) and PLACEHOLDER.search(tree):
        key = prefix.rstrip(".")
        where = f" (from {config_file})" if config_file else ""
        raise ConfigError(f"{key}: {tree!r}{where} is a placeholder: put your own value in the config "
                          f"or override it ({key}=...)")


# Settings that name where a stage writes. A relative one would be resolved against the process's
# working directory, which under `ray job submit` is the job's temporary copy of --working-dir.
OUTPUT_KEYS = ("out", "storage_path", "cache_dir", "reference_cache")


def running_as_ray_job() -> bool:
    """True in the driver of a job started by `ray job submit` (Ray's job supervisor sets this variable
    for the driver it starts; a plain `cwpo ...` or `python jobs/run.py STAGE` on a node does not have it)."""
    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))


def check_job_paths(cfg, prefix: str = "") -> None:
    """Under `ray job submit`, refuse a relative output path, naming the key.

    The job's driver runs in a temporary copy of the submitted working dir on the head node, and each
    worker in its own copy on its own node: a relative ``out`` would scatter the outputs over copies
    that Ray deletes. It is refused rather than resolved against the directory the user submitted
    from, because that directory is on the submitting machine, which the cluster cannot reach (and
    `ray job submit` does not pass it on).
    """
    if not running_as_ray_job():
        return
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_job_paths(value, prefix=f"{prefix}{f.name}.")
        elif (f.name in OUTPUT_KEYS and isinstance(value, str) and value and "://" not in value
              and not os.path.isabs(os.path.expanduser(value))):
            raise ConfigError(f"{prefix}{f.name}: {value!r} is a relative path, which in a Ray job lands in the "
                              "job's temporary working dir (deleted afterwards, and a different copy on each "
                              "node): give an absolute path on storage every node sees (e.g. /mnt/shared/...) "
                              "or an s3:// / gs:// URI")


def check_paths(cfg, prefix: str = "") -> None:
    """Fail early, with the key named, when an input file a stage needs does not exist."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_paths(value, prefix=f"{prefix}{f.name}.")
        elif f.metadata.get("must_exist") and isinstance(value, str) and value and "://" not in value:
            if not os.path.exists(value):
                raise ConfigError(f"{prefix}{f.name}: file not found: {value}")


def to_dict(cfg) -> dict[str, Any]:
    """Plain dict of a config (for logging params and fingerprints)."""
    return dataclasses.asdict(cfg)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out

"""Load a config: YAML file(s) + dotted `key=value` overrides -> validated `Config`.

A YAML file may start with `defaults: [other.yaml, ...]` (paths relative to the file); those are
merged first, the file itself last, then the command-line overrides. Validation is pydantic's;
this module only turns its errors into one message a person can act on.
"""

from __future__ import annotations

import copy
import difflib
import importlib.resources
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from bignlp_jax import storage
from bignlp_jax.config.schema import Config
from bignlp_jax.errors import ConfigError

# The presets ship inside the package (bignlp_jax/configs links to the top-level configs/ in a
# clone, and is a plain folder in a wheel), so names such as `tiny` work from any install.
CONFIG_ROOT = Path(str(importlib.resources.files("bignlp_jax") / "configs"))


def resolve_config_path(path: str | Path) -> Path:
    """Find a config by path, or by name under the packaged `configs/` folder."""
    if storage.is_remote(path):  # a run's config.yaml in a bucket
        return storage.path(path)
    candidates = [Path(path), CONFIG_ROOT / path, CONFIG_ROOT / f"{path}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"config file not found: {path}\n"
        f"  looked in: {', '.join(str(c) for c in candidates)}\n"
        f"  fix: pass a YAML path, or a name under {CONFIG_ROOT} such as 'tiny'"
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        # where and what, never the line itself: a `defaults:` entry may name any file
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"{where}: not valid YAML ({problem})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {e.start}); a config is YAML"
                          ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def deep_merge(base: dict, update: dict) -> dict:
    """Return base updated by `update`, merging nested mappings key by key."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_yaml_tree(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config, merging its `defaults` files first (recursively)."""
    path = path if storage.is_remote(path) else path.resolve()
    if path in _seen:
        raise ConfigError(f"config defaults form a cycle: {' -> '.join(map(str, _seen + (path,)))}")
    data = _read_yaml(path)
    merged: dict[str, Any] = {}
    for include in data.pop("defaults", None) or []:
        include_path = (path.parent / include).resolve()
        if not include_path.is_file():
            raise ConfigError(f"{path}: defaults entry {include!r} not found at {include_path}")
        merged = deep_merge(merged, load_yaml_tree(include_path, _seen + (path,)))
    return deep_merge(merged, data)


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings; values are parsed as YAML scalars/lists (`3`, `1e-4`,
    `[1,2]`)."""
    tree = copy.deepcopy(tree)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(
                f"override {item!r} is not of the form key=value (e.g. train.steps=10)")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return tree


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_valid_keys(annotation, dotted + "."))
    return keys


def _describe_error(err: Mapping[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "<root>"
    given = err.get("input")
    if err["type"] == "extra_forbidden":
        # Nearest keys at the same depth (a section for a section, a key for a key).
        valid = [k for k in _valid_keys(Config) if k.count(".") == key.count(".")]
        near = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
        if not near:  # fall back to the other keys of the same section
            section = key.rsplit(".", 1)[0] + "." if "." in key else ""
            same = [k for k in valid if k.startswith(section)]
            near = difflib.get_close_matches(key, same, n=3, cutoff=0.3)
        hint = f"; did you mean {' or '.join(near)}?" if near else ""
        return f"unknown config key '{key}'{hint}"
    if err["type"] == "value_error":  # our own validators already name the keys
        return err["msg"].removeprefix("Value error, ")
    expected = err["msg"]
    ctx = err.get("ctx") or {}
    if "expected" in ctx:
        expected = f"expected one of {ctx['expected']}"
    return f"config key '{key}': {expected}; got {given!r}"


def validate(tree: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        lines = [_describe_error(err) for err in e.errors(include_url=False)]
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """YAML file (or None for all defaults) + overrides -> validated Config."""
    tree = load_yaml_tree(resolve_config_path(path)) if path is not None else {}
    return validate(apply_overrides(tree, list(overrides)))


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (every default filled in) as YAML."""
    path = storage.path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_to_yaml(cfg), encoding="utf-8")

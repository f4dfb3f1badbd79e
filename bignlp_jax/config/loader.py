"""Load a config: YAML file(s) + dotted `key=value` overrides -> validated `Config`.

A YAML file may start with `defaults: [other.yaml, ...]` (paths relative to the file); those are
merged first, the file itself last, then the command-line overrides. Validation is pydantic's;
this module only turns its errors into one message a person can act on.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import importlib.resources
import typing
from collections.abc import Collection, Mapping, Sequence
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


def add_config_arguments(parser: argparse.ArgumentParser, example: str) -> None:
    """`CONFIG [KEY=VALUE ...]`, the positional arguments of every command that runs
    `load_config(args.config, args.overrides)`; `example`: overrides that suit the command."""
    parser.add_argument("config", metavar="CONFIG",
                        help="YAML config (path, or name under configs/, e.g. tiny)")
    parser.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help=f"dotted overrides, e.g. {example} (default: none)")


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


def _yaml_problem(path: Path, error: yaml.YAMLError) -> str:
    """One message for a YAML syntax error: the file, where, what is wrong, and a fix. Where and
    what only, never the line itself: a `defaults:` entry may name any file."""
    mark = getattr(error, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(error, "problem", None) or type(error).__name__
    if "'\\t'" in problem:
        fix = "indent with spaces: YAML does not allow tabs for indentation"
    else:
        fix = ("check the indentation and quoting there (quote a value that holds ': ' or "
               "starts with a special character)")
    return f"{where}: not valid YAML ({problem})\n  fix: {fix}"


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_problem(path, e)) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {e.start}); a config is YAML"
                          ) from None
    if data is None:  # empty, or comments only: a run with every default is never meant
        raise ConfigError(f"{path} is empty (no sections); fix: give it sections such as "
                          "`model:` and `train:`, or start from a preset: `defaults: [tiny.yaml]`")
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a {type(data).__name__}, not a mapping of sections; "
                          "fix: write `section:` lines such as `model:` and `train:`, each with "
                          "its `key: value` lines indented below")
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


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str],
                    sections: Collection[str] | None = None) -> dict[str, Any]:
    """Apply `a.b.c=value` strings; values are parsed as YAML scalars/lists (`3`, `1e-4`,
    `[1,2]`). `SECTION=FILE` (e.g. `model=models/tiny_llama.yaml`) replaces a whole section
    with that config file's section first; dotted keys then apply on top of it, wherever they
    stand on the command line (`model.hidden=128 model=FILE` keeps hidden=128); a mapping
    given to a section sets its keys (`model={hidden: 128}` = `model.hidden=128`). `sections`:
    the keys that are sections (default: those of a run's `Config`)."""
    tree = copy.deepcopy(tree)
    sections = SECTIONS if sections is None else sections
    parsed = [_parse_override(item) for item in overrides]
    from_files = {key for key, value in parsed if key in sections and isinstance(value, str)}
    for key, value in parsed:
        if key in from_files:
            tree[key] = section_from_file(key, str(value))
    for key, value in parsed:
        if key in from_files:
            continue
        if key in sections and isinstance(value, dict) and isinstance(tree.get(key), dict):
            # `model={num_layers: 3}` sets those keys, as a `defaults:` file would; replacing
            # the section would silently reset every other key of it to its default
            tree[key] = deep_merge(tree[key], value)
            continue
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return tree


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.steps=10)")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _sections() -> set[str]:
    """The top-level keys of `Config` that are sections (mappings of keys), not values."""
    out = set()
    for name, field in Config.model_fields.items():
        kinds = typing.get_args(field.annotation) or (field.annotation,)
        if any(isinstance(kind, type) and issubclass(kind, BaseModel) for kind in kinds):
            out.add(name)
    return out


SECTIONS = _sections()


def section_from_file(section: str, name: str) -> dict[str, Any]:
    """The `section` of a config file (a path, or a name under configs/; its `defaults`
    merged first), for `SECTION=FILE`; ConfigError in one line when there is none."""
    try:
        path = resolve_config_path(name)
    except ConfigError:
        raise ConfigError(
            f"override {section}={name}: {section} is a section, so its value names a config "
            f"file whose `{section}:` section replaces this one, and no file {name} was found "
            f"(nor {CONFIG_ROOT / name}[.yaml])\n  fix: name a file, e.g. {section}="
            f"{'models/tiny_llama.yaml' if section == 'model' else 'FILE.yaml'}, or set single "
            f"keys: {section}.KEY=VALUE") from None
    tree = load_yaml_tree(path)
    if not isinstance(tree.get(section), dict):
        raise ConfigError(f"override {section}={name}: {path} has no `{section}:` section to "
                          f"take\n  fix: name a file that has one, or set single keys: "
                          f"{section}.KEY=VALUE")
    return tree[section]


def check_unique_overrides(overrides: Sequence[str]) -> None:
    """Refuse a key given twice on the command line (`a=1 ... a=2`): which one was meant is a
    guess, and keeping the last silently hides a typo."""
    seen: dict[str, str] = {}
    for item in overrides:
        key, sep, _ = item.partition("=")
        key = key.strip()
        if not sep or not key:
            continue  # apply_overrides names a malformed one
        if key in seen:
            raise ConfigError(f"{key} is given twice on the command line ({seen[key]} and "
                              f"{item}); keep the one you mean")
        seen[key] = item


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

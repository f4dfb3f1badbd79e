"""No hidden inputs: the token stores a run reads are part of its saved config.

`data.stores` ({dataset/split: store identity}) is null in a user's config; at the start of a
run it is filled in with the identities of the stores the config resolves to (built if
missing), and the run's `config.yaml` is written with it. A config that sets it (a run's own
config.yaml) reads exactly those stores, and a rerun into a run dir with checkpoints whose
config.yaml names other stores (another tokenizer, another version of the dataset) stops,
naming both, instead of continuing on different data.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from bignlp_jax import storage
from bignlp_jax.config import Config
from bignlp_jax.errors import UserError


def _show(stores: dict[str, str]) -> str:
    return ", ".join(f"{k} {v[:16]}" for k, v in sorted(stores.items()))


def with_store_identities(cfg: Config, run_dir: str | Path) -> Config:
    """`cfg` with data.stores filled in; UserError if it or the run's saved config.yaml (in a
    run with checkpoints) names other stores."""
    if cfg.data.source != "tfds" or cfg.task is not None:
        return cfg
    from bignlp_jax.data.text_source import store_identities  # grain, tfds: tfds runs only

    found = store_identities(cfg)
    if cfg.data.stores is not None and cfg.data.stores != found:
        raise UserError(
            f"data.stores names the token stores {_show(cfg.data.stores)}, but this config "
            f"reads {_show(found)}\n  fix: point data.data_dir / data.tokenizer at the data "
            "the run was trained on, or set data.stores=null to accept the new data in a new "
            "run.dir")
    saved = _saved_stores(storage.path(run_dir))
    if saved is not None and saved != found and (storage.path(run_dir) / "checkpoints").is_dir():
        raise UserError(
            f"run {run_dir} was trained on token stores {_show(saved)} (its config.yaml), but "
            f"this config reads {_show(found)}: other data (another tokenizer or dataset)\n"
            "  fix: use the run's data (data.data_dir, data.tokenizer), or a new run.dir")
    data = cfg.data.model_copy(update={"stores": found})
    return cfg.model_copy(update={"data": data})


def _saved_stores(run_dir: storage.AnyPath) -> dict[str, str] | None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return None  # the config check of the run itself reports a broken config.yaml
    return (saved.get("data") or {}).get("stores")

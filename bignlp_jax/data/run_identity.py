"""No hidden inputs: the token stores a run reads are part of its saved config.

`data.stores` ({dataset/split: store identity}) is null in a user's config; at the start of a
run it is filled in with the identities of the stores the config resolves to (built if
missing), and the run's recorded config is written with it. A config that sets it (a run's own
recorded config) reads exactly those stores. Whether a rerun may read other stores than the
run recorded is the run-identity rule's call (train/identity.py), the same rule as for every
other key: refused in a run with checkpoints unless the change is allowed.
"""

from __future__ import annotations

from bignlp_jax.config import Config
from bignlp_jax.errors import UserError


def _show(stores: dict[str, str]) -> str:
    return ", ".join(f"{k} {v[:16]}" for k, v in sorted(stores.items()))


def with_store_identities(cfg: Config) -> Config:
    """`cfg` with data.stores filled in; UserError if it names other stores than it reads."""
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
    data = cfg.data.model_copy(update={"stores": found})
    return cfg.model_copy(update={"data": data})

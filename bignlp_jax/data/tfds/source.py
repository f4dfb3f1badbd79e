"""Open a split of a prepared TFDS dataset as a random-access source, without TensorFlow.

Any dataset prepared in ArrayRecord format under a `data_dir` works: ours (`data prepare`, the
embedded corpora) and catalogue datasets a user prepared elsewhere (`c4/en`, `glue/sst2:2.0.0`).
The builder is rebuilt from the files (`dataset_info.json`), so no builder code (and no
TensorFlow) is imported. Records come back as dicts of numpy values; strings are bytes and
`text_of` decodes them.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from bignlp_jax import storage
from bignlp_jax.config import Config
from bignlp_jax.errors import UserError

DEFAULT_DATA_DIR = "~/.cache/bignlp_jax/datasets"


def default_data_dir() -> Path:
    """The user's cache, used when data.data_dir is null: ~/.cache/bignlp_jax/datasets, or
    under $XDG_CACHE_HOME when set (the freedesktop convention pip and Hugging Face follow too).
    A run records the directory it used in its config.yaml."""
    cache = os.environ.get("XDG_CACHE_HOME")
    if cache:
        return Path(cache).expanduser() / "bignlp_jax" / "datasets"
    return Path(DEFAULT_DATA_DIR).expanduser()


def resolve_data_dir(data_dir: str | Path | None) -> storage.AnyPath:
    """The absolute directory `data.data_dir` names (null: `default_data_dir()`); a bucket
    URL as it is (an `epath.Path`)."""
    if data_dir is not None and storage.is_remote(data_dir):
        return storage.path(data_dir)
    return (default_data_dir() if data_dir is None else Path(data_dir).expanduser()).absolute()


def with_resolved_data_dir(cfg: Config) -> Config:
    """`cfg` with `data.data_dir` made the absolute directory it names, so the config a run
    records says where its data came from (a null would depend on the user's cache)."""
    data = cfg.data.model_copy(update={"data_dir": str(resolve_data_dir(cfg.data.data_dir))})
    return cfg.model_copy(update={"data": data})


def list_datasets(data_dir: storage.AnyPath) -> list[str]:
    """Names of the prepared datasets under `data_dir` (dirs holding a dataset_info.json)."""
    names = set()
    for info in storage.files_under(data_dir):
        if info.name == "dataset_info.json":
            rel = Path(str(info)[len(str(data_dir)):].strip("/")).parts  # name[/config]/version
            if len(rel) >= 3:
                names.add("/".join(rel[:-2]))
    return sorted(names)


def _builder(name: str, data_dir: storage.AnyPath):
    import tensorflow_datasets as tfds  # seconds to import: only when a dataset is read

    if not data_dir.is_dir():
        raise UserError(
            f"data directory {data_dir} does not exist (looking for dataset {name!r})\n"
            "  fix: set data.data_dir to the directory holding your prepared TFDS datasets, or "
            "prepare one with `bignlp-jax data prepare --input GLOB --name NAME --data-dir DIR`"
        )
    base = name.split(":")[0]
    if not (data_dir / base).is_dir():
        available = list_datasets(data_dir)
        raise UserError(
            f"dataset {name!r} not found in {data_dir}\n"
            f"  looked for: {data_dir / base}\n"
            f"  available there: {', '.join(available) or '(none)'}\n"
            "  fix: check data.tfds_name, or prepare it (`bignlp-jax data prepare ...`)"
        )
    try:
        return tfds.builder(name, data_dir=str(data_dir))
    except (ValueError, OSError, AssertionError) as e:  # DatasetNotFoundError is a ValueError;
        # bad version/config; unreadable dataset_info.json. Others are our bugs: traceback.
        raise UserError(f"cannot open TFDS dataset {name!r} in {data_dir}: "
                        f"{str(e).splitlines()[0]}") from e


def _checked_builder(name: str, data_dir: storage.AnyPath, split: str,
                     required_keys: Sequence[str]):
    """The builder of dataset `name`, after checking the split, features and file format."""
    builder = _builder(name, data_dir)
    info = builder.info
    splits = sorted(info.splits.keys())
    base_split = split.split("[")[0]
    if base_split not in splits:
        raise UserError(
            f"dataset {name!r} in {data_dir} has no split {split!r}; it has: {', '.join(splits)}"
        )
    features = sorted(info.features.keys()) if info.features else []
    missing = [k for k in required_keys if k not in features]
    if missing:
        raise UserError(
            f"dataset {name!r} in {data_dir} has no feature {missing[0]!r} "
            f"(features: {', '.join(features)})\n  fix: set data.text_key to one of them"
        )
    formats = {str(getattr(f, "value", f)) for f in [info.file_format] if f is not None}
    if formats and "array_record" not in formats:
        raise UserError(
            f"dataset {name!r} in {data_dir} is stored as {', '.join(formats)}, not array_record; "
            "random access needs ArrayRecord\n  fix: re-prepare it with file_format='array_record'"
        )
    return builder


def open_split(name: str, data_dir: str | Path | None, split: str,
               required_keys: Sequence[str] = ()) -> Sequence[dict]:
    """Random-access source (len, [i]) of the records of `split` of dataset `name`.

    Raises UserError naming what was looked for when the data dir, dataset, split or one of
    `required_keys` (features) is missing, or the dataset is not in ArrayRecord format. A
    dataset in a bucket is read from a local copy (`local_dataset_dir`): ArrayRecord reads
    local files only.
    """
    data_dir = resolve_data_dir(data_dir)
    _checked_builder(name, data_dir, split, required_keys)  # errors name the bucket path
    if storage.is_remote(data_dir):
        data_dir = local_dataset_dir(name, data_dir)
    return _checked_builder(name, data_dir, split, required_keys).as_data_source(split=split)


def split_size(name: str, data_dir: str | Path | None, split: str,
               required_keys: Sequence[str] = ()) -> int:
    """Records in `split` of dataset `name`, from its dataset_info.json alone (no record is
    read: for a dataset in a bucket, nothing is copied)."""
    builder = _checked_builder(name, resolve_data_dir(data_dir), split, required_keys)
    return int(builder.info.splits[split].num_examples)


@functools.cache
def _fetched(name: str, data_dir: str) -> Path:
    return storage.fetch_dir(f"{data_dir.rstrip('/')}/{name.split(':')[0]}").parent


def local_dataset_dir(name: str, data_dir: str | Path) -> Path:
    """A local data dir holding dataset `name`: `data_dir` itself, or (a bucket) a temporary
    copy of the dataset made once per process and removed at exit. Only what reads records
    needs it (tokenizing, task finetuning, tokenizer training); pretraining reads token stores
    by byte ranges (token_store.py)."""
    if not storage.is_remote(data_dir):
        return Path(data_dir)
    return _fetched(name, str(data_dir))


def text_of(record: Mapping, key: str) -> str:
    """The string feature `key` of a record, decoded from UTF-8."""
    value = record[key]
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if hasattr(value, "item"):  # numpy scalar of bytes
        value = value.item()
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    return str(value)

"""Our TFDS builder: documents from Python generators -> a TFDS dataset in ArrayRecord format.

TFDS writes ArrayRecord shards and `dataset_info.json` without TensorFlow, so the result is read
by name with `tfds.data_source(name, data_dir=...)` (or `builder.as_data_source()`) like any
prepared TFDS dataset. Every feature is a string (`tfds.features.Text`). TFDS orders the records
of a split by a hash of their keys, so the stored order is deterministic.

One builder class serves every dataset: `write_dataset` subclasses it with the dataset's name
(outside TFDS's registry, so a user's name never clashes with a catalogue dataset) and runs it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from bignlp_jax.errors import UserError

# Generates one split: yields (unique key, {feature: str}) pairs.
SplitGenerator = Callable[[], Iterable[tuple[str, Mapping[str, str]]]]
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")

log = logging.getLogger(__name__)


def check_name(name: str) -> str:
    """Dataset names become directory and builder names: lower snake_case only."""
    if not NAME_PATTERN.match(name):
        raise UserError(
            f"dataset name {name!r} is not valid: use lower-case letters, digits and '_', "
            "starting with a letter (e.g. my_corpus)"
        )
    return name


def _builder_class(name: str, version: str, fields: tuple[str, ...], description: str,
                   splits: Mapping[str, SplitGenerator]):
    import tensorflow_datasets as tfds  # seconds to import: only when a dataset is written

    # tfds ships no type information, so its base class is Any and mypy checks the keyword
    # against object.__init_subclass__; tfds' registry does take it
    class RecordsBuilder(tfds.core.GeneratorBasedBuilder,  # type: ignore[call-arg]
                         skip_registration=True):
        VERSION = tfds.core.Version(version)
        RELEASE_NOTES = {version: description}
        # TFDS looks for a checksums file next to the builder's code; finding the code of a
        # class inside a package needs `importlib_resources`, which tfds 4.9 only installs on
        # Python < 3.9. We download nothing, so there is no code path to find.
        code_path = None

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description=description,
                features=tfds.features.FeaturesDict(
                    {f: tfds.features.Text() for f in fields}
                ),
            )

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in splits}

        def _generate_examples(self, split):
            for key, record in splits[split]():
                yield key, {f: record[f] for f in fields}

    RecordsBuilder.name = name
    return RecordsBuilder


def write_dataset(name: str, data_dir: str | Path, splits: Mapping[str, SplitGenerator], *,
                  fields: Iterable[str] = ("text",), version: str = "1.0.0",
                  description: str = "", overwrite: bool = False) -> Path:
    """Write `splits` as TFDS dataset `name` (ArrayRecord) under `data_dir`; returns its dir."""
    import tensorflow_datasets as tfds  # seconds to import: only when a dataset is written

    check_name(name)
    fields = tuple(fields)
    out = Path(data_dir) / name / version
    if out.exists():
        if not overwrite:
            raise UserError(f"dataset {name} {version} already exists at {out}\n"
                            "  fix: pass --overwrite, or choose another --name")
        shutil.rmtree(out)
    builder_cls = _builder_class(name, version, fields, description, splits)
    builder = builder_cls(data_dir=str(data_dir), file_format="array_record")
    tfds.disable_progress_bar()
    downloads = tempfile.mkdtemp(prefix="bignlp_tfds_dl_")
    # TFDS prints a "Downloading and preparing" banner to stdout; keep it out of our output.
    banner = io.StringIO()
    try:
        with contextlib.redirect_stdout(banner):
            builder.download_and_prepare(download_dir=downloads)
    except UserError:
        raise
    except AssertionError as e:  # TFDS refuses to write a split without examples
        if "No examples were yielded" not in str(e):
            raise
        raise UserError(f"dataset {name}: {e}\n  fix: give that split some non-empty "
                        "documents") from None
    except Exception as e:  # TFDS wraps generator errors; show the user-facing cause
        cause: BaseException = e
        while (nxt := cause.__cause__ or cause.__context__) is not None:
            if isinstance(nxt, UserError):
                raise nxt from None
            cause = nxt
        raise
    finally:
        shutil.rmtree(downloads, ignore_errors=True)
        # A failed build leaves an empty dataset dir that would look like a broken dataset.
        base = Path(data_dir) / name
        if base.is_dir() and not any(base.rglob("*.array_record*")):
            shutil.rmtree(base, ignore_errors=True)
    log.info(banner.getvalue().strip())
    return out

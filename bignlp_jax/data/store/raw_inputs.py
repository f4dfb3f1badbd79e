"""Raw input files of a corpus (local, gs://, s3://) -> their documents, streamed.

JSON lines, Parquet and plain text (`local_files.EXTENSIONS`), each optionally compressed (.gz,
.bz2, .xz, .zst: a compressed file is decompressed as it is read, never whole in memory). Plain
text splits into documents by `text_unit` as `data prepare` does (file, paragraph, line).
"""

from __future__ import annotations

import bz2
import glob
import gzip
import io
import lzma
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, cast

from bignlp_jax import storage
from bignlp_jax.data.tfds.local_files import EXTENSIONS, FORMATS, _field, json_record
from bignlp_jax.errors import UserError

COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Sorted, de-duplicated files (paths or URLs) matching the globs; UserError if a glob
    matches nothing."""
    found: set[str] = set()
    for pattern in patterns:
        if storage.is_remote(pattern):
            storage.path(pattern)  # the missing-extra error
            import fsspec.core  # bucket inputs only

            fs, key = fsspec.core.url_to_fs(pattern)
            scheme = pattern.split("://")[0]
            matches = [f"{scheme}://{m}" for m in fs.glob(key) if fs.isfile(m)]
        else:
            matches = [str(Path(m).absolute()) for m in glob.glob(
                str(Path(pattern).expanduser()), recursive=True) if Path(m).is_file()]
        if not matches:
            raise UserError(f"--input {pattern!r} matches no files\n"
                            "  fix: check the path; quote globs so the shell does not expand them")
        found.update(matches)
    return sorted(found)


def input_format(url: str, fmt: str | None = None) -> tuple[str, str | None]:
    """(format, compression suffix or None) of an input from its name."""
    name = url.rsplit("/", 1)[-1].lower()
    compression = next((c for c in COMPRESSIONS if name.endswith(c)), None)
    if compression:
        name = name[: -len(compression)]
    if fmt:
        return fmt, compression
    suffix = "." + name.rsplit(".", 1)[-1] if "." in name else ""
    if suffix not in EXTENSIONS:
        raise UserError(f"cannot tell the format of {url} from its name (known: "
                        f"{', '.join(sorted(EXTENSIONS))}, optionally + "
                        f"{', '.join(COMPRESSIONS)})\n  fix: pass --format {'|'.join(FORMATS)}")
    return EXTENSIONS[suffix], compression


@contextmanager
def open_input(url: str, compression: str | None) -> Iterator[IO[bytes]]:
    """The decompressed bytes of an input, as a stream."""
    with storage.path(url).open("rb") as raw:
        if compression == ".gz":
            stream: IO[bytes] = cast(IO[bytes], gzip.GzipFile(fileobj=raw))
        elif compression == ".bz2":
            stream = bz2.BZ2File(raw)
        elif compression == ".xz":
            stream = lzma.LZMAFile(raw)
        elif compression == ".zst":
            try:
                import zstandard  # the `ray` extra: .zst inputs only
            except ImportError:
                raise UserError(f"{url}: reading .zst needs the zstandard package\n"
                                "  fix: pip install 'bignlp_jax[ray]'") from None
            stream = zstandard.ZstdDecompressor().stream_reader(raw)
        else:
            stream = raw
        yield stream


def read_texts(url: str, text_key: str = "text", fmt: str | None = None,
               text_unit: str = "file") -> Iterator[str]:
    """The documents' texts of one input file, in file order."""
    kind, compression = input_format(url, fmt)
    try:
        with open_input(url, compression) as stream:
            if kind == "parquet":
                yield from _parquet(url, stream, text_key)
            elif kind == "jsonl":
                text = io.TextIOWrapper(stream, encoding="utf-8")
                for number, line in enumerate(text, 1):
                    if line.strip():
                        yield _json_text(line, text_key, f"{url}:{number}")
            else:
                data = io.TextIOWrapper(stream, encoding="utf-8").read()
                pieces = {"file": [data], "paragraph": data.split("\n\n"),
                          "line": data.split("\n")}[text_unit]
                yield from (p.strip("\n") for p in pieces if p.strip())
    except (UnicodeDecodeError, EOFError, OSError, lzma.LZMAError) as e:
        if isinstance(e, FileNotFoundError):
            raise UserError(f"input {url} is gone (it matched --input when the build "
                            "started)\n  fix: run the build again") from None
        raise UserError(f"input {url} could not be read as {kind}"
                        f"{' (' + compression + ')' if compression else ''}: "
                        f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                        "\n  fix: check the file, or pass --format") from None


def _json_text(line: str, text_key: str, where: str) -> str:
    return _field(json_record(line, where), text_key, where)


def _parquet(url: str, stream: IO[bytes], text_key: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq  # the `parquet` extra: only for Parquet input
    except ImportError:
        raise UserError(f"{url}: reading Parquet needs pyarrow, which is not installed\n"
                        "  fix: pip install 'bignlp_jax[parquet]'") from None
    if not stream.seekable():  # a compressed Parquet file: its footer is at the end
        stream = io.BytesIO(stream.read())
    try:
        table = pq.ParquetFile(stream)
    except (OSError, ValueError) as e:
        raise UserError(f"{url} is not a readable Parquet file: {e}") from None
    if text_key not in table.schema_arrow.names:
        raise UserError(f"{url} has no column {text_key!r} (columns: "
                        f"{', '.join(table.schema_arrow.names)})\n  fix: pass --text-key")
    for batch in table.iter_batches(columns=[text_key]):
        for i, record in enumerate(batch.to_pylist()):
            yield _field(record, text_key, f"{url} row {i}")

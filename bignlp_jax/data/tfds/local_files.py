"""Local files (plain text, JSON lines, Parquet) -> documents -> a TFDS dataset of ours.

`prepare_local` is what `bignlp-jax data prepare` runs. Documents are dicts of strings: the text
field plus any extra fields asked for (e.g. a label). The validation split is chosen by content,
not position: a document goes to `validation` when sha1(text) falls in the first
`validation_fraction` of the hash range, so adding files never moves old documents between
splits and duplicates never straddle them (unless explicit validation files are given).
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from bignlp_jax.data.tfds.builder import check_name, write_dataset
from bignlp_jax.errors import UserError

FORMATS = ("text", "jsonl", "parquet")
EXTENSIONS = {".txt": "text", ".text": "text", ".md": "text", ".rst": "text",
              ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
TEXT_UNITS = ("file", "paragraph", "line")


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Sorted, de-duplicated files matching the globs; UserError if a glob matches no file."""
    files: set[Path] = set()
    for pattern in patterns:
        matches = [Path(m) for m in glob.glob(str(Path(pattern).expanduser()), recursive=True)]
        matches = [m for m in matches if m.is_file()]
        if not matches:
            raise UserError(f"input {pattern!r} matches no files (relative to {Path.cwd()})\n"
                            "  fix: check the path; quote globs so the shell does not expand them")
        files.update(matches)
    return sorted(files)


def file_format(path: Path, fmt: str | None) -> str:
    if fmt:
        return fmt
    try:
        return EXTENSIONS[path.suffix.lower()]
    except KeyError:
        raise UserError(f"cannot tell the format of {path} from its extension "
                        f"(known: {', '.join(sorted(EXTENSIONS))})\n"
                        f"  fix: pass --format {'|'.join(FORMATS)}") from None


def _decode(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if b"\0" in data[:8192]:  # text in any encoding has no NUL bytes: not a text file
            raise UserError(f"{path} is a binary file, not text (NUL byte at offset "
                            f"{data.index(0)})\n  fix: leave it out of --input (narrow the glob "
                            "or pass --format), or give the text it was made from") from None
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{path} is not UTF-8 text: byte {e.start} (line {line}) is "
                        f"0x{data[e.start]:02x}\n  fix: convert it, e.g. "
                        f"`iconv -f latin1 -t utf-8 {path}`") from None


def _field(record: dict, key: str, where: str) -> str:
    if key not in record:
        raise UserError(f"{where} has no field {key!r} (fields: {', '.join(sorted(record))})\n"
                        "  fix: pass --text-key (and --fields) naming fields that exist")
    value = record[key]
    if value is None:
        raise UserError(f"{where}: field {key!r} is null, expected a string")
    if isinstance(value, (dict, list)):  # e.g. chat `messages`: kept as JSON text
        return json.dumps(value, ensure_ascii=False)
    return value if isinstance(value, str) else str(value)


def json_record(line: str, where: str) -> dict:
    """One JSON-lines record (an object), or a UserError naming `where` (file:line)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where} is not valid JSON: {e.msg}") from None
    if not isinstance(record, dict):
        raise UserError(f"{where} holds a JSON {type(record).__name__}, expected an object")
    return record


def read_documents(path: Path, fmt: str, fields: Sequence[str],
                   text_unit: str = "file") -> Iterator[dict[str, str]]:
    """Documents of one file: {field: str} for each of `fields` (fields[0] is the text)."""
    text_key = fields[0]
    if fmt == "text":
        text = _decode(path.read_bytes(), path)
        if text_unit == "file":
            pieces = [text]
        elif text_unit == "paragraph":
            pieces = text.split("\n\n")
        else:
            pieces = text.split("\n")
        for piece in pieces:
            if piece.strip():
                yield {text_key: piece.strip("\n")}
    elif fmt == "jsonl":
        for number, line in enumerate(_decode(path.read_bytes(), path).split("\n"), 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            record = json_record(line, where)
            yield {k: _field(record, k, where) for k in fields}
    elif fmt == "parquet":
        try:
            import pyarrow.parquet as pq  # the `parquet` extra: only for Parquet input
        except ImportError:
            raise UserError(f"{path}: reading Parquet needs pyarrow, which is not installed\n"
                            "  fix: pip install 'bignlp_jax[parquet]'") from None

        try:
            table = pq.ParquetFile(path)
        except (OSError, ValueError) as e:  # ArrowInvalid is a ValueError, ArrowIOError OSError
            raise UserError(f"{path} is not a readable Parquet file: {e}") from e
        columns = table.schema_arrow.names
        missing = [k for k in fields if k not in columns]
        if missing:
            raise UserError(f"{path} has no column {missing[0]!r} (columns: {', '.join(columns)})"
                            "\n  fix: pass --text-key (and --fields) naming columns that exist")
        for batch in table.iter_batches(columns=list(fields)):
            for i, record in enumerate(batch.to_pylist()):
                yield {k: _field(record, k, f"{path} row {i}") for k in fields}
    else:
        raise UserError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def iter_documents(files: Sequence[Path], fmt: str | None, fields: Sequence[str],
                   text_unit: str = "file") -> Iterator[tuple[str, dict[str, str]]]:
    """(unique key, document) for every document of every file, in file order."""
    for file_index, path in enumerate(files):
        for doc_index, doc in enumerate(read_documents(path, file_format(path, fmt), fields,
                                                       text_unit)):
            yield f"{file_index:06d}:{doc_index:09d}", doc


def _bucket(text: str) -> float:
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:12], 16) / 16**12


def prepare_local(inputs: Sequence[str], name: str, data_dir: str | Path, *,
                  fmt: str | None = None, text_key: str = "text", fields: Sequence[str] = (),
                  text_unit: str = "file", validation_fraction: float = 0.05,
                  validation_inputs: Sequence[str] = (), overwrite: bool = False) -> dict:
    """Turn local files into TFDS dataset `name` (train/validation) under `data_dir`."""
    check_name(name)
    if not 0 < validation_fraction < 1 and not validation_inputs:
        raise UserError(f"--validation-fraction {validation_fraction} must be in (0, 1)")
    all_fields = (text_key, *[f for f in fields if f != text_key])
    files = expand_inputs(inputs)
    val_files = expand_inputs(validation_inputs) if validation_inputs else []

    def docs(paths):
        return iter_documents(paths, fmt, all_fields, text_unit)

    if val_files:
        splits = {"train": lambda: docs(files), "validation": lambda: docs(val_files)}
    else:
        # A first pass checks there is text and that neither split ends up empty (tiny inputs:
        # the lowest hash goes to validation, the highest to train).
        buckets = sorted(_bucket(doc[text_key]) for _, doc in docs(files))
        if len(buckets) < 2:
            raise UserError(f"{', '.join(inputs)} holds {len(buckets)} document(s); a train and "
                            "a validation split need at least 2 (see --text-unit)")
        threshold = min(max(validation_fraction, buckets[0] + 1e-12), buckets[-1])

        def split_docs(validation: bool):
            return lambda: ((k, d) for k, d in docs(files)
                            if (_bucket(d[text_key]) < threshold) == validation)

        splits = {"train": split_docs(False), "validation": split_docs(True)}
    out = write_dataset(name, data_dir, splits, fields=all_fields, overwrite=overwrite,
                        description=f"local files: {', '.join(inputs)}")
    with open(out / "dataset_info.json") as f:
        info = json.load(f)
    sizes = {s["name"]: int(sum(int(n) for n in s.get("shardLengths", []))) for s in info["splits"]}
    return {"name": name, "path": str(out), "splits": sizes, "fields": list(all_fields),
            "files": len(files) + len(val_files)}

"""Streaming safetensors: write a model tensor by tensor, split into shards, and read it back.

The safetensors format is an 8-byte little-endian header length, a JSON header (name -> dtype,
shape, byte range), then the raw bytes in header order. Because every shape is known from the
model config before any data exists, we write the header first and then append each tensor as
it is gathered, so host memory holds one tensor (or one layer of one), never a whole shard. The
`safetensors` library writes only whole dicts, hence this small writer; reading uses the library.

Above `max_shard_bytes` the tensors are split over `model-0000i-of-0000n.safetensors` plus a
`model.safetensors.index.json` (the layout `transformers` loads), in the order given.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from jax.numpy import bfloat16  # ml_dtypes' bfloat16, which numpy arrays can hold
from safetensors import safe_open

from bignlp_jax.containment import contained
from bignlp_jax.errors import UserError

DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(bfloat16),
          "F16": np.dtype(np.float16)}
TAGS = {v: k for k, v in DTYPES.items()}
INDEX = ".safetensors.index.json"
_WEIGHT_FILE = re.compile(r"[^/\\\0]+\.safetensors")  # a file name, no folder part
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes (decimal units, as transformers uses)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise UserError(f"cannot read the size {text!r}: expected e.g. 5GB, 500MB, 2GiB or bytes")
    unit = m.group(2).upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    return int(float(m.group(1)) * base**power)


@dataclass(frozen=True)
class Spec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class ShardedWriter:
    """Write tensors (declared up front as `Spec`s) into one or more safetensors files.

    Call `add(name, part)` in spec order; a tensor may arrive in several parts that are
    consecutive in C order (e.g. the layers of a stacked parameter). `close()` checks that
    everything arrived and writes the index when there are several files."""

    def __init__(self, out_dir: str | Path, specs: Iterable[Spec], max_shard_bytes: int,
                 prefix: str = "model", metadata: dict[str, str] | None = None):
        self.out_dir, self.prefix = Path(out_dir), prefix
        self.metadata = {"format": "pt", **(metadata or {})}  # transformers wants format=pt
        self.specs = list(specs)
        self.files: list[list[Spec]] = [[]]
        size = 0
        for spec in self.specs:  # greedy: start a new file when this tensor would overflow
            if self.files[-1] and size + spec.nbytes > max_shard_bytes:
                self.files.append([])
                size = 0
            self.files[-1].append(spec)
            size += spec.nbytes
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._queue = [(f, s) for f, specs in enumerate(self.files) for s in specs]
        self._pos, self._written, self._file_index = 0, 0, -1
        self._file: BinaryIO | None = None

    def file_name(self, index: int) -> str:
        n = len(self.files)
        return f"{self.prefix}.safetensors" if n == 1 else (
            f"{self.prefix}-{index + 1:05d}-of-{n:05d}.safetensors")

    def _open(self, index: int) -> None:
        if self._file is not None:
            self._file.close()
        header: dict[str, object] = {}
        offset = 0
        for spec in self.files[index]:
            header[spec.name] = {"dtype": TAGS[spec.dtype], "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        header["__metadata__"] = self.metadata
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the library writes
        self._file = open(self.out_dir / self.file_name(index), "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._file_index = index

    def add(self, name: str, part: np.ndarray) -> None:
        if self._pos >= len(self._queue):
            raise ValueError(f"tensor {name} written after all declared tensors")
        index, spec = self._queue[self._pos]
        if name != spec.name or part.dtype != spec.dtype:
            raise ValueError(f"expected {spec.name} ({spec.dtype}), got {name} ({part.dtype})")
        if index != self._file_index:
            self._open(index)
        data = np.ascontiguousarray(part).tobytes()
        self._written += len(data)
        if self._written > spec.nbytes:
            raise ValueError(f"{name}: more bytes than its shape {spec.shape} holds")
        assert self._file is not None  # opened above for this tensor's file
        self._file.write(data)
        if self._written == spec.nbytes:
            self._pos, self._written = self._pos + 1, 0

    def close(self) -> list[Path]:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._pos != len(self._queue):
            missing = [s.name for _, s in self._queue[self._pos:]]
            raise ValueError(f"export stopped before writing {', '.join(missing[:5])}")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": sum(s.nbytes for s in self.specs)},
                     "weight_map": {s.name: self.file_name(f) for f, s in self._queue}}
            (self.out_dir / f"{self.prefix}{INDEX}").write_text(json.dumps(index, indent=2) + "\n")
        return [self.out_dir / self.file_name(i) for i in range(len(self.files))]


def _weight_files(index: Path) -> list[str]:
    """The weight files an index names: plain `*.safetensors` names in its own folder, the only
    files the format defines (a path, absolute or relative, is refused before anything opens)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = set(weight_map.values())
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{index} is not a safetensors index (JSON with a `weight_map` of tensor "
                        "name -> file name)") from None
    for name in sorted(names, key=str):
        if not isinstance(name, str) or not _WEIGHT_FILE.fullmatch(name):
            raise UserError(f"{index} names {name!r}: not a weight file of its folder (expected "
                            f"a plain *.safetensors name in {index.parent}); refused")
    return sorted(names)


class SafetensorsDir:
    """The tensors of a directory's `<prefix>.safetensors` or sharded files with an index."""

    def __init__(self, directory: str | Path, prefix: str = "model"):
        self.directory = Path(directory)
        single = contained(self.directory, f"{prefix}.safetensors")
        index = contained(self.directory, f"{prefix}{INDEX}")
        if index.is_file():
            files = _weight_files(index)
        elif single.is_file():
            files = [single.name]
        else:
            raise UserError(
                f"no {single.name} or {index.name} in {self.directory} (only safetensors weights "
                "are read; convert a pytorch_model.bin with transformers' save_pretrained first)"
            )
        self._stack = ExitStack()
        self._where: dict[str, safe_open] = {}
        for name in files:
            path = contained(self.directory, name, named_by=index)
            if not path.is_file():
                raise UserError(f"{index} lists {name}, which does not exist")
            handle = self._stack.enter_context(safe_open(str(path), framework="numpy"))
            for key in handle.keys():
                self._where[key] = handle

    def names(self) -> list[str]:
        return list(self._where)

    def dtype_tag(self, name: str) -> str:
        return self._where[name].get_slice(name).get_dtype()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        return self._where[name].get_tensor(name)

    def get_slice(self, name: str, index) -> np.ndarray:
        return self._where[name].get_slice(name)[index]

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> SafetensorsDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

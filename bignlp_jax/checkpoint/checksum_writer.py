"""Writing a step's checksum lists at save (their format and the checks: integrity.py).

Each process, once its own writes are done, lists the files it wrote (`ChecksumAfter`, an
Orbax commit future); the primary process lists the rest of `state/` at finalize, and then the
step's other items (data positions, metadata) under names relative to `state/` (`../data/...`).
The local tier computes its sums while writing its shard files and records them with
`write_listing`.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from pathlib import Path
from typing import Any

import google_crc32c

from bignlp_jax import storage
from bignlp_jax.checkpoint.integrity import (
    ALGORITHM,
    PRIMARY,
    PROCESS_DIR,
    PROCESS_PATTERN,
    SELF_KEY,
    SKIPPED,
    STEP_ITEMS,
    canonical,
    crc32c_file,
    read_list,
)


def _sums(root: Path, files: list[Path]) -> dict[str, list[int]]:
    return {f.relative_to(root).as_posix(): [storage.size(f), crc32c_file(f)] for f in files}


def _write_json(path: Path, record: dict) -> None:
    """Write a checksum list with a CRC-32C of its own canonical JSON (integrity.read_list
    checks it)."""
    body = canonical({k: v for k, v in record.items() if k != SELF_KEY})
    text = canonical({**record, SELF_KEY: google_crc32c.value(body.encode())})
    # no fsync, like Orbax's own files: on ext4 it would flush the whole step's data (0.9 s for
    # 128 MiB), and durability of the step is the file system's and Orbax's business
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _item_dir(step: Path, item: str) -> Path | None:
    """An item's directory in a step: its own name, or during Orbax's finalize possibly still
    its temporary name (`<item>.orbax-checkpoint-tmp-<n>`, renamed item by item)."""
    if (step / item).is_dir():
        return step / item
    pending = sorted(step.glob(f"{item}.orbax-checkpoint-tmp*"))
    return pending[-1] if pending else None


def _step_item_sums(state_dir: Path) -> dict[str, list[int]]:
    """Sums of the step's other items' files (data positions, metadata), named as they will
    be once the step is in place (`../data/...`, relative to `state/`)."""
    sums = {}
    for item in STEP_ITEMS:
        if (root := _item_dir(state_dir.parent, item)) is None:
            continue
        for f in storage.files_under(root):
            if f.name not in SKIPPED:
                name = posixpath.join("..", item, f.relative_to(root).as_posix())
                sums[name] = [storage.size(f), crc32c_file(f)]
    return sums


def write_process_sums(state_dir: Path, process_index: int) -> None:
    """Checksum the files this process wrote (its own OCDBT directory), if it has one."""
    own = state_dir / PROCESS_DIR.format(process_index)
    files = storage.files_under(own) if own.is_dir() else []
    _write_json(state_dir / PROCESS_PATTERN.format(process_index),
                {"algorithm": ALGORITHM, "files": _sums(state_dir, files)})


def write_primary_sums(state_dir: Path, process_count: int,
                       processes: list[int] | None = None) -> None:
    """Checksum every file of `state/` outside the per-process directories (primary only).
    `processes`: whose per-process sums the step holds (default all; a local-tier step holds
    only its own process's, see local_tier.py)."""
    files = [
        p for p in storage.files_under(state_dir)
        if p.name not in SKIPPED and not p.name.startswith("checksums.")
        and not p.relative_to(state_dir).parts[0].startswith("ocdbt.process_")
    ]
    record = {"algorithm": ALGORITHM, "process_count": process_count,
              "files": {**_sums(state_dir, files), **_step_item_sums(state_dir)}}
    if processes is not None:
        record["processes"] = processes
    _write_json(state_dir / PRIMARY, record)


def write_listing(state_dir: Path, files: dict[str, tuple[int, int]], process_count: int,
                  processes: list[int]) -> None:
    """Record sums computed by the writer itself (name -> (size, crc)) as the step's primary
    list; `processes`: whose per-process lists the step also holds (the local tier's shard
    files, shard_files.py, sum their bytes while writing them and hold none)."""
    _write_json(state_dir / PRIMARY, {
        "algorithm": ALGORITHM, "process_count": process_count, "processes": processes,
        "files": {name: [size, crc] for name, (size, crc) in files.items()}})


def add_step_items(state_dir: Path) -> None:
    """Add the step's data positions and metadata to its primary list (at finalize, once
    they are written: the local tier's lists are written with the shard files, before)."""
    record = read_list(state_dir / PRIMARY)
    record["files"] = {**record["files"], **_step_item_sums(state_dir)}
    _write_json(state_dir / PRIMARY, record)


class ChecksumAfter:
    """An Orbax commit future: waits for this process's write futures, then checksums what it
    wrote. Runs in Orbax's background save thread, before the cross-process barrier.

    `on_failure(error)` is called with any error of this process's writes before it is
    re-raised: where this process alone fails, Orbax would next wait at a barrier for the
    others, who wait at theirs for this process's commit (see RunCheckpointer)."""

    def __init__(self, futures: list[Any] | None, directory: Any, process_index: int,
                 on_failure: Callable[[BaseException], None] | None = None):
        self.futures = list(futures or [])
        self.directory = directory  # a Path, or Orbax's PathAwaitingCreation (has .path)
        self.process_index = process_index
        self.on_failure = on_failure

    def result(self, timeout: float | None = None) -> None:
        try:
            for f in self.futures:
                f.result(timeout=timeout)
            write_process_sums(
                storage.path(str(getattr(self.directory, "path", self.directory))),
                self.process_index)
        except Exception as e:
            if self.on_failure is not None:
                self.on_failure(e)
            raise

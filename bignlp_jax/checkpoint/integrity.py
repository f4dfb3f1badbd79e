"""Checksums of a checkpoint's array files: written with every save, verified before a restore.

TensorStore checks the structure of an OCDBT database (manifests and b-tree nodes carry CRCs)
but not the array chunks themselves, so a flipped bit in a data file restores silently as a
slightly different number. Every save therefore records the CRC-32C and size of each file under
`<step>/state/`, and a restore recomputes them first:

- each process, once its own writes are done, checksums the files it wrote
  (`state/ocdbt.process_<i>/...`) into `state/checksums.process_<i>.json`;
- the primary process, in Orbax's finalize step (after every process finished, before the step
  directory is renamed into place), checksums the rest of `state/` (the merged OCDBT manifest
  and the metadata files) into `state/checksums.primary.json`, with the process count.

- at finalize, the rest of the step is added to the primary list: every process's data position
  (`data/process_<i>-of-<n>.json`) and the step's metadata (`meta/metadata`), under names
  relative to `state/` (`../data/...`); a local-tier step does the same (shard_files.py).

Both happen inside Orbax's temporary directory, so a step that looks complete always carries its
checksums. The checksum lists carry a CRC-32C of their own canonical JSON, so a flipped bit in
a list is caught too. Left out: Orbax's commit markers and step metadata (`commit_success.txt`,
`_CHECKPOINT_METADATA`), written after finalize and never read by a restore. A step written
before checksums existed has none and is restored unverified (with a note). The same lists make
a cheap completeness test (every listed file present) that catches a step half-deleted by a kill
during Orbax's cleanup of old steps, or a data position or metadata file gone missing.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import jax
import numpy as np
from jax.experimental import multihost_utils

from bignlp_jax import storage

PRIMARY = "checksums.primary.json"
PROCESS_PATTERN = "checksums.process_{}.json"
PROCESS_DIR = "ocdbt.process_{}"
ALGORITHM = "crc32c"
CHUNK = 8 * 2**20
# written or rewritten by Orbax after finalize (commit markers, step metadata): never read by a
# restore, and not yet there when the sums are taken
SKIPPED = {"commit_success.txt", "_CHECKPOINT_METADATA"}
# the step's other items, checksummed with the state at finalize (names relative to state/)
STEP_ITEMS = ("data", "meta")
SELF_KEY = "crc32c"  # a list's checksum of its own canonical JSON
LIST_KEYS = {"algorithm", "files", "process_count", "processes", SELF_KEY}


def crc32c_file(path: Path) -> int:
    """CRC-32C of a file, read in 8 MiB chunks (about 4 GB/s with the C extension)."""
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            crc = google_crc32c.extend(crc, chunk)
    return crc


def _sums(root: Path, files: list[Path]) -> dict[str, list[int]]:
    return {f.relative_to(root).as_posix(): [storage.size(f), crc32c_file(f)] for f in files}


def _canonical(record: dict) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def _write_json(path: Path, record: dict) -> None:
    """Write a checksum list with a CRC-32C of its own canonical JSON (see `_read_json`)."""
    body = _canonical({k: v for k, v in record.items() if k != SELF_KEY})
    text = _canonical({**record, SELF_KEY: google_crc32c.value(body.encode())})
    # no fsync, like Orbax's own files: on ext4 it would flush the whole step's data (0.9 s for
    # 128 MiB), and durability of the step is the file system's and Orbax's business
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _read_json(path: Path) -> dict:
    """A checksum list, checked against its own CRC: the text must be exactly the canonical JSON
    that was written, so any changed byte fails. Lists written before they carried a CRC have
    none (and only the keys of that time); ValueError for anything else."""
    text = path.read_text(encoding="utf-8")
    record = json.loads(text)
    if not isinstance(record, dict) or not set(record) <= LIST_KEYS:
        raise ValueError(f"{path.name} is not a checksum list")
    if SELF_KEY in record:
        body = _canonical({k: v for k, v in record.items() if k != SELF_KEY})
        if text != _canonical(record) or record[SELF_KEY] != google_crc32c.value(body.encode()):
            raise ValueError(f"{path.name} fails its own checksum: it changed after it was "
                             "written")
    if record.get("algorithm") != ALGORITHM:
        raise ValueError(f"{path.name} names algorithm {record.get('algorithm')!r}, not "
                         f"{ALGORITHM!r}")
    return record


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


def listed_path(state_dir: Path, name: str) -> Path:
    """The file a listed name (relative to `state/`) stands for. `..` is resolved here: bucket
    paths (gs://, s3://) take it literally as part of an object name."""
    if name.startswith("../"):
        return state_dir.parent / name[len("../"):]
    return state_dir / name


def shown(name: str) -> str:
    """A listed name (relative to `state/`) as the step-relative path messages show."""
    return posixpath.normpath(posixpath.join("state", name))


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
    record = _read_json(state_dir / PRIMARY)
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


@dataclass(frozen=True)
class Listing:
    """The checksums recorded for one step's state: relative path -> (size, crc)."""

    files: dict[str, tuple[int, int]]
    problem: str | None  # a missing or unreadable checksum file


def read_listing(state_dir: Path) -> Listing | None:
    """What the step recorded, or None for a step written without checksums."""
    primary = state_dir / PRIMARY
    process_files = sorted(state_dir.glob(PROCESS_PATTERN.format("*")))
    if not primary.is_file() and not process_files:
        return None
    current = primary
    try:
        head = _read_json(primary)
        files = dict(head["files"])
        for i in head.get("processes", range(int(head["process_count"]))):
            current = state_dir / PROCESS_PATTERN.format(i)
            files.update(_read_json(current)["files"])
        return Listing({k: (int(v[0]), int(v[1])) for k, v in files.items()}, None)
    except FileNotFoundError:
        return Listing({}, f"state/{current.name} is missing (a checksum list of the step)")
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        return Listing({}, f"state/{current.name} (a checksum list of the step) is damaged or "
                           f"unreadable: {e}")


def missing_file(step_dir: Path) -> str | None:
    """Cheap (stat only): None if every file the step's checksums list exists; else the first
    missing one. Steps without checksums pass. (A damaged file is `verify`'s business.)"""
    state_dir = storage.path(step_dir) / "state"
    listing = read_listing(state_dir)
    if listing is None:
        return None
    if listing.problem:
        return listing.problem
    for name in sorted(listing.files):
        if not listed_path(state_dir, name).is_file():
            return f"{shown(name)} is missing"
    return None


def check_file(state_dir: Path, name: str, size: int, crc: int) -> str | None:
    """None if the file matches its record; else what is wrong with it."""
    path, where = listed_path(state_dir, name), shown(name)
    try:
        have_size = storage.size(path)
        if have_size != size:
            return f"{where} has {have_size} bytes; {size} were written"
        have = crc32c_file(path)
    except FileNotFoundError:
        return f"{where} is missing"
    except OSError as e:
        return f"{where} cannot be read ({e.strerror or e})"
    if have != crc:
        return (f"{where} fails its checksum (crc32c {have:08x}, recorded at save "
                f"{crc:08x}): the file changed after it was written")
    return None


def verify(step_dir: Path, share: tuple[int, int] = (0, 1)) -> tuple[int, str] | None:
    """Recompute the checksums of this process's `share` (index, count) of the step's files.

    Returns (position in the sorted file list, problem) for the first bad file, or None.
    Position -1: the checksum lists themselves are broken."""
    state_dir = storage.path(step_dir) / "state"
    listing = read_listing(state_dir)
    if listing is None:
        return None
    if listing.problem:
        return -1, listing.problem
    index, count = share
    for position, (name, (size, crc)) in enumerate(sorted(listing.files.items())):
        if position % count == index and (problem := check_file(state_dir, name, size, crc)):
            return position, problem
    return None


def verify_items(step_dir: Path) -> str | None:
    """Check only the step's data positions and metadata against its list (the local tier
    checks its shard files from the bytes it loads); None, or the first problem."""
    state_dir = storage.path(step_dir) / "state"
    listing = read_listing(state_dir)
    if listing is None:
        return None
    if listing.problem:
        return listing.problem
    for name, (size, crc) in sorted(listing.files.items()):
        if name.startswith("../") and (problem := check_file(state_dir, name, size, crc)):
            return problem
    return None


def problem_at(step_dir: Path, position: int) -> str:
    """The problem with file number `position` (as `verify` numbers them), recomputed here so
    every process can print the same message."""
    state_dir = storage.path(step_dir) / "state"
    listing = read_listing(state_dir)
    if listing is None:
        return "its checksum list disappeared"
    if listing.problem:
        return listing.problem
    name, (size, crc) = sorted(listing.files.items())[position]
    return check_file(state_dir, name, size, crc) or f"{shown(name)} fails its checksum"


def has_checksums(step_dir: Path) -> bool:
    return read_listing(storage.path(step_dir) / "state") is not None


def verify_step(step_dir: Path) -> str | None:
    """Verify a whole step, the files shared out among the processes (each reads 1/N of them);
    every process gets the same answer: None, or the first bad file's problem."""
    count = jax.process_count()
    found = verify(step_dir, (jax.process_index(), count))
    if count == 1:
        return found[1] if found else None
    mine = np.array([found[0] if found else np.iinfo(np.int32).max], np.int32)
    first = int(np.min(multihost_utils.process_allgather(mine)))
    if first == np.iinfo(np.int32).max:
        return None
    return found[1] if found and found[0] == first else problem_at(step_dir, first)

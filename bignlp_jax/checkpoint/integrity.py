"""Checksums of a checkpoint's array files: written with every save (checksum_writer.py),
verified before a restore (here, with the lists' format).

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
STATE = "state"  # the step item the lists sit in (checkpoint/paths.py names the same)
# a check of one listed file: (state_dir, name, size, crc) -> None, or what is wrong with it
Check = Callable[[Path, str, int, int], str | None]


def crc32c_file(path: Path) -> int:
    """CRC-32C of a file, read in 8 MiB chunks (about 4 GB/s with the C extension)."""
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            crc = google_crc32c.extend(crc, chunk)
    return crc


def canonical(record: dict) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def read_list(path: Path) -> dict:
    """A checksum list (checksum_writer.py writes them), checked against its own CRC: the text
    must be exactly the canonical JSON that was written, so any changed byte fails. Lists
    written before they carried a CRC have none (and only the keys of that time); ValueError
    for anything else."""
    text = path.read_text(encoding="utf-8")
    record = json.loads(text)
    if not isinstance(record, dict) or not set(record) <= LIST_KEYS:
        raise ValueError(f"{path.name} is not a checksum list")
    if SELF_KEY in record:
        body = canonical({k: v for k, v in record.items() if k != SELF_KEY})
        if text != canonical(record) or record[SELF_KEY] != google_crc32c.value(body.encode()):
            raise ValueError(f"{path.name} fails its own checksum: it changed after it was "
                             "written")
    if record.get("algorithm") != ALGORITHM:
        raise ValueError(f"{path.name} names algorithm {record.get('algorithm')!r}, not "
                         f"{ALGORITHM!r}")
    return record


def listed_path(state_dir: Path, name: str) -> Path:
    """The file a listed name (relative to `state/`) stands for. `..` is resolved here: bucket
    paths (gs://, s3://) take it literally as part of an object name."""
    if name.startswith("../"):
        return state_dir.parent / name[len("../"):]
    return state_dir / name


def shown(name: str) -> str:
    """A listed name (relative to `state/`) as the step-relative path messages show."""
    return posixpath.normpath(posixpath.join("state", name))


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
        head = read_list(primary)
        files = dict(head["files"])
        for i in head.get("processes", range(int(head["process_count"]))):
            current = state_dir / PROCESS_PATTERN.format(i)
            files.update(read_list(current)["files"])
        return Listing({k: (int(v[0]), int(v[1])) for k, v in files.items()}, None)
    except FileNotFoundError:
        return Listing({}, f"state/{current.name} is missing (a checksum list of the step)")
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        return Listing({}, f"state/{current.name} (a checksum list of the step) is damaged or "
                           f"unreadable: {e}")


def missing_file(step_dir: Path) -> str | None:
    """Cheap (stat only): None if every file the step's checksums list exists; else the first
    missing one. Steps without checksums pass. (A damaged file is `verify`'s business.)"""
    found = _first_problem(step_dir, _absent)
    return found[1] if found else None


def _absent(state_dir: Path, name: str, size: int, crc: int) -> str | None:
    return None if listed_path(state_dir, name).is_file() else f"{shown(name)} is missing"


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


def _first_problem(step_dir: Path, check: Check,
                   wanted: Callable[[int, str], bool] = lambda position, name: True
                   ) -> tuple[int, str] | None:
    """The one reader of a step's lists for the checks below: (position in the sorted file
    list, problem) of the first file `wanted` picks that `check` finds wrong; position -1 when
    the lists themselves are missing or broken; None when all is well or the step has no
    checksums."""
    state_dir = storage.path(step_dir) / STATE
    listing = read_listing(state_dir)
    if listing is None:
        return None
    if listing.problem:
        return -1, listing.problem
    for position, (name, (size, crc)) in enumerate(sorted(listing.files.items())):
        if wanted(position, name) and (problem := check(state_dir, name, size, crc)):
            return position, problem
    return None


def verify(step_dir: Path, share: tuple[int, int] = (0, 1)) -> tuple[int, str] | None:
    """Recompute the checksums of this process's `share` (index, count) of the step's files.

    Returns (position in the sorted file list, problem) for the first bad file, or None.
    Position -1: the checksum lists themselves are broken."""
    index, count = share
    return _first_problem(step_dir, check_file,
                          lambda position, name: position % count == index)


def verify_items(step_dir: Path) -> str | None:
    """Check only the step's data positions and metadata against its list (the local tier
    checks its shard files from the bytes it loads); None, or the first problem."""
    found = _first_problem(step_dir, check_file,
                           lambda position, name: name.startswith("../"))
    return found[1] if found else None


def problem_at(step_dir: Path, position: int) -> str:
    """The problem with file number `position` (as `verify` numbers them), recomputed here so
    every process can print the same message."""
    state_dir = storage.path(step_dir) / STATE
    listing = read_listing(state_dir)
    if listing is None:
        return "its checksum list disappeared"
    if listing.problem:
        return listing.problem
    name, (size, crc) = sorted(listing.files.items())[position]
    return check_file(state_dir, name, size, crc) or f"{shown(name)} fails its checksum"


def has_checksums(step_dir: Path) -> bool:
    return read_listing(storage.path(step_dir) / STATE) is not None


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

"""Files named inside an input folder stay inside it.

Model folders, run directories and token stores come from elsewhere (a download, a colleague,
a shared bucket), and the files in them name other files: a safetensors index names weight
files, a run's config names its tokenizer, a manifest names its chunks. Every such name is
resolved here before anything opens it, and refused unless it stays under its folder:

- an absolute name (`/etc/passwd`, `gs://other/x`) or one that climbs out (`../x`);
- a local symlink (the name itself or any folder on the way) whose target lies outside;
- a device, pipe or socket (`/dev/zero` would hang a reader): no format we read has one.

A refusal is one `UserError` line naming the file and the folder, raised before the file is
opened. Bucket paths (gs://, s3://) have no symlinks; their names are checked the same way.
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Iterator
from pathlib import Path

from bignlp_jax import storage
from bignlp_jax.errors import UserError

_REFUSED = "refused: only files inside the folder are read"


def contained(folder: str | os.PathLike, name: str, named_by: str | os.PathLike | None = None
              ) -> storage.AnyPath:
    """`folder/name`, after checking that it stays inside `folder` (see the module docstring).

    `named_by`: the file whose content gave `name` (an index, a manifest), for the message.
    Returns the path unresolved (messages keep the folder's spelling); raises `UserError`."""
    where = f"{named_by} names {name!r}" if named_by is not None else repr(name)
    if not isinstance(name, str) or not name or "\0" in name:
        raise UserError(f"{where}: not a file name inside {folder}; {_REFUSED}")
    if "://" in name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UserError(f"{where}: an absolute path, not a file inside {folder}; {_REFUSED}")
    normal = posixpath.normpath(name.replace("\\", "/"))
    if normal == ".." or normal.startswith("../"):
        raise UserError(f"{where}: leads outside {folder}; {_REFUSED}")
    if storage.is_remote(folder):
        return storage.path(str(folder).rstrip("/") + "/" + normal)
    base = Path(folder)
    candidate = base / name
    resolved = candidate.resolve()
    if not resolved.is_relative_to(base.resolve()):
        raise UserError(f"{where}: a symlink in {folder} that leads outside it (to {resolved}); "
                        f"{_REFUSED}")
    try:
        mode = resolved.stat().st_mode
    except OSError:
        return candidate  # missing: the caller says what it expected there
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise UserError(f"{where} in {folder}: not a regular file (a device, pipe or socket); "
                        f"{_REFUSED}")
    return candidate


def check_tree(folder: str | os.PathLike, within: str | os.PathLike | None = None) -> None:
    """Refuse a local directory tree holding a symlink that leads outside `within` (default:
    the tree itself) or a device, pipe or socket. Bucket paths: nothing to check."""
    if storage.is_remote(folder):
        return
    base = Path(within if within is not None else folder)
    root = Path(folder)
    for entry in _walk(root):
        contained(base, os.path.relpath(entry, base))


def _walk(root: Path) -> Iterator[Path]:
    """Every entry below `root` (symlinked folders are listed, not entered)."""
    for here, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            yield Path(here) / name

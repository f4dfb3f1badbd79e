"""Fail fast on output paths that cannot be written, before any model is built.

One check for every place that writes (run.dir, a pipeline's output_dir, `export --out`), so a
read-only or mistyped path costs a second and one readable line, not a build and a traceback.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from bignlp_jax.errors import UserError


def require_writable(path: str | Path, what: str, fix_key: str) -> None:
    """Prove a file can be written in `path`, or (where it does not exist yet) in its nearest
    existing parent, so it can be made; UserError naming `what` (e.g. "run.dir"), the path, the
    OS's reason and `fix_key` (e.g. "run.dir=DIR") if not. The probe leaves nothing behind: a
    start that stops later finds the disk as it was."""
    if "://" in str(path):  # object storage (gs://...): the checkpointer reports its errors
        return
    path = Path(path)
    try:
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write_probe."):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        where = f" at {e.filename}" if e.filename and Path(e.filename) != path else ""
        raise UserError(
            f"{what} {path} is not writable: {reason} (errno {e.errno}){where}\n"
            f"  fix: give a directory you can write to ({fix_key}), or fix its permissions"
            + (f" (user id {os.getuid()})" if hasattr(os, "getuid") else "")
        ) from e

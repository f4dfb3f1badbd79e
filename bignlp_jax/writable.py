"""Fail fast on output paths that cannot be written, before any model is built.

One check for every place that writes (run.dir, a pipeline's output_dir, `export --out`), so a
read-only or mistyped path costs a second and one readable line, not a build and a traceback.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from bignlp_jax.errors import UserError


def require_writable(path: str | Path, what: str, fix_key: str) -> None:
    """Create `path` if needed and prove a file can be written in it; UserError naming `what`
    (e.g. "run.dir"), the path, the OS's reason and `fix_key` (e.g. "run.dir=DIR") if not."""
    if "://" in str(path):  # object storage (gs://...): the checkpointer reports its errors
        return
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_probe."):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        where = f" at {e.filename}" if e.filename and Path(e.filename) != path else ""
        raise UserError(
            f"{what} {path} is not writable: {reason} (errno {e.errno}){where}\n"
            f"  fix: give a directory you can write to ({fix_key}), or fix its permissions"
            + (f" (user id {os.getuid()})" if hasattr(os, "getuid") else "")
        ) from e

"""File-system faults around checkpoints: say which path and which OS error, in one line.

Three moments:
- before the model is built, the run directory and the checkpoints directory are probed with a
  small file (`bignlp_jax.access.check_path`: a read-only mount or a missing permission
  shows at once, not after minutes of compiling and training);
- before each save, `check_space` compares the free space with the size of the step (the
  previous step's size on disk, else the state's bytes), so a full disk stops the run with the
  bytes needed before Orbax writes half a step;
- when a save fails anyway (quota, a disk filled by someone else, a mount gone read-only),
  `save_failure` turns the error Orbax and TensorStore raise into a `CheckpointWriteError`.
"""

from __future__ import annotations

import errno
import inspect
import logging
import os
import re
import sys
import threading
from pathlib import Path

from bignlp_jax import storage
from bignlp_jax.access import STORAGE_ERRNOS as STORAGE_ERRORS
from bignlp_jax.access import free_space, size_text
from bignlp_jax.errors import UserError

# TensorStore reports the OS error inside a message: `... [os_error_code='28']`
_TS_ERRNO = re.compile(r"os_error_code='?(\d+)")
# margin on top of the estimated step size: Orbax's metadata and TensorStore's write slack
SPACE_MARGIN = 1.10


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (full disk, read-only, quota, permission)."""


def size_on_disk(directory: Path) -> int:
    """Bytes of all files under `directory` (0 if it does not exist)."""
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass  # a file removed while we walk (Orbax cleaning up)
    return total


def free_bytes(path: Path) -> int:
    return free_space(path)


def check_space(directory: Path, step: int, needed: int) -> None:
    """Refuse to start saving `step` into `directory` when less than `needed` bytes (plus a
    margin) are free; the earlier checkpoints stay as they are. (A bucket has no free space
    to read: its quota errors arrive as save failures.)"""
    if storage.is_remote(directory):
        return
    want = int(needed * SPACE_MARGIN)
    have = free_bytes(directory)
    if have < want:
        raise CheckpointWriteError(
            f"cannot save checkpoint step {step} in {directory}: {STORAGE_ERRORS[errno.ENOSPC]} "
            f"(ENOSPC): the step needs about {size_text(want)} and {size_text(have)} are free "
            f"(short by {size_text(want - have)}); earlier checkpoints are intact\n"
            "  fix: free space (or raise the quota) and run the same command again: it "
            "resumes from the last checkpoint"
        )


def storage_errno(error: BaseException) -> int | None:
    """The OS error behind a failed save, from an OSError or a TensorStore message (following
    __cause__/__context__), if it is one of STORAGE_ERRORS."""
    seen = 0
    current: BaseException | None = error
    while current is not None and seen < 10:
        code = current.errno if isinstance(current, OSError) else None
        if code is None and (m := _TS_ERRNO.search(str(current))):
            code = int(m.group(1))
        if code in STORAGE_ERRORS:
            return code
        current, seen = current.__cause__ or current.__context__, seen + 1
    return None


def save_failure(error: BaseException, step: int | None, directory: Path,
                 needed: int | None) -> CheckpointWriteError | None:
    """A one-line error for a save that failed on storage, or None if it is something else
    (then it is a bug or an unexpected failure and keeps its traceback)."""
    code = storage_errno(error)
    if code is None:
        return None
    detail = f"{STORAGE_ERRORS[code]} ({errno.errorcode[code]})"
    if code == errno.ENOSPC and needed:
        try:
            free = free_bytes(directory)
            detail += f": the step needs about {size_text(needed)}, {size_text(free)} are free"
        except OSError:
            pass
    return CheckpointWriteError(
        f"cannot save checkpoint step {step} in {directory}: {detail}; earlier checkpoints "
        "are intact\n"
        "  fix: free space, raise the quota or make the directory writable, then run the same "
        "command again: it resumes from the last checkpoint"
    )


class QuietStorageErrors(logging.Filter):
    """Drops Orbax's log records (each with a full traceback, several per failed save) of a
    storage failure that `save_failure` reports as one message; everything else passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and storage_errno(error) is not None:
            return False
        m = _TS_ERRNO.search(record.getMessage())
        return not (m and int(m.group(1)) in STORAGE_ERRORS)


_FILTER = QuietStorageErrors()


def _loop_closed(error: BaseException | None) -> bool:
    """TensorStore completing a write on Orbax's event loop after Orbax closed it (a failed
    save's pending writes): carries nothing the one message does not."""
    return isinstance(error, RuntimeError) and "Event loop is closed" in str(error)


def _leftover(error: BaseException | None) -> bool:
    """After a reported storage failure: the same failure again (a storage errno), or a
    background writer torn down at exit (TensorBoard's queue: 'handle is closed')."""
    return isinstance(error, OSError) and (storage_errno(error) is not None
                                           or "handle is closed" in str(error))


class _Quiet:
    """Replacements for `sys.excepthook`, `sys.unraisablehook` and `threading.excepthook` that
    drop the noise of a storage failure and pass everything else to the hook they replaced.
    TensorStore reports its callbacks' errors as unraisable (a bare traceback, up to ~20 when
    the disk fills in the middle of writing a step); after a failure has been reported
    (`failed`), Orbax's unfinished write coroutines, and the TensorBoard writer's retries on the
    same full disk (its exit hook and its thread), are dropped as well."""

    failed = False  # set by silence_leftovers once the one message is on its way

    def __init__(self, previous):
        self.previous = previous

    def drop(self, error: BaseException | None, obj: object = None) -> bool:
        if _loop_closed(error):
            return True
        return _Quiet.failed and (inspect.iscoroutine(obj) or _leftover(error))


class _QuietExcepthook(_Quiet):
    def __call__(self, kind, value, tb):
        if not self.drop(value):
            self.previous(kind, value, tb)


class _QuietUnraisable(_Quiet):
    def __call__(self, unraisable):
        if not self.drop(unraisable.exc_value, unraisable.object):
            self.previous(unraisable)


class _QuietThreads(_Quiet):
    def __call__(self, args):
        if not self.drop(args.exc_value):
            self.previous(args)


def quiet_storage_errors() -> None:
    """Install the filter on absl's logger (Orbax logs through absl) and the hooks above.
    Idempotent; other errors still print."""
    for name in ("absl", "asyncio"):  # Orbax logs through absl; asyncio reports lost tasks
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    for owner, name, hook in ((sys, "excepthook", _QuietExcepthook),
                              (sys, "unraisablehook", _QuietUnraisable),
                              (threading, "excepthook", _QuietThreads)):
        if not isinstance(getattr(owner, name), _Quiet):
            setattr(owner, name, hook(getattr(owner, name)))


def silence_leftovers() -> None:
    """After a reported storage failure, drop its leftovers too (see _Quiet)."""
    quiet_storage_errors()
    _Quiet.failed = True

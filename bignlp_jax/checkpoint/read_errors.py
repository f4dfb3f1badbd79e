"""Which exceptions mean "this checkpoint cannot be read" (a user-facing problem) rather than a
bug in our code: the CLI turns the first kind into one line and exit 2, the second into a
traceback and exit 1, so only these are caught and re-raised as UserError (cause chained).

A damaged or unreadable checkpoint shows itself as:
- `DamagedCheckpoint`: what our own readers raise for a file that fails its checksum, is cut
  short or does not hold what its index says (integrity.py, shard_files.py, local_tier.py);
- `OSError`: a missing, unreadable or permission-denied file (os, Orbax, TensorStore's drivers);
- `msgpack`'s UnpackException: Orbax's aggregate file (`_METADATA` of old checkpoints) cut short;
- a `ValueError` or `KeyError` raised inside the readers of the file formats (Orbax, TensorStore,
  json, msgpack): TensorStore reports corrupt chunks as ValueError ("DATA_LOSS: ..."), Orbax
  raises it and KeyError for metadata without an expected entry, json for a broken file.
A ValueError or KeyError raised in our own code is a bug, whatever the file: not in this list.
"""

from __future__ import annotations

import types

import msgpack


class DamagedCheckpoint(ValueError):
    """A checkpoint file that fails its checksum or does not hold what was written."""


# where a ValueError/KeyError must be raised to mean a damaged file: the readers of the formats
READER_PACKAGES = ("orbax", "tensorstore", "json", "msgpack")
ALWAYS: tuple[type[BaseException], ...] = (
    DamagedCheckpoint, OSError, msgpack.exceptions.UnpackException)
FROM_READERS: tuple[type[BaseException], ...] = (ValueError, KeyError)


def _raised_in_reader(error: BaseException) -> bool:
    """Whether `error` was raised inside a format reader: some frame of its traceback is one
    (awaited TensorStore errors surface through asyncio's frames), and the innermost frame
    that raised it is not our code (a bug of ours called from Orbax stays a bug)."""
    modules = []
    tb: types.TracebackType | None = error.__traceback__
    while tb is not None:
        modules.append(str(tb.tb_frame.f_globals.get("__name__", "")).split(".")[0])
        tb = tb.tb_next
    return bool(modules) and modules[-1] != "bignlp_jax" and any(
        m in READER_PACKAGES for m in modules)


def is_read_error(error: BaseException) -> bool:
    """Whether `error`, or an exception it was raised from, says a checkpoint file is damaged
    or unreadable (see the module doc). Orbax re-raises TensorStore's read errors as a bare
    `Exception` with the original chained, so the chain is what tells a damaged file from a
    bug."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, ALWAYS):
            return True
        if isinstance(current, FROM_READERS) and _raised_in_reader(current):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False

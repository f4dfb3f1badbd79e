"""Which exceptions mean "this checkpoint cannot be read" (a user-facing problem) rather than a
bug in our code: the CLI turns the first kind into one line and exit 2, the second into a
traceback and exit 1, so only these are caught and re-raised as UserError (cause chained)."""

from __future__ import annotations

import msgpack

# OSError: missing/unreadable/permission-denied files (Orbax, TensorStore's file driver, os).
# ValueError: TensorStore reports corrupt or truncated chunks and bad specs as ValueError
# ("DATA_LOSS: ...", "NOT_FOUND: ..."); Orbax raises it for missing items and bad metadata;
# json.JSONDecodeError is one too. KeyError: Orbax metadata without an expected entry.
# msgpack: Orbax's aggregate file (`_METADATA` / msgpack checkpoints) cut short.
CHECKPOINT_READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, KeyError, msgpack.exceptions.UnpackException)


def is_read_error(error: BaseException) -> bool:
    """Whether `error`, or an exception it was raised from, is one of CHECKPOINT_READ_ERRORS.
    Orbax re-raises TensorStore's read errors as a bare `Exception` with the original chained,
    so the chain is what tells a damaged file from a bug."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, CHECKPOINT_READ_ERRORS):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False

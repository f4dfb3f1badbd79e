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

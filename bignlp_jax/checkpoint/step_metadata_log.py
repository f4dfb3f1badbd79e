"""Orbax's complaint about a damaged `_CHECKPOINT_METADATA` speaks at debug level only.

Orbax keeps a step's own metadata (save timestamps) in `<step>/_CHECKPOINT_METADATA` and reads
it while listing steps. A damaged copy makes it log `ERROR:absl:Failed to read Metadata file`
(or `Failed to json parse Metadata file`, with the file's content) and go on without it: a
restore never reads that file, so the resume is unaffected and the user has nothing to do. The
record is demoted to DEBUG for that file only; the same messages about any other file, and
every other Orbax record, pass unchanged.
"""

from __future__ import annotations

import logging
from pathlib import PurePath

from bignlp_jax.client_logs import to_debug

STEP_METADATA = "_CHECKPOINT_METADATA"
MESSAGES = ("Failed to read Metadata file", "Failed to json parse Metadata file")


class _StepMetadataToDebug(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not (isinstance(record.msg, str) and record.msg.startswith(MESSAGES)):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        if not args or PurePath(str(args[0])).name != STEP_METADATA:
            return True
        return to_debug(record)


_FILTER = _StepMetadataToDebug()


def quiet_step_metadata() -> None:
    """Install the filter on absl's logger, which Orbax logs through (idempotent)."""
    logger = logging.getLogger("absl")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)

"""Storage client libraries speak at debug level only.

gcsfs logs every exception its callers expect and handle (`logger.exception(...)` with a full
traceback: a 400 on a bucket-layout probe, a 404 on a listing) at ERROR; aiohttp and s3fs do
the same for closed connections. Our path layer turns the errors that matter into one line
itself (access.check_path), so their records are demoted to DEBUG here: a healthy gs:// or
s3:// run prints no traceback, and `logging` at DEBUG still shows every one.
"""

from __future__ import annotations

import logging

# every logger the bucket clients log on (a filter sees only its own logger's records)
CLIENT_LOGGERS = ("gcsfs", "gcsfs.credentials", "gcsfs.core", "s3fs", "fsspec", "aiohttp.client",
                  "aiohttp.internal", "google.auth._default", "botocore.credentials")


def to_debug(record: logging.LogRecord) -> bool:
    """Make a record a DEBUG one, for a filter to return: False (drop it) where its logger
    does not show DEBUG."""
    # a handler does not check the logger's level again (one with level NOTSET, as
    # basicConfig installs, prints whatever reaches it): drop what DEBUG would not show
    if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
        return False
    record.levelno, record.levelname = logging.DEBUG, "DEBUG"
    return True


class _ToDebug(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return to_debug(record)


_FILTER = _ToDebug()


def demote_client_logs() -> None:
    """Demote the bucket clients' log records to DEBUG (idempotent)."""
    for name in CLIENT_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)

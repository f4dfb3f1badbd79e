"""A storage endpoint that went away mid-run, said in one line instead of a library traceback.

When a bucket's endpoint stops answering, gcsfs, s3fs and aiohttp retry and then raise their
own connection errors from deep inside a save or a read. That is not a bug of ours: `describe`
recognises such an error anywhere in an exception's chain and names the endpoint, the
operation of ours that was running, and the last error, for the CLI to print (exit 2).
`StorageWatch` bounds how long our waits on storage may last while the endpoint is unreachable
(checkpoint.storage_deadline_s), and `quiet_outage_tracebacks` keeps the library threads'
copies of the same error out of sight (at debug level).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
import traceback
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

# connection-level failures of the bucket clients (aiohttp for gcsfs, botocore for s3fs,
# google.api_core), matched by class name so that none of them needs importing here
_CONNECTION_ERRORS = {"ClientConnectorError", "ClientConnectionError", "ServerDisconnectedError",
                      "ClientOSError", "ServerTimeoutError", "EndpointConnectionError",
                      "ConnectTimeoutError", "ReadTimeoutError", "ServiceUnavailable"}


def _chain(error: BaseException):
    seen: set[int] = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        link = link.__cause__ or link.__context__


def _endpoint(error: BaseException) -> str:
    host, port = getattr(error, "host", None), getattr(error, "port", None)
    if host:
        return f"{host}:{port}" if port else str(host)
    kwargs = getattr(error, "kwargs", None) or {}  # botocore keeps endpoint_url there
    if kwargs.get("endpoint_url"):
        return str(kwargs["endpoint_url"])
    return (os.environ.get("STORAGE_EMULATOR_HOST") or os.environ.get("AWS_ENDPOINT_URL")
            or "the storage service")


def _operation(error: BaseException) -> str:
    """The innermost function of ours that was running (file:function)."""
    ours = [f for f in traceback.extract_tb(error.__traceback__)
            if f"{os.sep}bignlp_jax{os.sep}" in f.filename]
    if not ours:
        return "a storage operation"
    frame = ours[-1]
    return f"{frame.filename.rsplit(os.sep + 'bignlp_jax' + os.sep, 1)[1]}:{frame.name}"


def describe(error: BaseException) -> str | None:
    """One line for a lost storage endpoint anywhere in `error`'s chain, else None."""
    for link in _chain(error):
        if any(k.__name__ in _CONNECTION_ERRORS for k in type(link).__mro__):
            last = f"{type(link).__name__}: {str(link).splitlines()[0] if str(link) else ''}"
            return (f"lost the storage endpoint {_endpoint(link)} during {_operation(error)} "
                    f"(after the client's retries; last error {last[:200]}); fix: check the "
                    "network and the endpoint, then run the same command again: it resumes "
                    "from the last complete checkpoint")
    return None


# ---- the deadline: a watch on the endpoint while we wait for storage ----
#
# Why a watchdog and not our own retry loop: the waits that hang are inside the clients' own
# retry loops (gcsfs: 6 tries, backoff up to 32 s, per request; TensorStore: its own, in C++;
# Orbax's commit thread waits on both), and none of them can be cancelled or bounded from
# outside without patching their internals. So while one of our storage waits is running
# (`bounded`), a thread probes the endpoint (a TCP connect: cheap, no credentials, no bucket
# traffic); only when it has stayed unreachable for the whole deadline does the process stop
# itself: one line, then os._exit (the blocked call cannot be unwound, and nothing more can be
# written anyway). A slow but reachable endpoint (a big checkpoint to a healthy bucket) never
# trips it; an endpoint that accepts connections but never answers is left to the clients'
# own retries, whose final error `describe` turns into the same one line.


def endpoint_of(url: str) -> tuple[str, int] | None:
    """(host, port) that a gs:// or s3:// path's client talks to (the emulator's, the proxy's
    if one is set, else the public service's); None for a local path."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme in ("gs", "gcs"):
        base = os.environ.get("STORAGE_EMULATOR_HOST") or "https://storage.googleapis.com"
    elif scheme == "s3":
        base = (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                or "https://s3.amazonaws.com")
    else:
        return None
    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY",
                                         "http_proxy") if os.environ.get(k)), None)
    parsed = urllib.parse.urlsplit(proxy or (base if "://" in base else f"http://{base}"))
    return parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)


class StorageWatch:
    """Stops the process when the endpoint of a wait (`waiting`) stays unreachable for
    `deadline_s`.

    `safe_step()`: a step held elsewhere that is at least as new as the last durable one (the
    local tier's), or None; with one the process exits with `requeue_code` (a rerun resumes
    from it), else with exit code 2. `announce(line, code)` tells a job's other processes."""

    current: StorageWatch | None = None

    def __init__(self, deadline_s: float,
                 safe_step: Callable[[], str | None] = lambda: None, requeue_code: int = 75,
                 announce: Callable[[str, int], None] = lambda line, code: None,
                 exit_fn: Callable[[int], Any] = os._exit):
        self.deadline_s = deadline_s
        self.safe_step, self.requeue_code = safe_step, requeue_code
        self.announce, self.exit_fn = announce, exit_fn
        quiet_outage_tracebacks()
        # (operation, endpoint) of our waits on storage now running, innermost last
        self._waits: list[tuple[str, tuple[str, int]]] = []
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="storage-watch", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def waiting(self, operation: str, url: str) -> Iterator[None]:
        """Watch `url`'s endpoint while the block runs (nothing for a local path)."""
        endpoint = endpoint_of(url)
        if endpoint is None:
            yield
            return
        wait = (operation, endpoint)
        with self._wake:
            self._waits.append(wait)
            self._wake.notify()
        try:
            yield
        finally:
            with self._wake:
                self._waits.remove(wait)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        if StorageWatch.current is self:
            StorageWatch.current = None

    def _probe(self, endpoint: tuple[str, int]) -> str | None:
        try:
            socket.create_connection(endpoint, timeout=min(5.0, self.deadline_s)).close()
            return None
        except OSError as e:
            return f"{type(e).__name__}: {e}"

    def _run(self) -> None:
        every = max(0.05, min(2.0, self.deadline_s / 10))
        down_since: float | None = None
        while True:
            with self._wake:
                while not self._waits and not self._closed:
                    down_since = None
                    self._wake.wait()
                if self._closed:
                    return
                operation, endpoint = self._waits[-1]
            error = self._probe(endpoint)
            now = time.monotonic()
            if error is None:
                down_since = None
            else:
                down_since = now if down_since is None else down_since
                if now - down_since >= self.deadline_s:
                    self._fire(operation, endpoint, error)
                    return
            time.sleep(every)

    def _fire(self, operation: str, endpoint: tuple[str, int], error: str) -> None:
        host, port = endpoint
        line = (f"lost the storage endpoint {host}:{port} during {operation}: unreachable "
                f"for {self.deadline_s:g} s (checkpoint.storage_deadline_s); last error {error}")
        safe = self.safe_step()
        if safe is not None:
            line += (f"; {safe} is safe: run the same command again once the endpoint "
                     "answers, it resumes from there")
            code, prefix = self.requeue_code, "bignlp-jax: "
        else:
            line += ("; fix: check the network and the endpoint, then run the same command "
                     "again: it resumes from the last complete checkpoint")
            code, prefix = 2, "bignlp-jax: error: "
        quiet_outage_tracebacks()
        # on a line of its own: a progress bar may be drawn on the current one
        print("\n" + prefix + line, file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            self.announce(line, code)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        self.exit_fn(code)


@contextlib.contextmanager
def bounded(operation: str, url: object) -> Iterator[None]:
    """Mark a wait on storage (a checkpoint save, a metrics flush, a store read) as bounded by
    the installed StorageWatch's deadline; nothing when none is installed (local run dirs)."""
    watch = StorageWatch.current
    if watch is None:
        yield
        return
    with watch.waiting(operation, str(url)):
        yield


# ---- after an outage: library threads' tracebacks of the same failure go to debug ----

_log = logging.getLogger(__name__)
_previous_hook = threading.excepthook


def _thread_hook(args: threading.ExceptHookArgs) -> None:
    # Orbax's background threads (async commit, deletion of old steps) let a lost endpoint's
    # error escape: the CLI already says it in one line, so their copy goes to the debug log;
    # any other exception in a thread (a bug) still prints as Python prints it
    if args.exc_value is not None and describe(args.exc_value) is not None:
        _log.debug("thread %s stopped on a lost storage endpoint", args.thread,
                   exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
        return
    _previous_hook(args)


class _OutageRecordsToDebug(logging.Filter):
    """Drop library log records whose exception is a lost endpoint (re-logged at debug)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and describe(error) is not None:
            if _log.isEnabledFor(logging.DEBUG):
                _log.debug("%s", record.getMessage(), exc_info=record.exc_info)
            return False
        return True


_RECORDS = _OutageRecordsToDebug()


def quiet_outage_tracebacks() -> None:
    """Route third-party tracebacks of a lost endpoint (threads, absl/orbax log records) to
    debug; every other exception still shows (idempotent)."""
    global _previous_hook
    if threading.excepthook is not _thread_hook:
        _previous_hook, threading.excepthook = threading.excepthook, _thread_hook
    for name in ("absl", "orbax", "orbax.checkpoint", "asyncio", "concurrent.futures"):
        logger = logging.getLogger(name)
        if _RECORDS not in logger.filters:
            logger.addFilter(_RECORDS)

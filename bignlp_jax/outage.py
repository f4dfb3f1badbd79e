"""A storage endpoint that went away mid-run, said in one line instead of a library traceback.

When a bucket's endpoint stops answering, gcsfs, s3fs and aiohttp retry and then raise their
own connection errors from deep inside a save or a read. That is not a bug of ours: `describe`
recognises such an error anywhere in an exception's chain and names the endpoint, the
operation of ours that was running, and the last error, for the CLI to print (exit 2).
"""

from __future__ import annotations

import os
import traceback

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

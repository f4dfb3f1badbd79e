"""One check for every path a command reads or writes, local or in a bucket, before it builds
anything: readable, writable, and (where a file system says) enough free space.

`check_path` is what train, export, import, data and pipeline call. A local path is probed
with a small temporary file in it, or in its nearest existing parent when it does not exist
yet (so nothing is left behind: a start that stops later finds the disk as it was). A bucket
path is probed with a listing and, to write, a small object written and deleted, bounded by
PROBE_TIMEOUT_S. A failure is one `UserError` line whose kind (missing, permission, no or
refused credentials, unreachable, no space) comes from the exception's type, its errno or
the service's status code, never from its message text.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from bignlp_jax import storage
from bignlp_jax.errors import UserError

PROBE_TIMEOUT_S = 10.0  # gcsfs retries a refused connection for ~30 s; say so sooner

# OS errors that mean "this storage cannot take the write" (not a bug of ours)
STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EROFS: "the file system is read-only",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}

# the services' codes for credentials that exist but are refused (a wrong or expired key, a
# signature made with the wrong secret; gcsfs's HttpError carries HTTP 401 for a bad token)
REFUSED_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                           "InvalidClientTokenId", "InvalidToken", "401"})
DENIED_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "403"})
NO_BUCKET_CODES = frozenset({"NoSuchBucket", "404"})
CREDENTIALS_FIX = {
    "gs://": "`gcloud auth application-default login`, GOOGLE_APPLICATION_CREDENTIALS or the "
             "VM's service account",
    "s3://": "AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or an instance or pod role"}


class PathMissing(FileNotFoundError):
    """A path to read that is not there (its bucket is)."""


class BucketMissing(FileNotFoundError):
    """The bucket itself is not there."""


def check_path(p: str | os.PathLike, key: str, write: bool = True, what: str | None = None,
               fix: str | None = None, free_bytes: int | None = None) -> None:
    """Fail fast, in one line, if path `p` (config key or flag `key`) cannot be written (or,
    with write=False, read). `what` names a local path in the message (default `key`), `fix`
    the setting to change (default `key=DIR`); `free_bytes`: also refuse a local path on a
    file system with less free space than that."""
    if storage.is_remote(p):
        _check_bucket(str(p), key, write)
    else:
        _check_local(Path(p), what or key, fix or f"{key}=DIR", write, free_bytes)


# --- local paths ----------------------------------------------------------------------------
def nearest_existing(path: Path) -> Path:
    """`path`, or its nearest parent that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_space(path: Path) -> int:
    """Free bytes on the file system that holds (or would hold) `path`."""
    return shutil.disk_usage(nearest_existing(path)).free


def _check_local(path: Path, what: str, fix_key: str, write: bool,
                 free_bytes: int | None) -> None:
    try:
        existing = nearest_existing(path)
        if not existing.is_dir() and (write or existing != path):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
        if not write:
            if existing == path and not os.access(path, os.R_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return  # a missing input is for its reader to name (with its own fix)
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write_probe."):
            pass
        free = free_space(existing) if free_bytes is not None else None
    except OSError as e:
        reason = e.strerror or type(e).__name__
        where = f" at {e.filename}" if e.filename and Path(e.filename) != path else ""
        raise UserError(
            f"{what} {path} is not {'writable' if write else 'readable'}: {reason} (errno "
            f"{e.errno}){where}\n"
            f"  fix: give a directory you can {'write to' if write else 'read'} ({fix_key}), "
            "or fix its permissions"
            + (f" (user id {os.getuid()})" if hasattr(os, "getuid") else "")
        ) from e
    if free is not None and free_bytes is not None and free < free_bytes:
        raise UserError(
            f"{what} {path}: {STORAGE_ERRNOS[errno.ENOSPC]} (ENOSPC): about "
            f"{size_text(free_bytes)} needed, {size_text(free)} free\n"
            f"  fix: free space (or raise the quota), or give another directory ({fix_key})")


def size_text(num_bytes: float) -> str:
    """A byte count for a message: `1.5 GiB`."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(num_bytes) < 1024 or unit == "TiB":
            return f"{num_bytes:.4g} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")


# --- bucket paths ---------------------------------------------------------------------------
def _bucket(p: str) -> str:
    return str(p).split("/")[2]


def _chain(error: BaseException) -> Iterator[BaseException]:
    """The error and its causes (s3fs keeps the service's error under __cause__)."""
    seen = 0
    current: BaseException | None = error
    while current is not None and seen < 10:
        yield current
        current, seen = current.__cause__ or current.__context__, seen + 1


def _is(error: BaseException, module: str, name: str) -> bool:
    """isinstance against a client library's exception class, without importing the library
    (an error of a library that was never imported cannot be one of its classes)."""
    loaded = sys.modules.get(module)
    cls = getattr(loaded, name, None) if loaded is not None else None
    return isinstance(cls, type) and isinstance(error, cls)


def _service_code(error: BaseException) -> str | None:
    """The storage service's error code: botocore's ClientError code, or gcsfs's HTTP status."""
    for e in _chain(error):
        response = getattr(e, "response", None)
        if _is(e, "botocore.exceptions", "ClientError") and isinstance(response, dict):
            return str(response.get("Error", {}).get("Code", "")) or None
        status = getattr(e, "code", None)
        if _is(e, "gcsfs.retry", "HttpError") and status is not None:
            return str(status)
    return None


def error_kind(error: BaseException, scheme: str) -> str:
    """'refused', 'no_credentials', 'path_missing', 'bucket_missing', 'permission' or
    'unreachable', from the exception types and the service's code."""
    code = _service_code(error)
    chain = list(_chain(error))
    if code in REFUSED_CODES or any(_is(e, "google.auth.exceptions", "RefreshError")
                                    for e in chain):
        return "refused"
    if isinstance(error, PathMissing):
        return "path_missing"
    if isinstance(error, FileNotFoundError) or code in NO_BUCKET_CODES:
        return "bucket_missing"
    # gcsfs answers HTTP 403 with a bare OSError (no errno, no code): its only 403 form
    gcs_forbidden = scheme == "gs://" and type(error) is OSError and error.errno is None
    if isinstance(error, PermissionError) or code in DENIED_CODES or gcs_forbidden:
        return "permission"
    if any(_is(e, "botocore.exceptions", "NoCredentialsError")
           or _is(e, "google.auth.exceptions", "DefaultCredentialsError") for e in chain):
        return "no_credentials"
    return "unreachable"


def explain(p: str, error: BaseException, write: bool = True) -> str:
    """The message and fix line for a failed probe of bucket path `p`."""
    text = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    bucket, scheme = _bucket(p), str(p)[:5]
    kind = error_kind(error, scheme)
    if kind == "refused":
        return f"the credentials for {p} were refused ({text})\n  fix: {CREDENTIALS_FIX[scheme]}"
    if kind == "path_missing":
        return f"{p} does not exist\n  fix: check the path (a run directory written by train)"
    if kind == "bucket_missing":
        return (f"bucket {scheme}{bucket} does not exist ({text})\n"
                f"  fix: create it, or correct the bucket name")
    if kind == "permission":
        return (f"no permission to {'write to' if write else 'read'} {p} ({text})\n"
                "  fix: grant this identity access to the bucket (storage.objectAdmin / "
                "s3:PutObject, s3:GetObject, s3:ListBucket, s3:DeleteObject)")
    if kind == "no_credentials":
        return f"no credentials for {p} ({text})\n  fix: {CREDENTIALS_FIX[scheme]}"
    return (f"cannot reach the storage service for {p} ({text})\n"
            "  fix: check the network and the endpoint (STORAGE_EMULATOR_HOST, "
            "AWS_ENDPOINT_URL) and that the bucket name is right")


def _probe(p: str, write: bool, stage: list[str]) -> None:
    import fsspec.core  # bucket paths only

    if p.startswith("gs://") and not os.environ.get("STORAGE_EMULATOR_HOST"):
        # gcsfs, finding no Application Default Credentials, asks the metadata server for
        # ~15 s and then carries on anonymously; ask google-auth (its own first step) directly.
        # Off GCE that is a file lookup and a metadata-server ping: ~0.1 s where the address is
        # unreachable, ~3 s where the connection is refused, up to ~12 s where packets are
        # dropped (3 tries of 3 s): the probe's time limit bounds it
        import google.auth

        stage[0] = "credentials"
        google.auth.default()
        stage[0] = "storage"
    fs, key = fsspec.core.url_to_fs(str(storage.path(p)))
    # a listing, not exists(): exists() turns every failure (no or refused credentials, no
    # permission) into False, which would read as "no such bucket"
    try:
        found = bool(fs.ls(key, detail=False))
    except FileNotFoundError:
        found = False
    if not found:
        try:
            fs.info(_bucket(p))
        except FileNotFoundError:
            raise BucketMissing(f"bucket {_bucket(p)} not found") from None
        if not write:
            raise PathMissing(f"{p} does not exist")
    if write:
        # a write and a delete: reading alone would pass a read-only identity that cannot
        # save; one marker per process (the processes of a multi-host run probe one directory)
        marker = storage.path(p) / f".bignlp_write_probe.{socket.gethostname()}.{os.getpid()}"
        marker.write_text("ok")
        marker.unlink()


def _check_bucket(p: str, key: str, write: bool) -> None:
    storage.path(p)  # the missing-extra error first
    # a daemon thread: a probe stuck in gcsfs's retries must not hold the exit (an executor's
    # worker would be joined at interpreter exit)
    outcome: list[BaseException | None] = []
    stage = ["storage"]  # what the probe is waiting for, should it time out
    probe = threading.Thread(
        target=lambda: outcome.append(_try(_probe, p, write, stage)), daemon=True)
    probe.start()
    probe.join(PROBE_TIMEOUT_S)
    if not outcome and stage[0] == "credentials":
        raise UserError(
            f"{key}={p}: no credentials found in {PROBE_TIMEOUT_S:g} s (no Application Default "
            "Credentials on disk, and no answer from a GCE metadata server)\n"
            f"  fix: {CREDENTIALS_FIX['gs://']}")
    if not outcome:
        raise UserError(
            f"{key}={p}: no answer from the storage service in {PROBE_TIMEOUT_S:g} s\n"
            "  fix: check the network and the endpoint (STORAGE_EMULATOR_HOST, "
            "AWS_ENDPOINT_URL)")
    if outcome[0] is not None:
        raise UserError(f"{key}={p}: {explain(p, outcome[0], write)}")


def _try(fn, *args) -> BaseException | None:
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - every failure is explained in one line
        return e
    return None

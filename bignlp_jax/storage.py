"""One path layer for every file the system reads or writes: local paths, gs:// and s3://.

Local paths stay `pathlib.Path` (behaviour unchanged); bucket paths become `etils.epath.Path`,
the abstraction Orbax and TFDS use (gcsfs / s3fs underneath, credentials from the platform's
usual mechanisms: Application Default Credentials, the AWS credential chain). Both offer the
same `/`, `open`, `read_text`, `write_text`, `mkdir`, `exists`, `is_dir`, `glob` methods, so
call sites only swap `Path(x)` for `storage.path(x)`.

`check_access` probes a bucket path once, before a model is built, and turns a missing bucket,
an unreachable endpoint, missing credentials or a permission error into one `UserError` line.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Union

from bignlp_jax.client_logs import demote_client_logs
from bignlp_jax.errors import UserError

if TYPE_CHECKING:
    from etils import epath

REMOTE_SCHEMES = {"gs://": "gcsfs", "s3://": "s3fs"}
CLOUD_EXTRA = "pip install 'bignlp-jax[cloud]'"
PROBE_TIMEOUT_S = 10.0  # gcsfs retries a refused connection for ~30 s; say so sooner

AnyPath = Union[Path, "epath.Path"]  # etils is imported at run time only for bucket paths


def is_remote(p: str | os.PathLike) -> bool:
    """True for gs:// and s3:// paths (str or epath)."""
    return str(p).startswith(tuple(REMOTE_SCHEMES))


def path(p: str | os.PathLike) -> AnyPath:
    """A path object for `p`: `pathlib.Path` locally, `epath.Path` for a bucket."""
    if not is_remote(p):
        return Path(p)
    scheme = str(p)[:5]
    module = REMOTE_SCHEMES[scheme]
    try:
        __import__(module)
    except ImportError:
        raise UserError(f"{p}: {scheme} paths need the `{module}` package\n"
                        f"  fix: {CLOUD_EXTRA}") from None
    # gcsfs logs tracebacks of errors its callers handle; they go to the log at debug level
    demote_client_logs()
    # No cached listings: other processes (and hosts) add checkpoint steps while this one runs,
    # and a stale listing would hide them. Set before epath creates (and keeps) its filesystems.
    import fsspec.config

    for protocol in ("gcs", "gs", "s3"):
        fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)
    from etils import epath  # bucket paths only: etils/fsspec are slow to import

    return epath.Path(str(p))


def absolute(p: str | os.PathLike) -> AnyPath:
    """`p` made absolute (Orbax refuses relative paths); bucket paths are absolute already."""
    return path(p) if is_remote(p) else Path(p).absolute()


def size(p: AnyPath) -> int:
    """Bytes of a file, local or in a bucket (epath's stat says `length`, not `st_size`)."""
    if isinstance(p, Path):
        return p.stat().st_size
    return p.stat().length


def install_dir(tmp: Path, final: Path) -> None:
    """Put a finished temporary directory (made next to `final`) in place with one rename,
    replacing an earlier version: readers see the old directory or the new one, never half."""
    tmp.chmod(0o755)  # mkdtemp makes it private
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def files_under(p: AnyPath) -> list[AnyPath]:
    """Every file below a directory, sorted (a bucket refuses a recursive `**` glob: walk it)."""
    if isinstance(p, Path):
        return sorted(f for f in p.rglob("*") if f.is_file())
    import fsspec.core  # bucket paths only

    # (epath's walk drops the scheme from the directories it yields; fsspec's find does not
    # pretend: its names are bucket/key, and the scheme goes back in front)
    fs, base = fsspec.core.url_to_fs(str(p))
    return [path(str(p)[:5] + name) for name in sorted(fs.find(base))]


def same(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same place (local paths resolved)."""
    if is_remote(a) or is_remote(b):
        return str(a).rstrip("/") == str(b).rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy one file between any two places (local or bucket)."""
    if not is_remote(src) and not is_remote(dst):
        shutil.copyfile(src, dst)
        return
    with path(src).open("rb") as fin, path(dst).open("wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 22)


def move(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move a file or directory tree within one store (a bucket has no real directories, so
    epath's rename, which wants `dst`'s parent to exist, cannot be used there)."""
    if not is_remote(src):
        shutil.move(str(src), str(dst))
        return
    import fsspec.core  # bucket paths only

    fs, source = fsspec.core.url_to_fs(str(path(src)))
    target = fsspec.core.url_to_fs(str(dst))[1]
    if not fs.isdir(source):
        fs.mv(source, target)
        return
    # object by object: s3fs's recursive mv also copies the directory's own name, which is no
    # object on S3 (NoSuchKey)
    for name in fs.find(source):
        fs.copy(name, target + name[len(source):])
    fs.rm(source, recursive=True)


def rmtree(p: str | os.PathLike) -> None:
    """Remove a directory tree (missing is fine)."""
    target = path(p)
    if isinstance(target, Path):  # local (`path` gives an epath.Path exactly for a bucket)
        shutil.rmtree(target, ignore_errors=True)
    elif target.exists():
        target.rmtree()


def staging_dir(dest: str | os.PathLike) -> Path:
    """Where to write a directory tree bound for `dest`: `dest` itself when local, else a fresh
    local temporary directory that `publish` uploads. Used by writers that need real files
    (safetensors, renames for atomicity)."""
    if not is_remote(dest):
        return Path(dest)
    return Path(tempfile.mkdtemp(prefix="bignlp-stage-")) / path(dest).name


def publish(staged: Path, dest: str | os.PathLike, marker: str) -> AnyPath:
    """Upload the tree written to `staged` (from `staging_dir`) to bucket path `dest`, replacing
    an earlier one (only if it holds `marker`: a mistyped --out never deletes other objects);
    `marker` (the file that says the tree is complete) is uploaded last.
    A no-op for a local `dest`, and on processes that staged nothing."""
    remote = path(dest)
    if isinstance(remote, Path) or not staged.exists():  # local `dest`, or nothing staged
        return remote
    if remote.exists() and any(remote.iterdir()):
        if not (remote / marker).exists():
            raise UserError(f"{dest} exists and is not an earlier export (no {marker}); "
                            "choose an empty or new --out directory")
        remote.rmtree()
    files = sorted(f for f in staged.rglob("*") if f.is_file())
    # the marker last: an upload cut short leaves no tree that looks complete
    for file in sorted(files, key=lambda f: f.relative_to(staged).parts[0] == marker):
        target = remote / file.relative_to(staged).as_posix()
        target.parent.mkdir(parents=True, exist_ok=True)
        copy_file(file, target)
    shutil.rmtree(staged.parent, ignore_errors=True)
    return remote


def fetch_dir(src: str | os.PathLike) -> Path:
    """A local copy of directory `src` (itself when local): for readers that need real files
    (safetensors memory-maps them). The copy lives in a temporary directory."""
    if not is_remote(src):
        return Path(src)
    remote = path(src)
    if not remote.is_dir():
        raise UserError(f"{src} does not exist (or holds no objects)")
    local = Path(tempfile.mkdtemp(prefix="bignlp-fetch-")) / remote.name
    pending = [remote]
    while pending:
        for item in pending.pop().iterdir():
            if item.is_dir():
                pending.append(item)
                continue
            name = str(item)[len(str(remote)) + 1:]
            # an object name may be anything, `../x` included: nothing is written outside `local`
            if not name or name.startswith("/") or ".." in name.split("/"):
                raise UserError(f"{src} holds an object named {name!r}, which leads outside it; "
                                "refused: only files inside the folder are read")
            target = local / name
            target.parent.mkdir(parents=True, exist_ok=True)
            copy_file(item, target)
    return local


def _bucket(p: str) -> str:
    return str(p).split("/")[2]


# what the services answer when credentials exist but are refused (a wrong or expired key, a
# signature made with the wrong secret), and gcsfs's anonymous fallback when it found none
_REJECTED = ("invalidaccesskeyid", "signaturedoesnotmatch", "expiredtoken", "invalidclienttokenid",
             "invalidtoken", "invalid_grant", "anonymous caller", "access key id you provided")
_CREDENTIALS_FIX = {
    "gs://": "`gcloud auth application-default login`, GOOGLE_APPLICATION_CREDENTIALS or the "
             "VM's service account",
    "s3://": "AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or an instance or pod role"}


def _explain(p: str, error: BaseException, write: bool = True) -> str:
    """The fix line for a failed probe of bucket path `p`."""
    text = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    cause = error.__cause__  # s3fs keeps the service's error code (InvalidAccessKeyId ...) there
    detail = f"{text} {type(cause).__name__}: {cause}" if cause is not None else text
    bucket, scheme = _bucket(p), str(p)[:5]
    lowered = detail.lower()
    if any(w in lowered for w in _REJECTED):
        return f"the credentials for {p} were refused ({text})\n  fix: {_CREDENTIALS_FIX[scheme]}"
    if isinstance(error, FileNotFoundError) and str(error) == f"{p} does not exist":
        return f"{p} does not exist\n  fix: check the path (a run directory written by train)"
    if isinstance(error, FileNotFoundError) or "nosuchbucket" in lowered or "not exist" in lowered:
        return (f"bucket {scheme}{bucket} does not exist ({text})\n"
                f"  fix: create it, or correct the bucket name")
    if isinstance(error, PermissionError) or any(
            w in lowered for w in ("403", "401", "forbidden", "accessdenied", "access denied")):
        return (f"no permission to {'write to' if write else 'read'} {p} ({text})\n"
                "  fix: grant this identity access to the bucket (storage.objectAdmin / "
                "s3:PutObject, s3:GetObject, s3:ListBucket, s3:DeleteObject)")
    if any(w in lowered for w in ("credential", "token", "nocredentials", "defaultcredentials")):
        return f"no credentials for {p} ({text})\n  fix: {_CREDENTIALS_FIX[scheme]}"
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
        # dropped (3 tries of 3 s): check_access's time limit bounds it
        import google.auth

        stage[0] = "credentials"
        google.auth.default()
        stage[0] = "storage"
    fs, key = fsspec.core.url_to_fs(str(path(p)))
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
            raise FileNotFoundError(f"bucket {_bucket(p)} not found") from None
        if not write:
            raise FileNotFoundError(f"{p} does not exist")
    if write:
        # a write and a delete: reading alone would pass a read-only identity that cannot
        # save; one marker per process (the processes of a multi-host run probe one directory)
        marker = path(p) / f".bignlp_write_probe.{socket.gethostname()}.{os.getpid()}"
        marker.write_text("ok")
        marker.unlink()


def check_access(p: str | os.PathLike, key: str, write: bool = True) -> None:
    """Fail fast, in one line, if bucket path `p` (config key `key`) cannot be written (or,
    with write=False, read).

    Local paths are not probed (their errors are clear already)."""
    if not is_remote(p):
        return
    path(p)  # the missing-extra error first
    # a daemon thread: a probe stuck in gcsfs's retries must not hold the exit (an executor's
    # worker would be joined at interpreter exit)
    outcome: list[BaseException | None] = []
    stage = ["storage"]  # what the probe is waiting for, should it time out
    probe = threading.Thread(
        target=lambda: outcome.append(_try(_probe, str(p), write, stage)), daemon=True)
    probe.start()
    probe.join(PROBE_TIMEOUT_S)
    if not outcome and stage[0] == "credentials":
        raise UserError(
            f"{key}={p}: no credentials found in {PROBE_TIMEOUT_S:g} s (no Application Default "
            "Credentials on disk, and no answer from a GCE metadata server)\n"
            f"  fix: {_CREDENTIALS_FIX['gs://']}")
    if not outcome:
        raise UserError(
            f"{key}={p}: no answer from the storage service in {PROBE_TIMEOUT_S:g} s\n"
            "  fix: check the network and the endpoint (STORAGE_EMULATOR_HOST, "
            "AWS_ENDPOINT_URL)")
    if outcome[0] is not None:
        raise UserError(f"{key}={p}: {_explain(str(p), outcome[0], write)}")


def _try(fn, *args) -> BaseException | None:
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - every failure is explained in one line
        return e
    return None

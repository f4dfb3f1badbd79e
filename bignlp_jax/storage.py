"""One path layer for every file the system reads or writes: local paths, gs:// and s3://.

Local paths stay `pathlib.Path` (behaviour unchanged); bucket paths become `etils.epath.Path`,
the abstraction Orbax and TFDS use (gcsfs / s3fs underneath, credentials from the platform's
usual mechanisms: Application Default Credentials, the AWS credential chain). Both offer the
same `/`, `open`, `read_text`, `write_text`, `mkdir`, `exists`, `is_dir`, `glob` methods, so
call sites only swap `Path(x)` for `storage.path(x)`.

Checking that a path can be read or written before a command starts is access.py's job.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Union

from bignlp_jax.client_logs import demote_client_logs
from bignlp_jax.errors import UserError

if TYPE_CHECKING:
    from etils import epath

REMOTE_SCHEMES = {"gs://": "gcsfs", "s3://": "s3fs"}
CLOUD_EXTRA = "pip install 'bignlp-jax[cloud]'"

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


def scratch_dir(prefix: str) -> Path:
    """A new local temporary directory, removed when this process exits (normally, by an error
    or after a stop on SIGTERM; a SIGKILL leaves it). Callers done with it sooner remove it."""
    scratch = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, scratch, True)
    return scratch


def staging_dir(dest: str | os.PathLike) -> Path:
    """Where to write a directory tree bound for `dest`: `dest` itself when local, else a fresh
    local temporary directory that `publish` uploads. Used by writers that need real files
    (safetensors, renames for atomicity)."""
    if not is_remote(dest):
        return Path(dest)
    return scratch_dir("bignlp-stage-") / path(dest).name


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
    (safetensors memory-maps them). The copy lives in a `scratch_dir` (gone at exit); a caller
    done with it sooner removes `.parent`."""
    if not is_remote(src):
        return Path(src)
    remote = path(src)
    if not remote.is_dir():
        raise UserError(f"{src} does not exist (or holds no objects)")
    local = scratch_dir("bignlp-fetch-") / remote.name
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

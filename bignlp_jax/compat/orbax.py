"""Orbax's private APIs, in one place: two helpers, and a shim that lets Orbax write and read
arrays on s3:// (narrow and checked).

Helpers (`orbax.checkpoint._src`, no public equivalent in 0.12): `run_sync` (Orbax's way to run a
coroutine to completion from synchronous code, also inside a running event loop) and
`array_metadata_store()` (the store the jax.Array handler records per-array metadata in; the
public handler takes it as an argument). `check_helpers()` verifies both still exist and work.

The s3:// shim:

orbax-checkpoint 0.12 (0.12.8 is the newest release) lists `s3://` among its remote prefixes,
and TensorStore has an `s3` kvstore driver, but the one function that turns a checkpoint
directory into a TensorStore spec does not connect the two: `_normalize_path` runs
`os.path.normpath`, which collapses `s3://bucket` to `s3:/bucket`, and restores the double slash
for `gs:/` only; every non-gs path then gets the local `file` driver, so a save to s3:// fails
mid-write ("Checkpoint path should be absolute"). Orbax's own directory handling (step
listing, temporary directories, renames) goes through etils.epath, which reads s3:// fine.

`apply()` (run once, when `bignlp_jax.checkpoint` is imported) wraps three module attributes of
`orbax.checkpoint._src.serialization.tensorstore_utils`, each delegating to the original for
anything that is not s3://:
  * `_normalize_path` keeps `s3://`;
  * `_use_gcs_driver` ("use a remote object-store driver, not the file driver") is true for
    s3:// as well, which skips the local-path checks;
  * the spec builder it then calls, `gcs_utils.get_kvstore_for_gcs`, gives an `s3` driver spec.
and, because S3 has no rename (epath's "rename" of a step directory is a single-object copy,
which fails), two functions of `orbax.checkpoint._src.path.atomicity_defaults` give s3:// the
commit-file atomicity Orbax already uses for gs:// (the step is written in place and is
complete once its `commit_success.txt` exists; step listings check that file):
  * `get_default_temporary_path_class`, `get_item_default_temporary_path_class`.
Before patching it checks that Orbax still behaves as assumed (an s3:// directory becomes a
`file` spec), and after patching that the spec is the s3 one; anything else raises at import,
naming the Orbax version, rather than writing checkpoints somewhere unexpected. When Orbax
learns s3:// itself (its spec already uses the s3 driver), nothing is patched.

TensorStore's s3 driver takes its endpoint, region and credentials from the spec (0.1.86 does
not read AWS_ENDPOINT_URL itself: without `endpoint` it asks AWS where the bucket is), so the
spec is filled from the AWS SDK's own environment variables, read at save/restore time:
AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (S3-compatible stores, emulators), AWS_REGION /
AWS_DEFAULT_REGION. Credentials stay with TensorStore's default AWS chain (environment,
profile files, web identity, instance role) unless AWS_ACCESS_KEY_ID is set: then the
`environment` provider alone, which is what the chain would pick first anyway, and which keeps
the chain from logging five lines about a missing ~/.aws/config on every open.
"""

from __future__ import annotations

import os
from collections.abc import Coroutine
from typing import Any, TypeVar

import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src import asyncio_utils
from orbax.checkpoint._src.metadata import array_metadata_store as _array_metadata_store
from orbax.checkpoint._src.path import atomicity, atomicity_defaults, gcs_utils
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

T = TypeVar("T")
S3 = "s3://"
_PROBE = "s3://bignlp-probe-bucket/run/checkpoints/1/state/"
_TS_NAMES = ("_normalize_path", "_use_gcs_driver", "build_kvstore_tspec")
_ATOMICITY_NAMES = ("get_default_temporary_path_class", "get_item_default_temporary_path_class")


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion (Orbax's helper: works inside a running event loop too)."""
    return asyncio_utils.run_sync(coroutine)


def array_metadata_store() -> Any:
    """A new store for the per-array metadata the jax.Array type handler writes."""
    return _array_metadata_store.Store()


def check_helpers() -> None:
    """Raise naming the Orbax version if the helpers above no longer exist or behave."""
    _check(callable(getattr(asyncio_utils, "run_sync", None)),
           "has no orbax.checkpoint._src.asyncio_utils.run_sync")

    async def answer() -> int:
        return 42

    _check(run_sync(answer()) == 42, "asyncio_utils.run_sync does not return the result")
    _check(callable(getattr(_array_metadata_store, "Store", None)),
           "has no orbax.checkpoint._src.metadata.array_metadata_store.Store")


def s3_kvstore_spec(path: str) -> dict[str, Any]:
    """A TensorStore `s3` kvstore spec for `s3://bucket/key...`, configured from the AWS
    environment variables (see the module docstring)."""
    bucket, _, key = path.removeprefix(S3).partition("/")
    if not bucket:
        raise ValueError(f"an s3:// path needs a bucket name: {path!r}")
    spec: dict[str, Any] = {"driver": "s3", "bucket": bucket, "path": key}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        spec["endpoint"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        spec["aws_region"] = region
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        spec["aws_credentials"] = {"type": "environment"}
    return spec


def _base_driver(spec: dict[str, Any]) -> str | None:
    """The driver under an OCDBT spec (or of a plain kvstore spec)."""
    base = spec.get("base", spec)
    return base.get("driver") if isinstance(base, dict) else None


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise RuntimeError(
            f"bignlp_jax.compat.orbax: orbax-checkpoint {ocp.__version__} {what}; this module "
            "was written for 0.12.x and must be revisited for this version")


def apply() -> None:
    """Patch Orbax's TensorStore spec builder for s3:// once (idempotent; see module doc)."""
    if getattr(ts_utils._normalize_path, "_bignlp_s3", False):
        return
    for module, names in ((ts_utils, _TS_NAMES), (gcs_utils, ("get_kvstore_for_gcs",)),
                          (atomicity_defaults, _ATOMICITY_NAMES)):
        for name in names:
            _check(callable(getattr(module, name, None)), f"has no {module.__name__}.{name}")
    _patch_atomicity()
    before = ts_utils.build_kvstore_tspec(_PROBE, use_ocdbt=False)
    if before.get("driver") == "s3":
        return  # Orbax handles s3:// itself now: nothing to patch
    _check(before.get("driver") == "file" and before.get("path") == "s3:/" + _PROBE[5:-1],
           f"builds {before} for an s3:// directory (expected the `file` driver on 's3:/...')")

    normalize, use_remote = ts_utils._normalize_path, ts_utils._use_gcs_driver
    gcs_spec = gcs_utils.get_kvstore_for_gcs

    def _normalize_path(path: str) -> str:
        if str(path).startswith(S3):
            return S3 + normalize(str(path)[len(S3):])
        return normalize(path)

    def _use_gcs_driver(directory: str) -> bool:
        return str(directory).startswith(S3) or use_remote(directory)

    def get_kvstore_for_gcs(path: str) -> dict[str, Any]:
        return s3_kvstore_spec(path) if str(path).startswith(S3) else gcs_spec(path)

    _normalize_path._bignlp_s3 = True  # type: ignore[attr-defined]
    ts_utils._normalize_path = _normalize_path
    ts_utils._use_gcs_driver = _use_gcs_driver
    gcs_utils.get_kvstore_for_gcs = get_kvstore_for_gcs

    after = ts_utils.build_kvstore_tspec(_PROBE, use_ocdbt=True)
    _check(after.get("driver") == "ocdbt" and _base_driver(after) == "s3"
           and after["base"]["path"] == _PROBE[len("s3://bignlp-probe-bucket/"):-1],
           f"still builds {after} for an s3:// directory after the shim")
    gs = ts_utils.build_kvstore_tspec("gs://b/run/state", use_ocdbt=False)
    _check(gs.get("driver") != "s3" and gs.get("bucket") == "b", f"builds {gs} for gs:// now")


def _patch_atomicity() -> None:
    """s3:// step and item directories: written in place, finalized by a commit file."""
    commit, rename = atomicity.CommitFileTemporaryPath, atomicity.AtomicRenameTemporaryPath
    probe_s3, probe_gs = epath.Path(_PROBE), epath.Path("gs://b/run/checkpoints/1")
    for name in _ATOMICITY_NAMES:
        original = getattr(atomicity_defaults, name)
        if original(probe_s3) is commit:
            continue  # Orbax does this itself now
        _check(original(probe_s3) is rename and original(probe_gs) is commit,
               f"picks {original(probe_s3).__name__} for s3:// and "
               f"{original(probe_gs).__name__} for gs:// in {name}")

        def default_class(path, *, atomicity_options=None, _original=original):
            # explicit atomicity options win, exactly as for gs://
            if atomicity_options is None and str(path).startswith(S3):
                return commit
            return _original(path, atomicity_options=atomicity_options)

        setattr(atomicity_defaults, name, default_class)
        _check(getattr(atomicity_defaults, name)(probe_s3) is commit,
               f"still picks a rename for s3:// in {name}")


# once, before any save or restore, by whoever imports this module first (the checkpoint
# package, the export bundle): Orbax then reads and writes s3:// arrays (see the module doc)
apply()

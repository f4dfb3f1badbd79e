"""The s3:// shim for Orbax (bignlp_jax/compat/orbax.py): the specs it builds, and
its refusal to patch an Orbax that no longer behaves as assumed. Saving and restoring through
it against an S3 server is tested in test_storage.py."""

from __future__ import annotations

import orbax.checkpoint as ocp
import pytest
from etils import epath
from orbax.checkpoint._src.path import atomicity, atomicity_defaults
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

from bignlp_jax.compat import orbax as orbax_compat


def test_s3_directories_get_the_s3_driver_and_others_are_unchanged(monkeypatch):
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_ACCESS_KEY_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    orbax_compat.apply()  # applied on import already: a second call changes nothing
    spec = ts_utils.build_kvstore_tspec("s3://bkt/run/checkpoints/4/state",
                                        ocdbt_process_spec=None, use_ocdbt=True)
    assert spec["driver"] == "ocdbt"
    assert spec["base"] == {"driver": "s3", "bucket": "bkt", "path": "run/checkpoints/4/state",
                            "endpoint": "http://127.0.0.1:9000", "aws_region": "eu-west-1"}
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3.local")  # the S3-specific one wins
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    assert orbax_compat.s3_kvstore_spec("s3://bkt/x")["endpoint"] == "http://s3.local"
    assert orbax_compat.s3_kvstore_spec("s3://bkt/x")["aws_credentials"] == {"type": "environment"}
    # gs:// and local paths: Orbax's own specs
    assert ts_utils.build_kvstore_tspec("gs://b/run/state", use_ocdbt=False)["driver"] == "gcs"
    local = ts_utils.build_kvstore_tspec("/tmp/run/state", use_ocdbt=False)
    assert local == {"driver": "file", "path": "/tmp/run/state"}
    # S3 has no rename: step directories are finalized by a commit file, as on gs://
    commit = atomicity.CommitFileTemporaryPath
    assert atomicity_defaults.get_default_temporary_path_class(epath.Path("s3://b/c/1")) is commit
    assert atomicity_defaults.get_default_temporary_path_class(
        epath.Path("/tmp/c/1")) is atomicity.AtomicRenameTemporaryPath


def test_an_orbax_that_behaves_otherwise_is_refused(monkeypatch):
    # as if a new Orbax built some other spec for s3:// (and the shim had not been applied)
    monkeypatch.setattr(ts_utils, "_normalize_path", lambda path: path)
    monkeypatch.setattr(ts_utils, "build_kvstore_tspec",
                        lambda *a, **k: {"driver": "file", "path": "s3://elsewhere"})
    with pytest.raises(RuntimeError, match=rf"orbax-checkpoint {ocp.__version__} builds .*must "
                                           "be revisited"):
        orbax_compat.apply()

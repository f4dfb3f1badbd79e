"""Error messages whose fix line must point the right way (issue 18, item 5)."""

from __future__ import annotations

import pytest

from bignlp_jax.config import MeshConfig, load_config
from bignlp_jax.errors import UserError


def test_mesh_bigger_than_the_devices_mentions_simulated_cpu_devices():
    from bignlp_jax.parallel.mesh import mesh_shape

    with pytest.raises(UserError, match="--xla_force_host_platform_device_count=8"):
        mesh_shape(MeshConfig(data=1, fsdp=4, tensor=2), 1)


def test_plan_that_does_not_fit_suggests_search_devices_and_remat(capsys):
    from bignlp_jax.perf.plan import COLLECTIVES
    from bignlp_jax.perf.plan_command import _print_plan

    plan = {"mesh": {"data": 1, "fsdp": 1, "sequence": 1, "tensor": 1}, "dcn": {},
            "devices": 1, "remat": "none",
            "param_bytes_per_device": 2**34, "optimizer_bytes_per_device": 2**35,
            "temp_bytes_per_device": 2**33, "total_gib_per_device": 56.0,
            "device_memory_gib": 16.0, "fits": False, "collective_bytes_per_device":
            {**dict.fromkeys(COLLECTIVES, 0), "cross_host": 0, "by_axis": {}},
            "est_step_s": 1.0, "compute_s": 1.0, "comm_s": 0.0,
            "est_mfu": 0.5, "compile_s": 1.0}
    _print_plan(None, plan, analytic=2**35)
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out
    assert "--search" in out and "--devices" in out and "model.remat=full" in out


def test_binary_input_file_is_called_binary_not_latin1(tmp_path):
    from bignlp_jax.data.tfds.local_files import _decode

    with pytest.raises(UserError) as err:
        _decode(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff", tmp_path / "x.txt")
    assert "is a binary file" in str(err.value) and "iconv" not in str(err.value)
    with pytest.raises(UserError, match="iconv -f latin1"):  # text in another encoding
        _decode("caf\xe9 au lait".encode("latin1"), tmp_path / "y.txt")


def test_finetune_without_its_pretraining_run_says_to_run_the_pretraining(tmp_path,
                                                                         monkeypatch):
    from bignlp_jax.train.loop import train

    monkeypatch.chdir(tmp_path)  # no runs/pretrain_stdlib here
    cfg = load_config("finetune_stdlib_modules", [
        "init_from=runs/pretrain_stdlib", "data.tokenizer=runs/pretrain_stdlib",
        f"run.dir={tmp_path / 'ft'}"])
    with pytest.raises(UserError) as err:
        train(cfg)
    message = str(err.value)
    assert "init_from=runs/pretrain_stdlib: no such run" in message
    assert "`bignlp-jax train configs/pretrain_stdlib.yaml`" in message
    assert "bignlp-jax pipeline" in message and "tokenizer train" not in message


def test_object_storage_paths_are_left_to_the_storage_layer(tmp_path, monkeypatch):
    """The local checks skip bucket paths: they get the bucket probe instead (no network
    here; the run identity of a bucket run is read through the storage layer, tested against
    the GCS emulator in test_storage.py)."""
    from bignlp_jax import access
    from bignlp_jax.train.inputs import check_source_runs

    monkeypatch.chdir(tmp_path)
    probed = []  # the bucket probe (network) is stood in for: only which probe runs matters
    monkeypatch.setattr(access, "_check_bucket", lambda *args: probed.append(args))
    access.check_path("gs://bucket/runs/a", "run.dir")
    assert probed == [("gs://bucket/runs/a", "run.dir", True)]
    cfg = load_config("tiny", ["run.dir=gs://bucket/runs/a", "init_from=gs://bucket/runs/p"])
    check_source_runs(cfg)
    assert list(tmp_path.iterdir()) == []  # no local gs:/bucket/... directories made

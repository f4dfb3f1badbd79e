"""Export from parameters sharded across two processes (jax.distributed, 2 x 2 CPU devices)
writes the same bytes as export from one process: the per-tensor gather crosses hosts."""

import json
import subprocess
import sys

import pytest
from conftest import REPO
from test_export_hf import VARIANTS, random_params

from bignlp_jax.config import Config, DataConfig, MeshConfig, RunConfig
from bignlp_jax.export.bundle import save_params_bundle

pytestmark = pytest.mark.multiprocess


def test_two_process_export_equals_one_process(tmp_path, cli_env):
    cfg = VARIANTS["gpt"]
    run = tmp_path / "run"
    # the run's own mesh spreads every parameter over both processes (fsdp 2 x tensor 2)
    run_cfg = Config(model=cfg, mesh=MeshConfig(data=1, fsdp=2, tensor=2),
                     data=DataConfig(seq_len=32), run=RunConfig(dir=str(run)))
    save_params_bundle(random_params(cfg), run_cfg, run, step=5)

    for fmt in ("hf", "params"):
        proc = subprocess.run(
            [sys.executable, str(REPO / "launch" / "local.py"), "--processes", "2",
             "--devices-per-process", "2", "--", "export", "--run", str(run), "--format", fmt,
             "--out", str(tmp_path / f"multi_{fmt}"), "--dtype", "bfloat16",
             "--max-shard-size", "16KB"],
            env=cli_env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        summary = [line for line in proc.stdout.splitlines() if line.startswith("[p0] {")]
        info = json.loads(summary[-1][len("[p0] "):])
        assert (info["processes"], info["devices"]) == (2, 4)  # sharded across both processes

    from bignlp_jax.cli import main

    assert main(["export", "--run", str(run), "--format", "hf", "--out", str(tmp_path / "one"),
                 "--dtype", "bfloat16", "--max-shard-size", "16KB"]) == 0
    one, multi = tmp_path / "one", tmp_path / "multi_hf"
    names = sorted(p.name for p in one.iterdir())
    assert sum(n.endswith(".safetensors") for n in names) > 1
    assert names == sorted(p.name for p in multi.iterdir())
    for name in names:
        assert (one / name).read_bytes() == (multi / name).read_bytes(), name

    # the params bundle written by two processes reads back as the bfloat16-rounded params
    import jax
    import numpy as np

    from bignlp_jax.checkpoint import load_params

    restored = load_params(tmp_path / "multi_params", cfg, step=5)
    expected = load_params(run, cfg)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(
        np.asarray(a), np.asarray(b.astype(jax.numpy.bfloat16)).astype(np.float32)),
        restored, expected)

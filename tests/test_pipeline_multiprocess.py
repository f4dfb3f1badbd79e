"""Pipeline stages across processes: mesh.dcn_stage=2 puts each stage in its own process (one
DCN granule each); two processes of two devices train like one process with the same four."""

import subprocess
import sys

import numpy as np
import pytest
from checkpoint_common import losses
from conftest import REPO

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

LOCAL = str(REPO / "launch" / "local.py")


def test_stages_over_two_processes_match_one_process(tmp_path, cli_env):
    from bignlp_jax.config import load_config

    overrides = ["train.steps=3", "train.log_every=1", "train.eval_every=0", "mesh.data=2",
                 "data.source=synthetic"]
    proc = subprocess.run(
        [sys.executable, LOCAL, "--processes", "2", "--devices-per-process", "2", "--",
         "train", "tiny", f"run.dir={tmp_path / 'multi'}", *overrides, "mesh.dcn_stage=2"],
        env=cli_env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "mesh stage=2 (2 over DCN) x data=2 x fsdp=1 x sequence=1 x tensor=1" in proc.stdout

    import jax

    from bignlp_jax.train.loop import train

    cfg = load_config("tiny", [f"run.dir={tmp_path / 'single'}", *overrides, "mesh.stage=2"])
    train(cfg, devices=jax.devices()[:4])
    multi, single = losses(tmp_path / "multi"), losses(tmp_path / "single")
    assert sorted(multi) == [1, 2, 3]
    np.testing.assert_allclose([multi[s] for s in sorted(multi)],
                               [single[s] for s in sorted(single)], rtol=2e-5)

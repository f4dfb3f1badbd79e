"""The suite compiles with LLVM's optimisations off (tests/compile_flags.py, to keep its time down);
users' runs compile at XLA's default level. A run at each level must train alike, or the suite
would be testing a different program from the one users run."""

import os
import subprocess

import numpy as np
import pytest
from checkpoint_common import host_params, losses
from compile_flags import TEST_XLA_FLAGS
from conftest import bignlp_cmd

OVERRIDES = ["train.steps=3", "train.log_every=1", "train.eval_every=0",
             "data.source=synthetic", "checkpoint.every_steps=3"]


@pytest.mark.slow  # a compile at the default level in a subprocess
def test_xla_default_level_trains_like_the_suites_level(tmp_path, cli_env):
    import jax

    from bignlp_jax.config import load_config
    from bignlp_jax.train.loop import train

    assert TEST_XLA_FLAGS in os.environ["XLA_FLAGS"].split()  # this process: the suite's level
    default = tmp_path / "default"
    flags = [f for f in cli_env["XLA_FLAGS"].split() if f != TEST_XLA_FLAGS]
    proc = subprocess.run(bignlp_cmd("train", "tiny", f"run.dir={default}", *OVERRIDES),
                          env=dict(cli_env, XLA_FLAGS=" ".join(flags)), capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    suite = tmp_path / "suite"
    cfg = load_config("tiny", [f"run.dir={suite}", *OVERRIDES])
    train(cfg, devices=jax.devices())

    got, want = losses(suite), losses(default)
    assert sorted(got) == sorted(want) == [1, 2, 3]
    np.testing.assert_allclose([got[s] for s in (1, 2, 3)], [want[s] for s in (1, 2, 3)],
                               rtol=1e-5)
    ours, theirs = host_params(suite, cfg.model), host_params(default, cfg.model)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs) and jax.tree.leaves(ours)
    differ = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), ours, theirs)
    assert max(jax.tree.leaves(differ)) < 2e-5, differ  # about 5e-6 measured

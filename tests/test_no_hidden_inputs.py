"""No hidden inputs: the environment carries the process layout only, and a run's config.yaml
records what the run used (the data dir resolved)."""

from __future__ import annotations

import re
from pathlib import Path

from bignlp_jax.config import load_config
from bignlp_jax.data.tfds.source import default_data_dir, with_resolved_data_dir

REPO = Path(__file__).resolve().parents[1]
# Where this process sits in a multi-process job, as torchrun and JAX pass it: the coordinator
# (and its port under SLURM), the process count and id, and "not distributed" for launchers that
# run a helper command inside an allocation.
# where the coordinator is and runs, how many processes, which one this is (as torchrun's)
LAYOUT_VARIABLES = {"BIGNLP_COORDINATOR", "BIGNLP_COORDINATOR_PORT", "BIGNLP_NUM_PROCESSES",
                    "BIGNLP_PROCESS_ID", "BIGNLP_DISTRIBUTED", "BIGNLP_COORDINATION_SERVICE"}


def bignlp_variables(text: str) -> set[str]:
    return set(re.findall(r"\bBIGNLP_[A-Z0-9_]+\b", text))


def test_only_process_layout_comes_from_the_environment():
    """Every BIGNLP_ name in the package and the launchers (read, set or documented) is a
    process-layout variable; anything else about a run is a config key or a flag."""
    found: dict[str, list[str]] = {}
    for path in [*(REPO / "bignlp_jax").rglob("*.py"), *(REPO / "launch").rglob("*.py")]:
        for name in bignlp_variables(path.read_text(encoding="utf-8")):
            found.setdefault(name, []).append(str(path.relative_to(REPO)))
    assert {"BIGNLP_COORDINATOR", "BIGNLP_PROCESS_ID"} <= found.keys()  # the scan sees them
    extra = {name: where for name, where in found.items() if name not in LAYOUT_VARIABLES}
    assert extra == {}


def test_the_scan_finds_a_setting_in_the_environment():
    code = 'timeout = float(os.environ.get("BIGNLP_HEARTBEAT_TIMEOUT", 60))'
    assert bignlp_variables(code) - LAYOUT_VARIABLES == {"BIGNLP_HEARTBEAT_TIMEOUT"}


def test_data_dir_is_resolved_to_an_absolute_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("tiny", [])
    assert cfg.data.data_dir is None
    assert with_resolved_data_dir(cfg).data.data_dir == str(default_data_dir())
    assert Path(with_resolved_data_dir(cfg).data.data_dir).is_absolute()
    relative = load_config("tiny", ["data.data_dir=datasets"])
    assert with_resolved_data_dir(relative).data.data_dir == str(tmp_path / "datasets")
    # nothing else changes
    assert with_resolved_data_dir(relative).model_copy(
        update={"data": relative.data}) == relative


def test_peak_tflops_is_a_config_key(tmp_path):
    """The MFU the train loop logs uses train.peak_tflops when given (no probe, no table)."""
    from helpers import tiny_config

    from bignlp_jax.model.flops import flops_per_token
    from bignlp_jax.train.peak import mfu_meter, peak_tflops

    cfg = tiny_config(tmp_path, "train.peak_tflops=2.5")
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    assert mfu_meter(cfg, 4)(1e6) == fpt * 1e6 / 4 / 1e12 / 2.5
    assert peak_tflops("float32", cfg.train.peak_tflops, "train.peak_tflops") == (
        2.5, "train.peak_tflops")

"""`plan --budget`: the scaling law, the FLOPs budget, the written config, bad input."""

import json
import math

import pytest

from bignlp_jax import cli
from bignlp_jax.config import load_config
from bignlp_jax.config.loader import CONFIG_ROOT
from bignlp_jax.perf.budget_inputs import device_spec, resolve
from bignlp_jax.perf.budget_shape import DEFAULT_VOCAB, choose_shape, closest_preset
from bignlp_jax.perf.scaling_law import LAWS, compute_optimal

# The published constants, written out here rather than read from the module under test.
PUBLISHED = {"hoffmann": (1.69, 406.4, 410.7, 0.34, 0.28),
             "epoch": (1.8172, 482.01, 2085.43, 0.3478, 0.3658)}


def _numeric_optimum(C, E, A, B, a, b):
    """argmin over N of E + A/N^a + B/(C/6N)^b by golden-section search on log N (no closed
    form), refined to a relative width of 1e-12."""
    loss = lambda log_n: A / math.exp(a * log_n) + B / (C / (6 * math.exp(log_n))) ** b  # noqa: E731
    lo, hi = math.log(1e3), math.log(C / 6 / 1e3)
    phi = (math.sqrt(5) - 1) / 2
    while hi - lo > 1e-12:
        x1, x2 = hi - phi * (hi - lo), lo + phi * (hi - lo)
        lo, hi = (lo, x2) if loss(x1) < loss(x2) else (x1, hi)
    n = math.exp((lo + hi) / 2)
    return n, C / (6 * n), E + loss((lo + hi) / 2)


def test_epoch_law_gives_chinchilla_at_its_budget():
    opt = compute_optimal(5.76e23, LAWS["epoch"])
    assert opt.params == pytest.approx(72.2e9, rel=0.01)
    assert opt.tokens == pytest.approx(1.33e12, rel=0.01)
    assert opt.params * opt.tokens * 6 == pytest.approx(5.76e23, rel=1e-12)


@pytest.mark.parametrize("law", ["hoffmann", "epoch"])
@pytest.mark.parametrize("C", [1e18, 5.76e23, 1e25])
def test_closed_form_matches_numeric_minimum(law, C):
    E, A, B, a, b = PUBLISHED[law]
    assert (LAWS[law].E, LAWS[law].A, LAWS[law].B, LAWS[law].a, LAWS[law].b) == (E, A, B, a, b)
    n, d, loss = _numeric_optimum(C, E, A, B, a, b)
    opt = compute_optimal(C, LAWS[law])
    assert opt.params == pytest.approx(n, rel=1e-6)
    assert opt.tokens == pytest.approx(d, rel=1e-6)
    assert opt.loss == pytest.approx(loss, rel=1e-9)


@pytest.mark.parametrize("family, n, preset", [("gpt3", 1.3e9, "gpt3_1.3b.yaml"),
                                               ("llama", 7.22e10, "llama3_70b.yaml")])
def test_shape_is_within_10_percent_and_shards(family, n, preset):
    shape = choose_shape(family, n, DEFAULT_VOCAB[family], 4096)
    m = shape.model
    assert abs(shape.params / n - 1) <= 0.10
    assert m.dim_per_head == 128 and m.num_heads * 128 == m.hidden and m.hidden % 1024 == 0
    assert m.kv_heads == (8 if family == "llama" else m.num_heads)
    assert m.mlp_dim % 256 == 0 and m.mlp_dim / m.hidden == pytest.approx(
        3.5 if family == "llama" else 4.0, rel=0.05)
    assert 32 <= m.hidden / m.num_layers <= 256
    assert closest_preset(family, shape.params, CONFIG_ROOT / "models")[0] == preset


def _args(*argv):
    return cli.parse_args(cli.build_parser(["plan", *argv]), ["plan", *argv])


def test_device_days_budget_is_exact():
    inp = resolve(_args("--budget", "--device", "h100", "--devices", "64", "--days", "7",
                        "--mfu", "0.4"))
    peak = device_spec("h100", 64).peak_tflops
    assert peak == 989.0  # H100 SXM dense bf16 datasheet
    assert inp.flops == 64 * (peak * 1e12) * 0.4 * 7 * 86400
    assert inp.days == 7 and inp.devices == 64


def test_mfu_from_a_bench_output(tmp_path):
    bench = tmp_path / "bench.txt"
    bench.write_text("compiled in 1.0s\nx: 10 tokens/s\n" + json.dumps({"mfu": 0.37}) + "\n")
    inp = resolve(_args("--budget", "--devices", "8", "--days", "1", "--mfu-from", str(bench)))
    assert inp.mfu == 0.37 and "bench" in inp.mfu_source
    assert inp.flops == 8 * (989.0 * 1e12) * 0.37 * 1 * 86400


def test_flops_alone_picks_devices_that_finish_in_30_days():
    inp = resolve(_args("--budget", "--flops", "1e24", "--mfu", "0.5"))
    days = lambda n: 1e24 / (n * 989e12 * 0.5) / 86400  # noqa: E731
    assert days(inp.devices) <= 30 < days(inp.devices // 2)


@pytest.mark.parametrize("argv, needle", [
    (["--devices", "8", "--days", "0"], "--days must be a positive number"),
    (["--device", "h900", "--devices", "8", "--days", "1"], "not a device kind we know"),
    (["--devices", "8", "--days", "1", "--mfu", "1.5"], "MFU must be in (0, 1]"),
    (["--flops", "1e9", "--devices", "8", "--vocab", "256"], "too small for any llama model"),
    (["tiny", "--flops", "1e20"], "give no CONFIG"),
])
def test_bad_input_is_one_line_and_exit_2(argv, needle, capsys):
    assert cli.main(["plan", "--budget", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


@pytest.mark.slow
def test_written_config_trains_as_planned(tmp_path, capsys):
    out = tmp_path / "budget.yaml"
    assert cli.main(["plan", "--budget", "--flops", "1e14", "--device", "h100", "--devices", "8",
                     "--vocab", "256", "--seq-len", "64", "--max-compiles", "1",
                     "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    law = compute_optimal(1e14, LAWS["epoch"])
    assert result["law"]["params"] == pytest.approx(law.params)
    assert out.read_text().startswith("# Written by `bignlp-jax plan --budget`: --flops 1e+14")
    cfg = load_config(str(out))
    # describe's parameter count within 10% of N
    assert cli.main(["describe", str(out), "--devices", "8"]) == 0
    described = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(described["parameters"] / law.params - 1) <= 0.10
    # tokens within 2% of D; the batch splits over the 8 devices
    tokens = cfg.train.steps * cfg.train.global_batch_size * cfg.data.seq_len
    assert abs(tokens / law.tokens - 1) <= 0.02
    assert cfg.train.global_batch_size % 8 == 0
    # step decay at 80% and 90% of the steps, to 0.316x then 0.1x
    opt = cfg.optimizer
    assert opt.schedule == "step" and opt.warmup_steps < opt.boundaries[0]
    assert opt.boundaries == [round(0.8 * cfg.train.steps), round(0.9 * cfg.train.steps)]
    assert opt.gamma == pytest.approx(0.316, abs=1e-3) and opt.gamma**2 == pytest.approx(0.1,
                                                                                         rel=1e-5)
    assert opt.lr == pytest.approx(0.3118 * 1e14**-0.125, rel=1e-3)
    assert result["mesh"]["fits"] and result["mesh"]["best"]["devices"] == 8
    # plan and train take it as it is (train for 2 of its steps)
    assert cli.main(["plan", str(out), "--devices", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["fits"]
    assert cli.main(["train", str(out), "train.steps=2", f"run.dir={tmp_path / 'run'}"]) == 0
    assert (tmp_path / "run").is_dir()


@pytest.mark.slow
def test_cpu_budget_gives_a_model_that_trains_here(tmp_path, capsys):
    out = tmp_path / "cpu.yaml"
    assert cli.main(["plan", "--budget", "--flops", "1e17", "--device", "cpu", "--devices", "8",
                     "--vocab", "1024", "--seq-len", "128", "--max-compiles", "0",
                     "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "days at MFU 0.4" in text and "closest preset: llama" in text
    cfg = load_config(str(out))
    assert cfg.model.dtype == "float32" and cfg.mesh.data == -1
    # one step of it, with a batch this machine takes in seconds
    assert cli.main(["train", str(out), "train.steps=1", "train.global_batch_size=8",
                     f"run.dir={tmp_path / 'run'}"]) == 0


def test_no_plan_fits_says_so_and_how_large_a_model_would(tmp_path, capsys):
    out = tmp_path / "small.yaml"
    assert cli.main(["plan", "--budget", "--flops", "1e14", "--devices", "8", "--vocab", "256",
                     "--seq-len", "64", "--device-memory-gb", "0.0001", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    result = json.loads(text.strip().splitlines()[-1])
    assert result["mesh"]["none_fits"] and result["mesh"]["best"] is None
    largest = 8 * 0.9 * 0.0001 * 2**30 / 16
    assert result["mesh"]["largest_fitting_params"] == pytest.approx(largest)
    assert "NO PLAN FITS on 8 x h100" in text and f"~{largest / 1e9:.3g}B parameters" in text
    assert "NO PLAN FITS" in out.read_text().splitlines()[4]

"""Performance tooling: the FLOPs formula, `bench` output, `plan` memory figures, the HLO
collective counter, and that the speed-motivated model changes keep the numbers."""

import json
import os
import platform
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, bignlp_cmd
from helpers import tiny_config

from bignlp_jax.model import abstract_params, count_params
from bignlp_jax.model.flops import flops_per_token, param_bytes_per_device
from bignlp_jax.perf.plan import collective_bytes

BENCH_FIELDS = ("tokens_per_sec", "step_time_s", "step_time_spread", "compile_s",
                "flops_per_token", "tflops_per_device", "mfu", "peak_memory_bytes_per_device",
                "data_wait_fraction", "page_faults_per_step")


def test_flops_per_token_gpt_by_hand(tmp_path):
    # V=128, L=2, D=32, 4 heads of 8, F=64, T=16, learned positions (64 x 32), tied embeddings.
    m = tiny_config(tmp_path).model
    per_layer = (2 * 32          # attn_norm scale + bias
                 + 32 * 4 * 3 * 8 + 4 * 3 * 8  # qkv [D,K,G+2,H] + bias (K=4, G=1)
                 + 4 * 8 * 32 + 32  # out [N,H,D] + bias
                 + 2 * 32          # mlp_norm
                 + 32 * 64 + 64 + 64 * 32 + 32)  # wi, bi, wo, bo
    total = 128 * 32 + 64 * 32 + 2 * per_layer + 2 * 32  # embed, positions, blocks, final norm
    assert count_params(abstract_params(m)) == total
    n = total - 64 * 32  # tied: the table is the output head; positions do no matmul
    assert flops_per_token(m, 16) == 6 * n + 12 * 2 * 4 * 8 * 16 == 139776


def test_flops_per_token_llama_by_hand(tmp_path):
    # GQA (4 query heads on 2 kv heads), RoPE, SwiGLU, RMSNorm, no biases, untied head.
    m = tiny_config(tmp_path, llama=True).model
    per_layer = 32 + 32 * 2 * 4 * 8 + 4 * 8 * 32 + 32 + 32 * 2 * 64 + 64 * 32
    total = 128 * 32 + 2 * per_layer + 32 + 32 * 128  # embed, blocks, final norm, lm_head
    assert count_params(abstract_params(m)) == total
    n = total - 128 * 32  # the input table does no matmul; the untied head does
    assert flops_per_token(m, 16) == 6 * n + 12 * 2 * 4 * 8 * 16 == 148416


@pytest.mark.slow
@pytest.mark.parametrize("device_kind, name", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-80GB", "a100"), ("TPU v4", "tpu-v4"), ("TPU v5 lite", "tpu-v5e"),
    ("TPU v5p", "tpu-v5p"), ("TPU v6 lite", "tpu-v6e"), ("cpu", None),
])
def test_one_accelerator_table_serves_mfu_and_plan(device_kind, name):
    """MFU's peak (train/peak.py) and plan's device specs come from one table
    (parallel/devices.py), matched by jax's device_kind."""
    from bignlp_jax.parallel.devices import DEVICES, spec_for_kind
    from bignlp_jax.train.peak import table_peak

    spec = spec_for_kind(device_kind)
    assert (spec.name if spec else None) == name
    assert table_peak(device_kind) == (DEVICES[name].peak_tflops if name else None)


@pytest.mark.slow
def test_bench_prints_json_with_every_field(cli_env, tmp_path):
    proc = subprocess.run(
        bignlp_cmd("bench", "configs/tiny.yaml", f"run.dir={tmp_path}", "--steps", "2",
                   "--warmup", "1", "--peak-tflops", "0.5"),
        cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in BENCH_FIELDS:
        assert key in result, key
    assert result["num_devices"] == 8 and result["steps"] == 2
    assert result["tokens_per_sec"] > 0 and result["peak_memory_bytes_per_device"] > 0
    lo, hi = result["step_time_spread"]
    assert lo <= result["step_time_s"] <= hi
    assert 0 <= result["data_wait_fraction"] < 1
    assert result["page_faults_per_step"] >= 0
    assert result["peak_tflops_per_device"] == 0.5
    expected = result["flops_per_token"] * result["tokens_per_sec"] / 8 / 1e12 / 0.5
    assert result["mfu"] == pytest.approx(expected)


def _plan(cli_env, *overrides):
    proc = subprocess.run(
        bignlp_cmd("plan", "configs/models/llama_126m.yaml", "--devices", "16", "--json",
                   "data.seq_len=128", "train.global_batch_size=16", "mesh.data=-1", *overrides),
        cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_plan_memory_shrinks_with_fsdp_and_matches_analytic(cli_env):
    from bignlp_jax.config import load_config

    plans = {f: _plan(cli_env, f"mesh.fsdp={f}") for f in (2, 8)}
    model = load_config("configs/models/llama_126m.yaml").model
    for f, plan in plans.items():
        assert plan["devices"] == 16 and plan["mesh"]["fsdp"] == f
        analytic = param_bytes_per_device(model, "default", plan["mesh"])
        assert plan["param_bytes_per_device"] == pytest.approx(analytic, rel=0.01)
        # AdamW: two float32 moments per parameter (plus a step counter)
        assert plan["optimizer_bytes_per_device"] == pytest.approx(2 * analytic, rel=0.01)
        assert plan["analytic_param_optimizer_bytes_per_device"] == pytest.approx(
            3 * analytic, rel=0.01)
    small, large = plans[8], plans[2]
    assert small["param_bytes_per_device"] < large["param_bytes_per_device"] / 3
    assert small["total_bytes_per_device"] < large["total_bytes_per_device"]
    assert small["collective_bytes_per_device"]["all-gather"] > 0  # fsdp gathers parameters


HLO = """HloModule m

%body (p: (s32[], f32[64])) -> (s32[], f32[64]) {
  %p = (s32[], f32[64]) parameter(0)
  %x = f32[64]{0} get-tuple-element(%p), index=1
  %ag = f32[256]{0} all-gather(%x), channel_id=1, replica_groups=mesh['a'=2,'b'=4] {'b'}, dimensions={0}
  %ar = f32[256]{0} all-reduce(%ag), channel_id=2, replica_groups=[4,2]<=[8], to_apply=%add
  %ds = f32[64]{0} dynamic-slice(%ar, %i), dynamic_slice_sizes={64}
  ROOT %t = (s32[], f32[64]) tuple(%i, %ds)
}

ENTRY %main (a: f32[64]) -> f32[64] {
  %a = f32[64]{0} parameter(0)
  %w = (s32[], f32[64]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %g = f32[512]{0} all-reduce(%a2), channel_id=3, replica_groups=mesh['a'=2,'b'=4] {'a'}, to_apply=%add
  ROOT %r = f32[64]{0} get-tuple-element(%w), index=1
}
"""


def test_collective_bytes_counts_loop_trips_and_groups():
    out = collective_bytes(HLO, host_size=4)
    # all-gather of 256 floats over groups of 4 consecutive devices, 3 trips: 1024 B * 3/4 * 3
    assert out["all-gather"] == pytest.approx(1024 * 3 / 4 * 3)
    # the sliced all-reduce counts as a reduce-scatter: 1024 B * 1/2 * 3
    assert out["reduce-scatter"] == pytest.approx(1024 * 1 / 2 * 3)
    # a plain all-reduce moves its bytes twice; devices 0 and 4 sit on different hosts
    assert out["all-reduce"] == pytest.approx(2 * 2048 * 1 / 2)
    assert out["cross_host"] == pytest.approx(out["all-reduce"])


@pytest.mark.slow  # a training/compile run end to end: CI's whole suite runs it
def test_search_ranks_fitting_meshes(tmp_path):
    from bignlp_jax.perf.plan import DEVICES
    from bignlp_jax.perf.plan_command import search

    cfg = tiny_config(tmp_path, "model.dtype=bfloat16")
    fitting, too_big, skipped = search(cfg, 8, DEVICES["h100"], 80.0, budget_s=300,
                                       max_compiles=2, log=lambda s: None)
    assert len(fitting) == 2 and not too_big
    assert fitting[0]["est_step_s"] <= fitting[1]["est_step_s"]
    assert skipped  # the rest were left uncompiled by max_compiles
    for plan in fitting:
        assert plan["devices"] == 8 and plan["fits"]


@pytest.mark.slow
def test_unrolled_layers_match_scanned(tmp_path):
    from bignlp_jax.data import SyntheticSource
    from bignlp_jax.model import init_params
    from bignlp_jax.train.step import loss_sums

    batch = next(SyntheticSource(seed=0, vocab_size=128, seq_len=16, global_batch=4,
                                 rows=(0, 4)))
    results = []
    for unroll in (1, 0):
        cfg = tiny_config(tmp_path, f"model.scan_unroll={unroll}", llama=True)
        params = init_params(cfg.model, jax.random.key(3))
        results.append(jax.jit(jax.value_and_grad(
            lambda p, cfg=cfg: loss_sums(p, batch, cfg)[0]))(params))
    (loss_a, grads_a), (loss_b, grads_b) = results
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    # same operations, possibly in another order: float32 rounding only
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 grads_a, grads_b)


def test_huge_page_tunable_is_added_once_and_respects_the_user():
    from bignlp_jax.perf.hugepages import tunables_with_huge_pages

    assert tunables_with_huge_pages(None) == "glibc.malloc.hugetlb=1"
    assert tunables_with_huge_pages("glibc.malloc.arena_max=2") == (
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
    assert tunables_with_huge_pages("glibc.malloc.hugetlb=0") is None  # the user's opt-out
    assert tunables_with_huge_pages("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1") is None


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc tunables only")
def test_entry_point_reexecutes_with_the_tunable(tmp_path):
    code = ("import os; from bignlp_jax.perf.hugepages import reexec_with_huge_pages as r; "
            "r(); print(os.environ.get('GLIBC_TUNABLES'), os.getpid())")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            text=True)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    tunables, pid = out.split()
    assert tunables == "glibc.malloc.hugetlb=1" and int(pid) == proc.pid  # same process, re-executed
    env["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=0"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60).stdout
    assert out.split()[0] == "glibc.malloc.hugetlb=0"


def test_huge_pages_only_where_jax_will_run_on_cpu(tmp_path, monkeypatch):
    from bignlp_jax.perf.hugepages import accelerator_plugins, cpu_backend_expected

    assert cpu_backend_expected({"JAX_PLATFORMS": "cpu"})
    assert not cpu_backend_expected({"JAX_PLATFORMS": "cuda"})
    assert not cpu_backend_expected({"JAX_PLATFORMS": "tpu,cpu"})  # JAX takes the first
    assert cpu_backend_expected({}) == (accelerator_plugins() == [])
    # a CUDA PJRT plugin (a `jax_plugins` submodule) or libtpu installed: an accelerator host
    (tmp_path / "jax_plugins" / "xla_cuda13").mkdir(parents=True)
    (tmp_path / "jax_plugins" / "xla_cuda13" / "__init__.py").write_text("")
    (tmp_path / "libtpu").mkdir()
    (tmp_path / "libtpu" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert accelerator_plugins() == ["libtpu", "jax_plugins.xla_cuda13"]
    assert not cpu_backend_expected({})
    assert cpu_backend_expected({"JAX_PLATFORMS": "cpu"})  # the user's explicit choice wins


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc tunables only")
def test_entry_leaves_accelerator_hosts_alone_without_importing_jax():
    code = ("import os, sys; from bignlp_jax.perf.hugepages import reexec_with_huge_pages as r; "
            "r(); print(os.environ.get('GLIBC_TUNABLES'), 'jax' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    for platforms, tunables in (("cpu", "glibc.malloc.hugetlb=1"), ("cuda", "None"),
                                ("tpu", "None")):
        env["JAX_PLATFORMS"] = platforms
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=60).stdout
        assert out.split() == [tunables, "False"], platforms


def test_console_script_goes_through_the_reexec_entry():
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name="bignlp-jax")
    assert script.value == "bignlp_jax.cli:entry"


def test_collective_bytes_by_mesh_axis():
    """Groups named as an anonymous mesh with its own device order, as iota lists and as
    permute pairs are each traced back to the axes of our mesh."""
    shape = {"data": 2, "fsdp": 1, "sequence": 2, "tensor": 2}  # device id = 4d + 2s + t
    lines = [
        # device_ids [4,2]T(1,0): the 2x4 mesh holds rows (0,2,4,6) and (1,3,5,7), so a group
        # along axis_3 is {0,2,4,6}: data and sequence vary
        "%a = f32[8]{0} all-gather(%x), replica_groups=mesh['axis_2'=2,'axis_3'=4], "
        "device_ids=([4,2]T(1,0)) {'axis_3'}, dimensions={0}",
        "%b = f32[8]{0} all-gather(%x), replica_groups=[4,2]<=[8], dimensions={0}",  # {0,1}
        "%c = f32[8]{0} collective-permute(%x), source_target_pairs={{0,2},{2,0},{1,3},{3,1}}",
    ]
    from bignlp_jax.perf.plan import group_axes

    assert [group_axes(line, shape) for line in lines] == ["data+sequence", "tensor", "sequence"]
    hlo = "HloModule m\n\nENTRY %main () -> f32[8] {\n" + "\n".join(
        "  " + line for line in lines) + "\n}\n"
    out = collective_bytes(hlo, 8, shape, dcn={"data": 2})
    assert out["by_axis"] == {"data+sequence": 32 * 3 / 4, "tensor": 32 / 2, "sequence": 32 / 2}
    assert out["cross_host"] == 32 * 3 / 4  # only the collective along data crosses DCN


def test_search_space_has_sequence_and_dcn_splits(tmp_path):
    from bignlp_jax.perf.plan import DEVICES
    from bignlp_jax.perf.plan_command import analytic_step_s, dcn_candidates, mesh_candidates

    cfg = tiny_config(tmp_path, "data.seq_len=64", "train.global_batch_size=64")
    shapes = mesh_candidates(cfg, 64)
    assert {s["sequence"] for s in shapes} == {1, 2, 4, 8}
    assert all(64 % (2 * s["sequence"]) == 0 and np.prod(list(s.values())) == 64 for s in shapes)
    # 64 devices = 8 hosts of 8: the hosts split between data and fsdp, seq x tensor in a host
    shape = {"data": 4, "fsdp": 4, "sequence": 2, "tensor": 2}
    assert dcn_candidates(shape, 64, 8) == [{"dcn_data": 4, "dcn_fsdp": 2},
                                            {"dcn_data": 2, "dcn_fsdp": 4}]
    assert dcn_candidates({**shape, "sequence": 8, "fsdp": 1}, 64, 8) == []
    assert dcn_candidates(shape, 64, 4096) == [{"dcn_data": 1, "dcn_fsdp": 1}]  # one TPU slice
    # fsdp traffic over DCN costs more than over NVLink
    shape = {"data": 8, "fsdp": 2, "sequence": 2, "tensor": 2}
    inside, across = dcn_candidates(shape, 64, 8)
    assert (inside, across) == ({"dcn_data": 8, "dcn_fsdp": 1}, {"dcn_data": 4, "dcn_fsdp": 2})
    h100 = DEVICES["h100"]
    assert analytic_step_s(cfg, shape, "full", h100, across) > analytic_step_s(
        cfg, shape, "full", h100, inside)


@pytest.mark.slow
def test_plan_output_has_no_xla_rematerialization_warnings(cli_env):
    """A 2x2 data x fsdp mesh makes XLA's SPMD partitioner warn "Involuntary full
    rematerialization" from C++; plan's output keeps its own table and drops those lines."""
    env = {k: v for k, v in cli_env.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run(
        bignlp_cmd("plan", "configs/tiny.yaml", "mesh.data=2", "mesh.fsdp=2", "--devices", "4"),
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mesh d x f x seq x t        2x2x1x1 (4 devices)" in proc.stdout, proc.stdout
    assert "Involuntary full rematerialization" not in proc.stdout + proc.stderr

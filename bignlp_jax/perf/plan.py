"""Ahead-of-time planning: compile the real train step for a mesh you do not have.

`compile_plan` lowers and compiles the train step (`make_train_step`, the one training runs) for
abstract inputs (`abstract_state`: shapes and shardings, nothing allocated) on N devices, and
reads back what XLA decided: per-device bytes of parameters, optimizer state and temporaries
(compiled memory analysis), and the collectives it inserted. The devices are simulated CPU
devices (`command.py` re-executes itself with `--xla_force_host_platform_device_count=N`), so
the figures are the CPU compiler's: layouts and fusion differ a little from GPU/TPU, and the
temporaries are an estimate for the real accelerator, not a promise.

Estimated step time = compute + communication, no overlap assumed (so it is pessimistic):
  compute = model FLOPs per device (PaLM formula, x4/3 when the forward is recomputed under
            `remat=full`) / the device's peak, divided by 1 - the pipeline bubble
            (S-1)/(R*M+S-1) with pipeline stages (idle stages compute on nothing useful);
  comm    = bytes of every collective in the compiled program (loop bodies counted once per
            trip) / the device's link bandwidth (slower across hosts when a group spans hosts).
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from bignlp_jax.config import Config
from bignlp_jax.model.flops import flops_per_token, pipeline_split
from bignlp_jax.model.lora import LoraSpec
from bignlp_jax.parallel.devices import DEVICES, DeviceSpec
from bignlp_jax.parallel.mesh import dcn_axes
from bignlp_jax.train.dpo import is_preference
from bignlp_jax.train.loop import Trainer
from bignlp_jax.train.state import abstract_state

__all__ = ["DEVICES", "DeviceSpec", "compile_plan"]  # the device table lives in devices.py



COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
               "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def abstract_batch(cfg: Config, sharding: NamedSharding) -> dict[str, jax.ShapeDtypeStruct]:
    shape = (cfg.train.global_batch_size, cfg.data.seq_len)
    out = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)
           for k in ("tokens", "targets", "positions", "segment_ids")}
    out["loss_mask"] = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
    if is_preference(cfg):  # a batch of pairs: both sides' rows (train/dpo.py)
        return {f"{side}_{k}": v for side in ("chosen", "rejected") for k, v in out.items()}
    return out


def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
    return total


_COLLECTIVE_RE = re.compile(
    r"^\s*(?:ROOT )?%?[\w.\-]+ = (?P<result>.+?) "
    r"(?P<op>all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?P<start>-start)?\(")


def _shape_bytes(text: str) -> int:
    """Bytes of an HLO result type such as `bf16[8,128]{1,0}` or a tuple of them."""
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", text):
        if dtype in DTYPE_BYTES:
            total += DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _group_size_and_spread(line: str, host_size: int) -> tuple[int, bool]:
    """Devices per replica group, and whether a group spans hosts of `host_size` devices."""
    if "replica_groups=mesh[" in line:  # mesh['a'=2,'b'=4] {'b'}: groups along listed axes
        ids = _first_group(line) or [0]
        return len(ids), len({i // host_size for i in ids}) > 1
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](T\([\d,]+\))?", line)
    if m:
        size = int(m.group(2))
        # an iota without transpose lists consecutive devices; a transposed one strides
        contiguous = m.group(4) is None
        return size, not (contiguous and size <= host_size)
    m = re.search(r"replica_groups=\{\{([\d,]+)\}", line)
    if m:
        ids = [int(x) for x in m.group(1).split(",")]
        return len(ids), len({i // host_size for i in ids}) > 1
    if "source_target_pairs=" in line:  # collective-permute: each device sends one buffer
        return 2, False
    return 1, False


def _first_group(line: str) -> list[int] | None:
    """Logical device ids (positions in the mesh, row-major) of the first replica group, or
    None if the line names none."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(\[([\d,]+)\]"
                  r"(?:T\(([\d,]+)\))?\))?\s*\{([^}]*)\}", line)
    if m:  # mesh['axis_0'=2,...], device_ids=([4,2]T(1,0)) {'axis_1'}: groups along the listed
        axes = [(name, int(size)) for name, size in re.findall(r"'([^']+)'=(\d+)", m.group(1))]
        ids = np.arange(math.prod(size for _, size in axes))
        if m.group(2):  # the mesh's devices in an iota order of their own
            ids = ids.reshape([int(d) for d in m.group(2).split(",")])
            if m.group(3):
                ids = ids.transpose([int(p) for p in m.group(3).split(",")])
        ids = ids.reshape([size for _, size in axes])
        along = set(re.findall(r"'([^']+)'", m.group(4)))
        return ids[tuple(slice(None) if n in along else 0 for n, _ in axes)].ravel().tolist()
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if m:
        dims = [int(d) for d in m.group(3).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(4):
            ids = ids.transpose([int(p) for p in m.group(4).split(",")])
        return ids.reshape(int(m.group(1)), int(m.group(2)))[0].tolist()
    m = re.search(r"replica_groups=\{\{([\d,]+)\}", line)
    if m:
        return [int(x) for x in m.group(1).split(",")]
    return None


def group_axes(line: str, mesh_shape: dict[str, int]) -> str:
    """The mesh axes a collective's groups run along ('data', 'fsdp+tensor', ...): the axes
    whose coordinate differs between members of a group ('?' when the groups are not named)."""
    pairs = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)+)\}", line)
    if pairs:  # collective-permute: the axes along which some source and target differ
        groups = [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", pairs.group(1))]
    else:
        groups = [_first_group(line) or []]
    varying: set[str] = set()
    for ids in groups:
        if not ids or math.prod(mesh_shape.values()) <= max(ids):
            return "?"
        coords = np.array(np.unravel_index(ids, tuple(mesh_shape.values())))  # [axes, members]
        varying |= {a for a, row in zip(mesh_shape, coords) if len(set(row.tolist())) > 1}
    return "+".join(a for a in mesh_shape if a in varying) or "?"


def _sliced_after(line: str, lines: list[str]) -> bool:
    """Whether an all-reduce's result only feeds a dynamic-slice (each device keeps its shard).

    The CPU compiler leaves the pair as it is; GPU and TPU compilers turn it into a
    reduce-scatter, which moves half the bytes, so the estimate counts it as one."""
    match = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) =", line)
    if match is None:
        return False
    name = match.group(1)
    users = [u for u in lines if re.search(rf"[(, ]%{re.escape(name)}[,)]", u)]
    return bool(users) and all("dynamic-slice" in u.split("=", 1)[1].split("(")[0]
                               or "dynamic-slice" in u.split("=", 1)[0] for u in users)


def collective_bytes(hlo: str, host_size: int = 8, mesh_shape: dict[str, int] | None = None,
                     dcn: dict[str, int] | None = None) -> dict:
    """Per-device bytes moved by each kind of collective in a compiled HLO module.

    Instructions in a while loop's body count once per trip (XLA records `known_trip_count`).
    Bytes are the result size (all-gather, all-reduce x2 for its two phases) or operand size
    (reduce-scatter), the usual ring-algorithm volumes. `cross_host` collects the bytes of groups
    spanning hosts. With `mesh_shape` (axis -> size, mesh order), `by_axis` splits the bytes by
    the mesh axes each collective runs along; with `dcn` (the axes that cross slices/nodes),
    `cross_host` counts the collectives along those axes instead of guessing from host_size."""
    computations: dict[str, list[str]] = {}
    entry = current = None
    for line in hlo.splitlines():
        head = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            current = head.group(2)
            computations[current] = []
            entry = current if head.group(1) else entry
        elif current is not None:
            computations[current].append(line)

    # How many times each computation runs per step: walk from the entry through while loops.
    multiplicity: dict[str, float] = {}

    def visit(name: str, times: float) -> None:
        multiplicity[name] = multiplicity.get(name, 0.0) + times
        for line in computations.get(name, []):
            trips = 1.0
            if " while(" in line:
                m = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                trips = float(m.group(1)) if m else 1.0
            for callee in re.findall(r"(?:body|to_apply|calls|branch_computations)=\{?%([\w.\-]+)",
                                     line):
                if callee in computations and callee != name:
                    visit(callee, times * (trips if "body=" in line else 1.0))

    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    visit(entry, 1.0)

    out: dict[str, Any] = {k: 0.0 for k in COLLECTIVES}  # and by_axis: a dict of its own
    out["cross_host"] = 0.0
    by_axis: dict[str, float] = {}
    for name, lines in computations.items():
        if name not in multiplicity:
            continue
        for line in lines:
            m = _COLLECTIVE_RE.match(line)
            if not m:
                continue
            kind, result = m.group("op"), m.group("result")
            if m.group("start") and result.startswith("("):
                result = result.rsplit(", ", 1)[-1]  # async start: (operand, result) tuple
            size, spread = _group_size_and_spread(line, host_size)
            if size <= 1:
                continue
            nbytes = _shape_bytes(result)
            if kind == "reduce-scatter":
                nbytes *= size  # the operand is `size` times the result
            if kind == "all-reduce":
                if _sliced_after(line, lines):
                    kind = "reduce-scatter"  # what GPU/TPU compilers make of all-reduce + slice
                else:
                    nbytes *= 2
            moved = nbytes * (size - 1) / size * multiplicity[name]
            out[kind] += moved
            axes = group_axes(line, mesh_shape) if mesh_shape else "?"
            by_axis[axes] = by_axis.get(axes, 0.0) + moved
            if dcn:
                spread = any(a in dcn for a in axes.split("+"))
            if spread:
                out["cross_host"] += moved
    if mesh_shape:
        out["by_axis"] = by_axis
    return out


def compile_plan(cfg: Config, devices: list | None = None, spec: DeviceSpec | None = None,
                 memory_gb: float | None = None) -> dict:
    """Compile the train step for `cfg` on `devices` from abstract inputs; memory and estimates."""
    spec = spec or DEVICES["h100"]
    memory_gb = memory_gb if memory_gb is not None else spec.memory_gb
    start = time.perf_counter()
    # One process cannot lay out a multi-slice mesh; the compiled program does not depend on
    # which physical device sits where, so compile on a one-level mesh of the same shape and
    # count the bytes along the axes that would cross DCN.
    trainer = Trainer.build(cfg.model_copy(update={"mesh": cfg.mesh.model_copy(
        update={"dcn_data": 1, "dcn_fsdp": 1, "stage": cfg.mesh.stages, "dcn_stage": 1})}),
        devices)
    state = abstract_state(cfg.model, trainer.tx, trainer.state_sh,
                           LoraSpec.from_config(cfg.lora))
    batch = abstract_batch(cfg, trainer.batch_sh)
    compiled = trainer.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start

    stats = compiled.memory_analysis()
    params = shard_bytes(state.params)
    optimizer = shard_bytes(state.opt_state)
    arguments = int(stats.argument_size_in_bytes)
    temp = int(stats.temp_size_in_bytes)
    # Outputs not aliased to donated inputs need their own buffers (metrics: a few bytes).
    extra_out = max(int(stats.output_size_in_bytes) - int(stats.alias_size_in_bytes), 0)
    total = arguments + temp + extra_out
    dcn = dcn_axes(cfg.mesh)
    comm = collective_bytes(compiled.as_text(), spec.host_size, dict(trainer.mesh.shape), dcn)

    n = trainer.mesh.size
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    recompute = 4 / 3 if cfg.model.remat == "full" else 1.0
    pipeline = pipeline_split(cfg)
    bubble = pipeline["bubble"] if pipeline else 0.0
    compute_s = flops_per_token(cfg.model, cfg.data.seq_len) * tokens * recompute / n / (
        spec.peak_tflops * 1e12) / (1 - bubble)
    fast = sum(comm[k] for k in COLLECTIVES) - comm["cross_host"]  # by_axis: the same split
    comm_s = fast / (spec.link_gbps * 1e9) + comm["cross_host"] / (spec.cross_host_gbps * 1e9)
    gib = 2**30
    return {
        "mesh": dict(trainer.mesh.shape),
        "dcn": dcn,
        "remat": cfg.model.remat,
        "microbatches": cfg.train.microbatches,
        "devices": n,
        "param_bytes_per_device": params,
        "optimizer_bytes_per_device": optimizer,
        "argument_bytes_per_device": arguments,
        "temp_bytes_per_device": temp,
        "total_bytes_per_device": total,
        "total_gib_per_device": total / gib,
        "device_memory_gib": memory_gb,
        "fits": total <= memory_gb * gib,
        "collective_bytes_per_device": comm,
        "compute_s": compute_s,
        "comm_s": comm_s,
        "est_step_s": compute_s + comm_s,
        "est_mfu": compute_s * (1 - bubble) / recompute / (compute_s + comm_s),
        "pipeline": pipeline,
        "pipeline_fsdp_gather": cfg.train.pipeline_fsdp_gather,
        "compile_s": compile_s,
    }

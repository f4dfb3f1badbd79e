"""Logical axis names -> mesh axes: the one place that knows how a model is laid out on devices.

Model code names the axes of every parameter and activation (`embed`, `mlp`, `heads`, ...); it
never sees the mesh. A rules table per strategy maps those names onto the mesh axes
`stage`, `data`, `fsdp`, `sequence` and `tensor`. Parameters use the plain names; activations
use `act_*` names so that, e.g., FSDP can shard a weight's `embed` axis while activations keep
`embed` whole. The stacked layers' `layers` axis is split over `stage` (pipeline parallelism,
model/pipeline.py); with one stage that is no split at all. When the stages do not divide the
layers (126 layers on 8 stages) a dimension cannot be split over them, so `rules_table` keeps
`layers` whole and splits the parameters' `embed` over fsdp x stage instead: each device still
stores 1/(stage x fsdp x tensor) of a weight. Inside the pipeline the regrouped weights name their
stage dimension `pipeline_stage`, which is always `stage`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bignlp_jax.config import Config
from bignlp_jax.errors import UserError

MeshAxes = str | tuple[str, ...] | None

RULES: dict[str, dict[str, MeshAxes]] = {
    # ZeRO-3 style FSDP over `fsdp`, Megatron tensor parallelism over `tensor`, and the batch
    # split over every data-like axis. With fsdp=tensor=1 this is plain data parallelism.
    "default": {
        "batch": ("data", "fsdp"),
        # context parallelism: activations split along the sequence between layers
        "seq": "sequence",
        "embed": "fsdp",
        "mlp": "tensor",
        "heads": "tensor",
        "kv_heads": "tensor",
        "head_dim": None,
        "vocab": "tensor",
        "layers": "stage",
        "pipeline_stage": "stage",
        "act_stage": "stage",
        "norm": None,
        "act_embed": None,
        "act_mlp": "tensor",
        "act_heads": "tensor",
        "act_kv_heads": "tensor",
        "act_vocab": "tensor",
    },
    # Every parameter on every device; only the batch is split.
    # (Pipeline stages still hold only their own layers.)
    "replicated": {"batch": ("data", "fsdp"), "seq": "sequence", "layers": "stage",
                   "pipeline_stage": "stage", "act_stage": "stage"},
}
# Mesh axes that split weights only to store them (ZeRO-3): `constrain_gathered` undoes them.
STORAGE_AXES = ("fsdp",)


def rules_table(name: str, num_layers: int = 0, stages: int = 1) -> dict[str, MeshAxes]:
    """The rules `name`; with `stages` pipeline stages that do not divide `num_layers`, the
    layer stack stays whole along `layers` and the parameters' `embed` is split over `stage`
    too (in the tables that split `embed`; see the module docstring)."""
    if name not in RULES:
        raise UserError(f"unknown sharding rules {name!r}; known: {', '.join(RULES)}")
    rules = RULES[name]
    if stages == 1 or num_layers % stages == 0:
        return rules
    uneven: dict[str, MeshAxes] = {**rules, "layers": None}
    if rules.get("embed") is not None:
        kept = _without(rules["embed"], ("stage",)) or ()
        uneven["embed"] = (*kept, "stage")
    return uneven


def rules_for(cfg: Config) -> dict[str, MeshAxes]:
    """The rules table a run of `cfg` uses (`mesh.rules`, fitted to its layers and stages)."""
    return rules_table(cfg.mesh.rules, cfg.model.num_layers, cfg.mesh.stages)


def logical_to_spec(axes: Sequence[str | None], rules: dict[str, MeshAxes]) -> PartitionSpec:
    """Map a tuple of logical names to a PartitionSpec; unknown names are replicated."""
    used: set[str] = set()
    out = []
    for name in axes:
        mesh_axes = rules.get(name) if name is not None else None
        if isinstance(mesh_axes, str):
            mesh_axes = (mesh_axes,)
        # A mesh axis may shard only one dimension of an array: later dims give way.
        kept = tuple(a for a in (mesh_axes or ()) if a not in used)
        used.update(kept)
        out.append(kept[0] if len(kept) == 1 else (kept or None))
    return PartitionSpec(*out)


def sharding_for(
    mesh: Mesh, axes: Sequence[str | None], rules: dict[str, MeshAxes], shape=None, name=""
) -> NamedSharding:
    """NamedSharding for logical `axes`; with `shape`, checks each sharded dim divides evenly."""
    spec = logical_to_spec(axes, rules)
    if shape is not None:
        for dim, (size, mesh_axes) in enumerate(zip(shape, spec)):
            if mesh_axes is None:
                continue
            parts = 1
            for a in (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes:
                parts *= mesh.shape[a]
            if size % parts:
                raise UserError(
                    f"{name or 'array'} dimension {dim} ('{axes[dim]}', size {size}) cannot be "
                    f"split over mesh axes {mesh_axes} ({parts} devices)\n"
                    f"  fix: choose mesh sizes that divide {size}, or change the model shape"
                )
    return NamedSharding(mesh, spec)


# --- activation constraints -------------------------------------------------------------------
# The train step enters `activation_sharding(mesh, rules)` while tracing; model code calls
# `constrain(x, axes)` with logical names. Outside that context (unit tests, export) it is a no-op.
_ACTIVE: contextvars.ContextVar[tuple[Mesh, dict[str, MeshAxes]] | None] = contextvars.ContextVar(
    "bignlp_activation_sharding", default=None
)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: dict[str, MeshAxes]) -> Iterator[None]:
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, rules)))


def constrain_gathered(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`constrain`, but whole over the storage-only axes (fsdp): where a weight is gathered."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    gathered: dict[str, MeshAxes] = {name: _without(mesh_axes, STORAGE_AXES)
                                     for name, mesh_axes in rules.items()}
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes,
                                                                                   gathered)))


def _without(mesh_axes: MeshAxes, drop: Sequence[str]) -> tuple[str, ...] | None:
    names = (mesh_axes,) if isinstance(mesh_axes, str) else (mesh_axes or ())
    kept = tuple(a for a in names if a not in drop)
    return kept or None


def stage_vmap(fn):
    """`jax.vmap(fn)` over a leading pipeline-stage axis: constraints inside `fn` gain the mesh
    axis that `act_stage` maps to on that axis, so each stage's devices keep their own slice."""
    active = _ACTIVE.get()
    mesh_axis = None
    if active is not None:
        mesh, rules = active
        named = rules.get("act_stage")
        mesh_axis = named if isinstance(named, str) and named in mesh.shape else None
    return jax.vmap(fn, spmd_axis_name=mesh_axis)


def batch_replicas() -> tuple[tuple[str, ...], int]:
    """(mesh axes, device count) that the active rules split the batch over: the data-parallel
    replicas; ((), 1) outside `activation_sharding`."""
    active = _ACTIVE.get()
    if active is None:
        return (), 1
    mesh, rules = active
    axes = tuple(a for a in _without(rules.get("batch"), ()) or () if mesh.shape.get(a, 1) > 1)
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    return axes, n


def replica_vmap(fn):
    """`jax.vmap(fn)` over a leading axis with one entry per data-parallel replica (the mesh
    axes of `batch_replicas`): each call of `fn` sees one replica's rows, so constraints inside
    keep the batch whole, and the vmapped axis carries the split."""
    active = _ACTIVE.get()
    axes, n = batch_replicas()
    if active is None or n == 1:
        return jax.vmap(fn)
    mesh, rules = active
    inner = {**rules, "batch": None}

    def per_replica(*args):
        with activation_sharding(mesh, inner):
            return fn(*args)

    return jax.vmap(per_replica, spmd_axis_name=axes)


def split_axis(logical: str) -> tuple[str, int] | None:
    """(mesh axis, size) when the active rules split the logical axis over one mesh axis of
    more than one device; None outside `activation_sharding` or when it is not split."""
    active = _ACTIVE.get()
    if active is None:
        return None
    mesh, rules = active
    mesh_axes = rules.get(logical)
    if isinstance(mesh_axes, tuple):
        mesh_axes = mesh_axes[0] if len(mesh_axes) == 1 else None
    if mesh_axes is None or mesh.shape.get(mesh_axes, 1) == 1:
        return None
    return mesh_axes, mesh.shape[mesh_axes]


def logical_shard_map(fn, in_axes: Sequence[Sequence[str | None]],
                      out_axes: Sequence[str | None]):
    """`jax.shard_map(fn)` over the active mesh, specs given as logical axis names: lets model
    code write per-device code with explicit collectives (over `split_axis(...)[0]`) without
    ever holding the mesh. Call it only inside `activation_sharding`."""
    active = _ACTIVE.get()
    if active is None:
        raise RuntimeError("logical_shard_map needs an active activation_sharding context")
    mesh, rules = active
    return jax.shard_map(fn, mesh=mesh,
                         in_specs=tuple(logical_to_spec(a, rules) for a in in_axes),
                         out_specs=logical_to_spec(out_axes, rules))

"""Build the device mesh (`stage`, `data`, `fsdp`, `sequence`, `tensor`) from `mesh.*` and check
it fits.

Two levels: `mesh.dcn_data` and `mesh.dcn_fsdp` split the data and fsdp axes between slices
(TPU) or nodes/processes (GPU, CPU) joined by the slower network (DCN / InfiniBand); everything
else stays inside one slice on the fast interconnect (ICI / NVLink). The device order then comes
from `mesh_utils.create_hybrid_device_mesh`, so that only data and fsdp collectives cross DCN.
`sequence` and `tensor` are innermost: they talk most often (every layer) and stay on ICI.
`stage` (pipeline stages) is outermost: it sends one activation per microbatch, the least
traffic of all, and `mesh.dcn_stage` puts that split across slices/nodes (the stage axis has
mesh.stage x mesh.dcn_stage devices).
"""

from __future__ import annotations

import math

import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from bignlp_jax.config import MeshConfig
from bignlp_jax.errors import UserError

MESH_AXES = ("stage", "data", "fsdp", "sequence", "tensor")
# mesh axis -> its DCN split's config key
DCN_AXES = {"stage": "dcn_stage", "data": "dcn_data", "fsdp": "dcn_fsdp"}


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int, int, int]:
    """Resolve -1 and check that stages * data * fsdp * sequence * tensor equals the device
    count (in MESH_AXES order)."""
    sizes = {"stage": cfg.stages, "data": cfg.data, "fsdp": cfg.fsdp, "sequence": cfg.sequence,
             "tensor": cfg.tensor}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    fill = [k for k, v in sizes.items() if v == -1]
    if fill:
        if num_devices % fixed:
            raise UserError(
                f"mesh does not fit the devices: the fixed axes "
                f"({', '.join(f'{k}={v}' for k, v in sizes.items() if v != -1)}) use {fixed} "
                f"devices, which does not divide the {num_devices} available\n"
                f"  fix: choose mesh.* sizes whose product divides {num_devices}"
            )
        sizes[fill[0]] = num_devices // fixed
    total = math.prod(sizes.values())
    if total != num_devices:
        raise UserError(
            "mesh does not fit the devices: "
            + " x ".join(f"mesh.{k}={v}" for k, v in sizes.items())
            + f" = {total} devices, but {num_devices} are "
            f"available\n  fix: make the product {num_devices}, or set one axis to -1 to fill"
            + (f"; to try this mesh on a CPU, simulate {total} devices: XLA_FLAGS="
               f"--xla_force_host_platform_device_count={total}" if total > num_devices else "")
        )
    for axis, key in DCN_AXES.items():
        dcn = getattr(cfg, key)
        if sizes[axis] % dcn:
            raise UserError(
                f"mesh.{key}={dcn} does not divide mesh.{axis}={sizes[axis]}: the DCN split "
                f"cuts the {axis} axis into {dcn} groups of equal size\n"
                f"  fix: make mesh.{axis} a multiple of {dcn}")
    return (sizes["stage"], sizes["data"], sizes["fsdp"], sizes["sequence"], sizes["tensor"])


def dcn_shape(cfg: MeshConfig) -> tuple[int, ...]:
    """How many slices/nodes each mesh axis spans (1 = within one slice)."""
    return tuple(getattr(cfg, DCN_AXES[a]) if a in DCN_AXES else 1 for a in MESH_AXES)


def dcn_axes(cfg: MeshConfig) -> dict[str, int]:
    """The mesh axes that cross DCN, with the number of slices/nodes each spans."""
    return {a: n for a, n in zip(MESH_AXES, dcn_shape(cfg)) if n > 1}


def build_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """The mesh over all devices of all processes (or `devices`), axes in MESH_AXES order."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(cfg, len(devices))
    # Auto axes: shardings are declared on inputs/outputs and propagated by XLA inside.
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    dcn = dcn_shape(cfg)
    if math.prod(dcn) == 1:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    # A granule is a TPU slice; on GPU and CPU a process (one per node).
    by_slice = devices[0].platform == "tpu" and hasattr(devices[0], "slice_index")
    granules = {d.slice_index if by_slice else d.process_index for d in devices}
    if len(granules) != math.prod(dcn):
        what, many = ("TPU slice", "TPU slices") if by_slice else ("process", "processes")
        raise UserError(
            f"mesh.dcn_stage x mesh.dcn_data x mesh.dcn_fsdp = {math.prod(dcn)} must equal the "
            f"number of {many} ({len(granules)}): each DCN group is one {what}\n"
            f"  fix: set mesh.dcn_stage / mesh.dcn_data / mesh.dcn_fsdp so their product is "
            f"{len(granules)}")
    ici = tuple(s // d for s, d in zip(shape, dcn))
    array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=not by_slice)
    return Mesh(array, MESH_AXES, axis_types=axis_types)


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split (the `batch` rule spans data and fsdp)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def mesh_text(shape: dict[str, int], cfg: MeshConfig) -> str:
    """'data=4 (2 over DCN) x fsdp=8 x sequence=1 x tensor=8': sizes, and the DCN split of each
    axis that crosses slices/nodes (the rest of every axis stays on the fast interconnect).
    The stage axis is named only when there is more than one stage."""
    dcn = dcn_axes(cfg)
    return " x ".join(f"{a}={shape[a]}" + (f" ({dcn[a]} over DCN)" if a in dcn else "")
                      for a in MESH_AXES if a != "stage" or shape.get(a, 1) > 1)

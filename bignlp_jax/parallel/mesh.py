"""Build the device mesh (`data`, `fsdp`, `tensor`) from `mesh.*` and check it fits the devices."""

from __future__ import annotations

import math

import jax
from jax.sharding import AxisType, Mesh

from bignlp_jax.config import MeshConfig
from bignlp_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Resolve -1 and check that data * fsdp * tensor equals the device count."""
    sizes = {"data": cfg.data, "fsdp": cfg.fsdp, "tensor": cfg.tensor}
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
            f"mesh does not fit the devices: mesh.data={sizes['data']} x mesh.fsdp={sizes['fsdp']}"
            f" x mesh.tensor={sizes['tensor']} = {total} devices, but {num_devices} are "
            f"available\n  fix: make the product {num_devices}, or set one axis to -1 to fill"
            + (f"; to try this mesh on a CPU, simulate {total} devices: XLA_FLAGS="
               f"--xla_force_host_platform_device_count={total}" if total > num_devices else "")
        )
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def build_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """The mesh over all devices of all processes (or `devices`), axes in MESH_AXES order."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(cfg, len(devices))
    # Auto axes: shardings are declared on inputs/outputs and propagated by XLA inside.
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split (the `batch` rule spans data and fsdp)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]

"""Accelerators `plan` can lay a model out for (datasheet figures, per device). A module of its
own, free of jax, so `plan --help` can list the choices without loading jax."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceSpec:
    """What the estimate needs to know about one accelerator (datasheet figures, per device)."""

    name: str
    peak_tflops: float  # dense bf16
    memory_gb: float  # GiB usable for one program
    link_gbps: float  # GB/s for collectives among devices of one host / ICI slice
    cross_host_gbps: float  # GB/s per device once a collective group spans hosts
    host_size: int  # devices per host joined by the fast link


DEVICES: dict[str, DeviceSpec] = {
    # GPUs: NVLink inside an 8-GPU host, ~400 Gb/s InfiniBand per GPU between hosts.
    "h100": DeviceSpec("h100", 989.0, 80.0, 450.0, 50.0, 8),
    "h200": DeviceSpec("h200", 989.0, 141.0, 450.0, 50.0, 8),
    "a100": DeviceSpec("a100", 312.0, 80.0, 300.0, 25.0, 8),
    # TPUs: a whole slice shares the inter-chip interconnect.
    "tpu-v4": DeviceSpec("tpu-v4", 275.0, 32.0, 270.0, 270.0, 4096),
    "tpu-v5e": DeviceSpec("tpu-v5e", 197.0, 16.0, 200.0, 200.0, 256),
    "tpu-v5p": DeviceSpec("tpu-v5p", 459.0, 95.0, 600.0, 600.0, 8960),
    "tpu-v6e": DeviceSpec("tpu-v6e", 918.0, 32.0, 400.0, 400.0, 256),
}

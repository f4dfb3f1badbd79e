"""Accelerators by their datasheets (per device): the one table of peak throughput (the MFU
denominator, train/peak.py), memory and links (`plan`'s layout estimates, perf/plan.py). A module
of its own, free of jax, so `plan --help` can list the choices without loading jax."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceSpec:
    """What the estimates need to know about one accelerator (datasheet figures, per device)."""

    name: str
    peak_tflops: float  # dense bf16 (sparsity figures excluded)
    memory_gb: float  # GiB usable for one program
    link_gbps: float  # GB/s for collectives among devices of one host / ICI slice
    cross_host_gbps: float  # GB/s per device once a collective group spans hosts
    host_size: int  # devices per host joined by the fast link
    # lower-case substrings of jax's `device.device_kind` that name this accelerator
    kinds: tuple[str, ...] = ()


DEVICES: dict[str, DeviceSpec] = {
    # GPUs: NVLink inside an 8-GPU host, ~400 Gb/s InfiniBand per GPU between hosts.
    "h100": DeviceSpec("h100", 989.0, 80.0, 450.0, 50.0, 8, ("h100",)),  # SXM / NVL
    # PCIe cards: no NVLink switch, collectives over PCIe Gen5 x16
    "h100-pcie": DeviceSpec("h100-pcie", 756.0, 80.0, 64.0, 50.0, 8, ("h100 pcie",)),
    "h200": DeviceSpec("h200", 989.0, 141.0, 450.0, 50.0, 8, ("h200",)),
    "a100": DeviceSpec("a100", 312.0, 80.0, 300.0, 25.0, 8, ("a100",)),
    # TPUs: a whole slice shares the inter-chip interconnect.
    "tpu-v4": DeviceSpec("tpu-v4", 275.0, 32.0, 270.0, 270.0, 4096, ("tpu v4",)),
    # v5e and v6e report themselves as "TPU v5 lite" / "TPU v6 lite"
    "tpu-v5e": DeviceSpec("tpu-v5e", 197.0, 16.0, 200.0, 200.0, 256, ("tpu v5 lite", "tpu v5e")),
    "tpu-v5p": DeviceSpec("tpu-v5p", 459.0, 95.0, 600.0, 600.0, 8960, ("tpu v5p",)),
    "tpu-v6e": DeviceSpec("tpu-v6e", 918.0, 32.0, 400.0, 400.0, 256, ("tpu v6 lite", "tpu v6e")),
}


def spec_for_kind(device_kind: str) -> DeviceSpec | None:
    """The accelerator a jax `device_kind` names (the longest matching substring wins:
    "H100 PCIe" is the PCIe card, "H100 80GB HBM3" the SXM one), or None."""
    kind = device_kind.lower()
    found = [(len(k), spec) for spec in DEVICES.values() for k in spec.kinds if k in kind]
    return max(found, key=lambda pair: pair[0])[1] if found else None

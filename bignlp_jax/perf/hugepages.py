"""Transparent huge pages for XLA's CPU buffers, through glibc's `glibc.malloc.hugetlb` tunable.

Every run of a compiled program on the CPU backend allocates its temporary buffers afresh and
frees them at the end (1.5 GB per step for configs/bench/cpu_m.yaml). glibc serves allocations
that large straight from mmap, so each step faults all of those pages back in, 4 KiB at a time:
measured with getrusage, ~376,000 minor page faults and 1.2-1.4 CPU-seconds in the kernel per
cpu_m step (of ~10 CPU-seconds). With `glibc.malloc.hugetlb=1` glibc advises the kernel to back
those mappings with transparent huge pages (`madvise` mode, the usual default), which cuts the
faults to ~1,500 per step; the benchmark configs then train 15-20% faster.

glibc reads its tunables once, at process start, so the command-line entry points re-execute
themselves once with the tunable added, and only where JAX will run on its CPU backend (the only
backend where this was measured; on GPU/TPU hosts XLA's buffers live in device memory and the
process is left alone). That is decided before jax is imported (`cpu_backend_expected`): the
first platform in JAX_PLATFORMS, or else whether an accelerator plugin is installed. Nothing
happens off Linux/glibc, or when GLIBC_TUNABLES already names glibc.malloc.hugetlb (set
`glibc.malloc.hugetlb=0` there to opt out). Kernels with huge pages set to `never` ignore the
advice; glibc before 2.35 ignores the tunable.

A program that uses the library directly gets the same behaviour by calling
`reexec_with_huge_pages()` first thing, as `bignlp-jax` and the benchmark scripts do. There is no
switch to flip later in a running process: glibc's `mallopt` has no huge-page option, and
keeping the block in the heap instead (`M_MMAP_MAX=0` and a high trim threshold) changes nothing
once XLA's threads own their malloc arenas (measured: 109,000 faults per cpu_s step either way),
it works only with one arena for the whole process set before any thread starts.
"""

from __future__ import annotations

import importlib.util
import os
import pkgutil
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb"
# Top-level modules of JAX's accelerator backends: TPU's libtpu, and the PJRT plugins (CUDA,
# ROCm, ...) that JAX discovers as submodules of the `jax_plugins` namespace package.
ACCELERATOR_MODULES = ("libtpu",)


def accelerator_plugins() -> list[str]:
    """Installed JAX accelerator backends, found without importing jax or the plugins."""
    found = [name for name in ACCELERATOR_MODULES if importlib.util.find_spec(name) is not None]
    namespace = importlib.util.find_spec("jax_plugins")
    if namespace is not None and namespace.submodule_search_locations:
        found += [f"jax_plugins.{m.name}"
                  for m in pkgutil.iter_modules(namespace.submodule_search_locations)]
    return found


def cpu_backend_expected(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether JAX will pick its CPU backend: JAX_PLATFORMS's first entry if it is set (JAX's
    own rule), else no accelerator plugin installed. A host with a plugin but no usable device
    falls back to CPU at run time without huge pages: never applied where not measured."""
    platforms = environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    return not accelerator_plugins()


def tunables_with_huge_pages(current: str | None) -> str | None:
    """GLIBC_TUNABLES with `glibc.malloc.hugetlb=1` added; None if it already names hugetlb."""
    if current and any(item.split("=")[0] == TUNABLE for item in current.split(":")):
        return None
    return f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"


def reexec_with_huge_pages() -> None:
    """Re-execute this process with huge-page malloc, once, if JAX will run on the CPU backend;
    returns only if nothing changes.

    Call it first thing in a program's entry point, before threads or heavy imports (jax, torch):
    the process image is replaced, with the same pid, arguments and the rest of its environment."""
    if sys.platform != "linux" or not sys.executable or not getattr(sys, "orig_argv", None):
        return
    tunables = tunables_with_huge_pages(os.environ.get("GLIBC_TUNABLES"))
    # the cheap check first: after the re-exec it ends here, before libc_ver reads the binary
    if tunables is None or not cpu_backend_expected() or platform.libc_ver()[0] != "glibc":
        return
    os.environ["GLIBC_TUNABLES"] = tunables
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)

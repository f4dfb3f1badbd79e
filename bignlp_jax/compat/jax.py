"""JAX's private distributed-runtime seam, in one place.

`jax.distributed.initialize` starts the coordination service through jaxlib's `_jax` module as
`jax._src.distributed` holds it (`_jax.get_distributed_runtime_service`). Process 0 swaps that
attribute for a stand-in while it initializes, so the service runs in a helper process or
outside the job (parallel/distributed.py, parallel/coordination_host.py), and the helper calls
the same jaxlib function itself. The peer watchdog reads the joined client from
`jax._src.distributed.global_state.client`. No public API offers either (jax 0.10).

JAX is imported inside these functions, not at module import: the launch code sets XLA flags
and the process layout before jax may load. `check()` raises naming the jax version when the
seam is no longer what this module assumes; tests/test_compat.py runs it.
"""

from __future__ import annotations

# Function-level imports: jax loads only once the launch code has set its flags (see above).
from types import ModuleType
from typing import Any


def distributed_module() -> ModuleType:
    """`jax._src.distributed` (imports jax)."""
    from jax._src import distributed

    return distributed


def jaxlib_module() -> ModuleType:
    """jaxlib's `_jax` extension module, as `jax._src.lib` exposes it (imports jax)."""
    from jax._src.lib import _jax

    return _jax


def distributed_jaxlib() -> Any:
    """The jaxlib module `jax.distributed` calls (None if this jax has no such attribute)."""
    return getattr(distributed_module(), "_jax", None)


def set_distributed_jaxlib(module: Any) -> None:
    """Make `jax.distributed` call `module` instead (a stand-in, or the real one back)."""
    distributed_module()._jax = module  # type: ignore[attr-defined]


def distributed_client() -> Any:
    """The distributed-runtime client of this process (after `jax.distributed.initialize`)."""
    return distributed_module().global_state.client


def check() -> None:
    """Raise RuntimeError naming the jax version if the seam differs from the above."""
    import jax

    distributed = distributed_module()
    problems = []
    real = getattr(distributed, "_jax", None)
    if real is None:
        problems.append("jax._src.distributed has no `_jax`")
    elif not callable(getattr(real, "get_distributed_runtime_service", None)):
        problems.append("jax._src.distributed._jax has no get_distributed_runtime_service")
    elif real is not jaxlib_module():
        problems.append("jax._src.distributed._jax is not jax._src.lib._jax")
    if not hasattr(getattr(distributed, "global_state", None), "client"):
        problems.append("jax._src.distributed has no global_state.client")
    if problems:
        raise RuntimeError(
            f"bignlp_jax.compat.jax: jax {jax.__version__}: {'; '.join(problems)}; this module "
            "was written for jax 0.10 and must be revisited for this version")

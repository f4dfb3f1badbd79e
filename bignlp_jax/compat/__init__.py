"""Every use of a private API of a dependency, one checked module per dependency.

`compat.jax`: JAX's distributed-runtime seam (`jax._src.distributed`, `jax._src.lib`).
`compat.orbax`: Orbax's private helpers (`orbax.checkpoint._src`) and its s3:// shim.
Each checks, where it is used, that the dependency still behaves as assumed and otherwise
raises naming the installed version; tests/test_compat.py runs those checks.
"""

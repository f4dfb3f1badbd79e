"""The checked shims over private JAX and Orbax APIs (bignlp_jax/compat/): the installed versions
pass their checks, and a version that behaves otherwise fails with a message naming it. (The
s3:// shim's own checks: test_orbax_compat.py.)"""

from __future__ import annotations

import types

import jax
import orbax.checkpoint as ocp
import pytest

from bignlp_jax.compat import jax as compat_jax
from bignlp_jax.compat import orbax as compat_orbax


def test_the_installed_jax_and_orbax_behave_as_assumed():
    compat_jax.check()
    compat_orbax.check_helpers()
    assert compat_jax.distributed_jaxlib() is compat_jax.jaxlib_module()


@pytest.mark.parametrize("broken, problem", [
    (lambda d: types.SimpleNamespace(global_state=d.global_state), "has no `_jax`"),
    (lambda d: types.SimpleNamespace(_jax=types.SimpleNamespace(), global_state=d.global_state),
     "has no get_distributed_runtime_service"),
    (lambda d: types.SimpleNamespace(_jax=d._jax, global_state=object()),
     "has no global_state.client"),
])
def test_a_jax_whose_distributed_seam_moved_is_named(monkeypatch, broken, problem):
    real = compat_jax.distributed_module()
    monkeypatch.setattr(compat_jax, "distributed_module", lambda: broken(real))
    with pytest.raises(RuntimeError, match=rf"compat.jax: jax {jax.__version__}: .*{problem}.*"
                                           "must be revisited"):
        compat_jax.check()


def test_an_orbax_without_its_helpers_is_named(monkeypatch):
    from orbax.checkpoint._src import asyncio_utils

    monkeypatch.delattr(asyncio_utils, "run_sync")
    with pytest.raises(RuntimeError, match=rf"orbax-checkpoint {ocp.__version__} has no "
                                           r"orbax.checkpoint._src.asyncio_utils.run_sync"):
        compat_orbax.check_helpers()

"""What an install carries: the config presets inside the package, and optional extras that
say which extra to install when they are missing."""

from __future__ import annotations

import fnmatch
import sys
import tomllib

import pytest
from conftest import REPO

from bignlp_jax.config import load_config
from bignlp_jax.config.loader import CONFIG_ROOT
from bignlp_jax.errors import UserError


def test_presets_are_package_data():
    """Names resolve under bignlp_jax/configs (a link to configs/ in a clone), and the wheel's
    package-data globs cover every preset there."""
    import bignlp_jax

    package = (REPO / "bignlp_jax").resolve()
    assert CONFIG_ROOT.parent == package and CONFIG_ROOT.resolve() == (REPO / "configs").resolve()
    assert load_config("finetune_stdlib_modules", []).task is not None  # `defaults:` included
    assert bignlp_jax.__file__.startswith(str(package))
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    globs = pyproject["tool"]["setuptools"]["package-data"]["bignlp_jax"]
    presets = [str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*") if p.is_file()]
    assert len(presets) > 20
    unshipped = [p for p in presets if not any(fnmatch.fnmatch(p, g) for g in globs)]
    assert unshipped == []


def _bleu(tmp_path):
    from bignlp_jax.evaluate.metrics import bleu

    return bleu(["a"], ["a"])


def _parquet(tmp_path):
    from bignlp_jax.data.tfds.local_files import read_documents

    (tmp_path / "x.parquet").write_bytes(b"")
    return list(read_documents(tmp_path / "x.parquet", "parquet", ("text",)))


@pytest.mark.parametrize("module, extra, call", [("sacrebleu", "bleu", _bleu),
                                                 ("pyarrow.parquet", "parquet", _parquet)])
def test_missing_extra_names_it(monkeypatch, tmp_path, module, extra, call):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(UserError, match=rf"fix: pip install 'bignlp_jax\[{extra}\]'"):
        call(tmp_path)

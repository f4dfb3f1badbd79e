"""No hidden inputs: the token stores a run reads are saved in its config and checked on rerun."""

import pytest
import yaml

from bignlp_jax.config import load_config, save_config
from bignlp_jax.data.run_identity import with_store_identities
from bignlp_jax.errors import UserError


def test_store_identities_saved_and_other_data_refused(tmp_path, embedded_data_dir):
    run_dir = tmp_path / "run"
    cfg = load_config("tiny", [f"run.dir={run_dir}", f"data.data_dir={embedded_data_dir}",
                               "train.eval_every=0"])
    resolved = with_store_identities(cfg, run_dir)
    stores = resolved.data.stores
    assert list(stores) == ["stdlib_docs/train"] and len(stores["stdlib_docs/train"]) == 64
    save_config(resolved, run_dir / "config.yaml")
    saved = load_config(run_dir / "config.yaml", [])
    assert saved.data.stores == stores and with_store_identities(saved, run_dir) == saved
    # A config naming other stores is refused, naming both.
    other = {"stdlib_docs/train": "f" * 64}
    pinned = load_config("tiny", [f"run.dir={run_dir}", f"data.data_dir={embedded_data_dir}",
                                  "train.eval_every=0", "data.stores={stdlib_docs/train: " +
                                  "f" * 64 + "}"])
    ours = stores["stdlib_docs/train"][:16]
    with pytest.raises(UserError, match=f"names the token stores stdlib_docs/train {'f' * 16}"
                                        f".*reads stdlib_docs/train {ours}"):
        with_store_identities(pinned, run_dir)
    # A rerun into a run with checkpoints trained on other data stops.
    text = yaml.safe_load((run_dir / "config.yaml").read_text())
    text["data"]["stores"] = other
    (run_dir / "config.yaml").write_text(yaml.safe_dump(text))
    assert with_store_identities(cfg, run_dir).data.stores == stores  # no checkpoints yet
    (run_dir / "checkpoints").mkdir()
    with pytest.raises(UserError, match=f"run {run_dir} was trained on token stores "
                                        f"stdlib_docs/train {'f' * 16}"):
        with_store_identities(cfg, run_dir)

"""No hidden inputs: the token stores a run reads are saved in its config and checked on rerun."""

import pytest
import yaml

from bignlp_jax.config import load_config, save_config
from bignlp_jax.data.run_identity import with_store_identities
from bignlp_jax.errors import UserError
from bignlp_jax.rundir import RunDir
from bignlp_jax.train.identity import config_changes, refuse_unless_allowed


def test_store_identities_saved_and_other_data_refused(tmp_path, embedded_data_dir):
    run_dir = tmp_path / "run"
    cfg = load_config("tiny", [f"run.dir={run_dir}", f"data.data_dir={embedded_data_dir}",
                               "train.eval_every=0"])
    resolved = with_store_identities(cfg)
    stores = resolved.data.stores
    assert list(stores) == ["stdlib_docs/train"] and len(stores["stdlib_docs/train"]) == 64
    save_config(resolved, run_dir / "config.yaml")
    saved = load_config(run_dir / "config.yaml", [])
    assert saved.data.stores == stores and with_store_identities(saved) == saved
    # A config naming other stores is refused, naming both.
    other = {"stdlib_docs/train": "f" * 64}
    pinned = load_config("tiny", [f"run.dir={run_dir}", f"data.data_dir={embedded_data_dir}",
                                  "train.eval_every=0", "data.stores={stdlib_docs/train: " +
                                  "f" * 64 + "}"])
    ours = stores["stdlib_docs/train"][:16]
    with pytest.raises(UserError, match=f"names the token stores stdlib_docs/train {'f' * 16}"
                                        f".*reads stdlib_docs/train {ours}"):
        with_store_identities(pinned)
    # A rerun into a run with checkpoints trained on other data stops: the run-identity rule,
    # the same as for every key (one "has checkpoints", one --allow-config-change).
    text = yaml.safe_load((run_dir / "config.yaml").read_text())
    text["data"]["stores"] = other
    (run_dir / "config.yaml").write_text(yaml.safe_dump(text))
    now = with_store_identities(cfg)
    assert now.data.stores == stores
    refuse_unless_allowed(config_changes(now, run_dir), allow=False)  # no checkpoints yet
    (run_dir / "checkpoints").mkdir()  # an empty folder is no trained state either
    refuse_unless_allowed(config_changes(now, RunDir(run_dir)), allow=False)
    (run_dir / "checkpoints" / "3" / "state").mkdir(parents=True)  # a complete step
    (run_dir / "checkpoints" / "3" / "state" / "_METADATA").write_text("{}")
    changes = config_changes(now, run_dir)
    with pytest.raises(UserError, match=f"(?s)run {run_dir} was trained on token stores "
                                        f"stdlib_docs/train {'f' * 16}.*but this config reads "
                                        f"stdlib_docs/train {ours}.*--allow-config-change"):
        refuse_unless_allowed(changes, allow=False)
    refuse_unless_allowed(changes, allow=True)  # allowed explicitly, as any other change

"""Commands that read or write a run in a bucket give what they give on local disk.

One short run is trained into the GCS emulator for the whole module and copied to local disk
(that training to a bucket gives the same run as training locally is test_storage.py's);
`eval`, `generate`, `export --format params` (to gs:// and s3://, from one process and from
two) and `import --out gs://...` on the bucket run are then checked against the local copy.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import storage_emulators
from checkpoint_common import assert_trees_equal, config, host_params

from bignlp_jax import storage
from bignlp_jax.checkpoint import load_run_config
from bignlp_jax.cli import main
from bignlp_jax.train.loop import train

gcs_emulator, s3_emulator = storage_emulators.gcs_emulator, storage_emulators.s3_emulator
VOCAB = 400
PROMPT = ["--prompt", "def f(x):", "--max-new-tokens", "8"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(gcs_emulator, tmp_path_factory) -> tuple[Path, str]:
    """(a local copy, a run trained in a gs:// bucket), with a SentencePiece tokenizer."""
    from bignlp_jax.data.tokenizer import train_tokenizer

    tokenizer = tmp_path_factory.mktemp("tok") / "tokenizer"
    sources = sorted((Path(storage.__file__).parent / "config").glob("*.py"))
    train_tokenizer([p.read_text() for p in sources], tokenizer, vocab_size=VOCAB)
    remote = f"{storage_emulators.new_bucket('gs')}/run"
    # parameters split over every device (fsdp): a two-process export then holds shards of
    # each one on both processes
    train(config(remote, "train.steps=2", f"model.vocab_size={VOCAB}",
                 f"data.tokenizer={tokenizer}", "mesh.data=1", "mesh.fsdp=-1"))
    return storage.fetch_dir(remote), remote


def _last_json(capsys):
    return json.loads(capsys.readouterr().out.splitlines()[-1])


def _model(run):
    return config(run, f"model.vocab_size={VOCAB}").model  # (the mesh does not matter here)


def test_eval_and_generate_on_a_bucket_run_match_the_local_run(runs, capsys):
    local, remote = runs
    assert main(["eval", str(local)]) == 0
    expected = _last_json(capsys)
    assert main(["eval", remote]) == 0
    got = _last_json(capsys)
    assert got.pop("run_dir") == remote and expected.pop("run_dir") == str(local)
    got.pop("seconds"), expected.pop("seconds")
    assert got == expected and got["step"] == 2
    written = json.loads((storage.path(remote) / "eval.json").read_text())  # next to the run
    assert written["loss"] == got["loss"]

    assert main(["generate", "--run", str(local), *PROMPT]) == 0
    expected = _last_json(capsys)
    assert main(["generate", "--run", remote, *PROMPT]) == 0
    assert _last_json(capsys) == expected and expected[0]["tokens"] > 0


def test_export_params_into_buckets_then_read_it(runs, s3_emulator, tmp_path, capsys):
    from bignlp_jax.checkpoint.params import default_shardings
    from bignlp_jax.train.start import load_init_params

    local, remote = runs
    model = _model(remote)
    expected = host_params(remote, model)
    gs_out = f"{remote.rsplit('/', 1)[0]}/exports/params"
    # a synthetic-data run records no tokenizer/: the one its config names is given explicitly
    tok = ["--tokenizer", str(load_run_config(remote).data.tokenizer)]
    for out in (gs_out, f"{storage_emulators.new_bucket('s3')}/params"):
        assert main(["export", "--run", remote, "--format", "params", "--out", out, *tok]) == 0
        assert _last_json(capsys)["out"] == out
        assert_trees_equal(host_params(out, model), expected)
        assert (storage.path(out) / "tokenizer" / "tokenizer.model").is_file()
    # the bundle is a run directory: init_from and generate read it where it is
    from_bucket = load_init_params(config(tmp_path / "fresh", f"model.vocab_size={VOCAB}",
                                          f"init_from={gs_out}"), default_shardings(model))
    assert_trees_equal(jax.tree.map(np.asarray, from_bucket), expected)
    assert main(["generate", "--run", str(local), *PROMPT]) == 0
    generated = _last_json(capsys)
    assert main(["generate", "--run", gs_out, *PROMPT]) == 0
    assert _last_json(capsys) == generated
    # exporting again replaces the earlier bundle (asked for with --overwrite)
    assert main(["export", "--run", remote, "--format", "params", "--out", gs_out, *tok,
                 "--overwrite"]) == 0
    assert_trees_equal(host_params(gs_out, model), expected)


def test_import_into_a_bucket(runs, tmp_path, capsys):
    local, remote = runs
    hf = tmp_path / "hf"
    tok = ["--tokenizer", str(load_run_config(local).data.tokenizer)]
    assert main(["export", "--run", str(local), "--format", "hf", "--out", str(hf), *tok]) == 0
    out = f"{remote.rsplit('/', 1)[0]}/imported"
    assert main(["import", "--from", str(hf), "--out", out]) == 0
    assert _last_json(capsys)["out"] == out
    assert_trees_equal(host_params(out, _model(local)), host_params(local, _model(local)))
    assert (storage.path(out) / "config.yaml").is_file()


@pytest.mark.multiprocess
def test_two_processes_export_params_into_a_bucket(runs, cli_env):
    # the TPU-pod case: no shared file system, every process writes its shards to the bucket
    import subprocess
    import sys

    from conftest import REPO

    local, remote = runs
    out = f"{remote.rsplit('/', 1)[0]}/exports/two"
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "local.py"), "--processes", "2",
         "--devices-per-process", "2", "--", "export", "--run", remote, "--format", "params",
         "--out", out, "--tokenizer", str(load_run_config(remote).data.tokenizer)],
        env=cli_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = [line for line in proc.stdout.splitlines() if line.startswith("[p0] {")]
    info = json.loads(summary[-1][len("[p0] "):])
    assert (info["processes"], info["devices"]) == (2, 4)  # sharded across both processes
    written = {str(f).split("/state/")[1].split("/")[0] for f in storage.files_under(out)
               if "/state/ocdbt.process_" in str(f)}
    assert written == {"ocdbt.process_0", "ocdbt.process_1"}  # each wrote its own shards
    assert_trees_equal(host_params(out, _model(remote)), host_params(local, _model(local)))

"""Config loading, overrides and the one-message errors (exit code 2, no traceback)."""

import subprocess

import pytest
from conftest import REPO, bignlp_cmd

from bignlp_jax import cli
from bignlp_jax.config import load_config, save_config
from bignlp_jax.config.loader import load_yaml_tree
from bignlp_jax.errors import ConfigError


def test_yaml_defaults_and_overrides(tmp_path):
    cfg = load_config("tiny", ["train.steps=7", "optimizer.lr=1e-4", "mesh.fsdp=2",
                               "optimizer.boundaries=[10, 20]"])
    assert cfg.train.steps == 7 and cfg.optimizer.lr == 1e-4 and cfg.mesh.fsdp == 2
    assert cfg.optimizer.boundaries == [10, 20]
    assert cfg.model.name == "tiny"  # merged from configs/models/tiny.yaml via `defaults`
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg  # the saved config is complete and exact


def test_a_section_override_takes_that_section_of_a_config_file():
    """`model=FILE` swaps the whole model section (nothing of the old one survives); dotted
    keys apply on top of it wherever they stand; the other sections stay."""
    llama = load_config("models/tiny_llama.yaml").model
    cfg = load_config("tiny", ["model.num_layers=3", "model=models/tiny_llama.yaml"])
    assert cfg.model == llama.model_copy(update={"num_layers": 3})
    assert cfg.model.family == "llama" and cfg.model.use_bias is False
    tiny = load_config("tiny")
    assert (cfg.train, cfg.data, cfg.run) == (tiny.train, tiny.data, tiny.run)
    # a mapping sets keys of the section, never resets the rest of it to the defaults
    assert load_config("tiny", ["model={num_layers: 3}"]).model == tiny.model.model_copy(
        update={"num_layers": 3})


def test_public_keys_exist():
    cfg = load_config(None, [])
    for key in ("run.dir", "run.seed", "train.steps", "train.global_batch_size", "data.seq_len",
                "mesh.data", "mesh.fsdp", "mesh.tensor", "optimizer.lr",
                "optimizer.warmup_steps", "optimizer.schedule"):
        section, name = key.split(".")
        assert hasattr(getattr(cfg, section), name), key


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.step=3", "unknown config key 'train.step'; did you mean train.steps"),
        ("trian.steps=3", "unknown config key 'trian'; did you mean train?"),
        ("optimizer.learning_rate=1", "unknown config key 'optimizer.learning_rate'"),
        ("train.steps=ten", "config key 'train.steps': Input should be a valid integer"),
        ("train.steps=0", "config key 'train.steps': Input should be greater than or equal to 1"),
        ("model.norm=batchnorm", "config key 'model.norm': expected one of 'layernorm' or "
                                 "'rmsnorm'; got 'batchnorm'"),
        # non-finite numbers are refused at load, not at step 1 (issue 17)
        ("optimizer.lr=inf", "config key 'optimizer.lr': Input should be a finite number"),
        ("optimizer.weight_decay=nan",
         "config key 'optimizer.weight_decay': Input should be a finite number"),
    ],
)
def test_config_errors_name_the_key(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert expected in str(err.value)


def test_unknown_key_suggests_few_keys_not_all():
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["optimizer.weight_decy=0.1"])
    msg = str(err.value)
    assert "optimizer.weight_decay" in msg
    assert "optimizer.warmup_steps" not in msg  # nearest keys only, not a dump


def test_defaults_cycle_is_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("defaults: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("defaults: [a.yaml]\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_yaml_tree(tmp_path / "a.yaml")


@pytest.mark.parametrize(
    "args, expected",
    [
        (["train", "tiny", "train.stesp=3"], "did you mean train.steps"),
        (["train", "tiny", "train.steps=abc"], "config key 'train.steps'"),
        (["train", "tiny", "mesh.data=3", "mesh.fsdp=2"], "mesh.data=3 x mesh.fsdp=2 x mesh.sequence=1 x mesh.tensor=1"
                                                          " = 6 devices, but 8 are available"),
        (["train", "no_such_config.yaml"], "config file not found: no_such_config.yaml"),
        # a section given a value that names no config file is refused, never ignored
        (["describe", "tiny", "model=tiny_llama"],
         "override model=tiny_llama: model is a section, so its value names a config file"),
        (["describe", "tiny", "mesh=models/tiny_llama.yaml"], "has no `mesh:` section to take\n"
                                                              "  fix: name a file that has one"),
    ],
)
def test_cli_exits_2_with_one_message(args, expected, capsys, tmp_path):
    rc = cli.main([*args, f"run.dir={tmp_path}"] if len(args) > 2 else args)
    err = capsys.readouterr().err
    assert rc == 2
    assert expected in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_cli_subprocess_has_no_traceback(tmp_path, cli_env):
    proc = subprocess.run(bignlp_cmd("train", "tiny", "train.stesp=3", f"run.dir={tmp_path}"),
                          cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown config key 'train.stesp'; did you mean train.steps" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()  # failed before any compute


@pytest.mark.parametrize("text, expected", [
    ("", r"c\.yaml is empty \(no sections\); fix: give it sections such as `model:`"),
    ("# only a comment\n", r"c\.yaml is empty"),
    ("- model\n- train\n", r"c\.yaml holds a list, not a mapping of sections; fix: write "
                           r"`section:` lines"),
    ("42\n", r"c\.yaml holds a int, not a mapping"),
])
def test_empty_or_non_mapping_yaml_is_refused_in_one_line(tmp_path, text, expected):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=expected) as err:
        load_config(str(tmp_path / "c.yaml"))
    assert "\n" not in str(err.value)


def test_yaml_syntax_error_names_file_line_and_fix(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  hidden: 32\ntrain:\n\tsteps: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert str(err.value).splitlines() == [  # where and what, not the line's text
        f"{path}:4:1: not valid YAML (found character '\\t' that cannot start any token)",
        "  fix: indent with spaces: YAML does not allow tabs for indentation"]
    path.write_text("model:\n  hidden: 32\n train: 3\n")  # not a tab: another fix
    with pytest.raises(ConfigError, match=r"c\.yaml:3:2: not valid YAML .*\n"
                                          r"  fix: check the indentation and quoting"):
        load_config(str(path))


def test_a_key_given_twice_on_the_command_line_is_refused(capsys, tmp_path):
    rc = cli.main(["train", "tiny", f"run.dir={tmp_path}", "train.steps=3", "optimizer.lr=1e-3",
                   "train.steps=5"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err == ("bignlp-jax train: error: train.steps is given twice on the command line "
                   "(train.steps=3 and train.steps=5); keep the one you mean")
    assert not (tmp_path / "config.yaml").exists()

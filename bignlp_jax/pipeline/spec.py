"""A pipeline file: which run configs its stages use, and where everything goes.

    name: default
    output_dir: runs/pipeline          # one sub-directory per stage, report.md, loss_curves.png
    data_dir: null                     # passed to every stage as data.data_dir (null: default)
    tokenizer: {model_type: bpe}       # trained on the pretraining data, model.vocab_size pieces
    pretrain:  {config: ../pretrain.yaml, train: {steps: 600}}   # config + any overrides
    finetune:  {config: ../finetune.yaml}
    finetune_scratch: true             # also finetune from random init (the baseline)
    align:     {config: ../align.yaml}  # optional: preference tuning (DPO) of the finetuned model
    evaluate: true
    export: {format: hf, dtype: float32}
    lm_eval: {tasks: [bignlp_stdlib_package], limit: 100}   # lm-evaluation-harness tasks
    compilation_cache: jax_cache       # XLA programs reused across stages (null: off)

Every stage's run config is its `config` file, then the stage's other keys (any run-config
keys, nested), then what the pipeline sets itself so stages feed each other: `run.dir`,
`data.tokenizer` (the tokenizer stage's output), `data.data_dir`, and for finetuning `init_from`
(the pretraining run), for alignment `init_from` (the finetuning run). Command-line
overrides address the pipeline file: `pretrain.train.steps=5`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bignlp_jax import storage
from bignlp_jax.config import Config
from bignlp_jax.config.loader import (
    CONFIG_ROOT,
    apply_overrides,
    deep_merge,
    load_yaml_tree,
    resolve_config_path,
    validate,
)
from bignlp_jax.errors import ConfigError, UserError

TRAIN_STAGES = ("pretrain", "finetune", "finetune_scratch", "align")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenizerStage(_Section):
    model_type: Literal["bpe", "unigram"] = "bpe"


class TrainStage(BaseModel):
    """`config` plus any run-config keys (kept as extra fields) that override it."""

    model_config = ConfigDict(extra="allow", frozen=True)
    config: str

    @property
    def overrides(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ExportStage(_Section):
    format: Literal["hf"] = "hf"
    dtype: Literal["float32", "bfloat16"] = "float32"


class LmEvalStage(_Section):
    """lm-evaluation-harness tasks (`bignlp-jax lm-eval`) on trained models of the pipeline;
    the scores go into report.md. Needs the eval extra (`pip install -e '.[eval]'`); without
    it the stage is left out and the report says so."""

    tasks: list[str] = Field(default_factory=lambda: ["bignlp_stdlib_package"], min_length=1)
    # training stages to evaluate (default: the final one, as exported)
    models: list[Literal["pretrain", "finetune", "finetune_scratch", "align"]] | None = None
    num_fewshot: int | None = Field(None, ge=0)
    limit: float | None = Field(None, gt=0)
    batch_size: int = Field(16, ge=1)
    max_length: int | None = Field(None, ge=2)
    # directories of extra task YAMLs, relative to the pipeline file
    include_paths: list[str] = Field(default_factory=list)
    add_bos_token: bool | None = None
    bootstrap_iters: int = Field(1000, ge=0)
    seed: int = 0


class PipelineConfig(_Section):
    name: str = "pipeline"
    output_dir: str = "runs/pipeline"
    data_dir: str | None = None
    tokenizer: TokenizerStage | None = None
    pretrain: TrainStage | None = None
    finetune: TrainStage | None = None
    finetune_scratch: bool = False
    align: TrainStage | None = None  # preference tuning (task.type=preference) after finetune
    evaluate: bool = True
    export: ExportStage | None = None
    lm_eval: LmEvalStage | None = None
    # XLA's persistent compilation cache: finetune_scratch, evaluation and reruns reuse the
    # programs compiled by earlier stages (same shapes, same HLO). Relative to output_dir.
    compilation_cache: str | None = "jax_cache"


class Pipeline:
    """A loaded pipeline file: its stages and each stage's resolved run config."""

    def __init__(self, spec: PipelineConfig, path: Path):
        self.spec, self.path = spec, path
        self.out = storage.path(spec.output_dir)

    @classmethod
    def load(cls, path: str | Path, overrides: Sequence[str] = ()) -> Pipeline:
        file = resolve_config_path(path)
        # a pipeline's keys are stages, not run config sections: no `SECTION=FILE` here
        tree = apply_overrides(load_yaml_tree(file), list(overrides), sections=())
        try:
            spec = PipelineConfig.model_validate(tree)
        except ValidationError as e:
            problems = "\n  ".join(
                f"{'.'.join(map(str, err['loc'])) or '<root>'}: {err['msg']}"
                for err in e.errors(include_url=False))
            raise ConfigError(f"invalid pipeline file {file}:\n  {problems}") from None
        pipeline = cls(spec, file)
        pipeline.check()
        return pipeline

    # -- stages --------------------------------------------------------------------------------
    def stages(self) -> list[str]:
        """Stage names in the order they run."""
        s = self.spec
        names = []
        if s.tokenizer is not None:
            names.append("tokenizer")
        if s.pretrain is not None:
            names.append("pretrain")
        if s.finetune is not None:
            names.append("finetune")
            if s.finetune_scratch:
                names.append("finetune_scratch")
        if s.align is not None:
            names.append("align")
        if s.evaluate and any(n in names for n in TRAIN_STAGES):
            names.append("evaluate")
        if s.export is not None and export_available():
            names.append("export")
        if s.lm_eval is not None and lm_eval_available() and self.lm_eval_models():
            names.append("lm_eval")
        return names

    def lm_eval_models(self) -> list[str]:
        """The training stages the lm_eval stage evaluates."""
        if self.spec.lm_eval is None:
            return []
        if self.spec.lm_eval.models is not None:
            return list(self.spec.lm_eval.models)
        final = self.final_run()
        return [final] if final is not None else []

    def stage_dir(self, stage: str) -> storage.AnyPath:
        return self.out / stage

    def enable_compilation_cache(self) -> None:
        """Point JAX's persistent compilation cache at `compilation_cache` (unless the user
        already set one, e.g. with JAX_COMPILATION_CACHE_DIR). Call before compiling."""
        import jax  # a spec is read and checked without loading jax

        # jax sets its flags as attributes at run time, which its type information cannot show
        if self.spec.compilation_cache is None or jax.config.jax_compilation_cache_dir:  # type: ignore[attr-defined]
            return
        jax.config.update("jax_compilation_cache_dir",
                          str(storage.absolute(self.out / self.spec.compilation_cache)))
        # the default (1 s) skips small programs that still cost seconds on a busy CPU
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)

    def final_run(self) -> str | None:
        """The stage whose model is the pipeline's result (exported, generated from)."""
        if self.spec.align is not None:
            return "align"
        return "finetune" if self.spec.finetune is not None else (
            "pretrain" if self.spec.pretrain is not None else None)

    # -- run configs ---------------------------------------------------------------------------
    def _stage_file(self, stage: TrainStage) -> Path:
        for candidate in (self.path.parent / stage.config, CONFIG_ROOT / stage.config):
            if candidate.is_file():
                return candidate
        return resolve_config_path(stage.config)  # raises with the places it looked

    def run_config(self, stage: str) -> Config:
        """The resolved run config of a training stage, wired to the stages before it."""
        if stage not in TRAIN_STAGES:
            raise ValueError(f"{stage} is not a training stage")
        train_stage = {"pretrain": self.spec.pretrain,
                       "align": self.spec.align}.get(stage, self.spec.finetune)
        if train_stage is None:
            raise UserError(f"pipeline {self.path} has no {stage} stage")
        tree = deep_merge(load_yaml_tree(self._stage_file(train_stage)), train_stage.overrides)
        forced: dict[str, Any] = {"run": {"dir": str(self.stage_dir(stage))}}
        if self.spec.data_dir is not None:
            forced["data"] = {"data_dir": self.spec.data_dir}
        if self.spec.tokenizer is not None:
            forced.setdefault("data", {})["tokenizer"] = str(self.stage_dir("tokenizer"))
        if stage == "finetune" and self.spec.pretrain is not None:
            forced["init_from"] = str(self.stage_dir("pretrain"))
        if stage == "align" and self.spec.finetune is not None:
            forced["init_from"] = str(self.stage_dir("finetune"))  # policy and reference
        if stage == "finetune_scratch":
            forced["init_from"] = None  # the baseline: the same finetuning from random init
            tree.pop("lora", None)  # (fully: adapters on random weights would learn nothing)
        try:
            return validate(deep_merge(tree, forced))
        except ConfigError as e:
            raise ConfigError(f"pipeline stage {stage}: {e}") from None

    def check(self) -> None:
        """Catch wiring mistakes before hours of training: every stage config must load, and
        finetuning must use the pretrained model's shape and vocabulary."""
        configs = {s: self.run_config(s) for s in self.stages() if s in TRAIN_STAGES}
        pre, fine = configs.get("pretrain"), configs.get("finetune")
        if pre is not None and fine is not None and pre.model != fine.model:
            diff = {k: (v, getattr(fine.model, k)) for k, v in pre.model
                    if getattr(fine.model, k) != v}
            shown = ", ".join(f"model.{k}: {a} vs {b}" for k, (a, b) in diff.items())
            raise UserError(
                f"pipeline {self.path}: finetune's model differs from pretrain's ({shown}); "
                "finetuning starts from the pretrained parameters, so the architectures must "
                "match\n  fix: use the same model config in both stages"
            )
        align = configs.get("align")
        if align is not None and (align.task is None or align.task.type != "preference"):
            raise UserError(f"pipeline {self.path}: the align stage's config has no "
                            "task.type=preference\n  fix: use a preference config, e.g. "
                            "align: {config: ../align_stdlib.yaml}")
        if align is not None and fine is not None and align.model != fine.model:
            raise UserError(f"pipeline {self.path}: align's model differs from finetune's; "
                            "alignment starts from the finetuned parameters\n  fix: use the "
                            "same model config in both stages")
        if self.spec.tokenizer is not None and pre is not None and pre.data.source != "tfds":
            raise UserError(f"pipeline {self.path}: the tokenizer stage trains on the pretraining "
                            f"data, but pretrain has data.source={pre.data.source}")
        if self.spec.tokenizer is not None and pre is not None and not pre.data.tfds_name:
            has, fix = (("reads a data.mixture", "set tokenizer: null (each stage then uses its "
                         "own data.tokenizer)") if pre.data.mixture else
                        ("has no data.tfds_name", "set pretrain.data.tfds_name"))
            raise UserError(f"pipeline {self.path}: the tokenizer stage trains on pretrain's "
                            f"data.tfds_name, but pretrain {has}\n  fix: {fix}")
        if self.spec.lm_eval is not None:
            trained = [st for st in self.stages() if st in TRAIN_STAGES]
            missing = [m for m in self.lm_eval_models() if m not in trained]
            if missing or not self.lm_eval_models():
                raise UserError(f"pipeline {self.path}: lm_eval evaluates "
                                f"{', '.join(missing) or 'the final trained model'}, which this "
                                f"pipeline does not train\n  fix: set lm_eval.models to some of "
                                f"{', '.join(trained) or '(none: add a training stage)'}")
        if self.spec.export is not None and self.final_run() is None:
            raise UserError(f"pipeline {self.path}: the export stage exports the trained model, "
                            "but the pipeline has no pretrain or finetune stage\n  fix: add "
                            "one, or set export: null")


def lm_eval_available() -> bool:
    """Whether lm-evaluation-harness (the eval extra) is installed."""
    return importlib.util.find_spec("lm_eval") is not None


def export_available() -> bool:
    """Whether the Hugging Face exporter (bignlp_jax.hf.weights) is installed in this tree."""
    try:
        return importlib.util.find_spec("bignlp_jax.hf.weights") is not None
    except ModuleNotFoundError:
        return False

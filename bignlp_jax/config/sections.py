"""The sections that say how a run goes: data, optimizer, train, checkpoint, run.

Each is one frozen pydantic model derived from `Section`: every field has a type and, where it
matters, a range; unknown keys are refused (`extra="forbid"`). What is trained and over which
devices (model, mesh) is in architecture.py, the finetuning sections (task, lora) in
finetune.py; schema.py joins them all into `Config` and checks across sections.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    # allow_inf_nan=False: `optimizer.lr=inf` or a `nan` anywhere is refused at load
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True,
                              allow_inf_nan=False)


class MixtureEntry(Section):
    """One dataset of `data.mixture`; unset fields take data.split / eval_split / text_key."""

    weight: float = Field(gt=0)
    split: str | None = None
    eval_split: str | None = None
    text_key: str | None = None


class DataConfig(Section):
    """Where batches come from. `synthetic` needs no files; `tfds` reads an ArrayRecord dataset."""

    source: Literal["synthetic", "tfds"] = "synthetic"
    seq_len: int = Field(128, ge=2)
    # TFDS ArrayRecord datasets (read without TensorFlow through tfds.data_source); documents are
    # tokenized once into a token store, packed into seq_len rows by index (data/store/batches.py)
    tfds_name: str | None = Field(None, description="e.g. stdlib_docs (embedded), c4/en, my_corpus")
    data_dir: str | None = Field(
        None, description="null: ~/.cache/bignlp_jax/datasets ($XDG_CACHE_HOME/bignlp_jax/"
        "datasets when set); a run records the directory it used in config.yaml")
    split: str = "train"
    eval_split: str | None = "validation"
    text_key: str = "text"
    tokenizer: str | None = Field(
        None, description="a .model file, a `bignlp-jax tokenizer train` dir or a run dir; null: "
        "the default tokenizer of the embedded corpora, trained with model.vocab_size pieces")
    worker_threads: int = Field(
        1, ge=0, description="Grain prefetch threads of the loader; never changes batches")
    workers: int = Field(
        0, ge=0, description="Grain worker processes of the loader (and of building a token "
        "store on first use); never changes batches")
    mixture: dict[str, float | MixtureEntry] | None = Field(
        None, description="{dataset: weight or {weight, split, eval_split, text_key}} blended "
        "per batch in these proportions (instead of data.tfds_name)")
    stores: dict[str, str] | None = Field(
        None, description="{dataset/split: token store identity} read by the run; null: filled "
        "in at the start and saved in run.dir/config.yaml; set: other data is refused")
    store: str | None = Field(
        None, description="a token store folder built by `data tokenize --input ... --out` "
        "(local, gs://, s3://): the training split reads it instead of a TFDS dataset")
    eval_store: str | None = Field(
        None, description="with data.store: the store of the held-out split (data.eval_split)")

    @model_validator(mode="after")
    def _check_mixture(self) -> DataConfig:
        if self.mixture is not None and (self.source != "tfds" or self.tfds_name or
                                         not self.mixture):
            raise ValueError("data.mixture needs data.source=tfds, at least one dataset and "
                             "data.tfds_name=null (the mixture names the datasets)")
        if self.store is not None and (self.source != "tfds" or self.mixture is not None):
            raise ValueError("data.store needs data.source=tfds and no data.mixture (it is the "
                             "one dataset of the run)")
        if self.eval_store is not None and self.store is None:
            raise ValueError("data.eval_store needs data.store (the training store)")
        for name, entry in (self.mixture or {}).items():
            if isinstance(entry, (int, float)) and not entry > 0:
                raise ValueError(f"data.mixture.{name}: weight {entry} must be > 0")
        return self


class OptimizerConfig(Section):
    """AdamW with global-norm clipping and a warmup + decay learning-rate schedule."""

    lr: float = Field(3e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["step", "cosine", "linear", "constant"] = "cosine"
    # step decay: multiply by gamma every decay_every steps after warmup, or at boundaries.
    gamma: float = Field(0.1, gt=0, le=1)
    decay_every: int | None = Field(None, ge=1)
    boundaries: list[int] | None = None
    # cosine / linear decay end at lr * min_lr_ratio after decay_steps (default: train.steps).
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    decay_steps: int | None = Field(None, ge=1)
    b1: float = Field(0.9, ge=0, lt=1)
    b2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    clip_norm: float | None = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _check_step(self) -> OptimizerConfig:
        if self.schedule == "step" and not (self.decay_every or self.boundaries):
            raise ValueError(
                "optimizer.schedule=step needs optimizer.decay_every or optimizer.boundaries"
            )
        if self.boundaries is not None and sorted(self.boundaries) != self.boundaries:
            raise ValueError(f"optimizer.boundaries must be increasing, got {self.boundaries}")
        return self


class TrainConfig(Section):
    steps: int = Field(100, ge=1)
    global_batch_size: int = Field(8, ge=1)
    microbatches: int = Field(1, ge=1, description="gradient accumulation steps per train step")
    # Pipeline schedule (mesh.stage x mesh.dcn_stage > 1): each train.microbatches slice of the
    # batch streams through the stages as this many microbatches
    pipeline_microbatches: int | None = Field(
        None, ge=1, description="microbatches per pipelined step; null: 2 x the stages")
    pipeline_repeats: int = Field(
        1, ge=1, description="1: GPipe; R > 1: circular, each stage holds R groups of layers")
    pipeline_fsdp_gather: Literal["step", "microbatch"] = Field(
        "step", description="with stages, gather fsdp-sharded weights once per step (a stage's "
        "layers whole in memory) or layer by layer for every microbatch (less memory, R*M x "
        "the bytes)")
    log_every: int = Field(1, ge=1)
    eval_every: int = Field(0, ge=0, description="0: no periodic evaluation")
    eval_batches: int = Field(4, ge=1)
    max_time: float | None = Field(None, gt=0, description="wall-clock seconds, then checkpoint")
    peak_tflops: float | None = Field(
        None, gt=0, description="peak dense TFLOP/s per device for MFU; null: the datasheet "
        "table (accelerators) or a measured matmul (CPU)")

    @model_validator(mode="after")
    def _check_batch(self) -> TrainConfig:
        if self.global_batch_size % self.microbatches:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} must be divisible by "
                f"train.microbatches={self.microbatches}"
            )
        return self


class CheckpointConfig(Section):
    """Orbax checkpoints in RUN_DIR/checkpoints: saved every `every_steps` and at the end."""

    every_steps: int = Field(0, ge=0, description="0: only at the end")
    keep: int = Field(3, ge=1, description="newest checkpoints kept")
    keep_every: int | None = Field(None, ge=1, description="also keep every multiple of this")
    resume_from: str | None = Field(
        None, description="a step of this run, or a run/checkpoint/step directory; used once")
    async_save: bool = True
    # the local fast tier (checkpoint/local_tier.py): node-local disk or /dev/shm, one directory
    # per process, saved often and cheaply; the run dir's checkpoints stay the durable tier
    local_dir: str | None = Field(
        None, description="node-local directory for the fast tier (per host); None: no tier")
    local_every_steps: int = Field(
        0, ge=0, description="save to local_dir every N steps (0: only when stopping)")
    local_keep: int = Field(2, ge=1, description="newest local steps kept")
    storage_deadline_s: float = Field(
        60.0, gt=0, description="a bucket endpoint unreachable this long while we wait on it "
        "(checkpoint save, metrics flush, token-store read) stops the run: exit 2, or 75 when "
        "the local tier holds a step at least as new as the last durable one")

    @field_validator("resume_from", mode="before")
    @classmethod
    def _step_as_text(cls, value):
        # `checkpoint.resume_from=8` arrives as the YAML integer 8
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _check_local_tier(self) -> CheckpointConfig:
        if self.local_dir is not None and "://" in self.local_dir:
            raise ValueError(
                f"checkpoint.local_dir={self.local_dir} is not a local path: the local tier "
                "is node-local disk or RAM on each host (e.g. /dev/shm/ckpt or /local_ssd/ckpt); "
                "the bucket is the durable tier (run.dir)")
        if self.local_every_steps and self.local_dir is None:
            raise ValueError(
                f"checkpoint.local_every_steps={self.local_every_steps} needs "
                "checkpoint.local_dir (where each host keeps its local steps); set it, e.g. "
                "checkpoint.local_dir=/dev/shm/bignlp_ckpt, or set local_every_steps=0")
        return self


class RunConfig(Section):
    dir: str = "runs/default"
    seed: int = 0
    name: str = "run"

    @field_validator("dir")
    @classmethod
    def _fits_a_file_system(cls, value: str) -> str:
        # Linux's limits (NAME_MAX, PATH_MAX): refused here in one line, not by the first mkdir
        longest = max((len(part.encode()) for part in value.split("/")), default=0)
        if longest > 255 or len(value.encode()) > 4095:
            raise ValueError(f"run.dir: a path of {len(value.encode())} bytes with a "
                             f"{longest}-byte name; file systems allow 4095 and 255: choose a "
                             "shorter one")
        return value


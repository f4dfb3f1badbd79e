"""The finetuning sections: `task` (what a finetuning run trains on and how it is scored) and
`lora` (low-rank adapters). Frozen pydantic models like the sections in sections.py."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from bignlp_jax.config.sections import Section


class TaskConfig(Section):
    """A finetuning task on the records of `data.tfds_name` (splits `data.split` /
    `data.eval_split`).

    Each record becomes <s> prompt <sep> target </s>, the loss counting only target tokens.
    `template` builds the prompt from record fields (Python format syntax, e.g. "{text}").
    classification: the target is the label word of `record[label_key]`; evaluation scores each
    label word's log-likelihood and picks the best. text_to_text: the target is
    `record[target_key]`; evaluation generates greedily and reports exact match and BLEU.
    chat: `record[messages_key]` is a conversation (template in tasks/chat.py), the loss on the
    assistant turns; evaluation reports their loss and perplexity. preference: records hold a
    `prompt` and two answers, `record[chosen_key]` preferred over `record[rejected_key]` (strings,
    or conversations; tasks/preference.py), trained with the `dpo` section's loss."""

    type: Literal["classification", "text_to_text", "chat", "preference"] = "classification"
    template: str = "{text}"
    label_key: str = "label"
    labels: list[str] | None = Field(
        None, description="classification: label values as stored (integer labels as '0', '1')")
    label_words: list[str] | None = Field(
        None, description="word trained and scored for each label (default: the labels)")
    target_key: str = "target"
    max_target_tokens: int = Field(64, ge=1, description="text_to_text: generation budget")
    eval_examples: int | None = Field(None, ge=1, description="cap on examples eval scores")
    # chat (tasks/chat.py): records hold [{role, content}, ...]; the loss counts answers only
    messages_key: str = "messages"
    chat_overflow: Literal["truncate", "refuse"] = Field(
        "truncate", description="chat: a conversation over data.seq_len: cut its end, or stop; "
        "preference: a pair over data.seq_len: cut its answers, or stop")
    # preference (tasks/preference.py): TRL's record format
    prompt_key: str = "prompt"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"

    @field_validator("labels", "label_words", mode="before")
    @classmethod
    def _labels_as_text(cls, value, info):
        # YAML reads `labels: [0, 1]` as integers; stored labels are compared as text
        if not isinstance(value, list):
            return value
        for v in value:
            if isinstance(v, bool):  # unquoted yes/no/true/false: the spelling is lost
                # pydantic turns ValueError (not TypeError) into a config message
                raise ValueError(  # noqa: TRY004
                    f"task.{info.field_name} holds the boolean {v}: YAML reads unquoted "
                    "yes/no/true/false as booleans; quote the words, e.g. [\"no\", \"yes\"]")
        return [str(v) for v in value]

    @model_validator(mode="after")
    def _check_labels(self) -> TaskConfig:
        if self.type != "classification":
            return self
        if not self.labels:
            raise ValueError("task.type=classification needs task.labels (the label set)")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"task.labels has duplicates: {self.labels}")
        if self.label_words is not None:
            if len(self.label_words) != len(self.labels):
                raise ValueError(
                    f"task.label_words has {len(self.label_words)} entries for "
                    f"{len(self.labels)} task.labels; give one word per label")
            if len(set(self.label_words)) != len(self.label_words):
                raise ValueError(f"task.label_words has duplicates: {self.label_words}")
        return self

    @property
    def words(self) -> list[str]:
        return list(self.label_words or self.labels or [])


class DpoConfig(Section):
    """Direct preference optimisation for task.type=preference, as TRL's DPOTrainer computes it.

    With log-ratios r = log p_policy(answer) - log p_reference(answer) summed over the answer's
    tokens, and d = r_chosen - r_rejected per pair:
    sigmoid (DPO): -(1 - e) log sigmoid(beta d) - e log sigmoid(-beta d), e = label_smoothing
    (conservative DPO); ipo: (d' - 1 / (2 beta))^2 with d' the difference of the per-token mean
    log-ratios; hinge: max(0, 1 - beta d). The reference is the init_from model, frozen."""

    beta: float = Field(0.1, gt=0)
    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5,
                                   description="sigmoid: probability that a label is flipped")

    @model_validator(mode="after")
    def _check(self) -> DpoConfig:
        if self.label_smoothing and self.loss != "sigmoid":
            raise ValueError(
                f"dpo.label_smoothing={self.label_smoothing} applies to dpo.loss=sigmoid only "
                f"(conservative DPO), not dpo.loss={self.loss}; set dpo.label_smoothing=0")
        return self


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


class LoraConfig(Section):
    """Low-rank adapters (LoRA) on the projections named in `targets`; rank 0 = off.

    Each targeted weight W gets W + (alpha / rank) * B @ A with A [in, rank] random and
    B [rank, out] zero (so step 0 is the base model); only A and B train and only they carry
    optimizer state. `dropout` drops the adapter's input during training."""

    rank: int = Field(0, description="0: no adapters (full finetuning)")
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] = Field(default_factory=lambda: ["q", "v"],
                               description="of q, k, v, o, gate, up, down")

    @model_validator(mode="after")
    def _check(self) -> LoraConfig:
        if self.rank < 0:
            raise ValueError(f"lora.rank={self.rank} is negative; use a rank >= 1, or 0 for off")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown:
            raise ValueError(f"lora.targets has unknown {', '.join(map(repr, unknown))}; "
                             f"choose from {', '.join(LORA_TARGETS)}")
        if not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"lora.targets must be non-empty without repeats, got {self.targets}")
        # values that differ from the defaults (a saved config.yaml spells every key out)
        extra = [k for k in ("alpha", "dropout", "targets")
                 if getattr(self, k) != LoraConfig.model_fields[k].get_default(
                     call_default_factory=True)]
        if self.rank == 0 and extra:
            raise ValueError(f"lora.rank=0 (off) but {', '.join('lora.' + k for k in extra)} "
                             "is set; set lora.rank >= 1 to train adapters, or drop those keys")
        return self

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


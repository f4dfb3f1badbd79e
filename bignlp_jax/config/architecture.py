"""The sections that say what is trained and over which devices: model and mesh.

Frozen pydantic models like every section (sections.py); schema.py joins them into `Config`,
where the rules that span sections (a mesh that divides the model) are checked.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from bignlp_jax.config.sections import Section


class ModelConfig(Section):
    """Decoder-only transformer shape. `family` picks the defaults users know by name."""

    name: str = "custom"
    family: Literal["gpt", "llama"] = "gpt"
    vocab_size: int = Field(32000, ge=2)
    num_layers: int = Field(2, ge=1)
    hidden: int = Field(128, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int | None = Field(None, ge=1, description="None: same as num_heads (MHA)")
    head_dim: int | None = Field(None, ge=1, description="None: hidden // num_heads")
    mlp_dim: int = Field(512, ge=1)
    mlp: Literal["gelu", "swiglu"] = "gelu"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = Field(1e-5, gt=0)
    position: Literal["learned", "rope"] = "learned"
    rope_theta: float = Field(10000.0, gt=0)
    max_seq_len: int = Field(2048, ge=1)
    use_bias: bool = True
    tie_embeddings: bool = True
    init_std: float = Field(0.02, gt=0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    remat: Literal["none", "full", "dots"] = "none"
    # Layers run as a `lax.scan` (compile time independent of depth). 0 unrolls the whole stack
    # into straight-line code: no per-layer weight slicing or stacked residual buffers, which is
    # faster on CPU and for shallow models, at the price of compile time growing with depth.
    scan_unroll: int = Field(1, ge=0, description="layers per scan iteration; 0 = all")
    # Kernel selection (bignlp_jax/model/kernels.py), resolved once when the model is built:
    # `auto` runs the optimised kernels measured to pay on the backend, `reference` plain
    # jnp/einsum ops with autodiff gradients everywhere; kernel_<op> overrides one op.
    kernels: Literal["auto", "reference"] = "auto"
    kernel_projection: Literal["auto", "reference", "cpu_transposed"] = "auto"
    kernel_attention: Literal["auto", "reference", "blocked", "cudnn"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _one_attention_knob(cls, data: Any) -> Any:
        """`model.kernel_attention` is the one attention knob. The older `model.attention` is
        refused, except its default `xla` (which selected nothing), dropped so that the stored
        configs of earlier runs still load."""
        if isinstance(data, dict) and "attention" in data:
            if data["attention"] not in ("xla", None):
                raise ValueError(
                    f"model.attention={data['attention']} is no longer a key; fix: "
                    f"model.kernel_attention={data['attention']} (the one attention knob)")
            data = {k: v for k, v in data.items() if k != "attention"}
        return data

    @model_validator(mode="after")
    def _check_heads(self) -> ModelConfig:
        kv = self.kv_heads
        if self.num_heads % kv:
            raise ValueError(
                f"model.num_heads={self.num_heads} must be a multiple of "
                f"model.num_kv_heads={kv} (grouped-query attention shares each kv head "
                "among num_heads/num_kv_heads query heads)"
            )
        if self.head_dim is None and self.hidden % self.num_heads:
            raise ValueError(
                f"model.hidden={self.hidden} is not divisible by model.num_heads="
                f"{self.num_heads}; set model.head_dim explicitly"
            )
        if self.position == "rope" and self.dim_per_head % 2:
            raise ValueError(f"rope needs an even head_dim, got {self.dim_per_head}")
        return self

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden // self.num_heads


class MeshConfig(Section):
    """Device mesh axes. -1 means "the devices left over" (at most one axis may say so)."""

    data: int = Field(-1, ge=-1)
    fsdp: int = Field(1, ge=-1)
    tensor: int = Field(1, ge=-1)
    rules: Literal["default", "replicated"] = "default"
    # Context parallelism: each row's tokens split over this many devices (model/
    # context_attention.py); data.seq_len must be a multiple of 2 * sequence.
    sequence: int = Field(1, ge=1, description="context-parallel devices per row")
    # Two-level mesh: how many slices/nodes (joined by DCN) the data and fsdp axes span.
    dcn_data: int = Field(1, ge=1, description="slices/nodes the data axis spans")
    dcn_fsdp: int = Field(1, ge=1, description="slices/nodes the fsdp axis spans")
    # Pipeline parallelism (model/pipeline.py): the layer stack is split into stage x dcn_stage
    # stages; `stage` of them inside a slice/node, times `dcn_stage` slices/nodes.
    stage: int = Field(1, ge=1, description="pipeline stages inside a slice/node")
    dcn_stage: int = Field(1, ge=1, description="slices/nodes the pipeline stages span")

    @property
    def stages(self) -> int:
        """Pipeline stages in all: mesh.stage x mesh.dcn_stage."""
        return self.stage * self.dcn_stage

    @model_validator(mode="after")
    def _check_sizes(self) -> MeshConfig:
        sizes = {"mesh.data": self.data, "mesh.fsdp": self.fsdp, "mesh.tensor": self.tensor}
        if any(v == 0 for v in sizes.values()):
            raise ValueError("mesh axis sizes must be >= 1, or -1 to fill the remaining devices")
        fills = [k for k, v in sizes.items() if v == -1]
        if len(fills) > 1:
            raise ValueError(f"only one mesh axis may be -1, got {', '.join(fills)}")
        if self.stages > 1 and self.sequence > 1:
            # the pipelined layer loop (model/pipeline.py) does not run context-parallel
            # attention's shard_map inside its stages
            raise ValueError(
                f"mesh.stage x mesh.dcn_stage = {self.stages} pipeline stages cannot be combined "
                f"with mesh.sequence={self.sequence}; fix: set mesh.sequence=1 or "
                "mesh.stage=1 mesh.dcn_stage=1")
        return self

"""The one name/layout map between our parameters and Hugging Face tensors, used both ways.

Each of our parameters (`Entry`) becomes one or more Hugging Face tensors (`Piece`s). A piece is
described, not coded: take a range along one axis of our array (one layer's slice for the stacked
`blocks/...` parameters), then reshape / transpose. `to_hf` applies those steps; `from_hf` runs
them backwards and writes each piece into its range, so export and import cannot drift apart.

Shapes: D hidden, K kv heads, G query heads per kv head, N = K*G heads, H head dim, F mlp dim,
V vocabulary, L layers. Our fused QKV is [D, K, G+2, H] (per kv head: its G query heads, then k,
then v); head n = k*G + g, which is exactly the order Hugging Face's `repeat_kv` assumes, so
splitting it is a slice + reshape. RoPE is the half-split (rotate_half) convention in both, so no
permutation of the q/k rows is needed (the golden test checks this).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from bignlp_jax.config import ModelConfig
from bignlp_jax.hf.arch import architecture_of

LAYER = "{i}"  # placeholder for the layer index in Hugging Face names


@dataclass(frozen=True)
class Reshape:
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Transpose:
    perm: tuple[int, ...]


@dataclass(frozen=True)
class Piece:
    """One Hugging Face tensor: our[take] (one axis range), then `ops` in order."""

    name: str
    take: tuple[int, int, int] | None = None  # (axis, start, stop) of our per-layer array
    ops: tuple[Reshape | Transpose, ...] = ()

    def shapes(self, our_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """The shape before each op and after the last one: [after take, ..., hf shape]."""
        shape = list(our_shape)
        if self.take is not None:
            axis, start, stop = self.take
            shape[axis] = stop - start
        shapes = [tuple(shape)]
        for op in self.ops:
            if isinstance(op, Reshape):
                if int(np.prod(op.shape)) != int(np.prod(shapes[-1])):
                    raise ValueError(f"{self.name}: cannot reshape {shapes[-1]} to {op.shape}")
                shapes.append(op.shape)
            else:
                shapes.append(tuple(shapes[-1][p] for p in op.perm))
        return shapes

    def index(self, ndim: int) -> tuple[slice, ...]:
        idx = [slice(None)] * ndim
        if self.take is not None:
            axis, start, stop = self.take
            idx[axis] = slice(start, stop)
        return tuple(idx)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        x = ours[self.index(ours.ndim)]
        for op in self.ops:
            x = x.reshape(op.shape) if isinstance(op, Reshape) else x.transpose(op.perm)
        return np.ascontiguousarray(x)

    def into_ours(self, hf: np.ndarray, out: np.ndarray) -> None:
        """Write the Hugging Face tensor `hf` back into its range of our array `out`."""
        shapes = self.shapes(out.shape)
        x = hf
        for op, before in zip(reversed(self.ops), reversed(shapes[:-1])):
            x = x.reshape(before) if isinstance(op, Reshape) else x.transpose(np.argsort(op.perm))
        out[self.index(out.ndim)] = x


@dataclass(frozen=True)
class Entry:
    """One of our parameters and the Hugging Face tensors it is made of."""

    path: tuple[str, ...]
    pieces: tuple[Piece, ...]

    @property
    def stacked(self) -> bool:  # the scanned blocks carry a leading layers axis
        return self.path[0] == "blocks"

    def hf_names(self, layer: int | None) -> list[str]:
        return [p.name.replace(LAYER, str(layer)) for p in self.pieces]


def _t2() -> tuple[Transpose]:
    return (Transpose((1, 0)),)


def _llama(cfg: ModelConfig) -> list[Entry]:
    D, K, H, F = cfg.hidden, cfg.kv_heads, cfg.dim_per_head, cfg.mlp_dim
    G = cfg.num_heads // K
    N = K * G
    layer = "model.layers.{i}."
    att, mlp = layer + "self_attn.", layer + "mlp."
    entries = [
        Entry(("embed", "embedding"), (Piece("model.embed_tokens.weight"),)),
        Entry(("blocks", "attn_norm", "scale"), (Piece(layer + "input_layernorm.weight"),)),
        Entry(("blocks", "mlp_norm", "scale"), (Piece(layer + "post_attention_layernorm.weight"),)),
        # [D,K,G+2,H] -> q [N*H, D], k/v [K*H, D] (torch Linear stores [out, in])
        Entry(("blocks", "attn", "qkv"), (
            Piece(att + "q_proj.weight", (2, 0, G), (Reshape((D, N * H)), *_t2())),
            Piece(att + "k_proj.weight", (2, G, G + 1), (Reshape((D, K * H)), *_t2())),
            Piece(att + "v_proj.weight", (2, G + 1, G + 2), (Reshape((D, K * H)), *_t2())),
        )),
        Entry(("blocks", "attn", "out"), (  # [N,H,D] -> [D, N*H]
            Piece(att + "o_proj.weight", None, (Reshape((N * H, D)), *_t2())),)),
        Entry(("blocks", "mlp", "wi"), (  # [D,2,F] (0 gate, 1 up) -> [F, D] each
            Piece(mlp + "gate_proj.weight", (1, 0, 1), (Reshape((D, F)), *_t2())),
            Piece(mlp + "up_proj.weight", (1, 1, 2), (Reshape((D, F)), *_t2())),
        )),
        Entry(("blocks", "mlp", "wo"), (Piece(mlp + "down_proj.weight", None, _t2()),)),
        Entry(("final_norm", "scale"), (Piece("model.norm.weight"),)),
    ]
    if cfg.use_bias:  # Llama's attention_bias and mlp_bias
        entries += [
            Entry(("blocks", "attn", "qkv_bias"), (
                Piece(att + "q_proj.bias", (1, 0, G), (Reshape((N * H,)),)),
                Piece(att + "k_proj.bias", (1, G, G + 1), (Reshape((K * H,)),)),
                Piece(att + "v_proj.bias", (1, G + 1, G + 2), (Reshape((K * H,)),)),
            )),
            Entry(("blocks", "attn", "out_bias"), (Piece(att + "o_proj.bias"),)),
            Entry(("blocks", "mlp", "bi"), (
                Piece(mlp + "gate_proj.bias", (0, 0, 1), (Reshape((F,)),)),
                Piece(mlp + "up_proj.bias", (0, 1, 2), (Reshape((F,)),)),
            )),
            Entry(("blocks", "mlp", "bo"), (Piece(mlp + "down_proj.bias"),)),
        ]
    if not cfg.tie_embeddings:
        entries.append(Entry(("lm_head",), (Piece("lm_head.weight", None, _t2()),)))  # [D,V]->[V,D]
    return entries


def _gpt2(cfg: ModelConfig) -> list[Entry]:
    D, N, H = cfg.hidden, cfg.num_heads, cfg.dim_per_head
    layer = "transformer.h.{i}."
    att, mlp = layer + "attn.", layer + "mlp."
    entries = [
        Entry(("embed", "embedding"), (Piece("transformer.wte.weight"),)),
        Entry(("pos_embed",), (Piece("transformer.wpe.weight"),)),
        Entry(("blocks", "attn_norm", "scale"), (Piece(layer + "ln_1.weight"),)),
        Entry(("blocks", "attn_norm", "bias"), (Piece(layer + "ln_1.bias"),)),
        Entry(("blocks", "mlp_norm", "scale"), (Piece(layer + "ln_2.weight"),)),
        Entry(("blocks", "mlp_norm", "bias"), (Piece(layer + "ln_2.bias"),)),
        # Conv1D stores [in, out]; c_attn's output is all q heads, then all k, then all v:
        # [D,N,3,H] -> [D,3,N,H] -> [D, 3*N*H]
        Entry(("blocks", "attn", "qkv"), (Piece(
            att + "c_attn.weight", None, (Transpose((0, 2, 1, 3)), Reshape((D, 3 * N * H)))),)),
        Entry(("blocks", "attn", "qkv_bias"), (
            Piece(att + "c_attn.bias", None, (Transpose((1, 0, 2)), Reshape((3 * N * H,)))),)),
        Entry(("blocks", "attn", "out"), (  # [N,H,D] -> [N*H, D]
            Piece(att + "c_proj.weight", None, (Reshape((N * H, D)),)),)),
        Entry(("blocks", "attn", "out_bias"), (Piece(att + "c_proj.bias"),)),
        Entry(("blocks", "mlp", "wi"), (Piece(mlp + "c_fc.weight"),)),
        Entry(("blocks", "mlp", "bi"), (Piece(mlp + "c_fc.bias"),)),
        Entry(("blocks", "mlp", "wo"), (Piece(mlp + "c_proj.weight"),)),
        Entry(("blocks", "mlp", "bo"), (Piece(mlp + "c_proj.bias"),)),
        Entry(("final_norm", "scale"), (Piece("transformer.ln_f.weight"),)),
        Entry(("final_norm", "bias"), (Piece("transformer.ln_f.bias"),)),
    ]
    if not cfg.tie_embeddings:
        entries.append(Entry(("lm_head",), (Piece("lm_head.weight", None, _t2()),)))
    return entries


LAYOUTS = {"LlamaForCausalLM": _llama, "GPT2LMHeadModel": _gpt2}


def hf_layout(cfg: ModelConfig) -> list[Entry]:
    """The map for `cfg` (refused with a UserError when no architecture matches it exactly)."""
    return LAYOUTS[architecture_of(cfg)](cfg)


def tensor_order(entries: list[Entry], num_layers: int) -> Iterator[tuple[Entry, int | None]]:
    """(entry, layer) in file order: embeddings, then layer by layer, then final norm / head.

    Layer-major order keeps each layer's tensors together, as Hugging Face's own files do."""
    first = [e for e in entries if not e.stacked and e.path[0] in ("embed", "pos_embed")]
    last = [e for e in entries if not e.stacked and e not in first]
    stacked = [e for e in entries if e.stacked]
    yield from ((e, None) for e in first)
    for i in range(num_layers):
        yield from ((e, i) for e in stacked)
    yield from ((e, None) for e in last)


def layer_shape(entry: Entry, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of one layer's slice of a parameter (the whole shape if not stacked)."""
    return tuple(shape[1:]) if entry.stacked else tuple(shape)

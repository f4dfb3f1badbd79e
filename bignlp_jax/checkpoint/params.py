"""Parameters only: read a checkpoint's params onto any sharding.

This is how finetuning, export, evaluation and generation get a model out of a run: no optimizer
state is read, and the shapes are checked against the model config first so a mismatch names
the parameter and both shapes instead of surfacing as a TensorStore error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from bignlp_jax import storage
from bignlp_jax.checkpoint import integrity
from bignlp_jax.checkpoint.paths import STATE, resolve_step_dir
from bignlp_jax.checkpoint.read_errors import is_read_error
from bignlp_jax.config import LoraConfig, ModelConfig
from bignlp_jax.errors import UserError
from bignlp_jax.model import abstract_params
from bignlp_jax.model.lora import KEY as LORA_KEY
from bignlp_jax.model.lora import LoraSpec, adapter_shapes, merge

Params = dict[str, Any]


def _key_name(key) -> str:
    # dict keys, namedtuple fields and sequence indices all print as plain names, so a saved
    # tree (Orbax turns namedtuples into dicts) and a live one give the same paths
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _flat(tree, is_leaf=None) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return {"/".join(map(_key_name, path)): leaf for path, leaf in leaves}


def saved_tree(state_dir: Path) -> dict[str, Any]:
    """The metadata tree (shape/dtype per leaf) of a saved train state."""
    try:  # the handler alone: the step-level metadata lives one directory up
        meta = ocp.PyTreeCheckpointHandler().metadata(storage.absolute(state_dir))
    except Exception as e:
        if not is_read_error(e):  # anything but unreadable metadata is a bug: traceback
            raise
        raise UserError(f"cannot read the checkpoint metadata in {state_dir}: {e}") from e
    return dict(getattr(meta, "tree", meta))


def check_shapes(saved: Any, expected: Any, where: str) -> None:
    """Raise UserError listing every parameter whose shape differs, is missing or unexpected."""
    is_leaf = lambda x: hasattr(x, "shape")  # noqa: E731 - Orbax metadata leaves have .shape
    have, want = _flat(saved, is_leaf), _flat(expected, is_leaf)
    problems = []
    for name, spec in want.items():
        if name not in have:
            problems.append(f"{name}: missing (expected shape {tuple(spec.shape)})")
        elif tuple(have[name].shape) != tuple(spec.shape):
            problems.append(
                f"{name}: checkpoint has shape {tuple(have[name].shape)}, the config "
                f"expects {tuple(spec.shape)}"
            )
    problems += [f"{n}: in the checkpoint but not expected by the config" for n in have
                 if n not in want]
    if problems:
        shown = "\n  ".join(problems[:12] + ([f"... {len(problems) - 12} more"]
                                            if len(problems) > 12 else []))
        raise UserError(
            f"{where} does not match this config:\n  {shown}\n"
            "  fix: use the model (and optimizer) config the checkpoint was written with "
            "(see its run's config.yaml)"
        )


def default_shardings(model_cfg: ModelConfig) -> Params:
    """Every parameter whole on this process's first device (for export and small models)."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda _: device, abstract_params(model_cfg))


def load_params(path: str | Path, model_cfg: ModelConfig, shardings: Params | None = None,
                step: int | None = None, lora: LoraConfig | None = None,
                merged: bool = True) -> Params:
    """Read only the parameters of a checkpoint (run dir, checkpoints dir or step dir).

    `shardings` (a tree like the params) places each array; default: one local device. The
    saved layout does not matter: Orbax reads each target shard from whatever was written.
    lora: the run's `lora` section; a LoRA run's adapters are folded into the base weights
    (`merged`, what generation, evaluation and the Hugging Face export read), or returned
    beside them under params["lora"] (merged=False)."""
    step_dir = resolve_step_dir(path, step)
    state_dir = step_dir / STATE
    # every file once in all, shared out among the processes (each reads 1/N; all agree on the
    # answer, so all stop together), before Orbax reads any. Every process of a job calls this
    # anyway: Orbax's restore below ends at a barrier of all processes.
    if damaged := integrity.verify_step(step_dir):
        raise UserError(f"checkpoint {step_dir} is damaged: {damaged}\n"
                        "  fix: use an earlier step of that run, or repair/remove this one")
    saved = saved_tree(state_dir)
    if "params" not in saved:
        raise UserError(f"{state_dir} holds no `params` (keys: {', '.join(saved)})")
    expected = abstract_params(model_cfg)
    spec = LoraSpec.from_config(lora) if lora is not None else None
    shardings = shardings if shardings is not None else default_shardings(model_cfg)
    if spec is not None:
        expected = {**expected, LORA_KEY: adapter_shapes(model_cfg, spec)}
        if LORA_KEY not in shardings:  # adapters are small: replicated beside the base
            where = jax.tree.leaves(shardings)[0]
            if isinstance(where, jax.sharding.NamedSharding):
                where = jax.sharding.NamedSharding(where.mesh, jax.sharding.PartitionSpec())
            shardings = {**shardings, LORA_KEY: jax.tree.map(lambda _: where,
                                                            expected[LORA_KEY])}
    check_shapes(saved["params"], expected, f"checkpoint {step_dir}")
    target = {"params": jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), expected, shardings)}
    try:
        # Orbax refuses relative paths; run dirs are often given relative to the working dir
        restored = ocp.PyTreeCheckpointer().restore(
            storage.absolute(state_dir), args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True))
    except Exception as e:
        if not is_read_error(e):
            raise
        raise UserError(f"cannot read the parameters of checkpoint {step_dir}: {e}") from e
    if spec is not None and merged:
        return jax.jit(merge, static_argnums=(0, 1))(model_cfg, spec, restored["params"])
    return restored["params"]


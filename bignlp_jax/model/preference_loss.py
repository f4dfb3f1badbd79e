"""The DPO family of preference losses, per pair, from sequence log-probabilities.

The formulas are those of TRL's DPOTrainer (reverse-KL DPO): with log-ratios
r = log p_policy(answer | prompt) - log p_reference(answer | prompt), each a sum over the answer's
tokens, and d = r_chosen - r_rejected:

    sigmoid  -(1 - e) log sigmoid(beta d) - e log sigmoid(-beta d)    (DPO; e > 0: conservative)
    ipo      (r_chosen / n_chosen - r_rejected / n_rejected - 1 / (2 beta))^2    (IPO, with
             TRL's per-token mean log-ratio; n = answer tokens)
    hinge    max(0, 1 - beta d)                                       (SLiC)

Rewards are beta * r (no gradient), as TRL logs them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# the six per-pair quantities logged under TRL's names (train/dpo.py averages them over pairs)
REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                  "logps/chosen", "logps/rejected")


def preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_tokens,
                    rejected_tokens, *, beta: float, loss: str,
                    label_smoothing: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-pair losses [B] and the per-pair metrics of REWARD_METRICS, each [B], float32.

    policy_*/ref_*: summed answer log-probabilities [B]; *_tokens: answer token counts [B]."""
    chosen_ratio = policy_chosen - jax.lax.stop_gradient(ref_chosen)
    rejected_ratio = policy_rejected - jax.lax.stop_gradient(ref_rejected)
    delta = chosen_ratio - rejected_ratio
    if loss == "sigmoid":
        losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * delta)
                  - label_smoothing * jax.nn.log_sigmoid(-beta * delta))
    elif loss == "ipo":
        mean_delta = (chosen_ratio / jnp.maximum(chosen_tokens, 1.0)
                      - rejected_ratio / jnp.maximum(rejected_tokens, 1.0))
        losses = (mean_delta - 1.0 / (2.0 * beta)) ** 2
    elif loss == "hinge":
        losses = jax.nn.relu(1.0 - beta * delta)
    else:
        raise ValueError(f"unknown preference loss {loss!r}")
    chosen_reward = beta * jax.lax.stop_gradient(chosen_ratio)
    rejected_reward = beta * jax.lax.stop_gradient(rejected_ratio)
    metrics = {
        "rewards/chosen": chosen_reward,
        "rewards/rejected": rejected_reward,
        "rewards/accuracies": (chosen_reward > rejected_reward).astype(jnp.float32),
        "rewards/margins": chosen_reward - rejected_reward,
        "logps/chosen": jax.lax.stop_gradient(policy_chosen),
        "logps/rejected": jax.lax.stop_gradient(policy_rejected),
    }
    return losses, metrics

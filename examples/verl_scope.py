"""SCOPE as a verl policy loss. verl's registered loss receives (old_log_prob, log_prob, advantages, response_mask,
loss_agg_mode, config, rollout_log_probs) (verl 0.9.1, verl/trainer/ppo/core_algos.py, PolicyLossFn): SCOPE's own
inputs (rewards, the teacher's log-probs, the prompt groups) are not among them. So SCOPE enters verl in two places,
as the released SCOPE fork does (its ray_trainer computes the weights, its actor takes a per-token advantage):

  1. where the batch holds rewards, prompt ids (verl's `uid`) and the teacher's log-probs, after the old log-probs:
         batch["advantages"] = scope_token_advantages(old_log_prob, teacher_log_prob, response_mask, rewards,
                                                      group_ids, n_rollouts)
  2. actor.policy_loss.loss_mode = "scope" (registered below when verl imports).

The REINFORCE gradient of -A * rho with these advantages, summed over tokens and averaged over sequences
("seq-mean-token-sum"), is the gradient of scope.scope_loss (eq. 6, agg="paper") at theta = theta_old: tested
(tests/test_examples.py) without verl. Not run inside verl: verl 0.9.1 requires transformers<5.11, and this project pins
5.19.0, so the two do not install together here.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import scope  # noqa: E402


def scope_token_advantages(old_log_prob, teacher_log_prob, response_mask, rewards, group_ids, n_rollouts, tau=1.0):
    """(B, T) advantages A with -A * rho = SCOPE's per-token loss: correct rollouts A = w_stu (eq. 2, 4), incorrect
    A = -w_tea * (o - T) (eq. 3, 5), times N because verl's seq-mean divides by B = prompts x N, eq. 6 by prompts."""
    w = scope.scope_weights(old_log_prob, teacher_log_prob, response_mask, group_ids, rewards, tau)   # (B,) eq. 4-5
    k1 = old_log_prob - teacher_log_prob                            # (B, T) sg(s - T) at theta = theta_old
    a = torch.where(rewards.bool()[:, None], torch.ones_like(k1), -k1) * w[:, None].to(k1.dtype)
    return a * n_rollouts * response_mask


def scope_policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="seq-mean-token-sum",
                      config=None, rollout_log_probs=None):
    """-A * rho (eq. 1: rho = 1 in value, its gradient d log_prob), summed per sequence, averaged over the batch."""
    ratio = torch.exp(log_prob - old_log_prob.detach())             # (B, T)
    per_token = -advantages.detach() * ratio * response_mask
    if config is not None and "verl" in sys.modules:               # verl's aggregation: global over ranks
        from verl.trainer.ppo.core_algos import agg_loss
        loss = agg_loss(per_token, response_mask, "seq-mean-token-sum", **config.global_batch_info)
    else:
        loss = per_token.sum(-1).mean()
    return loss, {"actor/scope_ratio_mean": float((ratio * response_mask).sum() / response_mask.sum().clamp(min=1))}


try:                                                               # register when verl is there
    from verl.trainer.ppo.core_algos import register_policy_loss
    register_policy_loss("scope")(scope_policy_loss)
except ImportError:
    pass

"""SCOPE as a verl policy loss (verl 0.9.1). verl's actor calls a registered loss as
loss_fn(old_log_prob=, log_prob=, advantages=, response_mask=, loss_agg_mode=, config=, rollout_is_weights=)
(verl/workers/utils/losses.py, ppo_loss): SCOPE's own inputs (rewards, the teacher's log-probs, the prompt groups) are
not among them. So SCOPE enters verl in two places, as the released SCOPE fork does (its ray_trainer computes the
weights, its actor takes a per-token advantage):

  1. where the batch holds rewards, prompt ids (verl's `uid`) and the teacher's log-probs, after the old log-probs:
         batch["advantages"] = scope_token_advantages(old_log_prob, teacher_log_prob, response_mask, rewards,
                                                      group_ids, n_rollouts)
  2. actor.policy_loss.loss_mode=scope and actor.loss_agg_mode=seq-mean-token-sum (the loss below, registered when
     this file is imported with verl installed).

The REINFORCE gradient of -A * rho with these advantages, summed over tokens and averaged over the global batch's
sequences (verl's agg_loss, "seq-mean-token-sum", with the counts verl passes in config.global_batch_info), is the
gradient of scope.scope_loss (eq. 6, agg="paper") at theta = theta_old, i.e. one update per rollout batch
(ppo_epochs=1, one mini-batch). Tested against verl 0.9.1 itself (tests/test_verl.py, `bash install.sh --verl`): its
registry, its aggregation over ranks and micro-batches, and its actor's loss and micro-batch loop (docs/trainers.md).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import scope  # noqa: E402


def scope_token_advantages(old_log_prob, teacher_log_prob, response_mask, rewards, group_ids, n_rollouts, tau=1.0):
    """(B, T) advantages A with -A * rho = SCOPE's per-token loss: correct rollouts A = w_stu (eq. 2, 4), incorrect
    A = -w_tea * (o - T) (eq. 3, 5), times N because verl's seq-mean divides by B = prompts x N, eq. 6 by prompts.
    Computed on the whole batch (every group complete), as verl's driver computes advantages."""
    w = scope.scope_weights(old_log_prob, teacher_log_prob, response_mask, group_ids, rewards, tau)   # (B,) eq. 4-5
    k1 = old_log_prob - teacher_log_prob                            # (B, T) sg(s - T) at theta = theta_old
    a = torch.where(rewards.bool()[:, None], torch.ones_like(k1), -k1) * w[:, None].to(k1.dtype)
    return a * n_rollouts * response_mask


def scope_policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="seq-mean-token-sum",
                      config=None, rollout_is_weights=None):
    """-A * rho (eq. 1: rho = 1 in value, its gradient d log_prob), times verl's rollout-correction weights when it
    passes them (scope_loss's token_weights), summed per sequence, averaged over the global batch's sequences."""
    if loss_agg_mode != "seq-mean-token-sum":
        raise ValueError(f"loss_agg_mode={loss_agg_mode!r}: SCOPE's eq. 6 needs "
                         "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum (the advantages carry the weights)")
    ratio = torch.exp(log_prob - old_log_prob.detach())             # (B, T)
    per_token = -advantages.detach() * ratio
    if rollout_is_weights is not None:                              # verl's rollout correction, no gradient
        per_token = per_token * rollout_is_weights.detach()
    if config is not None and "verl" in sys.modules:                # verl's aggregation: global over ranks
        from verl.trainer.ppo.core_algos import agg_loss
        loss = agg_loss(per_token, response_mask, loss_agg_mode, **config.global_batch_info)
    else:                                                           # one process, the whole batch
        loss = (per_token * response_mask).sum(-1).mean()
    mask = response_mask.to(ratio.dtype)
    return loss, {"actor/scope_ratio_mean": float((ratio.detach() * mask).sum() / mask.sum().clamp(min=1))}


try:                                                                # register when verl is there
    from verl.trainer.ppo.core_algos import register_policy_loss
    register_policy_loss("scope")(scope_policy_loss)
except ImportError:
    pass

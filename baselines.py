"""The baselines of the paper's tables, beside SCOPE (scope.py): OPD, PSR, GRPO and KD.

Each is a Baseline: `rows(args, batch)`, its per-row inputs computed on the WHOLE batch before the update cuts it into
micro-batches (uniform weights, GRPO's group-normalised advantages), and one loss of one signature,

    loss(logp, part, counts, args, token_weights) -> (loss, metrics)

called by scope.update_student on each micro-batch: logp (b, t) the student's log-probs with gradient; part the
micro-batch's rows of the batch (response_mask, rewards, groups, logp_teacher or logp_ref, and what `rows` made);
counts the loss's denominators over the global batch (scope.batch_counts, summed over ranks); args the config;
token_weights (b, t) or None (--rollout-is-cap). OPD and PSR are SCOPE's own loss (eq. 6) with other inputs, so they
are made from it: `opd(scope_loss)`. This file imports torch only; scope.py imports it, never the reverse.
"""

import dataclasses
from typing import Callable

import torch


@dataclasses.dataclass(frozen=True)
class Baseline:
    rows: Callable       # (args, batch) -> {name: (B,) tensor}, on whole groups
    loss: Callable       # (logp, part, counts, args, token_weights) -> (loss, metrics)


def uniform_weights(group_ids, agg="paper"):
    """Uniform per-prompt weights: 1/N for a group of N rows (they sum to 1, as eq. 6 with agg="paper") or 1 (the
    token aggregations). -> (B,) float32."""
    _, g, size = torch.unique(group_ids, return_inverse=True, return_counts=True)
    return (1.0 / size.double()[g] if agg == "paper" else torch.ones_like(g, dtype=torch.float64)).float()


def uniform_rows(args, batch):
    return {"weights": uniform_weights(batch["groups"], args.loss_agg)}


def opd(scope_loss):
    """OPD, plain on-policy distillation: eq. 3 on EVERY rollout with uniform weights, i.e. SCOPE's loss with every
    rollout on the teacher path (rewards 0, no correct tokens in the denominators)."""
    def loss(logp, part, counts, args, token_weights):
        rewards = torch.zeros_like(part["rewards"])
        total, m = scope_loss(logp, logp.detach(), part["logp_teacher"], part["response_mask"], rewards,
                              part["weights"], group_ids=part["groups"], counts=dict(counts, tokens_correct=0.0),
                              agg=args.loss_agg, token_weights=token_weights)
        return total, {"loss/opd": m["loss/opd"], "kl/teacher_k1": m["kl/teacher_k1"]}
    return Baseline(uniform_rows, loss)


def psr(scope_loss):
    """PSR, positive sample reinforcement (section 2.1): eq. 2 alone, uniform MLE on the correct rollouts. SCOPE's
    loss with the student's own log-probs as the teacher's, so sg(s - T) = 0 and the teacher path is empty."""
    def loss(logp, part, counts, args, token_weights):
        return scope_loss(logp, logp.detach(), logp.detach(), part["response_mask"], part["rewards"], part["weights"],
                          group_ids=part["groups"], counts=counts, agg=args.loss_agg, token_weights=token_weights)
    return Baseline(uniform_rows, loss)


def grpo_advantages(rewards, group_ids, eps=1e-6):
    """GRPO outcome advantage (R_i - mean_group R) / (std_group R + eps), population std, so a group of one rollout
    (or of equal rewards) has advantage 0. -> (B,)."""
    _, g = torch.unique(group_ids, return_inverse=True)
    n = int(g.max()) + 1
    r = rewards.double()
    size = torch.bincount(g, minlength=n).double()
    mean = torch.zeros(n, dtype=r.dtype, device=r.device).index_add(0, g, r) / size
    var = torch.zeros(n, dtype=r.dtype, device=r.device).index_add(0, g, (r - mean[g]) ** 2) / size
    return ((r - mean[g]) / (var.sqrt()[g] + eps)).float()


def grpo_objective(logp, logp_old, logp_ref, mask, advantages, clip, kl_coef, tokens, token_weights=None):
    """PPO-clip surrogate on the advantage plus kl_coef * KL(pi_theta || pi_ref) by the k3 estimator exp(r) - r - 1,
    r = ref - s (Schulman, "Approximating KL divergence"), both a token mean over `tokens`, the global number of
    response tokens (DAPO-style: micro-batching does not change the gradient). token_weights multiply the
    surrogate's tokens (as TRL does, not the KL term). -> (loss, metrics)."""
    for name, x in (("logp_old", logp_old), ("logp_ref", logp_ref), ("mask", mask)):
        if x.shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(logp.shape)} like logp")
    real = mask.bool()                                               # (b, t) response tokens
    for name, x in (("logp", logp), ("logp_old", logp_old), ("logp_ref", logp_ref)):
        if not torch.isfinite(x.detach()[real]).all():
            raise ValueError(f"{name} contains NaN or inf")
    d = max(float(tokens), 1.0)
    mask = mask.to(logp.dtype)
    zero = torch.zeros_like(logp)
    s = torch.where(real, logp, zero)
    ratio = torch.exp(s - torch.where(real, logp_old.detach(), zero))  # (b, t)
    a = advantages.detach().to(logp.dtype)[:, None]                  # (b, 1)
    pg = -torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)   # (b, t)
    pg = pg if token_weights is None else pg * token_weights.detach().to(pg.dtype)
    r = torch.where(real, logp_ref.detach(), zero) - s
    k3 = torch.exp(r) - r - 1                                        # (b, t) >= 0
    loss_pg, loss_kl = (pg * mask).sum() / d, (k3 * mask).sum() / d
    clipped = ((ratio - 1).abs() > clip).to(logp.dtype)
    return loss_pg + kl_coef * loss_kl, {"loss/pg": loss_pg.item(), "kl/ref_k3": loss_kl.item(),
                                         "train/ratio_clip_frac": float((clipped * mask).sum() / d)}


def grpo_loss(logp, part, counts, args, token_weights):
    """GRPO with its KL to the initial student (logp_ref; without a reference, KL 0: the student itself)."""
    ref = part.get("logp_ref", logp.detach())
    return grpo_objective(logp, logp.detach(), ref, part["response_mask"], part["advantages"], args.grpo_clip,
                          args.grpo_kl_coef, counts["tokens"], token_weights)


def grpo_rows(args, batch):
    return {"advantages": grpo_advantages(batch["rewards"], batch["groups"])}


def kd_loss(logp, part, counts, args, token_weights):
    """KD: token NLL of the teacher's own samples (off-policy), a mean over the global number of tokens."""
    real = part["response_mask"].bool()                              # (b, t) response tokens
    if not torch.isfinite(logp.detach()[real]).all():
        raise ValueError("logp contains NaN or inf")
    loss = -(torch.where(real, logp, torch.zeros_like(logp))).sum() / max(counts["tokens"], 1.0)
    return loss, {"loss/kd": loss.item()}


GRPO = Baseline(grpo_rows, grpo_loss)
KD = Baseline(lambda args, batch: {}, kd_loss)

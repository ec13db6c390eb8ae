"""SCOPE: Signal-Calibrated On-Policy Distillation Enhancement (arXiv 2604.10688), the method in one file.

Per prompt x the student samples N rollouts; a verifier marks each correct (R=1) or incorrect (R=0).
  correct rollouts   -> maximum likelihood, weighted by the student's perplexity   (eq. 2, 4)
  incorrect rollouts -> reverse-KL on-policy distillation from a teacher,
                        weighted by the teacher's inverse perplexity                (eq. 3, 5)
Both weights are a softmax within one prompt's group and one path (eq. 4-5); the objective is eq. 6.
Baselines: OPD (eq. 3 on every rollout), PSR (eq. 2 alone), GRPO, KD.  Equations and options: docs/method.md.

    python scope.py                                      # tiny preset: builds its own task and models, CPU, offline
    python scope.py --method opd                         # baselines: opd, psr, grpo, kd
    torchrun --nproc-per-node=2 scope.py                 # the same run on 2 processes, FSDP2 (gloo on CPU, NCCL on GPU)
    torchrun --nproc-per-node=8 scope.py --preset paper  # R1-Distill-Qwen-1.5B + Skywork-OR1-7B on DeepMath

Sections, in the order of the algorithm:
  1. the loss: weights (eq. 4-5), normalisation, SCOPE and OPD losses (eq. 1-3, 6); torch and math only, copyable;
     then the baselines (GRPO, KD) and the table of methods
  2. verifying rollouts: R_i per rollout (the answer checker itself is verifier.py)
  3. rollouts and scoring: `generate` with the sampler's log-probs, student and teacher token log-probs
  4. the config dataclass (its field docstrings are the --help)
  5. the loop: one code path for one process and torchrun, one function per phase
Engineering lives beside this file, called in one line each: logprobs.py (fused log-probs), loading.py (models,
data), checkpoints.py, memory.py (the memory plan), runtime.py (ranks, devices, FSDP2), vllm_engine.py (a vLLM
sampler), tiny_testbed.py (the embedded default: tiny task and models, imported only when no models are given).
"""

# ----------------------------------------------------------------------------------------------------
# 1. The loss. Torch and math only: from here to "end of the loss", a part that runs on its own (tested).
# ----------------------------------------------------------------------------------------------------
# The contract (notation over RESPONSE tokens only; docs/method.md):
#   logp          (B, L)  s_it = log pi_theta(y_it | x, y_i<t)   the student now, the only input with gradient
#   logp_old      (B, L)  o_it = log pi_old(y_it | ...)           the student that sampled the rollouts
#   logp_teacher  (B, L)  T_it = log pi_T(y_it | ...)             the teacher
#   mask (B, L) 1 on response tokens; rewards (B,) R_i in {0, 1}; group_ids (B,) the prompt each row answers.
# - scope_loss's logp_old is the TRAINER's log-prob under the parameters that sampled: with one update per batch
#   (the paper; this loop) it is logp.detach(), so rho = 1 in value and its gradient is grad s. It is NOT the
#   sampler's (e.g. vLLM's) log-prob: that differs from the trainer's by kernels and precision, and would make rho an
#   unclipped engine/trainer importance weight.
# - scope_weights needs pi_old's sequence perplexity (eq. 4: the sampler's log-probs are fine there) and sees WHOLE
#   groups: compute the weights once per batch, before any micro-batching, then slice them with the rows.
# - counts are the loss's denominators over the GLOBAL batch: batch_counts(..., group_size=N) of each rank's rows,
#   summed over ranks (all-reduce). Then the micro-batch losses add up to the full batch's loss, whatever the split.
# - data-parallel wrappers (FSDP2, DDP) AVERAGE gradients over ranks: backpropagate loss * world_size so the update
#   is the gradient of the global-batch loss.
import math

import torch

WEIGHT_NORMS = ("sum", "mean")            # sum: eq. 4-5 (weights sum to 1); mean: official code (x |cell|)
WEIGHT_DIRECTIONS = ("paper", "reversed", "uniform")
LOSS_AGGS = ("paper", "token", "official-microbatch")   # see scope_loss


def _check(ok, message):
    if not ok:                                                     # bad input: a ValueError naming the argument
        raise ValueError(message)


def _check_finite(name, x):
    _check(torch.isfinite(x).all(), f"{name} contains NaN or inf")


def _check_same_shape(**tensors):
    (name0, t0), *rest = tensors.items()
    for name, t in rest:
        _check(t.shape == t0.shape, f"{name} has shape {tuple(t.shape)}, expected {tuple(t0.shape)} like {name0}")


def _check_option(name, value, allowed):
    _check(value in allowed, f"{name}={value!r} is not one of {allowed}")


def _check_rewards(rewards, batch):
    _check(rewards.shape == (batch,), f"rewards has shape {tuple(rewards.shape)}, expected ({batch},)")
    _check(((rewards == 0) | (rewards == 1)).all(), "rewards must be 0 or 1")


def seq_nll(logp, mask):
    """Length-normalised sequence NLL = log PPL = -(1/|y|) sum_t logp_t over response tokens. -> (B,).
    An empty response (mask all 0) gets nll 0 (PPL 1); it carries no tokens, so no loss either."""
    mask = mask.to(logp.dtype)                                     # (B, L)
    return -(logp * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)    # (B,)


def group_softmax(scores, cell_ids, norm="sum"):
    """Softmax of scores within each cell (all rows with one cell id), vectorised. -> (B,).
    norm="sum": weights of a cell sum to 1 (paper eq. 4-5); norm="mean": they average 1 (official
    code: softmax x |cell|). Cells never interact: each is shifted by its own max before exp."""
    _check_option("norm", norm, WEIGHT_NORMS)
    _, cell = torch.unique(cell_ids, return_inverse=True)          # (B,) compact ids 0..C-1
    n_cells = int(cell.max()) + 1 if cell.numel() else 0
    scores = scores.detach().double()                              # weights carry no gradient
    cell_max = torch.full((n_cells,), -math.inf, dtype=scores.dtype, device=scores.device)
    cell_max = cell_max.scatter_reduce(0, cell, scores, reduce="amax")  # (C,)
    e = torch.exp(scores - cell_max[cell])                         # (B,) in (0, 1], max is 1
    cell_sum = torch.zeros(n_cells, dtype=scores.dtype, device=scores.device).index_add(0, cell, e)  # (C,)
    w = e / cell_sum[cell]                                         # (B,)
    if norm == "mean":
        cell_size = torch.bincount(cell, minlength=n_cells).to(w.dtype)  # (C,)
        w = w * cell_size[cell]
    return w.float()


def scope_weights(logp_old, logp_teacher, mask, group_ids, rewards, tau=1.0, norm="sum",
                  student="paper", teacher="paper"):
    """Dual-path adaptive weights (eq. 4-5), one per rollout. -> (B,), no gradient.

    Correct rollouts (R=1), eq. 4:   w_stu_i = softmax_{j in Omega_c}( +nll_student_j / tau )   ~ PPL_S^(+1/tau)
    Incorrect rollouts (R=0), eq. 5: w_tea_i = softmax_{j in Omega_w}( -nll_teacher_j / tau )   ~ PPL_T^(-1/tau)
    The softmax runs within one prompt (group_ids) and one path ("group-level normalisation").
    student / teacher: "paper" (the signs above), "reversed" (flipped, ablation), "uniform" (no weighting).
    The official released scripts are student="reversed", teacher="paper", norm="mean" (docs/method.md).
    """
    _check_same_shape(logp_old=logp_old, logp_teacher=logp_teacher, mask=mask)
    _check_rewards(rewards, logp_old.shape[0])
    _check(group_ids.shape == rewards.shape,
           f"group_ids has shape {tuple(group_ids.shape)}, expected {tuple(rewards.shape)}")
    _check(tau > 0, f"tau must be > 0, got {tau}")
    _check_option("student", student, WEIGHT_DIRECTIONS)
    _check_option("teacher", teacher, WEIGHT_DIRECTIONS)
    mask = mask.bool()
    _check_finite("logp_old", logp_old[mask])
    _check_finite("logp_teacher", logp_teacher[mask])
    sign = {"paper": 1.0, "reversed": -1.0, "uniform": 0.0}
    nll_student = seq_nll(logp_old.detach().double(), mask)        # (B,) log PPL_S, from pi_old
    nll_teacher = seq_nll(logp_teacher.detach().double(), mask)    # (B,) log PPL_T
    correct = rewards.bool()                                       # (B,)
    scores = torch.where(correct, sign[student] * nll_student,     # eq. 4: +log PPL_S / tau
                         -sign[teacher] * nll_teacher) / tau       # eq. 5: -log PPL_T / tau
    cell_ids = group_ids.long() * 2 + correct.long()               # (B,) one cell per (prompt, path)
    return group_softmax(scores, cell_ids, norm)


def batch_counts(mask, rewards, group_ids, group_size=None):
    """The loss's denominators for this part of the batch: prompts, response tokens, tokens of correct rollouts. Sum
    them over micro-batches and ranks and pass the totals to the losses (the contract above).
    group_size (N): count prompts as rows / N, right for any part of a batch (also one that cuts a group apart);
    without it, prompts = distinct group ids (right only for parts made of whole groups)."""
    mask = mask.float()                                            # (B, L)
    tokens = mask.sum(-1)                                          # (B,)
    prompts = mask.shape[0] / group_size if group_size else torch.unique(group_ids).numel()
    return {"prompts": float(prompts), "rollouts": float(mask.shape[0]), "tokens": float(tokens.sum()),
            "tokens_correct": float((tokens * rewards.float()).sum())}


def _normalisers(counts, agg, mask, rewards, weights):
    """(MLE denominator, OPD denominator) of a loss aggregation. Counts of zero become 1: empty sums stay 0."""
    _check_option("agg", agg, LOSS_AGGS)
    if agg == "paper":     # eq. 6: E_x[ sum_i w_i sum_t (...) ]: token sums, mean over prompts
        d_mle = d_opd = counts["prompts"]
    elif agg == "token":   # official code's token-mean (MLE / correct tokens, OPD / all tokens), but global
        d_mle, d_opd = counts["tokens_correct"], counts["tokens"]
    else:  # the released actor (docs/method.md): token means within THIS micro-batch, the MLE's over tokens of correct
        # rollouts whose weight is above 0 (its mask), each + 1e-8 (its masked_mean), times the micro-batch's share of
        # all the batch's rollouts (which also averages over ranks)
        tokens = mask.sum(-1)                                      # (b,)
        share = counts["rollouts"] / max(mask.shape[0], 1)
        mle_tokens = (tokens * rewards * (weights > 0)).sum()
        return (float(mle_tokens) + 1e-8) * share, (float(tokens.sum()) + 1e-8) * share
    return max(d_mle, 1.0), max(d_opd, 1.0)


def _weight_stats(w, cell_ids):
    """Max weight and mean entropy of the sum-to-1 weights over the cells present (for logging)."""
    if w.numel() == 0:
        return 0.0, 0.0
    _, cell = torch.unique(cell_ids, return_inverse=True)
    n = int(cell.max()) + 1
    total = torch.zeros(n, dtype=torch.float64, device=w.device).index_add(0, cell, w.double())
    p = w.double() / total[cell]                                   # renormalise "mean" weights to sum 1
    ent = torch.zeros(n, dtype=torch.float64, device=w.device).index_add(0, cell, -p * torch.log(p.clamp(min=1e-30)))
    return float(w.max()), float(ent.mean())


def scope_loss(logp, logp_old, logp_teacher, mask, rewards, weights, group_ids=None, agg="paper", counts=None,
               token_weights=None):
    """SCOPE objective (eq. 6). All (B, L) but rewards, weights, group_ids (B,). -> (loss, metrics).

      eq. 1  rho_it = exp(s_it - o_it)                         (=1 in value on fresh rollouts; grad = grad s_it)
      eq. 2  L_MLE(x, y_i) = - sum_t rho_it                    for correct rollouts
      eq. 3  L_OPD(x, y_i) =   sum_t rho_it * sg(s_it - T_it)   for incorrect rollouts (k1 log-ratio as
                                                                negative advantage: reverse KL to the teacher)
      eq. 6  J = E_x[ sum_{Omega_c} w_stu L_MLE + sum_{Omega_w} w_tea L_OPD ]

    agg="paper": token sums, divided by the number of prompts (eq. 6 exactly, with norm="sum" weights).
    agg="token": MLE sum / correct tokens + OPD sum / all response tokens (the official code's token-mean, global).
    agg="official-microbatch": the released update itself: those token means within each micro-batch, times the
    micro-batch's share of the batch's rollouts (pass counts of the whole batch: its "rollouts").
    counts: totals over the GLOBAL batch from batch_counts (summed over micro-batches and ranks); None uses
    this batch's own counts. With global counts, summing the losses of any split gives the full-batch loss.
    token_weights (B, L), no gradient: multiplies every token's term (truncated_is_weights, below); None: eq. 6.
    """
    _check_same_shape(logp=logp, logp_old=logp_old, logp_teacher=logp_teacher, mask=mask)
    _check_rewards(rewards, logp.shape[0])
    _check(weights.shape == rewards.shape, f"weights has shape {tuple(weights.shape)}, expected {tuple(rewards.shape)}")
    group_ids = torch.arange(logp.shape[0], device=logp.device) if group_ids is None else group_ids
    real = mask.bool()                                             # (B, L) response tokens
    for name, x in (("logp", logp), ("logp_old", logp_old), ("logp_teacher", logp_teacher)):
        _check_finite(name, x.detach()[real])
    _check_finite("weights", weights)
    counts = batch_counts(mask, rewards, group_ids) if counts is None else counts
    d_mle, d_opd = _normalisers(counts, agg, mask, rewards, weights)

    mask = mask.to(logp.dtype)                                     # (B, L)
    zero = torch.zeros_like(logp)
    logp_old = torch.where(real, logp_old.detach(), zero)          # padding may hold anything: zero it
    logp_teacher = torch.where(real, logp_teacher.detach(), zero)
    s = torch.where(real, logp, zero)
    rho = torch.exp(s - logp_old)                                  # (B, L) eq. 1
    if token_weights is not None:                                  # importance correction to the sampler, capped
        rho = rho * token_weights.detach().to(rho.dtype)
    k1 = (s.detach() - logp_teacher)                               # (B, L) sg(s - T), reverse-KL k1 estimate
    mle_seq = -(rho * mask).sum(-1)                                # (B,) eq. 2
    opd_seq = (rho * k1 * mask).sum(-1)                            # (B,) eq. 3
    correct = rewards.to(logp.dtype)                               # (B,)
    w = weights.detach().to(logp.dtype)                            # (B,)
    loss_mle = (w * correct * mle_seq).sum() / d_mle               # eq. 6, student path
    loss_opd = (w * (1 - correct) * opd_seq).sum() / d_opd         # eq. 6, teacher path

    c = rewards.bool()
    cells = group_ids.long() * 2 + c.long()
    w_stu_max, w_stu_ent = _weight_stats(weights[c].detach(), cells[c])
    w_tea_max, w_tea_ent = _weight_stats(weights[~c].detach(), cells[~c])
    n_wrong_tok = (mask * (1 - correct)[:, None]).sum()
    metrics = {
        "loss/mle": loss_mle.item(), "loss/opd": loss_opd.item(),
        "train/frac_correct": float(correct.mean()) if correct.numel() else 0.0,
        "train/w_stu_max": w_stu_max, "train/w_stu_entropy": w_stu_ent,
        "train/w_tea_max": w_tea_max, "train/w_tea_entropy": w_tea_ent,
        "kl/teacher_k1": float((k1 * mask * (1 - correct)[:, None]).sum() / n_wrong_tok.clamp(min=1)),
    }
    return loss_mle + loss_opd, metrics


# ---------------------------------------------------------------------------------------------- end of the loss
# The rest of the file (baselines, rollouts, scoring, config, the loop) needs more than torch and math:
import contextlib
import dataclasses
import json
import time
from pathlib import Path

import memory                                                      # the memory plan, printed before loading
import runtime                                                     # ranks, devices, seeds, FSDP2, small helpers
import verifier                                                    # section 2: the reward R_i
from checkpoints import OutDirLock, resume, save_checkpoint
from loading import drop_long_prompts, load_models, run_inputs, step_prompts
from logprobs import model_logprobs
from runtime import (GumbelSampler, all_reduce, log_step, micro_batches, pad_cat, row_seeds, split_batch,
                     summed_is_stats, summed_logs, trim)
# Moved beside this file and still importable from it, so code written against earlier versions keeps working:
from loading import load_model, load_problems, load_tokenizer  # noqa: F401
from logprobs import token_logprobs  # noqa: F401
from memory import memory_plan  # noqa: F401

# ----------------------------------------------------------------------------------------------------
# 1b. The baselines of the paper's tables, and the one table of methods (the config checks names against it; the
#     loop's update_student dispatches on it). PSR is eq. 2 alone: scope_loss with the teacher's log-probs = s.
# ----------------------------------------------------------------------------------------------------
METHODS = {   # name -> whether it needs the teacher, and its loss
    "scope": dict(teacher=True, loss="eq. 6: weighted MLE on correct rollouts + weighted OPD on incorrect (eq. 1-5)"),
    "opd": dict(teacher=True, loss="eq. 3 on every rollout, uniform weights (on-policy distillation)"),
    "psr": dict(teacher=False, loss="eq. 2 on the correct rollouts only, uniform weights (section 2.1)"),
    "grpo": dict(teacher=False, loss="PPO-clip on the group-normalised reward + k3 KL to the initial student"),
    "kd": dict(teacher=True, loss="token NLL of the teacher's own samples, generated once (off-policy)"),
}


def truncated_is_weights(logp_trainer, logp_sampler, mask, cap):
    """Truncated importance sampling, an option (the paper has none): per token min(pi_trainer / pi_sampler, cap),
    no gradient, to multiply each token's term when the sampler (vLLM, bf16) is not exactly the trainer.
    -> ((B, L) weights, 0 on padding; {"sum", "max", "capped", "tokens"} of the uncapped ratios, for logging)."""
    _check(cap > 0, f"cap must be > 0, got {cap}")
    real = mask.bool()
    log_ratio = torch.where(real, logp_trainer.detach() - logp_sampler.detach(), 0.0)          # (B, L)
    ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))              # as verl: a finite ratio even for a wild token
    stats = {"sum": float(ratio[real].sum()), "max": float(ratio[real].max()) if real.any() else 0.0,
             "capped": float((ratio[real] > cap).sum()), "tokens": float(real.sum())}
    return torch.where(real, ratio.clamp(max=cap), 0.0), stats


def uniform_weights(group_ids, agg="paper"):
    """Uniform per-prompt weights: 1/N (sums to 1, as eq. 6 with agg="paper") or 1 (agg="token"). -> (B,)."""
    scores = torch.zeros(group_ids.shape[0], device=group_ids.device)
    return group_softmax(scores, group_ids, "sum" if agg == "paper" else "mean")


def opd_loss(logp, logp_old, logp_teacher, mask, group_ids, agg="paper", counts=None, weights=None,
             token_weights=None):
    """Plain on-policy distillation baseline: eq. 3 on EVERY rollout with uniform weights.
    weights: uniform_weights of the WHOLE groups when a micro-batch holds only part of a group."""
    rewards = torch.zeros(logp.shape[0], device=logp.device)
    weights = uniform_weights(group_ids, agg) if weights is None else weights
    if counts is not None:                                         # every rollout is on the OPD path
        counts = dict(counts, tokens_correct=0.0)
    loss, metrics = scope_loss(logp, logp_old, logp_teacher, mask, rewards, weights, group_ids, agg, counts,
                               token_weights)
    return loss, {"loss/opd": metrics["loss/opd"], "kl/teacher_k1": metrics["kl/teacher_k1"]}


def grpo_advantages(rewards, group_ids, eps=1e-6):
    """GRPO outcome advantage (R_i - mean_group R) / (std_group R + eps). Population std, so a group of
    one rollout (or all equal rewards) has advantage 0. -> (B,)."""
    _, g = torch.unique(group_ids, return_inverse=True)
    n = int(g.max()) + 1
    r = rewards.double()
    size = torch.bincount(g, minlength=n).double()
    mean = torch.zeros(n, dtype=r.dtype, device=r.device).index_add(0, g, r) / size
    var = torch.zeros(n, dtype=r.dtype, device=r.device).index_add(0, g, (r - mean[g]) ** 2) / size
    return ((r - mean[g]) / (var.sqrt()[g] + eps)).float()


def grpo_loss(logp, logp_old, logp_ref, mask, advantages, clip=0.2, kl_coef=1e-4, counts=None, token_weights=None):
    """GRPO: PPO-clip surrogate on the group-normalised advantage plus kl_coef * KL(pi_theta || pi_ref) by the
    k3 estimator exp(r) - r - 1, r = ref - s (Schulman, "Approximating KL divergence"). Token-mean over the
    global number of response tokens (DAPO-style), so micro-batching does not change the gradient.
    token_weights (B, L): multiply the surrogate's tokens (truncated_is_weights; as TRL, not the KL term)."""
    _check_same_shape(logp=logp, logp_old=logp_old, logp_ref=logp_ref, mask=mask)
    real = mask.bool()                                             # (B, L) response tokens
    for name, x in (("logp", logp), ("logp_old", logp_old), ("logp_ref", logp_ref)):
        _check_finite(name, x.detach()[real])
    d = max(float(mask.float().sum()) if counts is None else counts["tokens"], 1.0)
    mask = mask.to(logp.dtype)
    zero = torch.zeros_like(logp)
    s = torch.where(real, logp, zero)
    ratio = torch.exp(s - torch.where(real, logp_old.detach(), zero))  # (B, L)
    a = advantages.detach().to(logp.dtype)[:, None]                 # (B, 1)
    pg = -torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)  # (B, L)
    pg = pg if token_weights is None else pg * token_weights.detach().to(pg.dtype)
    r = torch.where(real, logp_ref.detach(), zero) - s
    k3 = torch.exp(r) - r - 1                                       # (B, L) >= 0
    loss_pg, loss_kl = (pg * mask).sum() / d, (k3 * mask).sum() / d
    clipped = ((ratio - 1).abs() > clip).to(logp.dtype)
    return loss_pg + kl_coef * loss_kl, {"loss/pg": loss_pg.item(), "kl/ref_k3": loss_kl.item(),
                                         "train/ratio_clip_frac": float((clipped * mask).sum() / d)}


def kd_loss(logp, mask, counts=None):
    """KD baseline: token NLL of teacher-generated responses (off-policy), mean over global tokens."""
    real = mask.bool()                                             # (B, L) response tokens
    _check_finite("logp", logp.detach()[real])
    d = max(float(mask.float().sum()) if counts is None else counts["tokens"], 1.0)
    loss = -(torch.where(real, logp, torch.zeros_like(logp))).sum() / d
    return loss, {"loss/kd": loss.item()}


# ----------------------------------------------------------------------------------------------------
# 2. Verifying rollouts: R_i in {0, 1} (docs/method.md), the answer checker in verifier.py
# ----------------------------------------------------------------------------------------------------
# R_i = 1 when the last \boxed{} of a rollout equals the gold answer (verifier.is_equiv: a safe, time-bounded
# LaTeX -> sympy comparison that never executes model output) and the rollout was not cut at max_new_tokens.
# With --grader official, verifier.official_reward: the released code's exact string match (docs/method.md).
def decode_responses(tokenizer, batch):
    """The response texts, up to their eos. Past the mask: pad, a special token, not 0 (an ordinary one: Qwen's "!")."""
    ids = torch.where(batch["response_mask"].bool(), batch["response_ids"], tokenizer.pad_token_id)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def verify_rollouts(tokenizer, batch, golds, n, device, grader="verify"):
    """Phase 2: R_i in {0, 1}: the last \\boxed answer equals the gold one, and the response was not cut off."""
    texts = decode_responses(tokenizer, batch)
    judge = verifier.official_reward if grader == "official" else verifier.reward
    return torch.tensor([judge(texts[i], golds[i // n], bool(batch["truncated"][i])) for i in range(len(texts))],
                        device=device)                                # (B*n,)


# ----------------------------------------------------------------------------------------------------
# 3. Rollouts and scoring: sampling with transformers generate, token log-probs of student and teacher
# ----------------------------------------------------------------------------------------------------
def prompt_text(tokenizer, problem, instruction=""):
    """The chat-templated prompt: the problem, then the instruction (paper: "Please reason step by step...")."""
    content = problem + (" " + instruction if instruction else "")
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


class SamplerLogprobs:
    """The first logits processor: records log pi_old(a_t) of every sampled token at `temperature`, from the raw
    logits of the sampling forward pass (one (B, V) step kept at a time). These are the behaviour policy's
    log-probs (eq. 1, 4) and the reference for rollout/sampler_gap."""

    def __init__(self, temperature):
        self.temperature, self.prev, self.out = temperature, None, []

    def __call__(self, input_ids, scores):
        self.collect(input_ids[:, -1])                            # the token sampled from the previous step
        self.prev = torch.log_softmax(scores.float() / self.temperature, -1)   # (B, V)
        return scores

    def collect(self, tokens):
        if self.prev is not None:
            self.out.append(self.prev.gather(-1, tokens[:, None]).squeeze(-1))
            self.prev = None


def generate(model, tokenizer, prompts, n, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, seeds=None,
             logprob_temperature=1.0, synced=False):
    """Sample n rollouts per prompt (rows prompt-major: row p*n + j); seeds: one per row, or None (torch's RNG).
    synced: every rank keeps stepping until all are done (required when the model is FSDP-sharded).
    Returns tensors on the model's device: prompt_ids, prompt_mask (B*n, P) left-padded; response_ids,
    response_mask (B*n, T), the mask covering the response up to and including the first eos; truncated (B*n,),
    True when no eos came within max_new_tokens; logp_sampler (B*n, T) fp32, see SamplerLogprobs."""
    from transformers import (GenerationConfig, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)
    device = next(model.parameters()).device
    enc = tokenizer(prompts, padding=True, padding_side="left", add_special_tokens=False)   # lists: no device guess
    prompt_ids = torch.tensor(enc["input_ids"], device=device).repeat_interleave(n, 0)        # (B*n, P)
    prompt_mask = torch.tensor(enc["attention_mask"], device=device).repeat_interleave(n, 0)  # (B*n, P)
    if seeds is not None and len(seeds) != prompt_ids.shape[0]:
        raise ValueError(f"seeds has {len(seeds)} entries, expected {prompt_ids.shape[0]} (one per rollout)")
    recorder = SamplerLogprobs(logprob_temperature)
    procs = [recorder, TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k > 0 else [])
    procs += ([TopPLogitsWarper(top_p)] if top_p < 1.0 else []) + [GumbelSampler(seeds)]
    cfg = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id)               # sampling = argmax of noisy logits
    with torch.no_grad() if synced else torch.inference_mode():          # FSDP2 reuses buffers: no inference tensors
        seq = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=cfg,
                             logits_processor=LogitsProcessorList(procs), synced_gpus=synced)
        recorder.collect(seq[:, -1])
    response_ids = seq[:, prompt_ids.shape[1]:].clone()                            # (B*n, T); clone: a normal tensor
    is_eos = response_ids == tokenizer.eos_token_id
    response_mask = ((is_eos.cumsum(-1) - is_eos.long()) == 0).long()             # up to and including the first eos
    truncated = ~is_eos.any(-1)
    if truncated.any() and response_ids.shape[1] < max_new_tokens:
        raise RuntimeError("generate stopped before max_new_tokens without an eos")
    logp_sampler = torch.stack(recorder.out[:response_ids.shape[1]], 1).clone() * response_mask   # (B*n, T)
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_mask=response_mask, truncated=truncated,
                response_ids=torch.where(response_mask.bool(), response_ids, tokenizer.pad_token_id),
                logp_sampler=logp_sampler)


def sequence_logprobs(model, batch, temperature=1.0):
    """Log-probs of the response tokens from one forward pass over prompt + response. -> (B, T) fp32.
    Position ids count only real tokens, so left padding does not shift positions."""
    ids = torch.cat([batch["prompt_ids"], batch["response_ids"]], 1)              # (B, P+T)
    attn = torch.cat([batch["prompt_mask"], batch["response_mask"]], 1)           # (B, P+T)
    t = batch["response_ids"].shape[1]
    return model_logprobs(model, batch["response_ids"], temperature, input_ids=ids, attention_mask=attn,
                          position_ids=(attn.cumsum(-1) - 1).clamp(min=0), logits_to_keep=t + 1).logits


def shared_prompt_logprobs(model, batch, groups, temperature=1.0):
    """sequence_logprobs for rows where adjacent rows with one group id share a prompt (a prompt's rollouts, or
    part of them): each prompt runs once and its KV cache serves its rows (with grad, the gradient flows back
    through the repeated cache into the one prompt pass). -> (B, T) fp32."""
    new = torch.ones_like(groups, dtype=torch.bool)
    new[1:] = groups[1:] != groups[:-1]
    first, prompt_of = new.nonzero().squeeze(1), new.long().cumsum(0) - 1        # (G,) first row, (B,) its prompt
    p_ids, p_mask, resp = batch["prompt_ids"][first], batch["prompt_mask"][first], batch["response_ids"]
    out = model_logprobs(model, resp[:, :1], temperature, prompt_of, input_ids=p_ids, attention_mask=p_mask,
                         position_ids=(p_mask.cumsum(-1) - 1).clamp(min=0), use_cache=True, logits_to_keep=1)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values         # transformers >= 5.21 / older 5.x
    cache.batch_select_indices(prompt_of)                                        # (B) rows of prompt KV
    attn = torch.cat([batch["prompt_mask"], batch["response_mask"]], 1)          # (B, P+T)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)[:, p_ids.shape[1]:]                 # (B, T)
    kw = {"cache" if hasattr(out, "cache") else "past_key_values": cache}
    rest = model_logprobs(model, resp[:, 1:], temperature, input_ids=resp, attention_mask=attn, position_ids=pos, **kw)
    return torch.cat([out.logits, rest.logits], 1)                               # (B, T): token 0, tokens 1..T-1


def score_logprobs(model, batch, groups, max_tokens, temperature=1.0):
    """Teacher (or GRPO reference) log-probs of the student's response tokens, no grad, in token-budget
    micro-batches with one prompt pass per group. A failure raises: it never becomes a number (the official
    client's zero-fill would give a failed rollout the largest teacher weight). -> (B, T) fp32."""
    logp = torch.zeros(batch["response_ids"].shape, dtype=torch.float32, device=batch["response_ids"].device)
    for sl in micro_batches(batch, max_tokens):
        part = trim({k: v[sl] for k, v in batch.items()})
        with torch.inference_mode():
            lp = shared_prompt_logprobs(model, part, groups[sl], temperature)
        logp[sl, :lp.shape[1]] = lp.clone()                                      # (b, t), out of inference mode
    if not torch.isfinite(logp[batch["response_mask"].bool()]).all():
        raise RuntimeError("teacher scoring returned non-finite log-probs")
    return logp                                                                    # (B, T)


# ----------------------------------------------------------------------------------------------------
# 4. Config
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Args:
    preset: str = "tiny"
    """tiny: the offline embedded default (builds its own task and models); paper: the paper's models and data"""
    method: str = "scope"
    """scope | opd | grpo | kd | psr (positive sample reinforcement: uniform MLE on correct rollouts, section 2.1)"""
    grader: str = "verify"
    """training reward: verify (the last box, is_equiv) | official (the released code's MATH string match)"""
    student: str = ""
    """student model: local path or Hugging Face id; empty builds the tiny student"""
    teacher: str = ""
    """teacher model (must share the student's tokenizer): local path or Hugging Face id; empty: the tiny teacher"""
    data: str = ""
    """training problems: .jsonl file(s) (fields problem, answer) or a Hugging Face dataset id; empty: tiny task"""
    instruction: str = ""
    """text appended to every problem in the prompt"""
    out_dir: str = "runs/scope"
    """where metrics.jsonl, config.json and the checkpoint go"""
    cache_dir: str = ".cache/scope"
    """where the tiny models are built once and reused (keyed by their config)"""
    seed: int = 0
    """seeds data order, sampling (per prompt and rollout) and model building"""
    steps: int = 100
    """optimizer steps (one per batch of prompts)"""
    prompts_per_step: int = 16
    """prompts per step over all ranks (the global batch; a multiple of the number of ranks)"""
    n_rollouts: int = 8
    """rollouts per prompt (N)"""
    micro_batch_tokens: int = 1024
    """token budget of one student forward/backward: rows x (prompt + response), padded (gradient accumulation)"""
    score_tokens: int = 1024
    """token budget of one teacher / reference forward (no grad); tiny: small budgets waste less padding on a CPU"""
    rollout_tokens: int = 0
    """hf engine: KV-cache budget of one generate call, rows x (prompt + max_new_tokens) (0: all prompts at once)"""
    rollout_engine: str = "hf"
    """hf: transformers generate (exact per-rollout seeds; CPU or GPU); vllm: a colocated vLLM engine per rank (GPU)"""
    vllm_gpu_memory: float = 0.3
    """vllm engine: the GPU fraction for its weights and KV cache while awake (vLLM's CPU build: a 256 MiB KV cache)"""
    vllm_quantization: str = ""
    """vllm engine: quantise its copy of the student, e.g. fp8 (rollout/sampler_gap then includes that error)"""
    max_prompt_tokens: int = 2048
    """longest prompt in tokens: longer training problems are left out at load, counted (vllm: the engine's
    max_model_len is this + max_new_tokens)"""
    rollout_is_cap: float = 0.0
    """truncated importance sampling: weight each token's loss by min(pi_trainer / pi_sampler, C) (0: off, the paper)"""
    max_sampler_gap: float = 0.5
    """stop when the mean |log pi_sampler - log pi_trainer| per sampled token exceeds this: stale weights (0: off)"""
    max_new_tokens: int = 64
    """response length limit; a response that reaches it is truncated and gets reward 0"""
    temperature: float = 1.0
    """sampling temperature"""
    top_p: float = 1.0
    """nucleus sampling"""
    top_k: int = 0
    """top-k sampling (0: off)"""
    seeded_sampling: bool = True
    """sample with per-rollout seeds (identical rollouts on any number of ranks); off: torch's RNG"""
    logprob_temperature: str = "one"
    """one: student and teacher log-probs at T=1 (pi_theta itself); sampling: the student's at T (official code)"""
    lr: float = 3e-4
    """AdamW learning rate, constant (paper 5e-5; tiny 3e-4: 1e-3 knocks the tiny student down, 1e-4 learns slower)"""
    weight_decay: float = 0.01
    """AdamW weight decay"""
    grad_clip: float = 1.0
    """max gradient norm (0: no clipping)"""
    path_grad_norms: bool = False
    """scope: log its two paths' gradient norms (one more backward per micro-batch; one process only)"""
    tau: float = 1.0
    """SCOPE weight temperature (eq. 4-5)"""
    weight_norm: str = "sum"
    """sum: weights sum to 1 per (prompt, path) (eq. 4-5); mean: they average 1 (official code)"""
    student_weight: str = "paper"
    """paper: w ~ PPL_S^(+1/tau) (eq. 4); reversed (released scripts); uniform (ablation)"""
    teacher_weight: str = "paper"
    """paper: w ~ PPL_T^(-1/tau) (eq. 5); reversed; uniform (ablation)"""
    loss_agg: str = "paper"
    """paper: eq. 6 token sums averaged over prompts; token: the official code's token-mean over global counts;
    official-microbatch: the released update (token means per micro-batch, balanced micro-batches; docs/method.md)"""
    recipe: str = "paper"
    """paper: the paper's equations; official: the released scripts' recipe in one flag (docs/method.md)"""
    grpo_clip: float = 0.2
    """GRPO PPO clip range"""
    grpo_kl_coef: float = 1e-4
    """GRPO KL-to-reference coefficient (k3 estimator)"""
    kd_samples: int = 1
    """KD: teacher samples per prompt (generated once, cached)"""
    eval_every: int = 25
    """evaluate on the tiny test split every this many steps (0: never; tiny task only)"""
    eval_problems: int = 64
    """test problems per evaluation"""
    eval_k: int = 4
    """samples per test problem (Avg@k, Pass@k)"""
    save_every: int = 25
    """checkpoint every this many steps (0: only at the end)"""
    resume: bool = False
    """continue from out_dir/checkpoint"""
    threads: int = 1
    """torch CPU threads per process and for the tiny build (1: under load, 2 run slower; docs/measurements.md)"""
    dtype: str = "float32"
    """compute dtype, float32 | bfloat16 (the student's weights and AdamW state stay fp32; teacher stored in it)"""
    dist_timeout: float = 3600.0
    """torchrun: seconds a collective waits for the slowest rank before the run stops (NCCL's default is 600)"""
    memory_check: bool = True
    """stop before loading anything when the memory plan predicts the layout does not fit (false: print it only)"""
    gradient_checkpointing: bool = False
    """recompute activations in the student's backward pass (long responses on GPUs)"""


PRESETS = {
    "tiny": {},
    # The paper's setup (docs/method.md): 256 prompts x 8 rollouts, one update per batch, lr 5e-5 constant, wd 0.01,
    # T 0.6. Token budgets: docs/gpu.md, the memory plan for 8 x 80 GB.
    "paper": dict(student="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", teacher="Skywork/Skywork-OR1-7B",
                  data="zwhe99/DeepMath-103K", max_prompt_tokens=4096, instruction="Please reason step by step, and put your final answer "
                  "within \\boxed{}.", prompts_per_step=256, max_new_tokens=12288, temperature=0.6, lr=5e-5,
                  steps=500, seeded_sampling=False, eval_every=0, save_every=20, dtype="bfloat16", cache_dir="",
                  gradient_checkpointing=True, micro_batch_tokens=32768, score_tokens=65536, rollout_tokens=1 << 20,
                  rollout_engine="vllm", vllm_gpu_memory=0.4),   # 0.4: a quarter of a rank's rollouts in its KV cache
}


# --recipe official: the released scripts (machine981/SCOPE, run_experiment_distill_1_5b.sh) in one flag: their weight
# signs and mean-1 weights, their per-micro-batch normalisation over micro-batches balanced to 16,384 tokens per GPU
# (ppo_max_token_len_per_gpu), student log-probs at the sampling temperature 0.6, the MATH string-match grader.
OFFICIAL_RECIPE = dict(weight_norm="mean", student_weight="reversed", teacher_weight="paper", temperature=0.6,
                       loss_agg="official-microbatch", micro_batch_tokens=16384, logprob_temperature="sampling",
                       grader="official")


def resolve(given):
    """Args from a preset plus the fields given explicitly (they win); a value no option takes is a ValueError."""
    preset, recipe = given.get("preset", "tiny"), given.get("recipe", "paper")
    _check_option("preset", preset, tuple(PRESETS))
    _check_option("recipe", recipe, ("paper", "official"))
    args = Args(**{**PRESETS[preset], **(OFFICIAL_RECIPE if recipe == "official" else {}), **given})
    _check_option("method", args.method, tuple(METHODS))
    _check_option("grader", args.grader, ("verify", "official"))
    _check_option("logprob_temperature", args.logprob_temperature, ("one", "sampling"))
    _check_option("dtype", args.dtype, ("float32", "bfloat16"))
    _check_option("rollout_engine", args.rollout_engine, ("hf", "vllm"))
    if args.rollout_engine == "vllm" and args.logprob_temperature == "sampling" and (args.top_k > 0 or args.top_p < 1):
        raise ValueError("--rollout-engine vllm with --logprob-temperature sampling cannot use --top-k/--top-p: vLLM "
                         "renormalises its log-probs over the kept tokens, not the policy the loss uses (use one)")
    if args.rollout_is_cap < 0 or (args.rollout_is_cap and args.method == "kd"):
        raise ValueError(f"--rollout-is-cap {args.rollout_is_cap}: a cap > 0, and not with kd (its samples are the "
                         "teacher's: no student sampler to correct)")
    for name in ("steps", "prompts_per_step", "n_rollouts", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def parse_args(argv=None):
    import cli                                                        # the flag parser of every entry point
    p, given = cli.dataclass_cli(Args, argv, "SCOPE training (one process or torchrun)")
    try:
        return resolve(given)
    except ValueError as e:                                           # a usage error, not a traceback
        p.error(str(e))


# ----------------------------------------------------------------------------------------------------
# 5. The loop: one code path for one process and for torchrun (gloo on CPU, NCCL on GPU)
# ----------------------------------------------------------------------------------------------------
def train(args):
    """One training run: ranks, device and seeds; one run per output directory (a lock a kill -9 releases); the loop."""
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    rt = runtime.setup(args)                                          # ranks, device, seeds (runtime.py)
    lock = OutDirLock(Path(args.out_dir), rt)                         # a second run into it stops here (checkpoints.py)
    try:
        return loop(args, rt)
    finally:
        lock.release()


def loop(args, rt):
    """The SCOPE loop: sample N rollouts per prompt, verify, score with the teacher, one weighted update."""
    from tqdm import tqdm
    say = print if rt.rank == 0 else (lambda *a, **k: None)
    out = Path(args.out_dir)
    ckpt, student_name, teacher_name, rows, test_rows = run_inputs(args, rt, out, say)
    memory.print_plan(args, rt, student_name, teacher_name, say)      # the estimate, before anything is loaded
    tokenizer, student, teacher, ref, opt = load_models(args, rt, student_name, teacher_name, ckpt,
                                                        METHODS[args.method]["teacher"], args.method == "grpo" and
                                                        args.grpo_kl_coef > 0)   # the reference: the initial student
    start = resume(ckpt, student, opt, rt, out) if ckpt else 0
    rows = drop_long_prompts(rows, lambda p: len(tokenizer(prompt_text(tokenizer, p, args.instruction),
                                                           add_special_tokens=False)["input_ids"]),
                             args.max_prompt_tokens, say)
    if rt.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(args), indent=1))
        (out / "metrics.jsonl").open("a" if ckpt else "w").close()
    say(f"resumed from {ckpt} at step {start}" if ckpt else f"training from step 0 into {out}")
    engine = contextlib.nullcontext()                                 # hf: generate, below
    if args.rollout_engine == "vllm" and args.method != "kd":         # vllm_engine.py: imports vllm
        import vllm_engine
        engine = vllm_engine.rollouts(args, rt, student_name)         # closed on any error (woken first)
    with engine as engine:
        kd_cache, n = {}, args.kd_samples if args.method == "kd" else args.n_rollouts
        lp_temp = args.temperature if args.logprob_temperature == "sampling" else 1.0   # pi_theta's log-probs at T
        bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=args.method, disable=rt.rank != 0)
        for step in bar:
            idx = step_prompts(step, len(rows), args.prompts_per_step, args.seed)   # the global batch's problems
            my = list(range(rt.rank, len(idx), rt.world))                  # this rank's positions in it
            t = {"time/generate": time.time()}                             # 1. N rollouts a prompt, pi_old's log-probs
            batch = sample_rollouts(args, rt, step, student, teacher, tokenizer, rows, idx, my, kd_cache, engine)
            t["time/verify"] = time.time()                                 # 2. R_i
            batch["rewards"] = verify_rollouts(tokenizer, batch, [rows[idx[j]]["answer"] for j in my], n, rt.device,
                                               args.grader)
            batch["groups"] = torch.tensor(my, device=rt.device).repeat_interleave(n)   # (B*n,) global prompt ids
            t["time/score"] = time.time()                                  # 3. teacher T_it / GRPO reference (no grad)
            logp_teacher = (score_logprobs(teacher, batch, batch["groups"], args.score_tokens)
                            if args.method in ("scope", "opd") else None)
            logp_ref = (score_logprobs(ref, batch, batch["groups"], args.score_tokens, lp_temp)   # the student's T:
                        if ref is not None else None)                                           # KL 0 at step 0
            t["time/update"] = time.time()                                 # 4. weights (eq. 4-5) and one update (eq. 6)
            record = update_student(args, rt, student, opt, batch, logp_teacher, logp_ref)
            t["end"] = time.time()
            record = log_step(step, record, batch, t, rt.device)           # 5. log, evaluate, checkpoint
            if test_rows and args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
                record.update(evaluate(student, tokenizer, test_rows, args.eval_k, args, (args.seed, "eval"), rt))
            if rt.rank == 0:
                with (out / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.set_postfix(reward=f"{record['train/reward_mean']:.2f}", loss=f"{record['loss']:.3f}")
            if (args.save_every and (step + 1) % args.save_every == 0) or step + 1 == args.steps:
                save_checkpoint(out, step + 1, student, tokenizer, opt, args, rt)
    if rt.own_group:
        torch.distributed.destroy_process_group()
    return student


def sample_rollouts(args, rt, step, student, teacher, tokenizer, rows, idx, my, kd_cache, engine=None):
    """Phase 1: N rollouts per prompt from the student (KD: the teacher's, generated once), from the vLLM engine, or in
    generate calls whose KV cache fits rollout_tokens; every rank makes the same number of calls (FSDP2)."""
    n, lp_temp = args.n_rollouts, args.temperature if args.logprob_temperature == "sampling" else 1.0
    if args.method == "kd":
        part = [j for j in my if idx[j] not in kd_cache]
        if part:
            prompts = [prompt_text(tokenizer, rows[idx[j]]["problem"], args.instruction) for j in part]
            seeds = row_seeds(args.seed, "kd", [(idx[j], i) for j in part for i in range(args.kd_samples)])
            b = generate(teacher, tokenizer, prompts, args.kd_samples, args.max_new_tokens, args.temperature,
                         args.top_p, args.top_k, seeds if args.seeded_sampling else None)
            for q, j in enumerate(part):
                kd_cache[idx[j]] = {k: v[q * args.kd_samples:(q + 1) * args.kd_samples].cpu() for k, v in b.items()}
        parts = [kd_cache[idx[j]] for j in my]
        return {k: pad_cat([p[k] for p in parts], k, tokenizer.pad_token_id).to(rt.device) for k in parts[0]}
    prompts = [prompt_text(tokenizer, rows[idx[j]]["problem"], args.instruction) for j in my]
    if engine is not None:
        seeds = row_seeds(args.seed, step, [(j,) for j in my]) if args.seeded_sampling else None
        return engine.generate(student, tokenizer, prompts, n, seeds, rt.device)
    longest = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts) + args.max_new_tokens
    per_call = max(1, args.rollout_tokens // (longest * n)) if args.rollout_tokens else len(my)
    calls = int(all_reduce([math.ceil(len(my) / per_call)], rt.device, "max")[0])
    out = []
    for part in torch.arange(len(my), device="cpu").tensor_split(calls):   # nearly equal, contiguous
        part = part.tolist()
        seeds = row_seeds(args.seed, step, [(my[q], i) for q in part for i in range(n)])
        with rt.amp():
            out.append(generate(student, tokenizer, [prompts[q] for q in part], n, args.max_new_tokens,
                                args.temperature, args.top_p, args.top_k, seeds if args.seeded_sampling else None,
                                lp_temp, rt.fsdp))
    return {k: pad_cat([o[k] for o in out], k, tokenizer.pad_token_id) for k in out[0]}


def batch_weights(args, rt, batch, logp_teacher):
    """Phase 4a, on the whole batch before any micro-batching: SCOPE's weights (eq. 4-5, pi_old from the sampler's
    log-probs; OPD and PSR uniform), GRPO's advantages, and the loss's denominators summed over ranks (the loss's
    contract). -> (weights or None, advantages or None, counts)."""
    mask, rewards, groups = batch["response_mask"], batch["rewards"], batch["groups"]
    local = batch_counts(mask, rewards, groups, group_size=args.kd_samples if args.method == "kd" else args.n_rollouts)
    counts = dict(zip(local, all_reduce(local.values(), rt.device)))  # summed over ranks
    if args.method == "scope":
        return scope_weights(batch["logp_sampler"], logp_teacher, mask, groups, rewards, args.tau, args.weight_norm,
                             args.student_weight, args.teacher_weight), None, counts
    if args.method in ("opd", "psr"):
        return uniform_weights(groups, args.loss_agg), None, counts
    return None, grpo_advantages(rewards, groups) if args.method == "grpo" else None, counts


def update_student(args, rt, student, opt, batch, logp_teacher, logp_ref):
    """Phase 4: the weights of the whole batch (eq. 4-5), then one optimizer step over token-budget micro-batches (a
    group may be split) with the method's loss. Every normaliser counts the GLOBAL batch (the loss's contract)."""
    lp_temp = args.temperature if args.logprob_temperature == "sampling" else 1.0
    if args.method != "kd":                       # the sampler's log-probs feed the weights, the gap and the IS ratio
        _check_finite("logp_sampler", batch["logp_sampler"][batch["response_mask"].bool()])
    w, adv, counts = batch_weights(args, rt, batch, logp_teacher)
    parts = split_batch(args, rt, batch)                              # every rank runs as many (FSDP2)
    paths = runtime.PathGradNorms(student) if args.path_grad_norms and args.method == "scope" else None
    student.train()
    opt.zero_grad(set_to_none=True)
    logs, gap, nll, is_stats = [], 0.0, 0.0, []
    shared = (args.kd_samples if args.method == "kd" else args.n_rollouts) > 1 and not args.gradient_checkpointing
    for j, sl in enumerate(parts):
        part = trim({k: v[sl] for k, v in batch.items()})
        pm, r, g = part["response_mask"], part["rewards"], part["groups"]   # (b, t), (b,), (b,)
        if rt.fsdp:                                                   # reduce-scatter gradients once, after the last
            student.set_requires_gradient_sync(j == len(parts) - 1)
        with rt.amp():                                                # (b, t) s_it; one prompt pass per group needs
            logp = (shared_prompt_logprobs(student, part, g, lp_temp) if shared   # a KV cache: not with checkpointing
                    else sequence_logprobs(student, part, lp_temp))
        lt = None if logp_teacher is None else logp_teacher[sl, :logp.shape[1]]                      # (b, t) T_it
        logp_old = logp.detach()                                      # o_it: one update per batch (the contract)
        tw = None                                                     # --rollout-is-cap: trainer / sampler, capped
        if args.rollout_is_cap:
            tw, stats = truncated_is_weights(logp, part["logp_sampler"], pm, args.rollout_is_cap)
            is_stats.append(stats)
        if args.method == "scope":                                    # eq. 6 with the whole batch's weights
            loss, m = scope_loss(logp, logp_old, lt, pm, r, w[sl], g, args.loss_agg, counts, tw)
        elif args.method == "opd":                                    # eq. 3 on every rollout
            loss, m = opd_loss(logp, logp_old, lt, pm, g, args.loss_agg, counts, weights=w[sl], token_weights=tw)
        elif args.method == "psr":                                    # eq. 2 alone: T = s zeroes the teacher path
            loss, m = scope_loss(logp, logp_old, logp_old, pm, r, w[sl], g, args.loss_agg, counts, tw)
        elif args.method == "grpo":
            ref = logp_old if logp_ref is None else logp_ref[sl, :logp.shape[1]]
            loss, m = grpo_loss(logp, logp_old, ref, pm, adv[sl], args.grpo_clip, args.grpo_kl_coef, counts, tw)
        elif args.method == "kd":                                     # the teacher's samples: plain NLL
            loss, m = kd_loss(logp, pm, counts)
        else:
            raise ValueError(f"method={args.method!r} is not one of {tuple(METHODS)}")
        if paths:                                                     # the MLE path alone: OPD weights zeroed
            paths.add(scope_loss(logp, logp_old, lt, pm, r, w[sl] * r, g, args.loss_agg, counts, tw)[0])
        (loss * rt.world).backward()                                  # the wrapper averages over ranks: undo, to sum
        logs.append(m)
        nll += float(-(logp.detach() * pm).sum())                     # the student's NLL of its own tokens
        if args.method != "kd":                                       # KD's sampler is the teacher
            gap += float(((part["logp_sampler"] - logp.detach()).abs() * pm).sum())
    if args.max_sampler_gap and args.method != "kd":                  # stale weights: stop before the step
        runtime.check_sampler_gap(*all_reduce([gap, batch["response_mask"].sum()], rt.device), args.max_sampler_gap)
    record = {**(paths.norms() if paths else {}), **summed_is_stats(is_stats, rt)}
    grad_norm = runtime.clip_grad_norm(student, args.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)                                   # free the gradients before the next rollouts
    student.eval()
    return {**record, **summed_logs(logs, rt), "train/grad_norm": grad_norm, "train/grad_clipped":
            float(0 < args.grad_clip < grad_norm), "_nll": nll, "_gap": gap if args.method != "kd" else math.nan}


def evaluate(model, tokenizer, rows, k, args, seed_key, rt):
    """Avg@k and Pass@k (k samples a problem: some sample correct) per level (rows' "level") and overall, sampling as
    in training. Under torchrun every rank samples a shard of the problems (as many generate calls each); counts add."""
    mine = list(range(rt.rank, len(rows), rt.world))
    calls = int(all_reduce([math.ceil(len(mine) / 16)], rt.device, "max")[0])
    levels = sorted({r.get("level", "all") for r in rows})
    hist = {lv: [0.0] * (k + 1) for lv in levels}                     # per level: problems with c correct, c = 0..k
    for part in (p.tolist() for p in torch.tensor(mine, dtype=torch.long, device="cpu").tensor_split(max(calls, 1))):
        prompts = [prompt_text(tokenizer, rows[i]["problem"], args.instruction) for i in part]
        seeds = row_seeds(seed_key, [i * k + j for i in part for j in range(k)]) if args.seeded_sampling else None
        with rt.amp():
            b = generate(model, tokenizer, prompts, k, args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                         seeds, synced=rt.fsdp)
        texts = decode_responses(tokenizer, b)
        for q, i in enumerate(part):
            c = sum(verifier.reward(texts[q * k + j], rows[i]["answer"], bool(b["truncated"][q * k + j]))
                    for j in range(k))
            hist[rows[i].get("level", "all")][int(c)] += 1
    flat = all_reduce([x for lv in levels for x in hist[lv]], rt.device)
    hist = {lv: flat[i * (k + 1):(i + 1) * (k + 1)] for i, lv in enumerate(levels)}
    hist["all"] = [sum(h[c] for h in hist.values()) for c in range(k + 1)] if "all" not in hist else hist["all"]
    out = {}
    for lv, h in sorted(hist.items(), key=lambda x: x[0] == "all"):
        total = max(sum(h), 1.0)
        out[f"eval/{lv}/avg@{k}"] = sum(c * h[c] for c in range(k + 1)) / (k * total)
        out[f"eval/{lv}/pass@{k}"] = sum(h[1:]) / total               # unbiased Pass@k from k samples
    return out


if __name__ == "__main__":
    train(parse_args())

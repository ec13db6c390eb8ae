"""SCOPE: Signal-Calibrated On-Policy Distillation Enhancement (arXiv 2604.10688): the method in one file.

Per prompt x the student samples N rollouts; a verifier marks each correct (R=1) or incorrect (R=0).
  correct rollouts   -> maximum likelihood, weighted by the student's perplexity   (eq. 2, 4)
  incorrect rollouts -> reverse-KL on-policy distillation from a teacher,
                        weighted by the teacher's inverse perplexity                (eq. 3, 5)
Both weights are a softmax within one prompt's group and one path (eq. 4-5); the objective is eq. 6.

    python scope.py                                      # tiny preset: builds its own task and models, CPU, offline
    python scope.py --method opd                         # baselines: opd, grpo, kd
    torchrun --nproc-per-node=2 scope.py                 # the same run on 2 processes, FSDP2 (gloo on CPU, NCCL on GPU)
    torchrun --nproc-per-node=8 scope.py --preset paper  # R1-Distill-Qwen-1.5B + Skywork-OR1-7B on DeepMath

Sections, in the order of the algorithm:
  1. the math: fused token log-probs, group-softmax weights, SCOPE / OPD / GRPO / KD losses (pure tensor functions;
     examples/trl_scope.py runs them inside TRL's GRPO trainer, examples/verl_scope.py maps them onto verl's loss)
  2. verifying answers: R_i per rollout; the answer checker itself is verifier.py (swap in your own there)
  3. rollouts and scoring: transformers generate or a colocated vLLM engine; student and teacher token log-probs
  4. the config dataclass (its field docstrings are the --help)
  5. the training loop: one code path for one process and torchrun, one function per phase
The embedded default (tiny task, tokenizer and models) is the harness's tiny_testbed.py, imported lazily, only when
no --student/--teacher/--data are given.

Notation (SCOPE_SPEC.md section 1), all over RESPONSE tokens only:
  logp         s_it  log pi_theta(a_it | ...)  student, current parameters, carries gradient
  logp_old     o_it  log pi_old(a_it | ...)    student at sampling time, detached
  logp_teacher T_it  log pi_T(a_it | ...)      teacher, no gradient
  nll = -mean_t logp = log PPL, so a high nll means a high perplexity.
"""

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

import verifier                                    # section 2: the reward R_i (verifier.py)

# ----------------------------------------------------------------------------------------------------
# 1. The math (pure tensor functions: no globals, no I/O)
# ----------------------------------------------------------------------------------------------------

WEIGHT_NORMS = ("sum", "mean")            # sum: eq. 4-5 (weights sum to 1); mean: official code (x |cell|)
WEIGHT_DIRECTIONS = ("paper", "reversed", "uniform")
LOSS_AGGS = ("paper", "token")            # see scope_loss


def _check_finite(name, x):
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")


def _check_same_shape(**tensors):
    (name0, t0), *rest = tensors.items()
    for name, t in rest:
        if t.shape != t0.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(t0.shape)} like {name0}")


def _check_option(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {allowed}")


def _check_rewards(rewards, batch):
    if rewards.shape != (batch,):
        raise ValueError(f"rewards has shape {tuple(rewards.shape)}, expected ({batch},)")
    if not ((rewards == 0) | (rewards == 1)).all():
        raise ValueError("rewards must be 0 or 1")


class _FusedLogprobs(torch.autograd.Function):
    """log softmax(h W^T / T)[token] for N rows, `chunk` rows at a time: the (N, V) logits never exist.

    Forward keeps only the (N,) log-sum-exp. Backward recomputes each chunk's logits (one extra matmul, the price
    of never holding N x V) and uses d logp / d logits = (onehot(token) - softmax) / T, so that
    d h = d logits @ W and d W = d logits^T @ h. Matmuls run in the hidden states' dtype (bf16 on GPUs), the
    softmax in fp32; d W accumulates in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, tokens, temperature, chunk):
        w, acc = weight.to(hidden.dtype), torch.promote_types(hidden.dtype, torch.float32)  # (V, H), fp32 or fp64
        logp = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)  # (N,)
        lse = torch.empty_like(logp)                               # (N,)
        for i in range(0, hidden.shape[0], chunk):
            x = (hidden[i:i + chunk] / temperature @ w.T).to(acc)  # (c, V): the one block alive, reused in place
            target = x.gather(-1, tokens[i:i + chunk, None]).squeeze(-1)  # (c,)
            top = x.amax(-1, keepdim=True)                         # (c, 1)
            lse[i:i + chunk] = x.sub_(top).exp_().sum(-1).log_() + top.squeeze(-1)
            logp[i:i + chunk] = target - lse[i:i + chunk]
        ctx.save_for_backward(hidden, weight, tokens, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, tokens, lse = ctx.saved_tensors
        w, t, acc = weight.to(hidden.dtype), ctx.temperature, lse.dtype
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if ctx.needs_input_grad[1] else None
        for i in range(0, hidden.shape[0], ctx.chunk):
            h, g = hidden[i:i + ctx.chunk], grad_logp[i:i + ctx.chunk, None].to(acc) / t   # (c, H), (c, 1)
            d = (h / t @ w.T).to(acc).sub_(lse[i:i + ctx.chunk, None]).exp_().mul_(-g)    # (c, V) -softmax * g
            d.scatter_add_(-1, tokens[i:i + ctx.chunk, None], g)                               # + onehot(token) * g
            if grad_h is not None:
                grad_h[i:i + ctx.chunk] = d.to(w.dtype) @ w                                    # (c, H)
            if grad_w is not None:
                grad_w.addmm_(d.T, h.to(acc))                                                  # (V, H)
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None


def token_logprobs(hidden, weight, tokens, temperature=1.0, chunk=None):
    """log p(token) = log softmax(hidden @ weight.T / temperature)[token], never materialising (tokens x V) logits.
    hidden (B, L, H) last hidden states, weight (V, H) the output layer (or tied embedding), tokens (B, L) -> (B, L)
    fp32 (fp64 for fp64 inputs). Default chunk: rows of 2^25 logits in all (128 MiB of fp32 per block)."""
    if hidden.dim() != 3 or tokens.shape != hidden.shape[:2] or weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"hidden (B, L, H), weight (V, H) and tokens (B, L) disagree: {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(tokens.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b, l, h = hidden.shape
    chunk = chunk or max(1, 2**25 // weight.shape[0])
    out = _FusedLogprobs.apply(hidden.reshape(b * l, h), weight, tokens.reshape(b * l), float(temperature), int(chunk))
    return out.view(b, l)                                          # (B, L)


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
    The official released scripts are student="reversed", teacher="paper", norm="mean" (README).
    """
    _check_same_shape(logp_old=logp_old, logp_teacher=logp_teacher, mask=mask)
    _check_rewards(rewards, logp_old.shape[0])
    if group_ids.shape != rewards.shape:
        raise ValueError(f"group_ids has shape {tuple(group_ids.shape)}, expected {tuple(rewards.shape)}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
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
    """Local normalising counts of a batch. Sum them over micro-batches and ranks (all_reduce) and pass
    the totals to the losses, so the gradient never depends on how the global batch was split.
    group_size (N): count prompts as rows / N, which stays right when a part holds only some of a group's rows;
    without it, prompts = distinct group ids (right only for parts made of whole groups)."""
    mask = mask.float()                                            # (B, L)
    tokens = mask.sum(-1)                                          # (B,)
    correct = rewards.float()                                      # (B,)
    prompts = mask.shape[0] / group_size if group_size else torch.unique(group_ids).numel()
    return {"prompts": float(prompts), "sequences": float(mask.shape[0]), "tokens": float(tokens.sum()),
            "tokens_correct": float((tokens * correct).sum()), "tokens_incorrect": float((tokens * (1 - correct)).sum())}


def _normalisers(counts, agg):
    """(MLE denominator, OPD denominator) of a loss aggregation. Counts of zero become 1: empty sums stay 0."""
    _check_option("agg", agg, LOSS_AGGS)
    if agg == "paper":     # eq. 6: E_x[ sum_i w_i sum_t (...) ]: token sums, mean over prompts
        d_mle = d_opd = counts["prompts"]
    else:                  # official code's token-mean (MLE / correct tokens, OPD / all tokens), but global
        d_mle, d_opd = counts["tokens_correct"], counts["tokens"]
    return max(d_mle, 1.0), max(d_opd, 1.0)


def _weight_stats(w, cell_ids):
    """Max weight and mean entropy of the sum-to-1 weights over the cells present (for logging)."""
    if w.numel() == 0:
        return 0.0, 0.0
    _, cell = torch.unique(cell_ids, return_inverse=True)
    n = int(cell.max()) + 1
    total = torch.zeros(n, dtype=torch.float64).index_add(0, cell, w.double())
    p = w.double() / total[cell]                                   # renormalise "mean" weights to sum 1
    ent = torch.zeros(n, dtype=torch.float64).index_add(0, cell, -p * torch.log(p.clamp(min=1e-30)))
    return float(w.max()), float(ent.mean())


def scope_loss(logp, logp_old, logp_teacher, mask, rewards, weights, group_ids=None, agg="paper", counts=None):
    """SCOPE objective (eq. 6). All (B, L) but rewards, weights, group_ids (B,). -> (loss, metrics).

      eq. 1  rho_it = exp(s_it - o_it)                         (=1 in value on fresh rollouts; grad = grad s_it)
      eq. 2  L_MLE(x, y_i) = - sum_t rho_it                    for correct rollouts
      eq. 3  L_OPD(x, y_i) =   sum_t rho_it * sg(s_it - T_it)   for incorrect rollouts (k1 log-ratio as
                                                                negative advantage: reverse KL to the teacher)
      eq. 6  J = E_x[ sum_{Omega_c} w_stu L_MLE + sum_{Omega_w} w_tea L_OPD ]

    agg="paper": token sums, divided by the number of prompts (eq. 6 exactly, with norm="sum" weights).
    agg="token": MLE sum / correct tokens + OPD sum / all response tokens (the official code's token-mean).
    counts: totals over the GLOBAL batch from batch_counts (summed over micro-batches and ranks); None uses
    this batch's own counts. With global counts, summing the losses of any split gives the full-batch loss.
    """
    _check_same_shape(logp=logp, logp_old=logp_old, logp_teacher=logp_teacher, mask=mask)
    _check_rewards(rewards, logp.shape[0])
    if weights.shape != rewards.shape:
        raise ValueError(f"weights has shape {tuple(weights.shape)}, expected {tuple(rewards.shape)}")
    group_ids = torch.arange(logp.shape[0]) if group_ids is None else group_ids
    m = mask.bool()
    for name, x in (("logp", logp), ("logp_old", logp_old), ("logp_teacher", logp_teacher)):
        _check_finite(name, x.detach()[m])
    _check_finite("weights", weights)
    counts = batch_counts(mask, rewards, group_ids) if counts is None else counts
    d_mle, d_opd = _normalisers(counts, agg)

    mask = mask.to(logp.dtype)                                     # (B, L)
    zero = torch.zeros_like(logp)
    logp_old = torch.where(m, logp_old.detach(), zero)             # padding may hold anything: zero it
    logp_teacher = torch.where(m, logp_teacher.detach(), zero)
    s = torch.where(m, logp, zero)
    rho = torch.exp(s - logp_old)                                  # (B, L) eq. 1
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


def uniform_weights(group_ids, agg="paper"):
    """Uniform per-prompt weights: 1/N (sums to 1, as eq. 6 with agg="paper") or 1 (agg="token"). -> (B,)."""
    return group_softmax(torch.zeros(group_ids.shape[0]), group_ids, "sum" if agg == "paper" else "mean")


def opd_loss(logp, logp_old, logp_teacher, mask, group_ids, agg="paper", counts=None, weights=None):
    """Plain on-policy distillation baseline: eq. 3 on EVERY rollout with uniform weights.
    weights: uniform_weights of the WHOLE groups when a micro-batch holds only part of a group."""
    rewards = torch.zeros(logp.shape[0], device=logp.device)
    weights = uniform_weights(group_ids, agg) if weights is None else weights
    if counts is not None:                                         # every rollout is on the OPD path
        counts = dict(counts, tokens_correct=0.0, tokens_incorrect=counts["tokens"])
    loss, metrics = scope_loss(logp, logp_old, logp_teacher, mask, rewards, weights, group_ids, agg, counts)
    return loss, {"loss/opd": metrics["loss/opd"], "kl/teacher_k1": metrics["kl/teacher_k1"]}


def grpo_advantages(rewards, group_ids, eps=1e-6):
    """GRPO outcome advantage (R_i - mean_group R) / (std_group R + eps). Population std, so a group of
    one rollout (or all equal rewards) has advantage 0. -> (B,)."""
    _, g = torch.unique(group_ids, return_inverse=True)
    n = int(g.max()) + 1
    r = rewards.double()
    size = torch.bincount(g, minlength=n).double()
    mean = torch.zeros(n, dtype=r.dtype).index_add(0, g, r) / size
    var = torch.zeros(n, dtype=r.dtype).index_add(0, g, (r - mean[g]) ** 2) / size
    return ((r - mean[g]) / (var.sqrt()[g] + eps)).float()


def grpo_loss(logp, logp_old, logp_ref, mask, advantages, clip=0.2, kl_coef=1e-4, counts=None):
    """GRPO: PPO-clip surrogate on the group-normalised advantage plus kl_coef * KL(pi_theta || pi_ref) by the
    k3 estimator exp(r) - r - 1, r = ref - s (Schulman, "Approximating KL divergence"). Token-mean over the
    global number of response tokens (DAPO-style), so micro-batching does not change the gradient."""
    _check_same_shape(logp=logp, logp_old=logp_old, logp_ref=logp_ref, mask=mask)
    m = mask.bool()
    for name, x in (("logp", logp), ("logp_old", logp_old), ("logp_ref", logp_ref)):
        _check_finite(name, x.detach()[m])
    d = max(float(mask.float().sum()) if counts is None else counts["tokens"], 1.0)
    mask = mask.to(logp.dtype)
    zero = torch.zeros_like(logp)
    s = torch.where(m, logp, zero)
    ratio = torch.exp(s - torch.where(m, logp_old.detach(), zero))  # (B, L)
    a = advantages.detach().to(logp.dtype)[:, None]                 # (B, 1)
    pg = -torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)  # (B, L)
    r = torch.where(m, logp_ref.detach(), zero) - s
    k3 = torch.exp(r) - r - 1                                       # (B, L) >= 0
    loss_pg, loss_kl = (pg * mask).sum() / d, (k3 * mask).sum() / d
    clipped = ((ratio - 1).abs() > clip).to(logp.dtype)
    return loss_pg + kl_coef * loss_kl, {"loss/pg": loss_pg.item(), "kl/ref_k3": loss_kl.item(),
                                         "train/clip_frac": float((clipped * mask).sum() / d)}


def kd_loss(logp, mask, counts=None):
    """KD baseline: token NLL of teacher-generated responses (off-policy), mean over global tokens."""
    m = mask.bool()
    _check_finite("logp", logp.detach()[m])
    d = max(float(mask.float().sum()) if counts is None else counts["tokens"], 1.0)
    loss = -(torch.where(m, logp, torch.zeros_like(logp))).sum() / d
    return loss, {"loss/kd": loss.item()}


# ----------------------------------------------------------------------------------------------------
# 2. Verifying answers: reward R_i in {0, 1} (spec section 1), in verifier.py
# ----------------------------------------------------------------------------------------------------
# R_i = 1 when the last \boxed{} of a rollout equals the gold answer (verifier.is_equiv: a safe, time-bounded
# LaTeX -> sympy comparison that never executes model output) and the rollout was not cut at max_new_tokens.
# With --grader official, verifier.official_reward: the released code's exact string match (README).
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


def row_seeds(*key_and_rows):
    """Deterministic 63-bit seeds, one per row, from a key and per-row ids."""
    *key, rows = key_and_rows
    return [int.from_bytes(hashlib.sha256(repr((*key, r)).encode()).digest()[:8], "little") >> 1 for r in rows]


class GumbelSampler:
    """The last logits processor: argmax(logits + Gumbel noise) is an exact sample of softmax(logits). With seeds, row
    i's noise has its own generator seeded by (run seed, step, prompt, rollout): one process and torchrun draw the same
    rollouts, and a resumed run redraws what the uninterrupted one drew. Without: torch's RNG on the logits' device."""

    def __init__(self, seeds=None):
        self.gens = None if seeds is None else [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids, scores):
        if self.gens is None:
            u = torch.rand_like(scores, dtype=torch.float64)
        else:
            u = torch.stack([torch.rand(scores.shape[-1], generator=g, dtype=torch.float64) for g in self.gens])
        return scores + (-torch.log(-torch.log(u.clamp(1e-300, 1 - 1e-16)))).to(scores.device, scores.dtype)  # (B, V)


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
    from transformers import GenerationConfig, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    prompt_ids = enc["input_ids"].repeat_interleave(n, 0).to(device)              # (B*n, P)
    prompt_mask = enc["attention_mask"].repeat_interleave(n, 0).to(device)        # (B*n, P)
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


class LogprobHead(torch.nn.Module):
    """Stands in for a causal LM's output layer during one forward pass, so the model returns log p(target) per
    position (token_logprobs: no (B, L, V) logits) where it would return logits. Going through the model's own
    forward matters under FSDP2, which gathers the output layer's weight only inside forward.
    rows: which hidden row serves each target row (one prompt row for all of its rollouts)."""

    def __init__(self, lm_head, targets, temperature, rows=None):
        super().__init__()
        if getattr(lm_head, "bias", None) is not None:
            raise ValueError("an output layer with a bias is not supported")
        self.lm_head, self.targets, self.temperature, self.rows = lm_head, targets, temperature, rows

    def forward(self, hidden):                                                    # (B', L', H)
        hidden = hidden if self.rows is None else hidden[self.rows]               # (B, L', H)
        return token_logprobs(hidden[:, :self.targets.shape[1]], self.lm_head.weight, self.targets, self.temperature)


def model_logprobs(model, targets, temperature=1.0, rows=None, **inputs):
    """model(**inputs) with LogprobHead as its output layer: the output's .logits are (B, T) log-probs of targets.
    A wrapper with .module (DDP) is called as it is, so that its gradient hooks run; its module gets the head."""
    inner = getattr(model, "module", model)
    lm_head = inner.get_output_embeddings()
    inner.set_output_embeddings(LogprobHead(lm_head, targets, temperature, rows))
    try:
        return model(**inputs)
    finally:
        inner.set_output_embeddings(lm_head)


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
    first, rows = new.nonzero().squeeze(1), new.long().cumsum(0) - 1             # (G,) first row, (B,) its prompt
    p_ids, p_mask, resp = batch["prompt_ids"][first], batch["prompt_mask"][first], batch["response_ids"]
    out = model_logprobs(model, resp[:, :1], temperature, rows, input_ids=p_ids, attention_mask=p_mask,
                         position_ids=(p_mask.cumsum(-1) - 1).clamp(min=0), use_cache=True, logits_to_keep=1)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values         # transformers >= 5.21 / older 5.x
    cache.batch_select_indices(rows)                                             # (B) rows of prompt KV
    attn = torch.cat([batch["prompt_mask"], batch["response_mask"]], 1)          # (B, P+T)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)[:, p_ids.shape[1]:]                 # (B, T)
    kw = {"cache" if hasattr(out, "cache") else "past_key_values": cache}
    rest = model_logprobs(model, resp[:, 1:], temperature, input_ids=resp, attention_mask=attn, position_ids=pos, **kw)
    return torch.cat([out.logits, rest.logits], 1)                               # (B, T): token 0, tokens 1..T-1


def trim(batch):
    """Drop the columns that are padding in every row (prompt on the left, response on the right)."""
    p0 = int((batch["prompt_mask"].sum(0) > 0).nonzero()[0]) if batch["prompt_mask"].any() else 0
    width = max(int(batch["response_mask"].sum(-1).max()), 1)
    out = {k: v for k, v in batch.items() if k not in ("truncated",)}
    out.update({k: batch[k][:, p0:] for k in ("prompt_ids", "prompt_mask")})
    out.update({k: batch[k][:, :width] for k in ("response_ids", "response_mask", "logp_sampler") if k in batch})
    return out


def micro_batches(batch, max_tokens, count=None):
    """Consecutive row slices whose padded size, rows x (longest prompt + longest response), stays within
    max_tokens (0: no limit; a row larger than the budget goes alone). count: split further into exactly that
    many slices (FSDP2 ranks must run the same number of forward passes). -> list of slices."""
    lengths = (batch["prompt_mask"].sum(-1) + batch["response_mask"].sum(-1)).tolist()
    parts, start, longest = [], 0, 0
    for i, n in enumerate(lengths):
        longest = max(longest, n)
        if max_tokens and i > start and (i - start + 1) * longest > max_tokens:
            parts.append(slice(start, i))
            start, longest = i, n
    parts.append(slice(start, len(lengths)))
    while count and len(parts) < count:                                          # halve the largest slice
        j = max(range(len(parts)), key=lambda k: parts[k].stop - parts[k].start)
        a, b = parts[j].start, parts[j].stop
        if b - a < 2:
            raise ValueError(f"cannot split {len(lengths)} rows into {count} micro-batches")
        parts[j:j + 1] = [slice(a, (a + b) // 2), slice((a + b) // 2, b)]
    return parts


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
    """teacher model (must share the student's tokenizer): local path or Hugging Face id; empty builds the tiny teacher"""
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
    """vllm engine: longest prompt accepted (the engine's max_model_len is this + max_new_tokens)"""
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
    """paper: eq. 6 token sums averaged over prompts; token: the official code's token-mean (global counts)"""
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
    """torch CPU threads per process and for the tiny build (1: under load, 2 run slower; README, "thread count")"""
    dtype: str = "float32"
    """compute dtype, float32 | bfloat16 (the student's weights and AdamW state stay fp32; teacher stored in it)"""
    gradient_checkpointing: bool = False
    """recompute activations in the student's backward pass (long responses on GPUs)"""


PRESETS = {
    "tiny": {},
    # SCOPE_SPEC.md section 8: 256 prompts x 8 rollouts, one update per batch, lr 5e-5 constant, wd 0.01, T 0.6.
    # Token budgets: README, "memory plan" (8 x 80 GB).
    "paper": dict(student="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", teacher="Skywork/Skywork-OR1-7B",
                  data="zwhe99/DeepMath-103K", instruction="Please reason step by step, and put your final answer "
                  "within \\boxed{}.", prompts_per_step=256, max_new_tokens=12288, temperature=0.6, lr=5e-5,
                  steps=500, seeded_sampling=False, eval_every=0, save_every=20, dtype="bfloat16", cache_dir="",
                  gradient_checkpointing=True, micro_batch_tokens=32768, score_tokens=65536, rollout_tokens=1 << 20,
                  rollout_engine="vllm"),
}


def resolve(given):
    """Args from a preset plus the fields given explicitly (they win); a value no option takes is a ValueError."""
    preset = given.get("preset", "tiny")
    _check_option("preset", preset, tuple(PRESETS))
    args = Args(**{**PRESETS[preset], **given})
    _check_option("method", args.method, ("scope", "opd", "grpo", "kd", "psr"))
    _check_option("grader", args.grader, ("verify", "official"))
    _check_option("logprob_temperature", args.logprob_temperature, ("one", "sampling"))
    _check_option("dtype", args.dtype, ("float32", "bfloat16"))
    _check_option("rollout_engine", args.rollout_engine, ("hf", "vllm"))
    if args.rollout_engine == "vllm" and args.logprob_temperature == "sampling" and (args.top_k > 0 or args.top_p < 1):
        raise ValueError("--rollout-engine vllm with --logprob-temperature sampling cannot use --top-k/--top-p: vLLM "
                         "renormalises its log-probs over the kept tokens, not the policy the loss uses (use one)")
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
# 5. Training: one code path for one process and for torchrun (gloo on CPU, NCCL on GPU)
# ----------------------------------------------------------------------------------------------------
def all_reduce(values, device, op="sum"):
    """Sum (or max) a list of numbers over ranks. EVERY collective on data goes through here, on the loop's device:
    an NCCL process group has no CPU backend ("No backend type associated with device type cpu")."""
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def load_model(name, what, dtype=None, device="cpu"):
    """A causal LM (dtype given) or its tokenizer (dtype None), with a clear error when it cannot be reached. A
    tokenizer saved as a generic one (the tiny one) loads as one: transformers 5's AutoTokenizer would pick the class
    of config.json's model_type (Qwen2Tokenizer), whose byte-level pipeline drops the tiny tokenizer's spaces."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
    try:
        if dtype is not None:
            return AutoModelForCausalLM.from_pretrained(name, dtype=getattr(torch, dtype)).to(device).eval()
        cfg = Path(name) / "tokenizer_config.json"
        generic = cfg.exists() and json.loads(cfg.read_text()).get("tokenizer_class") in ("TokenizersBackend",
                                                                                         "PreTrainedTokenizerFast")
        tok = (PreTrainedTokenizerFast if generic else AutoTokenizer).from_pretrained(name)
    except OSError as e:
        raise SystemExit(f"cannot load the {what} model {name!r}: {e}\nOffline? Download it elsewhere and pass a "
                         f"local path with --{what}.") from None
    if not tok.chat_template:                                         # prompt_text builds every prompt with it
        raise SystemExit(f"the {what} tokenizer {name!r} has no chat template: prompts are the problem in the model's "
                         "chat template (SCOPE_SPEC.md section 8); save one with the tokenizer")
    if tok.pad_token is None:                                         # common for base models; the masks, not the
        tok.pad_token = tok.eos_token                                 # pad id, mark what is real
    return tok


def _problem(f, line, i=None):
    """{problem, answer} of one .jsonl line, or a message naming the file and line."""
    try:
        row = json.loads(line)
    except ValueError as e:
        raise SystemExit(f"{f}:{i}: not a JSON object ({e})") from None
    bad = [k for k in ("problem", "answer") if not isinstance(row, dict) or not isinstance(row.get(k), str)]
    if bad:
        raise SystemExit(f"{f}:{i}: field {bad[0]!r} is missing or not a string")
    return {"problem": row["problem"], "answer": row["answer"]}


class JsonlProblems:
    """Training problems in .jsonl files, read on demand: one pass checks every line and keeps its (file, offset); a row
    is parsed when a step uses it. No rank holds other columns (DeepMath's R1 solutions: 5 GB) or other ranks' rows."""

    def __init__(self, files):
        self.index = []
        for f in files:
            with open(f, "rb") as fh:
                for i, line in enumerate(iter(fh.readline, b""), 1):
                    if line.strip() and _problem(f, line, i):
                        self.index.append((f, fh.tell() - len(line)))
        if not self.index:
            raise SystemExit(f"--data: no problems in {', '.join(map(str, files))} (empty)")

    def __len__(self):
        return len(self.index)

    def __getitem__(self, k):
        f, offset = self.index[k]
        with open(f, "rb") as fh:
            fh.seek(offset)
            return _problem(f, fh.readline())


def load_problems(data):
    """Training problems from a .jsonl file, a directory of .jsonl files (fields problem, answer), or a Hugging Face
    dataset id (DeepMath's question, final_answer, or problem, answer), read only as a step needs them."""
    path = Path(data)
    if path.is_dir() or path.suffix == ".jsonl":
        files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
        if not files or not all(f.is_file() for f in files):
            raise SystemExit(f"--data {data}: {'no .jsonl file in this directory' if path.is_dir() else 'no such file'}")
        return JsonlProblems(files)
    if path.exists():
        raise SystemExit(f"--data {data}: expected a .jsonl file or a directory of them")
    try:
        import datasets
        for cols in (("question", "final_answer"), ("problem", "answer")):   # parquet: only these columns are read
            with contextlib.suppress(ValueError, KeyError):
                ds = datasets.load_dataset(data, split="train", columns=list(cols))
                break
        else:
            raise ValueError("it has neither question/final_answer nor problem/answer columns")
    except Exception as e:  # ImportError, no network, other columns
        raise SystemExit(f"cannot load training data {data!r} ({type(e).__name__}: {e}). Offline? Pass a local "
                         f"JSONL with 'problem' and 'answer' fields, e.g. --data ../shared/benchmarks/"
                         f"deepmath_train_sample.jsonl") from None
    ds = ds.rename_columns(dict(zip(cols, ("problem", "answer"))))
    return ds.cast_column("answer", datasets.Value("string"))         # memory-mapped Arrow: rows read on demand


def step_prompts(step, n_rows, per_step, seed):
    """Global prompt indices of a step: epoch-wise permutations of the data, so step s is known without state."""
    out = []
    for j in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(j, n_rows)
        out.append(torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1000 + epoch))[pos].item())
    return out


def setup(args):
    """Ranks, device, seeds, output directory. -> a namespace: rank, world, device, fsdp, amp (the student's
    compute-dtype context), own_group (this call started the process group)."""
    import types
    import torch.distributed as dist
    ddp = int(os.environ.get("RANK", -1)) != -1
    own_group = ddp and not dist.is_initialized()                   # a caller (reproduce.py) may hold the group
    if own_group:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    if args.prompts_per_step % world:
        raise SystemExit(f"--prompts-per-step {args.prompts_per_step} is not a multiple of the {world} ranks")
    if args.path_grad_norms and ddp:
        raise SystemExit("--path-grad-norms works in one process only (FSDP2 shards the gradients it compares)")
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed + rank)
    random.seed(args.seed + rank)
    np.random.seed((args.seed + rank) % 2**32)                        # vLLM draws unseeded requests' seeds from it
    autocast = args.dtype != "float32" and not ddp                   # FSDP2 casts by itself (mixed precision)
    amp = (lambda: torch.autocast(device.type, getattr(torch, args.dtype))) if autocast else contextlib.nullcontext
    if rank == 0:
        print("config:\n" + "\n".join(f"  {k:22s} {v}" for k, v in dataclasses.asdict(args).items()), flush=True)
    return types.SimpleNamespace(rank=rank, world=world, device=device, fsdp=ddp, amp=amp, own_group=own_group)


def shard(model, dtype):
    """FSDP2: one unit per decoder layer, then the root. Parameters (master weights), gradients and AdamW state stay
    fp32 and sharded over ranks; each unit is gathered in `dtype` for compute; gradients reduce in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    return fully_shard(model, mp_policy=mp)


def load_models(args, rt, student_name, teacher_name, ckpt):
    """(tokenizer, student, teacher or None, GRPO reference or None, optimizer). The student loads in fp32."""
    import copy
    tokenizer = load_model(student_name, "student")
    student = load_model(str(ckpt) if ckpt else student_name, "student", "float32", rt.device)
    teacher = load_model(teacher_name, "teacher", args.dtype, rt.device) if args.method in ("scope", "opd", "kd") else None
    if teacher is not None and load_model(teacher_name, "teacher").get_vocab() != tokenizer.get_vocab():
        raise SystemExit(f"student {student_name} and teacher {teacher_name} do not share a tokenizer: the "
                         "teacher must score the student's own token ids")
    ref = None
    if args.method == "grpo" and args.grpo_kl_coef > 0:                # the reference is the initial policy
        ref = load_model(student_name, "student", args.dtype, rt.device) if ckpt else copy.deepcopy(student).to(
            getattr(torch, args.dtype)).eval()
    if args.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    if rt.fsdp:
        student = shard(student, args.dtype)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    return tokenizer, student, teacher, ref, opt


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
    for part in torch.arange(len(my)).tensor_split(calls):            # nearly equal, contiguous
        part = part.tolist()
        seeds = row_seeds(args.seed, step, [(my[q], i) for q in part for i in range(n)])
        with rt.amp():
            out.append(generate(student, tokenizer, [prompts[q] for q in part], n, args.max_new_tokens, args.temperature,
                                args.top_p, args.top_k, seeds if args.seeded_sampling else None, lp_temp, rt.fsdp))
    return {k: pad_cat([o[k] for o in out], k, tokenizer.pad_token_id) for k in out[0]}


def method_loss(args, logp, part, w, adv, logp_teacher, logp_ref, counts):
    """The method's loss on one micro-batch (section 1). logp (b, t): s_it with gradient."""
    logp_old = logp.detach()                                          # o_it: one update per batch, theta = theta_old
    mask, rewards, groups = part["response_mask"], part["rewards"], part["groups"]
    if args.method == "scope":                                        # eq. 6, weights of the whole batch (eq. 4-5)
        return scope_loss(logp, logp_old, logp_teacher, mask, rewards, w, groups, args.loss_agg, counts)
    if args.method == "opd":
        return opd_loss(logp, logp_old, logp_teacher, mask, groups, args.loss_agg, counts, weights=w)
    if args.method == "psr":                                          # eq. 2 only: the teacher path is zero (T = s)
        return scope_loss(logp, logp_old, logp_old, mask, rewards, w, groups, args.loss_agg, counts)
    if args.method == "grpo":
        ref = logp_ref if logp_ref is not None else logp_old
        return grpo_loss(logp, logp_old, ref, mask, adv, args.grpo_clip, args.grpo_kl_coef, counts)
    return kd_loss(logp, mask, counts)


def update_student(args, rt, student, opt, batch, logp_teacher, logp_ref):
    """Phase 4: weights of the whole batch, then one optimizer step over token-budget micro-batches (a group may be
    split). Every normaliser is a count over the GLOBAL batch, so the summed gradient of the micro-batches, summed
    over ranks, is the gradient of the full batch (README: normalisation)."""
    n = args.n_rollouts if args.method != "kd" else args.kd_samples
    lp_temp = args.temperature if args.logprob_temperature == "sampling" else 1.0
    mask, rewards, groups = batch["response_mask"], batch["rewards"], batch["groups"]
    local = batch_counts(mask, rewards, groups, group_size=n)
    counts = dict(zip(local, all_reduce(local.values(), rt.device)))
    w = adv = None
    if args.method == "scope":                                        # eq. 4-5 from pi_old: the sampler's log-probs
        w = scope_weights(batch["logp_sampler"], logp_teacher, mask, groups, rewards, args.tau, args.weight_norm,
                          args.student_weight, args.teacher_weight)
    elif args.method in ("opd", "psr"):
        w = uniform_weights(groups, args.loss_agg)
    elif args.method == "grpo":
        adv = grpo_advantages(rewards, groups)
    parts = micro_batches(batch, args.micro_batch_tokens)
    parts = micro_batches(batch, args.micro_batch_tokens, int(all_reduce([len(parts)], rt.device, "max")[0]))
    student.train()
    opt.zero_grad(set_to_none=True)
    logs, gap, nll, shared = [], [], 0.0, n > 1 and not args.gradient_checkpointing   # (no GC + KV cache)
    params = [p for p in student.parameters() if p.requires_grad]
    mle_grad = [torch.zeros_like(p) for p in params] if args.path_grad_norms and args.method == "scope" else None
    for j, sl in enumerate(parts):
        part = trim({k: v[sl] for k, v in batch.items()})
        if rt.fsdp:                                                   # reduce-scatter gradients once, after the last
            student.set_requires_gradient_sync(j == len(parts) - 1)
        with rt.amp():
            logp = (shared_prompt_logprobs(student, part, part["groups"], lp_temp) if shared  # (b, t) s_it
                    else sequence_logprobs(student, part, lp_temp))
        width = logp.shape[1]
        loss, m = method_loss(args, logp, part, None if w is None else w[sl], None if adv is None else adv[sl],
                              None if logp_teacher is None else logp_teacher[sl, :width],
                              None if logp_ref is None else logp_ref[sl, :width], counts)
        if mle_grad is not None:                                      # the MLE path alone: the OPD path's weights zeroed
            mle = method_loss(args, logp, part, w[sl] * part["rewards"], None, logp_teacher[sl, :width], None, counts)[0]
            for acc, g in zip(mle_grad, torch.autograd.grad(mle, params, retain_graph=True, allow_unused=True)):
                acc += 0 if g is None else g
        (loss * rt.world).backward()                                  # FSDP2 averages over ranks: undo, to sum
        logs.append(m)
        pm = part["response_mask"]
        nll += float(-(logp.detach() * pm).sum())                     # the student's NLL of its own tokens
        if args.method != "kd":                                       # KD's sampler is the teacher
            gap.append(float(((part["logp_sampler"] - logp.detach()).abs() * pm).sum()))
    if args.max_sampler_gap and gap:                                  # before the step: no update from such samples
        g = all_reduce([sum(gap), mask.sum()], rt.device)
        if g[0] / max(g[1], 1.0) > args.max_sampler_gap:
            raise RuntimeError(f"rollout/sampler_gap {g[0] / max(g[1], 1.0):.3f} nats per token > --max-sampler-gap "
                               f"{args.max_sampler_gap}: the rollouts were sampled from other weights than the trainer's "
                               "(stale engine weights after a sync?); no update was made")
    paths = {} if mle_grad is None else {                             # total = MLE path + OPD path, before clipping
        "train/grad_norm_mle": float(torch.stack([g.norm() for g in mle_grad]).norm()),
        "train/grad_norm_opd": float(torch.stack([(p.grad - g).norm() for p, g in zip(params, mle_grad)]).norm())}
    grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip or math.inf)
    opt.step()
    student.eval()
    losses = {k: sum(m[k] for m in logs) for k in logs[0] if k.startswith("loss/")}   # micro-batches sum up ...
    record = {k: sum(m[k] for m in logs) / len(logs) for k in logs[0]}
    record.update(zip(losses, all_reduce(losses.values(), rt.device)))  # ... and so do ranks (global normalisers)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm   # FSDP2: a DTensor
    return {**record, **paths, "loss": sum(record[k] for k in losses), "train/grad_norm": float(grad_norm),
            "train/clipped": float(0 < args.grad_clip < float(grad_norm)), "_nll": nll,
            "_gap": sum(gap) if args.method != "kd" else math.nan}


def tied_names(model):
    """Parameter names that alias another parameter (a tied output layer: lm_head.weight = embed_tokens.weight)."""
    return {k for k, _ in model.named_parameters(remove_duplicate=False)} - {k for k, _ in model.named_parameters()}


def save_checkpoint(out, step, model, tokenizer, opt, args, rt):
    """Atomic: everything goes to checkpoint.tmp, which then replaces checkpoint in one rename. Model and optimizer
    state are gathered to rank 0 (full state dicts, so the directory is a plain Hugging Face model for eval)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    barrier = dist.barrier if rt.world > 1 else (lambda: None)
    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    if rt.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    tied = tied_names(model)
    msd = {k: v for k, v in msd.items() if k not in tied}             # e.g. lm_head.weight = embed_tokens.weight
    name, keys, *rest = np.random.get_state()                         # as tensors and numbers: weights_only loads
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate(),
                "numpy": (name, torch.from_numpy(keys.astype("int64")), *rest)}, tmp / f"rng_rank{rt.rank}.pt")
    if rt.rank == 0:
        model.save_pretrained(tmp, state_dict=msd, safe_serialization=True)
        cfg = json.loads((tmp / "config.json").read_text())           # FSDP2 renames the class: FSDPQwen2ForCausalLM
        cfg["architectures"] = [a.removeprefix("FSDP") for a in cfg.get("architectures") or []]
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        tokenizer.save_pretrained(tmp)
        torch.save(osd, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "world": rt.world, "config": dataclasses.asdict(args)}))
    barrier()
    if rt.rank == 0:
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


# Settings a resumed run may change: they do not change what the run computes.
RESUMABLE = {"resume", "steps", "out_dir", "threads", "eval_every", "eval_problems", "eval_k", "save_every", "cache_dir",
             "micro_batch_tokens", "score_tokens", "rollout_tokens", "max_sampler_gap", "vllm_gpu_memory",
             "gradient_checkpointing", "path_grad_norms"}


def find_checkpoint(args, out, world):
    """The checkpoint to resume from, or None for a fresh run. Stops before anything is written on --resume with
    nothing to resume, a checkpoint of other settings or another number of ranks, or a fresh run over a checkpoint."""
    found = [d for d in (out / "checkpoint", out / "checkpoint.old") if (d / "state.json").exists()]   # .old: a crash
    if found and not args.resume:                                                                     # mid-rename
        raise SystemExit(f"{out} holds an earlier run's checkpoint: --resume continues it, another --out-dir starts "
                         "afresh (nothing was changed)")
    if not args.resume:
        return None
    if not found:
        raise SystemExit(f"--resume: no checkpoint in {out} (no checkpoint/state.json); without --resume a run starts")
    state = json.loads((found[0] / "state.json").read_text())
    if state["world"] != world:
        raise SystemExit(f"--resume: {found[0]} was written by {state['world']} rank(s), this run has {world}: resume "
                         "with as many ranks (the RNG state is per rank)")
    differ = [f"--{k.replace('_', '-')} {v!r} (now {getattr(args, k)!r})" for k, v in state["config"].items()
              if k not in RESUMABLE and hasattr(args, k) and getattr(args, k) != v]
    if differ:
        raise SystemExit(f"--resume: {found[0]} was trained with other settings: {', '.join(differ)}")
    return found[0]


def load_tensors(path):
    """torch.load that cannot run code (weights_only): a checkpoint file from elsewhere may hold anything."""
    import pickle
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise SystemExit(f"{path}: refused: it holds more than tensors, numbers and strings, and unpickling it could "
                         f"run code ({str(e).splitlines()[0]})") from None


def resume(ckpt, student, opt, rt, out):
    """Restore optimizer (re-sharded over this run's ranks) and RNG state; drop metric lines the checkpoint does not
    cover. The weights were loaded from the checkpoint directory. Returns the start step."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    once = rt.world > 1                                               # rank 0 reads the file and broadcasts it
    osd = load_tensors(ckpt / "optimizer.pt") if rt.rank == 0 or not once else {}
    set_optimizer_state_dict(student, opt, osd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=once))
    rng = load_tensors(ckpt / f"rng_rank{rt.rank}.pt")
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "numpy" in rng:
        np.random.set_state((rng["numpy"][0], rng["numpy"][1].numpy().astype(np.uint32), *rng["numpy"][2:]))
    start = json.loads((ckpt / "state.json").read_text())["step"]
    path = out / "metrics.jsonl"
    if rt.rank == 0 and path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= start]
        path.write_text("".join(line + "\n" for line in kept))
    return start


def train(args):
    """The SCOPE loop: sample N rollouts per prompt, verify, score with the teacher, one weighted update."""
    import torch.distributed as dist
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    rt = setup(args)
    say = print if rt.rank == 0 else (lambda *a, **k: None)
    student_name, teacher_name, rows, evaluate = args.student, args.teacher, None, None
    if not (args.student and args.teacher and args.data):             # the embedded default (harness) fills the gaps
        import tiny_testbed
        student_name, teacher_name, rows, evaluate = tiny_testbed.embedded_default(args, say)
    rows = rows or load_problems(args.data)
    if args.eval_every and not evaluate:
        say("eval_every: periodic evaluation runs on the tiny task only; evaluate checkpoints with `python -m eval`")
    if rt.rank == 0:                                                  # the estimate, before step 1 (README)
        from transformers import AutoConfig
        with contextlib.suppress(OSError):                            # load_models says what is missing
            have = torch.cuda.get_device_properties(rt.device).total_memory / 2**30 if rt.device.type == "cuda" else 0
            say(memory_plan(args, AutoConfig.from_pretrained(student_name), AutoConfig.from_pretrained(teacher_name),
                            rt.world, have)[0])
    out = Path(args.out_dir)
    ckpt = find_checkpoint(args, out, rt.world)                       # bad input stops here: nothing written yet
    tokenizer, student, teacher, ref, opt = load_models(args, rt, student_name, teacher_name, ckpt)
    start = resume(ckpt, student, opt, rt, out) if ckpt else 0
    if rt.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(args), indent=1))
        (out / "metrics.jsonl").open("a" if ckpt else "w").close()
    say(f"resumed from {ckpt} at step {start}" if ckpt else f"training from step 0 into {out}")
    engine = None
    if args.rollout_engine == "vllm" and args.method != "kd":           # vllm_engine.py: imports vllm
        import vllm_engine
        engine = vllm_engine.VLLMRollouts(args, student_name)
    kd_cache = {}
    n = args.n_rollouts if args.method != "kd" else args.kd_samples
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=args.method, disable=rt.rank != 0)
    for step in bar:
        idx = step_prompts(step, len(rows), args.prompts_per_step, args.seed)
        my = list(range(rt.rank, len(idx), rt.world))                  # this rank's positions in the global batch
        t = {"time/generate": time.time()}
        batch = sample_rollouts(args, rt, step, student, teacher, tokenizer, rows, idx, my, kd_cache, engine)  # 1.
        t["time/verify"] = time.time()
        batch["rewards"] = verify_rollouts(tokenizer, batch, [rows[idx[j]]["answer"] for j in my], n, rt.device,
                                           args.grader)  # 2.
        batch["groups"] = torch.tensor(my, device=rt.device).repeat_interleave(n)   # (B*n,) one id per global prompt
        t["time/score"] = time.time()                                 # 3. teacher T_it / GRPO reference (no grad)
        logp_teacher = (score_logprobs(teacher, batch, batch["groups"], args.score_tokens)
                        if args.method in ("scope", "opd") else None)
        logp_ref = score_logprobs(ref, batch, batch["groups"], args.score_tokens) if ref is not None else None
        t["time/update"] = time.time()                                # 4. weights (eq. 4-5) and one update (eq. 6)
        record = update_student(args, rt, student, opt, batch, logp_teacher, logp_ref)
        t["end"] = time.time()
        record = log_step(step, record, batch, t, rt.device)          # 5. log, evaluate, checkpoint
        if evaluate and args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            record.update(evaluate(student, tokenizer, rt))
        if rt.rank == 0:
            with (out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(reward=f"{record['train/reward_mean']:.2f}", loss=f"{record['loss']:.3f}")
        if (args.save_every and (step + 1) % args.save_every == 0) or step + 1 == args.steps:
            save_checkpoint(out, step + 1, student, tokenizer, opt, args, rt)
    if rt.own_group:
        if engine is not None:                                        # its teardown would end the group
            vllm_engine.close_engine()
        dist.destroy_process_group()
    return student


def log_step(step, record, batch, t, device):
    """Phase 5: the step's JSON record, with batch statistics summed over ranks (README: logging keys)."""
    mask = batch["response_mask"]
    r_sum, rows, trunc, tok, nll, gap = all_reduce([batch["rewards"].sum(), mask.shape[0], batch["truncated"].sum(),
                                                    mask.sum(), record.pop("_nll"), record.pop("_gap")], device)
    phases = ["time/generate", "time/verify", "time/score", "time/update", "end"]
    times = {k: t[nxt] - t[k] for k, nxt in zip(phases, phases[1:])}
    record = {"step": step + 1, **record, "train/reward_mean": r_sum / rows, "rollout/truncated_frac": trunc / rows,
              "rollout/mean_len": tok / rows, "rollout/nll_student": nll / max(tok, 1.0),
              "perf/tokens_per_s": tok / max(sum(times.values()), 1e-9), **times}
    return record if math.isnan(gap) else {**record, "rollout/sampler_gap": gap / max(tok, 1.0)}


def memory_plan(args, s, t, world, gpu_gib=0.0):
    """Estimated GiB per rank from the model configs s (student), t (teacher): resident + the largest phase (README);
    the vLLM engine takes vllm_gpu_memory of a gpu_gib GPU (0: of 80 GiB, no verdict). -> (table text, peak GiB)."""
    def params(c):                                                    # decoder-only transformer, biases ignored
        kv = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
        layer = c.hidden_size * (2 * c.hidden_size + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
        return c.num_hidden_layers * layer + c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    half, gib = 2 if args.dtype == "bfloat16" else 4, 2**30
    ps, root = params(s), s.vocab_size * s.hidden_size * (1 if s.tie_word_embeddings else 2)
    layer = (ps - root) / s.num_hidden_layers
    kv_bytes = 2 * half * s.num_hidden_layers * s.num_key_value_heads * s.hidden_size // s.num_attention_heads
    per_token = s.hidden_size * s.num_hidden_layers + (4 * s.hidden_size + 3 * s.intermediate_size) * (
        1 if args.gradient_checkpointing else s.num_hidden_layers)   # saved layer inputs + one layer's internals
    resident = {"student fp32 weights + AdamW state, sharded": 12 * ps / world,
                "teacher (replicated)": half * params(t) * (args.method in ("scope", "opd", "kd")),
                "GRPO reference (replicated)": half * ps * (args.method == "grpo"),
                "gathered: embeddings + output layer, 2 decoder layers": half * (root + 2 * layer)}
    rollouts = ("rollouts: KV cache (rollout_tokens)", args.rollout_tokens * kv_bytes) if args.rollout_engine == "hf" \
        else ("rollouts: vLLM engine awake (vllm_gpu_memory x GPU)", args.vllm_gpu_memory * (gpu_gib or 80.0) * gib)
    phases = {rollouts[0]: rollouts[1],
              "scoring: teacher activations (score_tokens)": args.score_tokens * (4 * t.hidden_size + t.intermediate_size) * half,
              "update: fp32 grads (sharded) + activations (micro_batch_tokens) + log-prob blocks": 4 * ps / world
              + args.micro_batch_tokens * per_token * half + 3 * 4 * 2**25 + 4 * root}
    peak = (sum(resident.values()) + max(phases.values())) / gib
    rows = [f"  {k:80s} {v / gib:6.1f} GiB" for k, v in {**resident, **phases, "peak: resident + the largest phase":
                                                           peak * gib}.items()]
    if gpu_gib:
        rows.append(f"  this GPU has {gpu_gib:.0f} GiB: " + ("fits" if peak < 0.9 * gpu_gib else
                    "LIKELY OUT OF MEMORY: lower rollout_tokens / micro_batch_tokens / score_tokens"))
    return f"memory plan per rank, {world} ranks (estimate):\n" + "\n".join(rows), peak


def pad_cat(tensors, key, pad_id):
    """Concatenate rollout tensors of different widths (prompts left-padded, responses right-padded)."""
    if tensors[0].dim() == 1:
        return torch.cat(tensors)
    width = max(t.shape[1] for t in tensors)
    fill = pad_id if key.endswith("_ids") else 0
    left = key.startswith("prompt")
    return torch.cat([torch.nn.functional.pad(t, (width - t.shape[1], 0) if left else (0, width - t.shape[1]), value=fill)
                      for t in tensors])


if __name__ == "__main__":
    train(parse_args())

"""SCOPE: Signal-Calibrated On-Policy Distillation Enhancement (arXiv 2604.10688), in one file.

Per prompt x the student samples N rollouts; a verifier marks each correct (R=1) or incorrect (R=0).
  correct rollouts   -> maximum likelihood, weighted by the student's perplexity   (eq. 2, 4)
  incorrect rollouts -> reverse-KL on-policy distillation from a teacher,
                        weighted by the teacher's inverse perplexity                (eq. 3, 5)
Both weights are a softmax within one prompt's group and one path (eq. 4-5); the objective is eq. 6.

    python scope.py                                      # tiny preset: builds its own task and models, CPU, offline
    python scope.py --method opd                         # baselines: opd, grpo, kd
    torchrun --nproc_per_node=2 scope.py                 # the same run on 2 processes (gloo on CPU, NCCL on GPU)
    torchrun --nproc_per_node=8 scope.py --preset paper  # R1-Distill-Qwen-1.5B + Skywork-OR1-7B on DeepMath
    python scope.py --help

Sections, in the order of the algorithm:
  1. the math: token log-probs, perplexities, group-softmax weights, SCOPE / OPD / GRPO / KD losses
     (pure tensor functions: paste them into verl or TRL)
  2. verifying answers: \\boxed extraction and a safe, time-bounded sympy-based equivalence check
  3. rollouts: seeded sampling with transformers generate, student and teacher token log-probs
  4. the config dataclass (its field docstrings are the --help)
  5. the training loop: one code path for one process and torchrun, one function per phase
The embedded default (a synthetic task, a character tokenizer, tiny Qwen2 teacher and student built on the spot)
is the harness's tiny_testbed.py; it is imported, lazily, only when no --student/--teacher/--data are given.

Notation (SCOPE_SPEC.md section 1), all over RESPONSE tokens only:
  logp         s_it  log pi_theta(a_it | ...)  student, current parameters, carries gradient
  logp_old     o_it  log pi_old(a_it | ...)    student at sampling time, detached
  logp_teacher T_it  log pi_T(a_it | ...)      teacher, no gradient
  nll = -mean_t logp = log PPL, so a high nll means a high perplexity.
"""

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import time
from pathlib import Path

import sympy
import torch

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


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(logits / temperature)[token], computed `chunk` rows at a time.

    Only one (chunk, V) float32 block exists at a time, forward and backward; the naive
    log_softmax(logits.float()) materialises two full (N, V) float32 tensors. Backward uses
    d logp / d logits = (onehot(token) - softmax) / temperature, so nothing of size V is saved.
    """

    @staticmethod
    def forward(ctx, logits, tokens, temperature, chunk):
        n = logits.shape[0]                                        # logits (N, V), tokens (N,)
        logp = torch.empty(n, dtype=torch.float32, device=logits.device)  # (N,)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)   # (N,)
        for i in range(0, n, chunk):
            x = logits[i:i + chunk].float()                        # (c, V); a copy only if not fp32
            if temperature != 1.0:
                x = x / temperature
            lse[i:i + chunk] = torch.logsumexp(x, dim=-1)          # (c,)
            logp[i:i + chunk] = x.gather(-1, tokens[i:i + chunk, None]).squeeze(-1) - lse[i:i + chunk]
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        logits, tokens, lse = ctx.saved_tensors
        t, chunk = ctx.temperature, ctx.chunk
        grad = torch.empty_like(logits)                            # (N, V)
        for i in range(0, logits.shape[0], chunk):
            g = grad_logp[i:i + chunk, None].float()               # (c, 1)
            p = torch.exp(logits[i:i + chunk].float() / t - lse[i:i + chunk, None])  # (c, V) softmax
            gi = -p * g
            gi.scatter_add_(-1, tokens[i:i + chunk, None], g)      # onehot(token) * g
            grad[i:i + chunk] = gi / t
        return grad, None, None, None


def token_logprobs(logits, tokens, temperature=1.0, chunk=None):
    """log p(token) under softmax(logits / temperature). logits (B, L, V), tokens (B, L) -> (B, L) fp32.

    Equal to log_softmax(logits.float() / temperature).gather(-1, tokens) but with O(chunk * V) extra memory
    (default: rows of 2^24 elements in all, 64 MiB of fp32 per block).
    """
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(f"logits (B, L, V) and tokens (B, L) disagree: {tuple(logits.shape)} vs {tuple(tokens.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b, l, v = logits.shape
    chunk = chunk or max(1, 2**24 // v)
    out = _TokenLogprobs.apply(logits.reshape(b * l, v), tokens.reshape(b * l), float(temperature), int(chunk))
    return out.view(b, l)                                          # (B, L)


def seq_nll(logp, mask):
    """Length-normalised sequence NLL = log PPL = -(1/|y|) sum_t logp_t over response tokens. -> (B,).

    An empty response (mask all 0) gets nll 0 (PPL 1); it carries no tokens, so no loss either.
    """
    mask = mask.to(logp.dtype)                                     # (B, L)
    return -(logp * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)    # (B,)


def group_softmax(scores, cell_ids, norm="sum"):
    """Softmax of scores within each cell (all rows with one cell id), vectorised. -> (B,).

    norm="sum": weights of a cell sum to 1 (paper eq. 4-5); norm="mean": they average 1 (official
    code: softmax x |cell|). Cells never interact: each is shifted by its own max before exp.
    """
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


def batch_counts(mask, rewards, group_ids):
    """Local normalising counts of a batch. Sum them over micro-batches and ranks (all_reduce) and pass
    the totals to the losses, so the gradient never depends on how the global batch was split."""
    mask = mask.float()                                            # (B, L)
    tokens = mask.sum(-1)                                          # (B,)
    correct = rewards.float()                                      # (B,)
    return {
        "prompts": float(torch.unique(group_ids).numel()),
        "sequences": float(mask.shape[0]),
        "tokens": float(tokens.sum()),
        "tokens_correct": float((tokens * correct).sum()),
        "tokens_incorrect": float((tokens * (1 - correct)).sum()),
    }


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
# 2. Verifying answers: reward R_i in {0, 1} (spec section 1)
# ----------------------------------------------------------------------------------------------------
# The verifier never executes model output: no eval, no sympify/parse_expr on text. A small recursive-descent
# parser below builds sympy objects itself, from a fixed grammar, and refuses (-> not equal) anything too big
# before sympy sees it. Every call is bounded by those caps plus a cooperative 1 s deadline (no signals,
# so it works in worker threads).

MAX_ANSWER_CHARS = 1000       # longer answers are refused
MAX_NESTING = 50              # braces / brackets / parentheses / parser recursion
MAX_NODES = 400               # parser nodes per expression
MAX_NUMBER_DIGITS = 100       # digits of a literal number
MAX_RESULT_DIGITS = 2000      # a numeric power b^e may have at most this many digits (2^{1009} passes)
MAX_FACTORIAL = 300
MAX_ITEMS = 64                # elements of a tuple / set / list / matrix
REL_TOL, ABS_TOL = 1e-6, 1e-9  # numeric equality when either side is irrational; rationals compare exactly
VERIFY_SECONDS = 1.0


class _Refuse(Exception):
    """Input too big, too deep, or outside the grammar: the answer is judged not equal."""


_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")


def extract_boxed(text):
    """Content of the LAST \\boxed{...} / \\fbox{...} (nested braces; also `\\boxed 5`); None when there is none."""
    if not isinstance(text, str):
        return None
    last = None
    for last in _BOX_RE.finditer(text):
        pass
    if last is None:
        return None
    i = last.end()
    if text.startswith("{", i):
        depth, j = 0, i
        while j < len(text):
            c = text[j]
            if c == "\\":
                j += 2                                            # \{ and \} are content, not grouping
                continue
            depth += (c == "{") - (c == "}")
            if depth == 0:
                return text[i + 1:j]
            j += 1
        return None                                               # unbalanced: no answer
    m = re.match(r"\s+([^\s$]+)", text[i:])                       # \boxed 5
    return m.group(1) if m else None


_TEXT_CMDS = r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mathbf|mathit|mbox|operatorname|boldsymbol)"


def _normalize(s):
    """Strip LaTeX decoration that does not change the answer. Returns (answer, unit or None)."""
    s = s.replace("\n", " ").strip()
    s = re.sub(r"\\(?:displaystyle|textstyle|limits)", "", s)
    s = re.sub(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big|bigg|Bigg)(?![a-zA-Z])\.?", "", s)
    s = re.sub(r"(?<!\\)\\[!,;:> ]|\\quad|\\qquad|~", " ", s)     # thin spaces (1\,000 -> 1 000)
    s = s.replace("{,}", ",").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|°|\\degree|\\circ", "", s)   # degrees
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "%").replace("%", "")  # currency; percent dropped
    s = re.sub(r"\\(?:le|leq|leqslant)(?![a-zA-Z])", "<=", s)
    s = re.sub(r"\\(?:ge|geq|geqslant)(?![a-zA-Z])", ">=", s)
    s = re.sub(r"\\(?:ne|neq)(?![a-zA-Z])", "!=", s).replace("\\lt", "<").replace("\\gt", ">")
    s = s.strip().rstrip(".").strip()
    unit = None                                                   # trailing unit: "10 cm", "5\text{ inches}"
    m = re.match(r"^(.*?[\d}).])\s*(?:" + _TEXT_CMDS + r"\s*\{\s*([a-zA-Z][a-zA-Z ]*)\}|\s([a-zA-Z]{2,}(?:\s+[a-zA-Z]+)*))"
                 r"(\^\{?[23]\}?)?\s*$", s)
    number_part = re.sub(r"\\[a-zA-Z]+", "", m.group(1)) if m else ""   # letters only inside \frac, \sqrt, ...
    if m and re.search(r"\d", number_part) and not re.search(r"[a-zA-Z=<>]", number_part):
        s, unit = m.group(1).strip(), " ".join((m.group(2) or m.group(3)).split()) + (m.group(4) or "")
    s = re.sub(_TEXT_CMDS + r"\s*\{([^{}]*)\}", r"\1", s).strip()   # unwrap \text{...}
    s = re.sub(r"\s+", " ", s)
    if re.fullmatch(r"-?\d{1,3}(?:[ ,]\d{3})+(?:\.\d+)?", s):        # thousands separators 1,000 / 1 000
        s = re.sub(r"[ ,]", "", s)
    return s.lstrip("+").strip(), unit


def _split_top(s, seps):
    """Split s at separators (strings) that sit outside every bracket pair."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        if s.startswith("\\{", i) or s.startswith("\\}", i):
            depth += 1 if s[i + 1] == "{" else -1
            i += 2
            continue
        c = s[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            for sep in seps:
                if s.startswith(sep, i) and not (sep[-1].isalpha() and s[i + len(sep):i + len(sep) + 1].isalpha()):
                    parts.append(s[start:i])
                    i += len(sep)
                    start = i
                    break
            else:
                i += 1
            continue
        if depth > MAX_NESTING:
            raise _Refuse("nesting")
        i += 1
    parts.append(s[start:])
    return [p.strip() for p in parts]


# ---- the restricted LaTeX -> sympy translator ----
_TOKEN_RE = re.compile(r"\s*(?:(\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)|(\\[a-zA-Z]+|\\[{}|])|([a-zA-Z])|(<=|>=|!=|\*\*|[-+*/^_()\[\]{}!|,=<>']))")
_FUNCS = {"sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "cot": sympy.cot, "sec": sympy.sec,
          "csc": sympy.csc, "arcsin": sympy.asin, "arccos": sympy.acos, "arctan": sympy.atan, "sinh": sympy.sinh,
          "cosh": sympy.cosh, "tanh": sympy.tanh, "exp": sympy.exp, "ln": sympy.log, "log": sympy.log}
_GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta", "iota",
          "kappa", "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "upsilon", "phi", "varphi", "chi", "psi",
          "omega", "Gamma", "Delta", "Theta", "Lambda", "Xi", "Sigma", "Phi", "Psi", "Omega"}


def _tokenize(s):
    tokens, pos = [], 0
    s = s.rstrip()
    while pos < len(s):
        m = _TOKEN_RE.match(s, pos)
        if not m or m.end() == pos:
            raise _Refuse(f"unknown character {s[pos]!r}")
        num, cmd, letter, op = m.groups()
        tokens.append(("num", num) if num else ("cmd", cmd[1:]) if cmd else ("id", letter) if letter else ("op", op))
        pos = m.end()
    return tokens


class _Parser:
    """expr := term (+|- term)* ; term := unary ((*|/|\\cdot|\\times|implicit) unary)* ;
    unary := (+|-) unary | power ; power := postfix (^ unary)? ; postfix := atom (!)* ;
    atom := number | letter[_sub] | \\pi | \\infty | greek | (expr) | {expr} | |expr| | \\frac | \\sqrt | \\binom | func.
    Conventions: e is Euler's number, i the imaginary unit, `2e5` scientific notation, `3\\frac{1}{2}` (an
    integer then a numeric \\frac) the mixed number 3 + 1/2, juxtaposition multiplies."""

    def __init__(self, text, deadline):
        self.toks, self.i, self.depth, self.nodes, self.deadline = _tokenize(text), 0, 0, 0, deadline

    def peek(self, k=0):
        return self.toks[self.i + k] if self.i + k < len(self.toks) else (None, None)

    def take(self, kind=None, value=None):
        tok = self.peek()
        if tok[0] is None or (kind and tok[0] != kind) or (value is not None and tok[1] != value):
            raise _Refuse(f"expected {value or kind}, got {tok[1]!r}")
        self.i += 1
        return tok

    def parse(self):
        out = self.expr()
        if self.i != len(self.toks):
            raise _Refuse(f"unexpected {self.peek()[1]!r}")
        return out

    def enter(self):
        self.depth += 1
        self.nodes += 1
        if self.depth > MAX_NESTING or self.nodes > MAX_NODES:
            raise _Refuse("expression too deep or too large")
        if time.monotonic() > self.deadline:
            raise _Refuse("time")

    def expr(self, closer=None):
        self.enter()
        out = self.term(closer)
        while self.peek() in (("op", "+"), ("op", "-")):
            op = self.take()[1]
            rhs = self.term(closer)
            out = out + rhs if op == "+" else out - rhs
        self.depth -= 1
        return out

    def term(self, closer):
        out = self.unary(closer)
        while True:
            kind, val = self.peek()
            if (kind, val) in (("op", "*"), ("op", "/"), ("cmd", "cdot"), ("cmd", "times"), ("cmd", "div")):
                self.take()
                rhs = self.unary(closer)
                out = out / rhs if val in ("/", "div") else out * rhs
            elif self.starts_atom(closer):
                out = out * self.power(closer)                    # implicit multiplication
            else:
                return out

    def starts_atom(self, closer):
        kind, val = self.peek()
        if kind in ("num", "id"):
            return True
        if kind == "cmd":
            return val not in ("cdot", "times", "div", "cup", "cap", "pm", "mp", "}", "to")
        return kind == "op" and val in ("(", "{", "[") or (val == "|" and closer != "|")

    def unary(self, closer):
        if self.peek() in (("op", "-"), ("op", "+")):
            sign = self.take()[1]
            self.enter()
            out = self.unary(closer)
            self.depth -= 1
            return -out if sign == "-" else out
        return self.power(closer)

    def power(self, closer):
        base = self.postfix(closer)
        if self.peek() in (("op", "^"), ("op", "**")):
            self.take()
            self.enter()
            exp = self.arg_or_unary()
            self.depth -= 1
            return _pow(base, exp)
        return base

    def arg_or_unary(self):
        """An exponent: {expr}, or a single character (x^23 is x^2 * 3 in LaTeX), or a signed atom."""
        if self.peek() == ("op", "{"):
            return self.arg()
        if self.peek()[0] == "num":
            return self.arg()
        return self.unary(None) if self.peek() in (("op", "-"), ("op", "+")) else self.postfix(None)

    def postfix(self, closer):
        out = self.atom(closer)
        while self.peek() == ("op", "!"):
            self.take()
            out = _factorial(out)
        return out

    def arg(self):
        """A TeX macro argument: {expr} or one character (\\frac12, \\sqrt2)."""
        kind, val = self.peek()
        if (kind, val) == ("op", "{"):
            self.take()
            out = self.expr("}")
            self.take("op", "}")
            return out
        if kind == "num" and len(val) > 1:                        # split "12" into "1" and "2"
            self.toks[self.i] = ("num", val[1:])
            return _number(val[0])
        if kind in ("num", "id"):
            self.take()
            return _number(val) if kind == "num" else _symbol(val)
        return self.atom(None)

    def atom(self, closer):
        self.enter()
        kind, val = self.take()
        if kind == "num":
            out = _number(val)
            if self.peek() == ("cmd", "frac") and "." not in val:  # mixed number 3\frac{1}{2}
                self.take()
                num, den = self.arg(), self.arg()
                if not (num.is_Integer and den.is_Integer):
                    raise _Refuse("mixed number needs integer fraction")
                out = out + num / den
        elif kind == "id":
            out = _symbol(val)
            if self.peek() == ("op", "_"):                        # x_1, a_{n}
                self.take()
                sub = self.take()[1] if self.peek() != ("op", "{") else self.braced_text()
                out = sympy.Symbol(f"{val}_{sub}")
        elif (kind, val) in (("op", "("), ("op", "["), ("op", "{")):
            close = {"(": ")", "[": "]", "{": "}"}[val]
            out = self.expr(close)
            self.take("op", close)
        elif (kind, val) == ("op", "|") or val in ("lvert", "vert", "|"):
            out = sympy.Abs(self.expr("|"))
            nk, nv = self.take()
            if nv not in ("|", "rvert", "vert"):
                raise _Refuse("unclosed |")
        elif kind == "cmd" and val == "frac":
            num, den = self.arg(), self.arg()
            out = num / den
        elif kind == "cmd" and val == "sqrt":
            index = None
            if self.peek() == ("op", "["):
                self.take()
                index = self.expr("]")
                self.take("op", "]")
            radicand = self.arg()
            out = sympy.sqrt(radicand) if index is None else _pow(radicand, 1 / index)
        elif kind == "cmd" and val in ("binom", "dbinom", "tbinom"):
            n, k = self.arg(), self.arg()
            if not (n.is_Integer and k.is_Integer and 0 <= n <= MAX_FACTORIAL):
                raise _Refuse("binom")
            out = sympy.binomial(n, k)
        elif kind == "cmd" and val in _FUNCS:
            power = None
            base = None
            if val == "log" and self.peek() == ("op", "_"):
                self.take()
                base = self.arg()
            if self.peek() == ("op", "^"):                        # \sin^2 x
                self.take()
                power = self.arg()
            arg = self.power(None)
            out = _FUNCS[val](arg) if base is None else sympy.log(arg, base)
            if power is not None:
                out = _pow(out, power)
        elif kind == "cmd" and val == "pi":
            out = sympy.pi
        elif kind == "cmd" and val == "infty":
            out = sympy.oo
        elif kind == "cmd" and val in _GREEK:
            out = sympy.Symbol(val)
        else:
            raise _Refuse(f"unsupported {val!r}")
        self.depth -= 1
        return out

    def braced_text(self):
        self.take("op", "{")
        parts = []
        while self.peek() != ("op", "}"):
            parts.append(self.take()[1])
            if len(parts) > 10:
                raise _Refuse("subscript")
        self.take("op", "}")
        return "".join(parts)


def _number(text):
    if len(re.sub(r"\D", "", text)) > MAX_NUMBER_DIGITS:
        raise _Refuse("number too long")
    mant, _, exp = text.lower().partition("e")
    if exp and abs(int(exp)) > 400:
        raise _Refuse("exponent too large")
    out = sympy.Rational(mant if not mant.startswith(".") else "0" + mant)   # exact: 0.5 == 1/2
    return out * sympy.Integer(10) ** int(exp) if exp else out


def _symbol(letter):
    return {"e": sympy.E, "i": sympy.I}.get(letter) or sympy.Symbol(letter)


def _pow(base, exp):
    """base^exp, refused when the result could have more than MAX_RESULT_DIGITS digits."""
    if exp.is_number and exp.is_real and exp.is_finite:
        mag = abs(float(sympy.N(exp, 15))) if exp.is_comparable else 0.0
        if base.is_number and base.is_comparable:
            b = abs(float(sympy.N(base, 15))) if abs(base) < 10**MAX_RESULT_DIGITS else float("inf")
            if mag * math.log10(max(b, 10.0)) > MAX_RESULT_DIGITS:
                raise _Refuse("power too large")
        elif mag > MAX_RESULT_DIGITS:
            raise _Refuse("power too large")
    elif not exp.is_number and base.is_number and base.is_comparable and abs(base) > 10**6:
        raise _Refuse("symbolic power of a huge base")
    return sympy.Pow(base, exp)


def _factorial(x):
    if not (x.is_Integer and 0 <= x <= MAX_FACTORIAL):
        raise _Refuse("factorial")
    return sympy.factorial(x)


def _to_sympy(text, deadline):
    if len(text) > MAX_ANSWER_CHARS:
        raise _Refuse("too long")
    return _Parser(text, deadline).parse()


# ---- comparison ladder ----
def _numeric(x):
    """x as a Python complex, or None (not a finite number)."""
    try:
        v = complex(sympy.N(x, 30))
    except (TypeError, ValueError, OverflowError):
        return None
    return v if math.isfinite(v.real) and math.isfinite(v.imag) else None


def _close(a, b):
    return abs(a - b) <= max(ABS_TOL, REL_TOL * max(abs(a), abs(b)))


def _expr_equal(a, b):
    """Exact for rationals; REL_TOL for other numbers; random points for expressions in variables."""
    if a.has(sympy.zoo, sympy.nan) or b.has(sympy.zoo, sympy.nan):
        return False                                              # 1/0 is no answer
    if a == b:
        return True
    if a.is_Rational and b.is_Rational or a.has(sympy.oo) or b.has(sympy.oo):
        return False
    free = a.free_symbols | b.free_symbols                        # sin^2 x + cos^2 x == 1 is allowed
    rng = random.Random(0)
    points = [{}] if not free else [{x: sympy.Rational(rng.randint(3, 29), 7) for x in free} for _ in range(4)]
    for point in points:
        va, vb = _numeric(a.subs(point)), _numeric(b.subs(point))
        if va is None or vb is None or not _close(va, vb):
            return False
    return True


_REL_OPS = ("<=", ">=", "!=", "<", ">", "=")


def _structure(s, deadline):
    """Parse a normalised answer into a comparable structure (tuples tagged by kind)."""
    if s.count("{") > MAX_NESTING * 4 or len(s) > MAX_ANSWER_CHARS:
        raise _Refuse("too big")
    choice = re.fullmatch(r"\(?([A-E])\)?", s)
    if choice:
        return ("choice", choice.group(1))
    m = re.fullmatch(r"\\begin\{([pbvB]?matrix)\}(.*)\\end\{\1\}", s, re.S)
    if m:
        rows = [r for r in re.split(r"\\\\", m.group(2)) if r.strip()]
        cells = [[_to_sympy(c.strip(), deadline) for c in r.split("&")] for r in rows]
        if sum(map(len, cells)) > MAX_ITEMS:
            raise _Refuse("matrix too big")
        return ("matrix", cells)
    pieces = _split_top(s, ["\\cup"])
    if len(pieces) > 1:
        return ("union", [_structure(p, deadline) for p in pieces])
    items = _split_top(s, [","])
    if len(items) > MAX_ITEMS:
        raise _Refuse("too many items")
    if s.startswith("\\{") and s.endswith("\\}") and len(_split_top(s[2:-2], [","])) >= 1 and _balanced(s[2:-2]):
        return ("set", [_structure(x, deadline) for x in _split_top(s[2:-2], [","]) if x])
    if len(items) > 1:
        return ("set", [_structure(x, deadline) for x in items])     # bare comma list: unordered
    if s[:1] in "([" and s[-1:] in ")]" and _balanced(s[1:-1]):
        inner = _split_top(s[1:-1], [","])
        if len(inner) > 1:                                         # tuple / point / interval: ordered
            return ("seq", s[0] + s[-1], [_structure(x, deadline) for x in inner])
    if s.startswith("{") and s.endswith("}") and _balanced(s[1:-1]):
        return _structure(s[1:-1].strip(), deadline)
    rel = _split_top(s, _REL_OPS)
    if len(rel) > 1:
        ops = re.findall(r"<=|>=|!=|<|>|=", _mask_brackets(s))
        exprs = [_to_sympy(x, deadline) for x in rel]
        if len(ops) != len(exprs) - 1:
            raise _Refuse("relation")
        if any(o in (">", ">=") for o in ops):                     # a > b  ->  b < a
            exprs, ops = exprs[::-1], [{">": "<", ">=": "<="}.get(o, o) for o in ops[::-1]]
        return ("rel", tuple(ops), exprs)
    return ("expr", _to_sympy(s, deadline))


def _balanced(s):
    depth = 0
    for c in s:
        depth += (c in "([{") - (c in ")]}")
        if depth < 0:
            return False
    return depth == 0


def _mask_brackets(s):
    """s with everything inside brackets blanked, so operators found are top-level."""
    out, depth = [], 0
    for c in s:
        depth -= c in ")]}"
        out.append(c if depth == 0 else " ")
        depth += c in "([{"
    return "".join(out)


def _struct_equal(a, b, deadline):
    if time.monotonic() > deadline:
        raise _Refuse("time")
    if a[0] != b[0]:
        return False
    kind = a[0]
    if kind == "choice":
        return a[1] == b[1]
    if kind == "expr":
        return _expr_equal(a[1], b[1])
    if kind == "seq":
        return a[1] == b[1] and len(a[2]) == len(b[2]) and all(_struct_equal(x, y, deadline) for x, y in zip(a[2], b[2]))
    if kind == "matrix":
        return [len(r) for r in a[1]] == [len(r) for r in b[1]] and all(
            _expr_equal(x, y) for ra, rb in zip(a[1], b[1]) for x, y in zip(ra, rb))
    if kind in ("set", "union"):                                   # multiset: match each item once
        rest = list(b[1])
        for x in a[1]:
            j = next((j for j, y in enumerate(rest) if _struct_equal(x, y, deadline)), None)
            if j is None:
                return False
            rest.pop(j)
        return not rest
    if kind == "rel":
        (ops_a, ea), (ops_b, eb) = a[1:], b[1:]
        if ops_a != ops_b or len(ea) != len(eb):
            return False
        if len(ea) == 2:                                           # compare rhs - lhs (x > 2  ==  x - 2 > 0)
            da, db = ea[1] - ea[0], eb[1] - eb[0]
            return _expr_equal(da, db) or (ops_a[0] in ("=", "!=") and _expr_equal(da, -db))
        return all(_expr_equal(x, y) for x, y in zip(ea, eb))
    return False


_LHS_RE = re.compile(r"^\s*[a-zA-Z](?:_\{?\w+\}?)?(?:\([a-z]\))?\s*=\s*(?!.*[=<>])(.+)$")


def is_equiv(pred, gold):
    """True when the predicted answer equals the gold answer (both LaTeX strings, no \\boxed)."""
    deadline = time.monotonic() + VERIFY_SECONDS
    try:
        return _is_equiv(pred, gold, deadline)
    except (_Refuse, RecursionError, ValueError, TypeError, ZeroDivisionError, OverflowError, MemoryError,
            AttributeError, IndexError, KeyError, sympy.SympifyError, NotImplementedError):
        return False


def _is_equiv(pred, gold, deadline):
    if not isinstance(pred, str) or not isinstance(gold, str):
        return False
    if len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS or "\x00" in pred + gold:
        return False
    (p, p_unit), (g, g_unit) = _normalize(pred), _normalize(gold)
    if p_unit and g_unit and p_unit.lower() != g_unit.lower():
        return False                                               # 10 cm vs 10 m
    if not p or not g:
        return False
    if g_unit is None and p_unit is not None and not re.search(r"\d", p):
        p = f"{p} {p_unit}"                                        # "Tuesday" is an answer, not a unit
    if re.fullmatch(r"[a-zA-Z ]{3,}", p) and p.lower() == g.lower():
        return True                                                # words: case-insensitive
    if not re.search(r"[=<>]", g):                                 # gold is a bare value: drop "x = " in pred
        m = _LHS_RE.match(p)
        p = m.group(1) if m else p
    elif not re.search(r"[=<>]", p):                               # pred is a bare value, gold "M = value"
        m = _LHS_RE.match(g)
        g = m.group(1) if m else g
    if p.replace(" ", "") == g.replace(" ", ""):
        return True
    return _struct_equal(_structure(p.strip(), deadline), _structure(g.strip(), deadline), deadline)


def reward(response, gold, truncated=False):
    """Training reward (spec section 1): 1.0 if the last \\boxed answer equals gold, else 0.0. A response cut
    at the length limit, with no box, or with an empty box scores 0."""
    if truncated:
        return 0.0
    answer = extract_boxed(response)
    if answer is None or not answer.strip():
        return 0.0
    return float(is_equiv(answer, gold))


def pass_at_k(n, c, k):
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), from n samples of which c are correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


# ----------------------------------------------------------------------------------------------------
# 3. Rollouts: sampling with transformers generate, and token log-probs of student and teacher
# ----------------------------------------------------------------------------------------------------
def prompt_text(tokenizer, problem, instruction=""):
    """The chat-templated prompt: the problem, then the instruction (paper: "Please reason step by step...")."""
    content = problem + (" " + instruction if instruction else "")
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


class SeededGumbelSampler:
    """A logits processor that makes sampling a pure function of each row's own seed.

    argmax(logits + Gumbel noise) is an exact sample of softmax(logits) (the Gumbel-max trick). Drawing row i's
    noise from its own generator, seeded by (run seed, step, prompt, rollout), makes rollout i independent of
    the batch it shares and of the rank it runs on: one process and torchrun draw identical rollouts, and a
    resumed run redraws exactly what the uninterrupted one drew. Noise is drawn on the CPU: fine for the tiny
    preset; the paper preset samples with torch's own RNG (or vLLM) instead.
    """

    def __init__(self, seeds):
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids, scores):
        u = torch.stack([torch.rand(scores.shape[-1], generator=g, dtype=torch.float64) for g in self.gens])
        gumbel = -torch.log(-torch.log(u.clamp(1e-300, 1 - 1e-16)))   # (B, V)
        return scores + gumbel.to(scores.device, scores.dtype)


def row_seeds(*key_and_rows):
    """Deterministic 63-bit seeds, one per row, from a key and per-row ids."""
    *key, rows = key_and_rows
    return [int.from_bytes(hashlib.sha256(repr((*key, r)).encode()).digest()[:8], "little") >> 1 for r in rows]


def generate(model, tokenizer, prompts, n, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, seeds=None,
             return_logits=False):
    """Sample n rollouts per prompt (rows prompt-major: row p*n + j). seeds: one per row for SeededGumbelSampler,
    or None to sample with torch's RNG. Returns a dict of tensors on the model's device:
      prompt_ids, prompt_mask (B*n, P) left-padded; response_ids, response_mask (B*n, T), the mask covering the
      response up to and including the first eos; truncated (B*n,), True when no eos came within max_new_tokens;
      sampler_logits (B*n, T, V) when return_logits (to measure the sampler-vs-trainer log-prob gap)."""
    from transformers import GenerationConfig, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    prompt_ids = enc["input_ids"].repeat_interleave(n, 0).to(device)              # (B*n, P)
    prompt_mask = enc["attention_mask"].repeat_interleave(n, 0).to(device)        # (B*n, P)
    common = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, return_dict_in_generate=True, output_logits=return_logits)
    if seeds is not None:
        if len(seeds) != prompt_ids.shape[0]:
            raise ValueError(f"seeds has {len(seeds)} entries, expected {prompt_ids.shape[0]} (one per rollout)")
        procs = [TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k > 0 else [])
        procs += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
        cfg, kw = GenerationConfig(do_sample=False, **common), dict(
            logits_processor=LogitsProcessorList(procs + [SeededGumbelSampler(seeds)]))
    else:
        cfg, kw = GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k, **common), {}
    with torch.inference_mode():
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=cfg, **kw)
    response_ids = out.sequences[:, prompt_ids.shape[1]:].clone()                  # (B*n, T); clone: a normal tensor
    is_eos = response_ids == tokenizer.eos_token_id
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0                           # strictly after the first eos
    response_mask = (~after_eos).long()
    truncated = ~is_eos.any(-1)
    if truncated.any() and response_ids.shape[1] < max_new_tokens:
        raise RuntimeError("generate stopped before max_new_tokens without an eos")
    result = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids * response_mask
                  + tokenizer.pad_token_id * (1 - response_mask), response_mask=response_mask, truncated=truncated)
    if return_logits:
        result["sampler_logits"] = torch.stack(out.logits, dim=1).clone()          # (B*n, T, V) raw logits
    return result


def sequence_logprobs(model, batch, temperature=1.0):
    """Token log-probs of the response tokens under `model`, from one forward pass. -> (B, T) fp32.
    Position ids count only real tokens, so left padding does not shift positions."""
    ids = torch.cat([batch["prompt_ids"], batch["response_ids"]], 1)              # (B, P+T)
    attn = torch.cat([batch["prompt_mask"], batch["response_mask"]], 1)           # (B, P+T)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    t = batch["response_ids"].shape[1]
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=t + 1).logits[:, :-1]  # (B, T, V)
    return token_logprobs(logits, batch["response_ids"], temperature)


def trim(batch):
    """Drop the columns that are padding in every row (prompt on the left, response on the right): compute that
    depends on padded width, and rows of one micro-batch often share shorter lengths."""
    p0 = int((batch["prompt_mask"].sum(0) > 0).nonzero()[0]) if batch["prompt_mask"].any() else 0
    width = max(int(batch["response_mask"].sum(-1).max()), 1)
    out = dict(batch)
    for k in ("prompt_ids", "prompt_mask"):
        out[k] = batch[k][:, p0:]
    for k in ("response_ids", "response_mask"):
        out[k] = batch[k][:, :width]
    return out


def shared_prompt_logprobs(model, batch, n, temperature=1.0):
    """sequence_logprobs for rows that come in groups of n with one prompt (rollouts of one prompt): each prompt
    runs through the model once, and its KV cache is repeated for its n responses (with grad, the gradient flows
    back through the repeated cache into the one prompt pass). -> (B, T) fp32."""
    p_ids, p_mask = batch["prompt_ids"][::n], batch["prompt_mask"][::n]               # (G, P) one row per group
    out = model(input_ids=p_ids, attention_mask=p_mask, position_ids=(p_mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=True, logits_to_keep=1)
    cache = out.cache
    cache.batch_repeat_interleave(n)                                                  # (G*n) rows of prompt KV
    attn = torch.cat([batch["prompt_mask"], batch["response_mask"]], 1)              # (B, P+T)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)[:, p_ids.shape[1]:]                     # (B, T)
    resp = model(input_ids=batch["response_ids"], attention_mask=attn, position_ids=pos, cache=cache).logits
    first = out.logits[:, -1:].repeat_interleave(n, 0)                               # (B, 1, V) predicts token 0
    logits = torch.cat([first, resp[:, :-1]], 1)                                     # (B, T, V)
    return token_logprobs(logits, batch["response_ids"], temperature)


def teacher_logprobs(teacher, batch, micro_batch, group_size=1):
    """Teacher log-probs of the student's response tokens (no grad). Rows in groups of group_size rollouts of one
    prompt share one prompt pass (shared_prompt_logprobs); otherwise rows go in length-sorted micro-batches.
    A failure raises: it never becomes a number (the official client's zero-fill would give a failed rollout the
    largest teacher weight)."""
    keys = ("prompt_ids", "prompt_mask", "response_ids", "response_mask")
    rows = batch["response_ids"].shape[0]
    if group_size > 1:
        step = max(1, micro_batch // group_size) * group_size                      # whole groups per micro-batch
        chunks = [torch.arange(i, min(i + step, rows)) for i in range(0, rows, step)]
    else:
        order = torch.argsort(batch["response_mask"].sum(-1), descending=True)
        chunks = [order[i:i + micro_batch] for i in range(0, rows, micro_batch)]
    parts = []
    with torch.inference_mode():
        for idx in chunks:
            part = trim({k: batch[k][idx] for k in keys})
            lp = shared_prompt_logprobs(teacher, part, group_size) if group_size > 1 else sequence_logprobs(teacher, part)
            parts.append((idx, lp))
    logp = torch.zeros(batch["response_ids"].shape, dtype=torch.float32, device=batch["response_ids"].device)
    for idx, lp in parts:                                                          # outside inference mode
        logp[idx, :lp.shape[1]] = lp
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
    """scope | opd | grpo | kd"""
    student: str = ""
    """student model: local path or Hugging Face id; empty builds the tiny student"""
    teacher: str = ""
    """teacher model (must share the student's tokenizer): local path or Hugging Face id; empty builds the tiny teacher"""
    data: str = ""
    """training problems: a JSONL file with `problem` and `answer` fields, or a Hugging Face dataset id; empty = tiny task"""
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
    """prompts per step over all ranks (the global batch)"""
    n_rollouts: int = 8
    """rollouts per prompt (N)"""
    micro_batch_prompts: int = 4
    """prompt groups per forward/backward (gradient accumulation); groups are never split"""
    score_micro_batch: int = 32
    """rollouts per teacher forward (sorted by length, so each micro-batch carries little padding)"""
    max_new_tokens: int = 64
    """response length limit; a response that reaches it is truncated and gets reward 0"""
    temperature: float = 1.0
    """sampling temperature"""
    top_p: float = 1.0
    """nucleus sampling"""
    top_k: int = 0
    """top-k sampling (0: off)"""
    seeded_sampling: bool = True
    """sample with per-rollout seeds (SeededGumbelSampler: identical rollouts on any number of ranks); off: torch RNG"""
    logprob_temperature: str = "one"
    """one: student and teacher log-probs at T=1 (the policy pi_theta itself); sampling: student at the sampling
    temperature, teacher at T=1 (the official code)"""
    lr: float = 3e-4
    """AdamW learning rate, constant (paper: 5e-5; tiny: 3e-4, since 1e-3 knocks the tiny student down at the first
    Adam step and 1e-4 learns more slowly)"""
    weight_decay: float = 0.01
    """AdamW weight decay"""
    grad_clip: float = 1.0
    """max gradient norm"""
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
    """evaluate on the tiny test split every this many steps (0: never)"""
    eval_problems: int = 64
    """test problems per evaluation"""
    eval_k: int = 4
    """samples per test problem (Avg@k, Pass@k)"""
    save_every: int = 25
    """checkpoint every this many steps (0: only at the end)"""
    resume: bool = False
    """continue from out_dir/checkpoint"""
    threads: int = 1
    """torch CPU threads per process, also for building the tiny models (1: on a loaded machine 2 threads run
    several times slower than 1; README, "thread count")"""
    dtype: str = "float32"
    """float32 | bfloat16 for student and teacher weights"""
    gradient_checkpointing: bool = False
    """recompute activations in the student's backward pass (long responses on GPUs)"""
    log_sampler_gap: bool = True
    """log the mean |sampler - trainer| log-prob gap (keeps the sampler's logits: small vocabularies only)"""
    tiny_teacher_steps: int = 0
    """SFT steps of the tiny teacher (0: the testbed's default)"""
    tiny_student_steps: int = 0
    """SFT steps of the tiny student (0: the testbed's default)"""


PRESETS = {
    "tiny": {},
    # SCOPE_SPEC.md section 8: 256 prompts x 8 rollouts, one update per batch, lr 5e-5 constant, wd 0.01, T 0.6.
    "paper": dict(student="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", teacher="Skywork/Skywork-OR1-7B",
                  data="zwhe99/DeepMath-103K", instruction="Please reason step by step, and put your final answer "
                  "within \\boxed{}.", prompts_per_step=256, micro_batch_prompts=1, max_new_tokens=12288,
                  temperature=0.6, lr=5e-5, steps=500, seeded_sampling=False, eval_every=0, save_every=20,
                  dtype="bfloat16", log_sampler_gap=False, cache_dir="", gradient_checkpointing=True),
}


def field_docs(cls):
    """{field: the docstring written under it}, read from the class source (so --help is the dataclass)."""
    import ast
    import inspect
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {a.target.id: " ".join(b.value.value.split()) for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}


def dataclass_cli(cls, argv=None, description="", dashes=False):
    """argparse from a config dataclass: one flag per field, its docstring as help. Returns (parser, the fields
    given on the command line). A bool flag alone means true (`--resume`), or takes a value (`--resume false`)."""
    import argparse
    docs = field_docs(cls)
    p = argparse.ArgumentParser(description=description)
    for f in dataclasses.fields(cls):
        flag = "--" + (f.name.replace("_", "-") if dashes else f.name)
        extra = dict(nargs="?", const=True) if f.type is bool else {}
        kind = {bool: lambda s: s.lower() in ("1", "true", "yes"), int: int, float: float}.get(f.type, str)
        p.add_argument(flag, dest=f.name, type=kind, default=None, help=f"{docs.get(f.name, '')} (default: {f.default!r})",
                       **extra)
    return p, {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}


def parse_args(argv=None):
    p, given = dataclass_cli(Args, argv, "SCOPE training (one process or torchrun)")
    preset = given.get("preset", "tiny")
    if preset not in PRESETS:
        p.error(f"--preset must be one of {list(PRESETS)}")
    args = Args(**{**PRESETS[preset], **given})
    _check_option("method", args.method, ("scope", "opd", "grpo", "kd"))
    _check_option("logprob_temperature", args.logprob_temperature, ("one", "sampling"))
    return args


# ----------------------------------------------------------------------------------------------------
# 5. Training: one code path for one process and for torchrun (gloo on CPU, NCCL on GPU)
# ----------------------------------------------------------------------------------------------------
def all_reduce(values, device):
    """Sum a list of numbers over ranks. EVERY collective on data goes through here: the tensor lives on the loop's
    device, because an NCCL process group has no CPU backend ("No backend type associated with device type cpu")."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def load_model(name, what, dtype=None, device="cpu"):
    """A causal LM (dtype given) or its tokenizer (dtype None), with a clear error when it cannot be reached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
    try:
        if dtype is None:
            return _load_tokenizer(name, AutoTokenizer, PreTrainedTokenizerFast)
        return AutoModelForCausalLM.from_pretrained(name, dtype=getattr(torch, dtype)).to(device).eval()
    except OSError as e:
        raise SystemExit(f"cannot load the {what} model {name!r}: {e}\nOffline? Download it elsewhere and pass a "
                         f"local path with --{what}.") from None


def _load_tokenizer(name, auto, fast):
    """transformers 5's AutoTokenizer picks the class of config.json's model_type (Qwen2Tokenizer) over the saved
    generic tokenizer class, and that class rebuilds a byte-level pipeline that drops the tiny tokenizer's spaces.
    A tokenizer saved as a generic one is therefore loaded as one."""
    cfg = Path(name) / "tokenizer_config.json"
    if cfg.exists() and json.loads(cfg.read_text()).get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return fast.from_pretrained(name)
    return auto.from_pretrained(name)


def load_problems(data):
    """Training problems from a local JSONL (fields problem, answer) or a Hugging Face dataset id."""
    path = Path(data)
    if path.exists():
        rows = []
        for i, line in enumerate(path.open(), 1):
            if line.strip():
                row = json.loads(line)
                for field in ("problem", "answer"):
                    if not isinstance(row.get(field), str):
                        raise SystemExit(f"{path}:{i}: field {field!r} is missing or not a string")
                rows.append(row)
        return rows
    try:
        import datasets
        ds = datasets.load_dataset(data, split="train")
    except Exception as e:  # ImportError, or no network
        raise SystemExit(f"cannot load training data {data!r} ({type(e).__name__}: {e}). Offline? Pass a local "
                         f"JSONL with 'problem' and 'answer' fields, e.g. --data ../shared/benchmarks/"
                         f"deepmath_train_sample.jsonl") from None
    cols = ("question", "final_answer") if "question" in ds.column_names else ("problem", "answer")
    return [{"id": str(i), "problem": r[cols[0]], "answer": str(r[cols[1]])} for i, r in enumerate(ds)]


def embedded_default(args, log):
    """The tiny testbed (a harness module, imported only here): its models and task fill whatever the user did not
    name. Returns (student, teacher, train rows or None, test rows)."""
    import tiny_testbed as tb
    student, teacher = args.student, args.teacher
    if not student or not teacher:
        t_spec = dataclasses.replace(tb.TINY_TEACHER, sft_steps=args.tiny_teacher_steps or tb.TINY_TEACHER.sft_steps)
        s_spec = dataclasses.replace(tb.TINY_STUDENT, sft_steps=args.tiny_student_steps or tb.TINY_STUDENT.sft_steps)
        dirs = tb.build_tiny_models(args.cache_dir, t_spec, s_spec, seed=0, log=log, threads=args.threads)
        student, teacher = student or str(dirs[0]), teacher or str(dirs[1])
    if args.data:                                                     # periodic eval: the tiny task's test split
        return student, teacher, None, []
    return student, teacher, tb.tiny_task("train", 20000, args.seed), tb.tiny_task("test", args.eval_problems, args.seed)


def step_prompts(step, n_rows, per_step, seed):
    """Global prompt indices of a step: epoch-wise permutations of the data, so step s is known without state."""
    out = []
    for j in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(j, n_rows)
        out.append(torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1000 + epoch))[pos].item())
    return out


def setup(args):
    """Ranks, device, seeds, output directory. Returns (rank, world, device, owns_process_group)."""
    import torch.distributed as dist
    ddp = int(os.environ.get("RANK", -1)) != -1
    own_group = ddp and not dist.is_initialized()                   # a caller (reproduce.py) may hold the group
    if own_group:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed + rank)
    random.seed(args.seed + rank)
    if rank == 0:
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        print("config:\n" + "\n".join(f"  {k:22s} {v}" for k, v in dataclasses.asdict(args).items()), flush=True)
        (Path(args.out_dir) / "config.json").write_text(json.dumps(dataclasses.asdict(args), indent=1))
    return rank, world, device, own_group


def load_models(args, student_name, teacher_name, ckpt, device):
    """(tokenizer, student, teacher or None, GRPO reference or None, optimizer)."""
    import copy
    tokenizer = load_model(student_name, "student")
    student = load_model(str(ckpt) if ckpt else student_name, "student", args.dtype, device)
    teacher = load_model(teacher_name, "teacher", args.dtype, device) if args.method in ("scope", "opd", "kd") else None
    if teacher is not None and load_model(teacher_name, "teacher").get_vocab() != tokenizer.get_vocab():
        raise SystemExit(f"student {student_name} and teacher {teacher_name} do not share a tokenizer: the "
                         "teacher must score the student's own token ids")
    ref = None
    if args.method == "grpo" and args.grpo_kl_coef > 0:                # the reference is the initial policy
        ref = load_model(student_name, "student", args.dtype, device) if ckpt else copy.deepcopy(student).eval()
    if args.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    return tokenizer, student, teacher, ref, opt


def sample_rollouts(args, step, student, teacher, tokenizer, rows, idx, my, kd_cache, device):
    """Phase 1: N rollouts per prompt from the student (KD: the teacher's samples, generated once and cached)."""
    if args.method != "kd":
        prompts = [prompt_text(tokenizer, rows[idx[j]]["problem"], args.instruction) for j in my]
        seeds = row_seeds(args.seed, step, [(j, i) for j in my for i in range(args.n_rollouts)]) if args.seeded_sampling else None
        return generate(student, tokenizer, prompts, args.n_rollouts, args.max_new_tokens, args.temperature,
                        args.top_p, args.top_k, seeds, return_logits=args.log_sampler_gap)
    n = args.kd_samples
    missing = [j for j in my if idx[j] not in kd_cache]
    if missing:
        prompts = [prompt_text(tokenizer, rows[idx[j]]["problem"], args.instruction) for j in missing]
        seeds = row_seeds(args.seed, "kd", [(idx[j], i) for j in missing for i in range(n)]) if args.seeded_sampling else None
        b = generate(teacher, tokenizer, prompts, n, args.max_new_tokens, args.temperature, args.top_p, args.top_k, seeds)
        for q, j in enumerate(missing):
            kd_cache[idx[j]] = {k: v[q * n:(q + 1) * n].cpu() for k, v in b.items()}
    parts = [kd_cache[idx[j]] for j in my]
    return {k: _pad_cat([p[k] for p in parts], k, tokenizer.pad_token_id).to(device) for k in parts[0]}


def verify_rollouts(tokenizer, batch, golds, n, device):
    """Phase 2: R_i in {0, 1}: the last \\boxed answer equals the gold one, and the response was not cut off."""
    texts = tokenizer.batch_decode(batch["response_ids"] * batch["response_mask"], skip_special_tokens=True)
    return torch.tensor([reward(texts[i], golds[i // n], bool(batch["truncated"][i])) for i in range(len(texts))],
                        device=device)                                # (B*n,)


def micro_batch_loss(args, student, part, rewards, group_ids, advantages, logp_teacher, logp_ref, counts, n, lp_temp):
    """Phase 4, one micro-batch of whole prompt groups: s_it with gradient, then the method's loss (section 1)."""
    shared = n > 1 and not args.gradient_checkpointing               # one prompt pass per group (no GC + cache)
    logp = (shared_prompt_logprobs(student, part, n, lp_temp) if shared   # (b, t) s_it, with grad
            else sequence_logprobs(student, part, lp_temp))
    logp_old = logp.detach()                                          # o_it: one update per batch, theta = theta_old
    mask, width = part["response_mask"], logp.shape[1]
    if args.method == "scope":
        lp_t = logp_teacher[:, :width]                                # (b, t) T_it
        w = scope_weights(logp_old, lp_t, mask, group_ids, rewards, args.tau, args.weight_norm, args.student_weight,
                          args.teacher_weight)                        # eq. 4-5
        loss, m = scope_loss(logp, logp_old, lp_t, mask, rewards, w, group_ids, args.loss_agg, counts)  # eq. 6
    elif args.method == "opd":
        loss, m = opd_loss(logp, logp_old, logp_teacher[:, :width], mask, group_ids, args.loss_agg, counts)
    elif args.method == "grpo":
        ref = logp_ref[:, :width] if logp_ref is not None else logp_old
        loss, m = grpo_loss(logp, logp_old, ref, mask, advantages, args.grpo_clip, args.grpo_kl_coef, counts)
    else:
        loss, m = kd_loss(logp, mask, counts)
    return loss, m, logp_old


def update_student(args, student, opt, batch, rewards, group_ids, logp_teacher, logp_ref, sampler_logits, device):
    """Phase 4: one optimizer step. Every normaliser is a count over the GLOBAL batch (all ranks), so the summed
    gradient of the micro-batches, summed over ranks, is the gradient of the full batch (README: normalisation)."""
    import torch.distributed as dist
    n = args.n_rollouts if args.method != "kd" else args.kd_samples
    lp_temp = args.temperature if args.logprob_temperature == "sampling" else 1.0
    local = batch_counts(batch["response_mask"], rewards, group_ids)
    counts = dict(zip(local, all_reduce(local.values(), device)))
    advantages = grpo_advantages(rewards, group_ids) if args.method == "grpo" else None
    student.train()
    opt.zero_grad(set_to_none=True)
    logs, gap, nll, mb = [], [], 0.0, args.micro_batch_prompts * n
    for i in range(0, rewards.shape[0], mb):                          # whole prompt groups per micro-batch
        sl = slice(i, i + mb)
        part = trim({k: v[sl] for k, v in batch.items() if k != "truncated"})
        loss, m, logp_old = micro_batch_loss(
            args, student, part, rewards[sl], group_ids[sl], advantages[sl] if advantages is not None else None,
            logp_teacher[sl] if logp_teacher is not None else None, logp_ref[sl] if logp_ref is not None else None,
            counts, n, lp_temp)
        loss.backward()
        logs.append(m)
        mask = part["response_mask"]
        nll += float(-(logp_old * mask).sum())                        # the student's NLL of its own tokens
        if sampler_logits is not None:
            s_lp = token_logprobs(sampler_logits[sl, :logp_old.shape[1]], part["response_ids"], lp_temp)
            gap.append(float(((s_lp - logp_old).abs() * mask).sum() / mask.sum().clamp(min=1)))
    if dist.is_initialized() and dist.get_world_size() > 1:           # sum (not mean): losses use global counts
        for p in student.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
    grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip)
    opt.step()
    student.eval()
    losses = {k: sum(m[k] for m in logs) for k in logs[0] if k.startswith("loss/")}   # micro-batches sum up ...
    record = {k: sum(m[k] for m in logs) / len(logs) for k in logs[0]}
    record.update(zip(losses, all_reduce(losses.values(), device)))   # ... and so do ranks (global normalisers)
    record.update({"loss": sum(record[k] for k in losses), "train/grad_norm": float(grad_norm), "_nll": nll})
    if gap:
        record["rollout/sampler_gap"] = sum(gap) / len(gap)
    return record


def evaluate(model, tokenizer, rows, k, args, seed_key):
    """Avg@k and unbiased Pass@k per level (rows' "level" field) and overall, sampling like training."""
    per_level = {}
    for start in range(0, len(rows), 16):
        chunk = rows[start:start + 16]
        prompts = [prompt_text(tokenizer, r["problem"], args.instruction) for r in chunk]
        seeds = row_seeds(seed_key, range(start * k, (start + len(chunk)) * k)) if args.seeded_sampling else None
        b = generate(model, tokenizer, prompts, k, args.max_new_tokens, args.temperature, args.top_p, args.top_k, seeds)
        texts = tokenizer.batch_decode(b["response_ids"] * b["response_mask"], skip_special_tokens=True)
        for i, r in enumerate(chunk):
            c = sum(reward(texts[i * k + j], r["answer"], bool(b["truncated"][i * k + j])) for j in range(k))
            per_level.setdefault(r.get("level", "all"), []).append(int(c))
    out = {}
    for level, cs in sorted(per_level.items()) + [("all", [c for cs in per_level.values() for c in cs])]:
        out[f"eval/{level}/avg@{k}"] = sum(cs) / (k * len(cs))
        out[f"eval/{level}/pass@{k}"] = sum(pass_at_k(k, c, k) for c in cs) / len(cs)
    return out


def save_checkpoint(out, step, model, tokenizer, opt, args, rank, world):
    """Atomic: everything goes to checkpoint.tmp, which then replaces checkpoint in one rename."""
    import torch.distributed as dist
    barrier = dist.barrier if world > 1 else (lambda: None)
    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "world": world, "config": dataclasses.asdict(args)}))
    barrier()
    if rank == 0:
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def latest_checkpoint(out):
    for d in (out / "checkpoint", out / "checkpoint.old"):           # .old survives a crash mid-rename
        if (d / "state.json").exists():
            return d
    return None


def resume(ckpt, opt, rank, out):
    """Restore optimizer and RNG state; drop metric lines the checkpoint does not cover. Returns the start step."""
    opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=False))
    rng = torch.load(ckpt / f"rng_rank{rank}.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    start = json.loads((ckpt / "state.json").read_text())["step"]
    path = out / "metrics.jsonl"
    if rank == 0 and path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= start]
        path.write_text("".join(line + "\n" for line in kept))
    return start


def train(args):
    """The SCOPE loop: sample N rollouts per prompt, verify, score with the teacher, one weighted update."""
    import torch.distributed as dist
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    rank, world, device, own_group = setup(args)
    say = print if rank == 0 else (lambda *a, **k: None)
    student_name, teacher_name, rows, test_rows = args.student, args.teacher, None, []
    if not (args.student and args.teacher and args.data):             # the embedded default fills the gaps
        student_name, teacher_name, rows, test_rows = embedded_default(args, say)
    rows = rows or load_problems(args.data)
    if args.eval_every and not test_rows:
        say("eval_every: periodic evaluation runs on the tiny task only; evaluate checkpoints with `python -m eval`")
    out = Path(args.out_dir)
    ckpt = latest_checkpoint(out) if args.resume else None
    tokenizer, student, teacher, ref, opt = load_models(args, student_name, teacher_name, ckpt, device)
    start = resume(ckpt, opt, rank, out) if ckpt else 0
    if ckpt:
        say(f"resumed from {ckpt} at step {start}")
    elif rank == 0:
        (out / "metrics.jsonl").write_text("")
    if world > 1:                                                     # identical starting weights on every rank
        for p in student.parameters():
            dist.broadcast(p.data, 0)
    kd_cache = {}
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=args.method, disable=rank != 0)
    for step in bar:
        idx = step_prompts(step, len(rows), args.prompts_per_step, args.seed)
        my = list(range(rank, len(idx), world))                       # this rank's positions in the global batch
        n = args.n_rollouts if args.method != "kd" else args.kd_samples
        t = {"time/generate": time.time()}
        batch = sample_rollouts(args, step, student, teacher, tokenizer, rows, idx, my, kd_cache, device)  # 1. rollouts
        sampler_logits = batch.pop("sampler_logits", None)
        t["time/verify"] = time.time()
        rewards = verify_rollouts(tokenizer, batch, [rows[idx[j]]["answer"] for j in my], n, device)      # 2. verify
        group_ids = torch.tensor(my, device=device).repeat_interleave(n)   # (B*n,) one id per global prompt
        t["time/score"] = time.time()                                 # 3. teacher T_it / reference (no grad)
        logp_teacher = teacher_logprobs(teacher, batch, args.score_micro_batch, n) if args.method in ("scope", "opd") else None
        logp_ref = teacher_logprobs(ref, batch, args.score_micro_batch, n) if ref is not None else None
        t["time/update"] = time.time()                                # 4. weights (eq. 4-5) and one update (eq. 6)
        record = update_student(args, student, opt, batch, rewards, group_ids, logp_teacher, logp_ref, sampler_logits,
                                device)
        t["end"] = time.time()
        record = log_step(args, step, record, batch, rewards, t, device)  # 5. log, evaluate, checkpoint
        if args.eval_every and test_rows and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps) and rank == 0:
            record.update(evaluate(student, tokenizer, test_rows, args.eval_k, args, (args.seed, "eval")))
        if rank == 0:
            with (out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(reward=f"{record['train/reward_mean']:.2f}", loss=f"{record['loss']:.3f}")
        if (args.save_every and (step + 1) % args.save_every == 0) or step + 1 == args.steps:
            save_checkpoint(out, step + 1, student, tokenizer, opt, args, rank, world)
    if own_group:
        dist.destroy_process_group()
    return student


def log_step(args, step, record, batch, rewards, t, device):
    """Phase 5: the step's JSON record, with batch statistics summed over ranks (README: logging keys)."""
    tokens = float(batch["response_mask"].sum())
    r_sum, rows, trunc, tok, nll = all_reduce([rewards.sum(), rewards.numel(), batch["truncated"].sum(), tokens,
                                               record.pop("_nll")], device)
    phases = ["time/generate", "time/verify", "time/score", "time/update", "end"]
    times = {k: t[nxt] - t[k] for k, nxt in zip(phases, phases[1:])}
    return {"step": step + 1, **record, "train/reward_mean": r_sum / rows, "rollout/truncated_frac": trunc / rows,
            "rollout/mean_len": tok / rows, "rollout/nll_student": nll / max(tok, 1.0),
            "perf/tokens_per_s": tok / max(sum(times.values()), 1e-9), **times}


def _pad_cat(tensors, key, pad_id):
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

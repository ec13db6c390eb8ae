"""SCOPE: Signal-Calibrated On-Policy Distillation Enhancement (arXiv 2604.10688), in one file.

Per prompt x the student samples N rollouts; a verifier marks each correct (R=1) or incorrect (R=0).
  correct rollouts   -> maximum likelihood, weighted by the student's perplexity   (eq. 2, 4)
  incorrect rollouts -> reverse-KL on-policy distillation from a teacher,
                        weighted by the teacher's inverse perplexity                (eq. 3, 5)
Both weights are a softmax within one prompt's group and one path (eq. 4-5); the objective is eq. 6.

Sections, in the order of the algorithm:
  1. the math: token log-probs, perplexities, group-softmax weights, SCOPE / OPD / GRPO / KD losses
     (pure tensor functions: paste them into verl or TRL)
  2. verifying answers: \boxed extraction and a safe, time-bounded sympy-based equivalence check

Notation (SCOPE_SPEC.md section 1), all over RESPONSE tokens only:
  logp         s_it  log pi_theta(a_it | ...)  student, current parameters, carries gradient
  logp_old     o_it  log pi_old(a_it | ...)    student at sampling time, detached
  logp_teacher T_it  log pi_T(a_it | ...)      teacher, no gradient
  nll = -mean_t logp = log PPL, so a high nll means a high perplexity.
"""

import math
import random
import re
import time

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

"""SCOPE: Signal-Calibrated On-Policy Distillation Enhancement (arXiv 2604.10688) in one file.

Per prompt x the student samples N rollouts; a verifier marks each correct (R=1) or incorrect (R=0).
  correct rollouts   -> maximum likelihood, weighted by the student's perplexity    (eq. 2, 4)
  incorrect rollouts -> reverse-KL on-policy distillation from a teacher,
                        weighted by the teacher's inverse perplexity                 (eq. 3, 5)
Both weights are a softmax within one prompt's group and one path (eq. 4-5); the objective is eq. 6.
Baselines (baselines.py): OPD (eq. 3 on every rollout), PSR (eq. 2 alone), GRPO, KD.

    python scope.py                                     # tiny preset: its own task and models, CPU
    python scope.py --method opd                        # baselines: opd, psr, grpo, kd
    torchrun --nproc-per-node=2 scope.py                # 2 processes, FSDP2 (gloo CPU, NCCL GPU)
    torchrun --nproc-per-node=8 scope.py --preset paper # R1-Distill-Qwen-1.5B + Skywork-OR1-7B

Sections in the algorithm's order (equations: docs/method.md): 1. the loss (eq. 1-6; torch, math
only, copyable), the methods; 2. verifying (R_i); 3. rollouts, scoring; 4. the config; 5. the loop, a
function a phase. Beside it, one call each: ranks.py (ranks, FSDP2), batching.py, step_log.py (the
step's record), logprobs.py, loading.py, checkpoints.py, memory.py, vllm_engine.py (a sampler).
"""

# --------------------------------------------------------------------------------------------------
# 1. The loss. Torch and math only: this part, down to its END marker, runs on its own (tested).
# --------------------------------------------------------------------------------------------------
# The contract. Log-probs are over RESPONSE tokens only, (B, L); group_ids (B,): each row's prompt.
#   logp          s_it = log pi_theta(y_it | x, y_i<t): the student now, the only one with gradient
#   logp_old      o_it = log pi_old(y_it | ...): the student that sampled, as the TRAINER has it
#   logp_teacher  T_it = log pi_T(y_it | ...): the teacher, at temperature 1
#   logp_sampler  the sampler's own log-prob of each sampled token (e.g. vLLM's): the weights only
# logp, logp_old and logp_sampler share one temperature: 1 (pi_theta itself) or, as the released
# code has it, the sampling temperature. mask (B, L): 1 on response tokens; rewards (B,): R_i.
# - logp_old is the trainer's log-prob under the parameters that sampled: with one update per batch
#   (the paper, this loop) it is logp.detach(), so rho = 1 in value and its gradient is grad s. The
#   sampler's log-prob differs by kernels and precision: as logp_old it would weigh every token.
# - scope_weights needs pi_old's sequence perplexity (the sampler's log-probs serve), WHOLE groups:
#   compute the weights once per batch, before any micro-batching, and slice them with the rows. A
#   prompt's group stays on one rank (each rank weighs its own groups).
# - counts are the denominators over the GLOBAL batch: batch_counts(..., group_size=N) of each
#   rank's rows, summed over ranks. Micro-batch losses then add up to the batch's, for any split.
# - data-parallel wrappers (FSDP2, DDP) AVERAGE gradients over ranks: backpropagate
#   loss * world_size so the update is the gradient of the global-batch loss.
import math

import torch

WEIGHT_NORMS = ("sum", "mean")          # sum: eq. 4-5 (weights sum to 1); mean: official (x |cell|)
WEIGHT_DIRECTIONS = ("paper", "reversed", "uniform")
LOSS_AGGS = ("paper", "token", "official-microbatch")   # see scope_loss


def _check(ok, message):
    if not ok:                                               # bad input: a ValueError naming it
        raise ValueError(message)


def _check_finite(name, x):
    _check(torch.isfinite(x).all(), f"{name} contains NaN or inf")


def _check_same_shape(**tensors):
    (name0, t0), *rest = tensors.items()
    for name, t in rest:
        _check(t.shape == t0.shape,
               f"{name} has shape {tuple(t.shape)}, expected {tuple(t0.shape)} like {name0}")


def _check_option(name, value, allowed):
    _check(value in allowed, f"{name}={value!r} is not one of {allowed}")


def _check_rewards(rewards, batch):
    _check(rewards.shape == (batch,),
           f"rewards has shape {tuple(rewards.shape)}, expected ({batch},)")
    _check(((rewards == 0) | (rewards == 1)).all(), "rewards must be 0 or 1")


def seq_nll(logp, mask):
    """Length-normalised sequence NLL = log PPL = -(1/|y|) sum_t logp_t over the response. -> (B,).
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
    cell_sum = torch.zeros(n_cells, dtype=scores.dtype, device=scores.device)
    cell_sum = cell_sum.index_add(0, cell, e)                      # (C,)
    w = e / cell_sum[cell]                                         # (B,)
    if norm == "mean":
        cell_size = torch.bincount(cell, minlength=n_cells).to(w.dtype)  # (C,)
        w = w * cell_size[cell]
    return w.float()


def scope_weights(logp_sampler, logp_teacher, mask, group_ids, rewards, tau=1.0, norm="sum",
                  student_direction="paper", teacher_direction="paper"):
    """Dual-path adaptive weights (eq. 4-5), one per rollout, from pi_old's log-probs of the sampled
    tokens (logp_sampler) and the teacher's. -> (B,), no gradient.

    Correct (R=1), eq. 4:   w_stu_i = softmax_{j in Omega_c}(+nll_student_j / tau) ~ PPL_S^(1/tau)
    Incorrect (R=0), eq. 5: w_tea_i = softmax_{j in Omega_w}(-nll_teacher_j / tau) ~ PPL_T^(-1/tau)
    The softmax runs within one prompt (group_ids) and one path ("group-level normalisation").
    Directions: "paper" (the signs above), "reversed" (flipped), "uniform" (no weighting). The
    released scripts use student_direction="reversed", teacher_direction="paper", norm="mean".
    """
    _check_same_shape(logp_sampler=logp_sampler, logp_teacher=logp_teacher, mask=mask)
    _check_rewards(rewards, logp_sampler.shape[0])
    _check(group_ids.shape == rewards.shape,
           f"group_ids has shape {tuple(group_ids.shape)}, expected {tuple(rewards.shape)}")
    _check(tau > 0, f"tau must be > 0, got {tau}")
    _check_option("student_direction", student_direction, WEIGHT_DIRECTIONS)
    _check_option("teacher_direction", teacher_direction, WEIGHT_DIRECTIONS)
    mask = mask.bool()
    _check_finite("logp_sampler", logp_sampler[mask])
    _check_finite("logp_teacher", logp_teacher[mask])
    sign = {"paper": 1.0, "reversed": -1.0, "uniform": 0.0}
    nll_student = seq_nll(logp_sampler.detach().double(), mask)    # (B,) log PPL_S, of pi_old
    nll_teacher = seq_nll(logp_teacher.detach().double(), mask)    # (B,) log PPL_T
    correct = rewards.bool()                                       # (B,)
    scores = torch.where(correct, sign[student_direction] * nll_student,   # eq. 4: +log PPL_S
                         -sign[teacher_direction] * nll_teacher) / tau     # eq. 5: -log PPL_T
    cell_ids = group_ids.long() * 2 + correct.long()               # (B,) a cell: (prompt, path)
    return group_softmax(scores, cell_ids, norm)


def batch_counts(mask, rewards, group_ids, *, group_size):
    """The loss's denominators for this part of the batch: prompts, rollouts, response tokens,
    tokens of correct rollouts. Sum them over micro-batches and ranks; scope_loss takes the totals.
    group_size (N) is required: prompts = rows / N, right for any part of a batch (one that cuts a
    group too); group_size=None counts distinct group ids, right only for parts of whole groups."""
    mask = mask.float()                                            # (B, L)
    tokens = mask.sum(-1)                                          # (B,)
    prompts = mask.shape[0] / group_size if group_size else torch.unique(group_ids).numel()
    correct_tokens = float((tokens * rewards.float()).sum())
    return {"prompts": float(prompts), "rollouts": float(mask.shape[0]),
            "tokens": float(tokens.sum()), "tokens_correct": correct_tokens}


def truncated_is_weights(logp_trainer, logp_sampler, mask, cap):
    """Truncated importance sampling, an option (the paper has none): per token min(pi_trainer /
    pi_sampler, cap), no gradient, as scope_loss's token_weights when the sampler (vLLM, bf16) is
    not exactly the trainer. The log-ratio is clamped to +-20 first (as verl), so it stays finite.
    -> ((B, L) weights, 0 on padding; {"sum", "max", "capped", "tokens"} of the uncapped ratios)."""
    _check(cap > 0, f"cap must be > 0, got {cap}")
    real = mask.bool()
    log_ratio = torch.where(real, logp_trainer.detach() - logp_sampler.detach(), 0.0)   # (B, L)
    ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))
    top = float(ratio[real].max()) if real.any() else 0.0
    stats = {"sum": float(ratio[real].sum()), "max": top,
             "capped": float((ratio[real] > cap).sum()), "tokens": float(real.sum())}
    return torch.where(real, ratio.clamp(max=cap), 0.0), stats


def _normalisers(counts, agg, mask, rewards, weights):
    """(MLE denominator, OPD denominator) of an aggregation; a count of 0 becomes 1 (sums of 0)."""
    _check_option("agg", agg, LOSS_AGGS)
    if agg == "paper":     # eq. 6: E_x[ sum_i w_i sum_t (...) ]: token sums, mean over prompts
        d_mle = d_opd = counts["prompts"]
    elif agg == "token":   # the official token-mean (MLE: correct tokens, OPD: all), global
        d_mle, d_opd = counts["tokens_correct"], counts["tokens"]
    else:  # the released actor (docs/method.md): token means within THIS micro-batch, the MLE's
        # over tokens of correct rollouts whose weight is above 0, each count + 1e-8 in float32 (its
        # masked_mean: the 1e-8 vanishes for counts of 1 or more), times the micro-batch's share of
        # the batch's rollouts (which also averages over ranks)
        tokens = mask.sum(-1)                                      # (b,)
        share = counts["rollouts"] / max(mask.shape[0], 1)
        mle_tokens = (tokens * rewards * (weights > 0)).sum()
        f32 = [float(torch.tensor(float(n), dtype=torch.float32, device="cpu") + 1e-8)
               for n in (mle_tokens, tokens.sum())]
        return f32[0] * share, f32[1] * share
    return max(d_mle, 1.0), max(d_opd, 1.0)


def _weight_stats(w, cell_ids):
    """Max weight and mean entropy of the sum-to-1 weights over the cells present (for logging)."""
    if w.numel() == 0:
        return 0.0, 0.0
    _, cell = torch.unique(cell_ids, return_inverse=True)
    n = int(cell.max()) + 1
    total = torch.zeros(n, dtype=torch.float64, device=w.device).index_add(0, cell, w.double())
    p = w.double() / total[cell]                                   # "mean" weights to sum 1
    plogp = -p * torch.log(p.clamp(min=1e-30))
    ent = torch.zeros(n, dtype=torch.float64, device=w.device).index_add(0, cell, plogp)
    return float(w.max()), float(ent.mean())


def scope_loss(logp, logp_old, logp_teacher, mask, rewards, weights, *, group_ids, counts,
               agg="paper", token_weights=None):
    """SCOPE objective (eq. 6). All (B, L) but rewards, weights, group_ids (B,). -> (loss, metrics).

      eq. 1  rho_it = exp(s_it - o_it)                 (= 1 on fresh rollouts; grad = grad s_it)
      eq. 2  L_MLE(x, y_i) = - sum_t rho_it            for correct rollouts
      eq. 3  L_OPD(x, y_i) =   sum_t rho_it * sg(s_it - T_it)    for incorrect rollouts (the k1
                                                         log-ratio, negative advantage: reverse KL)
      eq. 6  J = E_x[ sum_{Omega_c} w_stu L_MLE + sum_{Omega_w} w_tea L_OPD ]

    group_ids and counts are required: without them the loss would silently change scale. counts
    are batch_counts of the GLOBAL batch (summed over micro-batches and ranks).
    agg="paper": token sums divided by the number of prompts (eq. 6, with norm="sum" weights).
    agg="token": MLE sum / correct tokens + OPD sum / all tokens (the official token-mean, global).
    agg="official-microbatch": the released update: those token means within each micro-batch, times
    its share of the batch's rollouts. With global counts, any split's losses add up to the batch's.
    token_weights (B, L), no gradient: multiply each token's term (truncated_is_weights); None: eq.6
    """
    _check_same_shape(logp=logp, logp_old=logp_old, logp_teacher=logp_teacher, mask=mask)
    _check_rewards(rewards, logp.shape[0])
    _check(weights.shape == rewards.shape,
           f"weights has shape {tuple(weights.shape)}, expected {tuple(rewards.shape)}")
    real = mask.bool()                                             # (B, L) response tokens
    for name, x in (("logp", logp), ("logp_old", logp_old), ("logp_teacher", logp_teacher)):
        _check_finite(name, x.detach()[real])
    _check_finite("weights", weights)
    d_mle, d_opd = _normalisers(counts, agg, mask, rewards, weights)

    mask = mask.to(logp.dtype)                                     # (B, L)
    zero = torch.zeros_like(logp)
    logp_old = torch.where(real, logp_old.detach(), zero)          # padding may hold anything
    logp_teacher = torch.where(real, logp_teacher.detach(), zero)
    s = torch.where(real, logp, zero)
    rho = torch.exp(s - logp_old)                                  # (B, L) eq. 1
    if token_weights is not None:                                  # importance weights, capped
        rho = rho * token_weights.detach().to(rho.dtype)
    k1 = (s.detach() - logp_teacher)                               # (B, L) sg(s - T), k1 estimate
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
    k1_wrong = (k1 * mask * (1 - correct)[:, None]).sum()
    metrics = {
        "loss/mle": loss_mle.item(), "loss/opd": loss_opd.item(),
        "train/frac_correct": float(correct.mean()) if correct.numel() else 0.0,
        "train/w_stu_max": w_stu_max, "train/w_stu_entropy": w_stu_ent,
        "train/w_tea_max": w_tea_max, "train/w_tea_entropy": w_tea_ent,
        "kl/teacher_k1": float(k1_wrong / n_wrong_tok.clamp(min=1)),
    }
    return loss_mle + loss_opd, metrics


# ------------------------------------------------------------------------------- END of the loss
# The rest (methods, rollouts, scoring, config, the loop) needs more than torch and math:
import contextlib
import dataclasses
import hashlib
import json
import time
from pathlib import Path

import baselines  # OPD, PSR, GRPO, KD
import memory  # the plan, before loading
import verifier  # section 2: the reward R_i
from batching import balanced_ranks, micro_batches, pad_cat, split_batch, trim
from checkpoints import OutDirLock, resume, save_checkpoint
from loading import drop_long_prompts, load_models, run_inputs, step_prompts
from logprobs import sequence_logprobs, shared_prompt_logprobs
from ranks import all_reduce, clip_grad_norm, setup, shard, sync_gradients
from step_log import UpdateLog, avg_pass, log_step


@dataclasses.dataclass(frozen=True)
class Method:
    """How a method trains: whose rollouts, which model scores them without gradient, its loss."""
    sampler: str                      # "student" (on-policy) | "teacher" (KD's samples, made once)
    scorer: str                       # "teacher" | "reference" (GRPO's KL to the start) | ""
    baseline: object                  # None: SCOPE's loss (eq. 6) | a baselines.Baseline


METHODS = {
    "scope": Method("student", "teacher", None),
    "opd": Method("student", "teacher", baselines.opd(scope_loss)),   # eq. 3 on every rollout
    "psr": Method("student", "", baselines.psr(scope_loss)),          # eq. 2 on the correct ones
    "grpo": Method("student", "reference", baselines.GRPO),           # PPO-clip, group advantages
    "kd": Method("teacher", "", baselines.KD),                        # NLL of the teacher's samples
}


def rollouts_per_prompt(args):
    return args.kd_samples if METHODS[args.method].sampler == "teacher" else args.n_rollouts


def logprob_temperature(args):
    """The student's log-probs' temperature (eq. 1-4): 1, or the sampling one (released code)."""
    return args.temperature if args.logprob_temperature == "sampling" else 1.0


# --------------------------------------------------------------------------------------------------
# 2. Verifying rollouts: R_i in {0, 1} (docs/method.md), the answer checker in verifier.py
# --------------------------------------------------------------------------------------------------
# R_i = 1 when the last \boxed{} equals the gold answer (verifier.is_equiv: safe, time-bounded,
# never runs model output) and the rollout was not cut off. --grader official: the released grader.
def decode_responses(tokenizer, batch):
    """The response texts up to their eos (past the mask: pad, a special token; 0 is an ordinary one)"""
    ids = torch.where(batch["response_mask"].bool(), batch["response_ids"], tokenizer.pad_token_id)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def verify_rollouts(tokenizer, batch, golds, n, device, grader="verify"):
    """Phase 2: R_i in {0, 1}: the last \\boxed answer equals the gold one, and was not cut off."""
    texts = decode_responses(tokenizer, batch)
    judge = verifier.official_reward if grader == "official" else verifier.reward
    cut = batch["truncated"].tolist()
    rewards = [judge(texts[i], golds[i // n], cut[i]) for i in range(len(texts))]
    return torch.tensor(rewards, device=device)                    # (B*n,)


# --------------------------------------------------------------------------------------------------
# 3. Rollouts and scoring: seeded sampling, the sampler's log-probs, student and teacher log-probs
# --------------------------------------------------------------------------------------------------
def prompt_text(tokenizer, problem, instruction=""):
    """The chat-templated prompt: the problem, then the instruction ("Please reason step by
    step...")."""
    content = problem + (" " + instruction if instruction else "")
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


def row_seeds(*key_and_rows):
    """Deterministic 63-bit seeds, one per row, from a key and per-row ids."""
    *key, rows = key_and_rows
    digests = (hashlib.sha256(repr((*key, r)).encode()).digest() for r in rows)
    return [int.from_bytes(d[:8], "little") >> 1 for d in digests]


class GumbelSampler:
    """The last logits processor: argmax(logits + Gumbel noise) is an exact sample of softmax(logits).
    With seeds, row i's noise has its own generator seeded by (run seed, step, prompt, rollout):
    any number of ranks, and a resumed run, draw the same rollouts. Without: torch's RNG."""

    def __init__(self, seeds=None):
        self.gens = seeds and [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids, scores):
        if self.gens is None:
            u = torch.rand_like(scores, dtype=torch.float64)
        else:                                                      # host generators, host noise
            u = torch.stack([torch.rand(scores.shape[-1], device="cpu", generator=g,
                                        dtype=torch.float64) for g in self.gens])  # (B, V)
        gumbel = -torch.log(-torch.log(u.clamp(1e-300, 1 - 1e-16)))
        return scores + gumbel.to(scores.device, scores.dtype)     # (B, V)


class SamplerLogprobs:
    """The first logits processor: records log pi_old(a_t) of every sampled token at `temperature`,
    from the raw logits of the sampling forward pass (one (B, V) step kept at a time): the behaviour
    policy's log-probs (eq. 1, 4), and the reference of rollout/sampler_gap."""

    def __init__(self, temperature):
        self.temperature, self.prev, self.out = temperature, None, []

    def __call__(self, input_ids, scores):
        self.collect(input_ids[:, -1])                             # sampled from the previous step
        self.prev = torch.log_softmax(scores.float() / self.temperature, -1)   # (B, V)
        return scores

    def collect(self, tokens):
        if self.prev is not None:
            self.out.append(self.prev.gather(-1, tokens[:, None]).squeeze(-1))
            self.prev = None


def generate(model, tokenizer, prompts, n, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
             seeds=None, logprob_temperature=1.0, synced=False):
    """Sample n rollouts per prompt (row p*n + j); seeds: one per row, or None (torch's RNG).
    synced: every rank steps until all are done (needed when the model is FSDP-sharded). -> tensors
    on the model's device: prompt_ids, prompt_mask (B*n, P) left-padded; response_ids, response_mask
    (B*n, T), the mask up to and including the first eos; truncated (B*n,), no eos within
    max_new_tokens; logp_sampler (B*n, T) fp32 at logprob_temperature (SamplerLogprobs)."""
    import transformers as tf
    device = next(model.parameters()).device
    enc = tokenizer(prompts, padding=True, padding_side="left", add_special_tokens=False)   # lists
    prompt_ids = torch.tensor(enc["input_ids"], device=device).repeat_interleave(n, 0)   # (B*n, P)
    prompt_mask = torch.tensor(enc["attention_mask"], device=device).repeat_interleave(n, 0)
    if seeds is not None and len(seeds) != prompt_ids.shape[0]:
        raise ValueError(f"seeds has {len(seeds)} entries, expected {prompt_ids.shape[0]} (rows)")
    recorder = SamplerLogprobs(logprob_temperature)
    procs = [recorder, tf.TemperatureLogitsWarper(temperature)]
    procs += [tf.TopKLogitsWarper(top_k)] if top_k > 0 else []
    procs += [tf.TopPLogitsWarper(top_p)] if top_p < 1.0 else []
    procs.append(GumbelSampler(seeds))                             # argmax of noisy logits
    cfg = tf.GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.no_grad() if synced else torch.inference_mode():   # FSDP2 reuses buffers: no_grad
        seq = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                             generation_config=cfg, logits_processor=tf.LogitsProcessorList(procs),
                             synced_gpus=synced)
        recorder.collect(seq[:, -1])
    response_ids = seq[:, prompt_ids.shape[1]:].clone()           # (B*n, T); a normal tensor
    is_eos = response_ids == tokenizer.eos_token_id
    response_mask = ((is_eos.cumsum(-1) - is_eos.long()) == 0).long()   # up to the first eos
    truncated = ~is_eos.any(-1)
    if truncated.any() and response_ids.shape[1] < max_new_tokens:
        raise RuntimeError("generate stopped before max_new_tokens without an eos")
    logp_sampler = torch.stack(recorder.out[:response_ids.shape[1]], 1).clone() * response_mask
    response_ids = torch.where(response_mask.bool(), response_ids, tokenizer.pad_token_id)
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                response_mask=response_mask, truncated=truncated, logp_sampler=logp_sampler)


def student_logprobs(student, part, args):
    """s_it of a micro-batch, with gradient, at the student's log-prob temperature: one prompt pass
    per group when rollouts share a prompt (a KV cache, which gradient checkpointing cannot keep).
    """
    if rollouts_per_prompt(args) > 1 and not args.gradient_checkpointing:
        return shared_prompt_logprobs(student, part, part["groups"], logprob_temperature(args))
    return sequence_logprobs(student, part, logprob_temperature(args))


def score_logprobs(model, batch, groups, max_tokens, temperature=1.0):
    """Teacher (or GRPO reference) log-probs of the student's response tokens, no grad, in
    token-budget micro-batches with one prompt pass per group. A failure raises: it never becomes a
    number (the official client's zero-fill would give a failed rollout the largest teacher weight).
    -> (B, T)."""
    ids = batch["response_ids"]
    logp = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    for sl in micro_batches(batch, max_tokens):
        part = trim({k: v[sl] for k, v in batch.items()})
        with torch.inference_mode():
            lp = shared_prompt_logprobs(model, part, groups[sl], temperature)
        logp[sl, :lp.shape[1]] = lp.clone()                        # (b, t), out of inference mode
    if not torch.isfinite(logp[batch["response_mask"].bool()]).all():
        raise RuntimeError("teacher scoring returned non-finite log-probs")
    return logp                                                    # (B, T)


# --------------------------------------------------------------------------------------------------
# 4. Config
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Args:
    preset: str = "tiny"
    """tiny: the offline embedded default (its own task and models); paper: the paper's setup"""
    method: str = "scope"
    """scope | opd | grpo | kd | psr (positive sample reinforcement, section 2.1)"""
    grader: str = "verify"
    """training reward: verify (the last box, is_equiv) | official (the released string match)"""
    student: str = ""
    """student model: local path or Hugging Face id; empty: the tiny student"""
    teacher: str = ""
    """teacher model sharing the student's tokenizer: local path or Hugging Face id; empty: tiny"""
    data: str = ""
    """training problems: .jsonl (problem, answer) file(s) or a Hugging Face dataset; empty: tiny"""
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
    """token budget of one student forward/backward: rows x (prompt + response), padded"""
    score_tokens: int = 1024
    """token budget of one teacher / reference forward (no grad)"""
    rollout_tokens: int = 0
    """hf engine: KV budget of a generate call, rows x (prompt + max_new_tokens); 0: one call"""
    rollout_engine: str = "hf"
    """hf: transformers generate (exact per-rollout seeds); vllm: a colocated vLLM engine a rank"""
    vllm_gpu_memory: float = 0.3
    """vllm engine: the GPU share of its weights and KV cache while awake (CPU build: 256 MiB KV)"""
    vllm_quantization: str = ""
    """vllm engine: quantise its copy of the student, e.g. fp8 (the sampler gap then includes it)"""
    max_prompt_tokens: int = 2048
    """longest prompt: longer training problems are left out at load (vllm: + max_new_tokens)"""
    rollout_is_cap: float = 0.0
    """truncated importance sampling: each token's loss x min(pi_trainer / pi_sampler, C); 0: off"""
    max_sampler_gap: float = 0.5
    """stop when the mean |log pi_sampler - log pi_trainer| per token exceeds this (0: off)"""
    max_new_tokens: int = 64
    """response length limit; a response that reaches it is truncated and gets reward 0"""
    temperature: float = 1.0
    """sampling temperature"""
    top_p: float = 1.0
    """nucleus sampling"""
    top_k: int = 0
    """top-k sampling (0: off)"""
    seeded_sampling: bool = True
    """per-rollout seeds (the same rollouts on any number of ranks); off: torch's RNG"""
    logprob_temperature: str = "one"
    """one: the student's log-probs at T=1 (pi_theta); sampling: at the sampling T (official)"""
    lr: float = 3e-4
    """AdamW learning rate, constant (paper 5e-5; tiny 3e-4: 1e-3 knocks the tiny student down)"""
    weight_decay: float = 0.01
    """AdamW weight decay"""
    grad_clip: float = 1.0
    """max gradient norm (0: no clipping)"""
    path_grad_norms: bool = False
    """scope: log its two paths' gradient norms (one more backward per micro-batch; one process)"""
    tau: float = 1.0
    """SCOPE weight temperature (eq. 4-5)"""
    weights_logprobs: str = "sampler"
    """pi_old's log-probs for eq. 4: sampler (its own) | trainer (recomputed first: released code)"""
    rank_split: str = "prompts"
    """torchrun: prompts (rank r: prompts r, r + W, ...) | balanced (by tokens: released trainer)"""
    weight_norm: str = "sum"
    """sum: weights sum to 1 per (prompt, path) (eq. 4-5); mean: they average 1 (official code)"""
    student_weight: str = "paper"
    """the student weight's direction: paper, ~ PPL_S^(1/tau) (eq. 4); reversed; uniform"""
    teacher_weight: str = "paper"
    """the teacher weight's direction: paper, ~ PPL_T^(-1/tau) (eq. 5); reversed; uniform"""
    loss_agg: str = "paper"
    """paper: eq. 6, token sums over prompts; token: the official token-mean over global counts;
    official-microbatch: the released update (token means per balanced micro-batch)"""
    recipe: str = "paper"
    """paper: the paper's equations; official: the released scripts' recipe (docs/method.md)"""
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
    """torch CPU threads per process and for the tiny build (1: under load 2 run slower)"""
    dtype: str = "float32"
    """compute dtype, float32 | bfloat16 (the student's weights and AdamW state stay fp32)"""
    dist_timeout: float = 3600.0
    """torchrun: seconds a collective waits for the slowest rank (NCCL's own default: 600)"""
    memory_check: bool = True
    """stop before loading when the memory plan predicts the layout will not fit (false: warn)"""
    gradient_checkpointing: bool = False
    """recompute activations in the student's backward pass (long responses on GPUs)"""


PRESETS = {
    "tiny": {},
    # The paper's setup (docs/method.md): 256 prompts x 8 rollouts, one update a batch, lr 5e-5, wd
    # 0.01, T 0.6. Budgets: docs/gpu.md; vLLM's 0.4 holds a quarter of a rank's rollouts at once.
    "paper": dict(student="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", teacher="Skywork/Skywork-OR1-7B",
                  data="zwhe99/DeepMath-103K", max_prompt_tokens=4096, instruction="Please reason step "
                  "by step, and put your final answer within \\boxed{}.", prompts_per_step=256, steps=500,
                  max_new_tokens=12288, temperature=0.6, lr=5e-5, seeded_sampling=False, eval_every=0,
                  save_every=20, dtype="bfloat16", cache_dir="", gradient_checkpointing=True,
                  micro_batch_tokens=32768, score_tokens=65536, rollout_tokens=1 << 20,
                  rollout_engine="vllm", vllm_gpu_memory=0.4),
}

# --recipe official: the released scripts (machine981/SCOPE): their weights' signs and mean 1, from
# the trainer's log-probs; token means per micro-batch, micro-batches balanced to 16,384 tokens a GPU,
# ranks balanced by tokens; student log-probs at the sampling temperature 0.6; their grader.
OFFICIAL_RECIPE = dict(weight_norm="mean", student_weight="reversed", teacher_weight="paper",
                       temperature=0.6, loss_agg="official-microbatch", micro_batch_tokens=16384,
                       logprob_temperature="sampling", grader="official",
                       weights_logprobs="trainer", rank_split="balanced")


def resolve(given):
    """Args from a preset and the fields given (they win); a value no option takes: a ValueError."""
    preset, recipe = given.get("preset", "tiny"), given.get("recipe", "paper")
    _check_option("preset", preset, tuple(PRESETS))
    _check_option("recipe", recipe, ("paper", "official"))
    args = Args(**{**PRESETS[preset], **(OFFICIAL_RECIPE if recipe == "official" else {}), **given})
    _check_option("method", args.method, tuple(METHODS))
    _check_option("grader", args.grader, ("verify", "official"))
    _check_option("logprob_temperature", args.logprob_temperature, ("one", "sampling"))
    _check_option("dtype", args.dtype, ("float32", "bfloat16"))
    _check_option("rollout_engine", args.rollout_engine, ("hf", "vllm"))
    _check_option("weights_logprobs", args.weights_logprobs, ("sampler", "trainer"))
    _check_option("rank_split", args.rank_split, ("prompts", "balanced"))
    filtered = args.top_k > 0 or args.top_p < 1
    if args.rollout_engine == "vllm" and args.logprob_temperature == "sampling" and filtered:
        raise ValueError("--rollout-engine vllm with --logprob-temperature sampling cannot use "
                         "--top-k/--top-p: vLLM renormalises its log-probs over the kept tokens")
    no_sampler = METHODS[args.method].sampler == "teacher"
    if args.rollout_is_cap < 0 or (args.rollout_is_cap and no_sampler):
        raise ValueError(f"--rollout-is-cap {args.rollout_is_cap}: a cap > 0, and not with kd (its "
                         "samples are the teacher's: no student sampler to correct)")
    for name in ("steps", "prompts_per_step", "n_rollouts", "max_new_tokens"):
        if getattr(args, name) < 1:
            flag, value = name.replace("_", "-"), getattr(args, name)
            raise ValueError(f"--{flag} must be at least 1, got {value}")
    return args


def parse_args(argv=None):
    import cli  # every entry point's flags
    p, given = cli.dataclass_cli(Args, argv, "SCOPE training (one process or torchrun)")
    try:
        return resolve(given)
    except ValueError as e:                                        # a usage error, no traceback
        p.error(str(e))


# --------------------------------------------------------------------------------------------------
# 5. The loop: one code path for one process and for torchrun (gloo on CPU, NCCL on GPU)
# --------------------------------------------------------------------------------------------------
def train(args):
    """One training run: ranks, device, seeds; one run per output directory (kill -9 frees it)."""
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    rt = setup(args)                                               # ranks, device, seeds (ranks.py)
    lock = OutDirLock(Path(args.out_dir), rt)                      # a second run into it stops here
    try:
        return loop(args, rt)
    finally:
        lock.release()


def prepare(args, rt, out, say):
    """The loop's setup: inputs checked, the memory plan, the models (the student sharded by FSDP2
    under torchrun), AdamW, the checkpoint to resume. -> (start step, models, optimizer, data)."""
    method = METHODS[args.method]
    ckpt, student_name, teacher_name, rows, test_rows = run_inputs(args, rt, out, say)
    memory.print_plan(args, rt, student_name, teacher_name, say)   # the estimate, before loading
    uses_teacher = "teacher" in (method.scorer, method.sampler)
    reference = method.scorer == "reference" and args.grpo_kl_coef > 0
    tokenizer, student, teacher, ref = load_models(args, rt, student_name, teacher_name, ckpt,
                                                   uses_teacher, reference)
    if rt.fsdp:                                                    # FSDP2: fp32 shards (ranks.py)
        student = shard(student, args.dtype)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    start = resume(ckpt, student, opt, rt, out) if ckpt else 0
    rows = drop_long_prompts(rows, tokenizer, lambda p: prompt_text(tokenizer, p, args.instruction),
                             args.max_prompt_tokens, say)
    if rt.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(args), indent=1))
        (out / "metrics.jsonl").open("a" if ckpt else "w").close()
    say(f"resumed from {ckpt} at step {start}" if ckpt else f"training from step 0 into {out}")
    return start, (tokenizer, student, teacher, ref), opt, (student_name, rows, test_rows)


def loop(args, rt):
    """The SCOPE loop: sample N rollouts per prompt, verify, score with the teacher, one update."""
    from tqdm import tqdm
    say = print if rt.rank == 0 else (lambda *a, **k: None)
    out, method = Path(args.out_dir), METHODS[args.method]
    start, (tokenizer, student, teacher, ref), opt, (student_name, rows, test_rows) = prepare(
        args, rt, out, say)
    engine = contextlib.nullcontext()                              # hf: generate (section 3)
    if args.rollout_engine == "vllm" and method.sampler == "student":   # imports vllm
        import vllm_engine
        engine = vllm_engine.rollouts(args, rt, student_name)      # closed on an error, woken first
    with engine as engine:
        kd_cache, n = {}, rollouts_per_prompt(args)
        bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=args.method,
                   disable=rt.rank != 0)
        for step in bar:
            idx = step_prompts(step, len(rows), args.prompts_per_step, args.seed)   # global batch
            my = list(range(rt.rank, len(idx), rt.world))          # this rank's positions in it
            # 1. N rollouts a prompt, with pi_old's log-probs
            t = {"time/generate": time.time()}
            batch = sample_rollouts(args, rt, step, student, teacher, tokenizer, rows, idx, my,
                                    kd_cache, engine)
            # 2. R_i; each row's prompt, one id per prompt of the global batch
            t["time/verify"] = time.time()
            golds = [rows[idx[j]]["answer"] for j in my]
            batch["rewards"] = verify_rollouts(tokenizer, batch, golds, n, rt.device, args.grader)
            batch["groups"] = torch.tensor(my, device=rt.device).repeat_interleave(n)   # (B*n,)
            # 3. T_it, the teacher's log-probs (GRPO: the initial student's, at its temperature)
            t["time/score"] = time.time()
            if method.scorer == "teacher":
                batch["logp_teacher"] = score_logprobs(teacher, batch, batch["groups"],
                                                       args.score_tokens)
            if ref is not None:
                batch["logp_ref"] = score_logprobs(ref, batch, batch["groups"], args.score_tokens,
                                                   logprob_temperature(args))
            # 4. the weights (eq. 4-5) and one update (eq. 6)
            t["time/update"] = time.time()
            record, sums = update_student(args, rt, student, opt, batch)
            # 5. log, evaluate, checkpoint
            t["end"] = time.time()
            record = log_step(step, record, sums, batch, t, rt.device)
            last = step + 1 == args.steps
            if test_rows and args.eval_every and ((step + 1) % args.eval_every == 0 or last):
                record.update(evaluate(student, tokenizer, test_rows, args.eval_k, args,
                                       (args.seed, "eval"), rt))
            if rt.rank == 0:
                with (out / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.set_postfix(reward=f"{record['train/reward_mean']:.2f}",
                                loss=f"{record['loss']:.3f}")
            if (args.save_every and (step + 1) % args.save_every == 0) or last:
                save_checkpoint(out, step + 1, student, tokenizer, opt, args, rt)
    if rt.own_group:
        torch.distributed.destroy_process_group()
    return student


def sample_rollouts(args, rt, step, student, teacher, tokenizer, rows, idx, my, kd_cache,
                    engine=None):
    """Phase 1: N rollouts per prompt from the student (KD: the teacher's, made once), from the vLLM
    engine or from generate calls whose KV cache fits rollout_tokens, as many on every rank."""
    if METHODS[args.method].sampler == "teacher":
        return teacher_samples(args, rt, teacher, tokenizer, rows, idx, my, kd_cache)
    prompts = [prompt_text(tokenizer, rows[idx[j]]["problem"], args.instruction) for j in my]
    n = args.n_rollouts
    if engine is not None:
        seeds = row_seeds(args.seed, step, [(j,) for j in my]) if args.seeded_sampling else None
        return engine.generate(student, tokenizer, prompts, n, seeds, rt.device)
    prompt_len = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    longest = prompt_len + args.max_new_tokens
    per_call = max(1, args.rollout_tokens // (longest * n)) if args.rollout_tokens else len(my)
    calls = int(all_reduce([math.ceil(len(my) / per_call)], rt.device, "max")[0])
    out = []
    for part in torch.arange(len(my), device="cpu").tensor_split(calls):   # contiguous, near equal
        part = part.tolist()
        seeds = row_seeds(args.seed, step, [(my[q], i) for q in part for i in range(n)])
        with rt.amp():
            out.append(generate(student, tokenizer, [prompts[q] for q in part], n,
                                args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                                seeds if args.seeded_sampling else None, logprob_temperature(args),
                                rt.fsdp))
    return {k: pad_cat([o[k] for o in out], k, tokenizer.pad_token_id) for k in out[0]}


def teacher_samples(args, rt, teacher, tokenizer, rows, idx, my, kd_cache):
    """KD's rollouts: the teacher's own samples of each prompt, generated once and cached."""
    m, new = args.kd_samples, [j for j in my if idx[j] not in kd_cache]
    if new:
        prompts = [prompt_text(tokenizer, rows[idx[j]]["problem"], args.instruction) for j in new]
        seeds = row_seeds(args.seed, "kd", [(idx[j], i) for j in new for i in range(m)])
        b = generate(teacher, tokenizer, prompts, m, args.max_new_tokens, args.temperature,
                     args.top_p, args.top_k, seeds if args.seeded_sampling else None)
        for q, j in enumerate(new):
            kd_cache[idx[j]] = {k: v[q * m:(q + 1) * m].cpu() for k, v in b.items()}
    parts = [kd_cache[idx[j]] for j in my]
    return {k: pad_cat([p[k] for p in parts], k, tokenizer.pad_token_id).to(rt.device)
            for k in parts[0]}


def batch_weights(args, batch):
    """Phase 4a, on the whole batch before any micro-batching: SCOPE's weights (eq. 4-5) from pi_old's
    log-probs (the sampler's, or the trainer's own) and the teacher's; a baseline's own per-row
    inputs (uniform weights, GRPO's advantages: baselines.py). -> {name: (B,) tensor}."""
    baseline = METHODS[args.method].baseline
    if baseline:
        return baseline.rows(args, batch)
    pi_old = batch["logp_old"] if args.weights_logprobs == "trainer" else batch["logp_sampler"]
    w = scope_weights(pi_old, batch["logp_teacher"], batch["response_mask"],
                      batch["groups"], batch["rewards"], args.tau, args.weight_norm,
                      args.student_weight, args.teacher_weight)
    return {"weights": w}


def update_student(args, rt, student, opt, batch):
    """Phase 4, one optimizer step (eq. 6). The weights (eq. 4-5) and the loss's denominators come
    first, on whole groups; then the batch is cut into micro-batches within micro_batch_tokens (a
    cut may split a group), each a forward (s_it, with gradient), the loss and a backward.
    -> (the update's metrics, the sums log_step adds)."""
    if args.weights_logprobs == "trainer":                         # pi_old recomputed, no gradient
        batch["logp_old"] = torch.zeros_like(batch["logp_sampler"])
        with torch.no_grad(), rt.amp():
            for rows in split_batch(args, rt, batch):              # as many on every rank (FSDP2)
                lp = student_logprobs(student, trim({k: v[rows] for k, v in batch.items()}), args)
                batch["logp_old"][rows, :lp.shape[1]] = lp.float()
    batch.update(batch_weights(args, batch))                       # eq. 4-5, on whole groups
    local = batch_counts(batch["response_mask"], batch["rewards"], batch["groups"],
                         group_size=rollouts_per_prompt(args))
    counts = dict(zip(local, all_reduce(local.values(), rt.device)))   # the global batch's
    if args.rank_split == "balanced":                              # the released trainer's split
        batch = balanced_ranks(batch, rt)
    baseline = METHODS[args.method].baseline                       # None: SCOPE; else baselines.py
    log = UpdateLog(args, rt, student, batch, METHODS[args.method])   # sums, alarms, path norms
    parts = split_batch(args, rt, batch)                           # as many on every rank (FSDP2)
    student.train()
    for j, rows in enumerate(parts):
        part = trim({k: v[rows] for k, v in batch.items()})        # a micro-batch, unpadded
        sync_gradients(student, rt, last=j == len(parts) - 1)      # FSDP2: reduce-scatter once
        with rt.amp():
            logp = student_logprobs(student, part, args)           # (b, t) s_it, with gradient
        tw = None if not args.rollout_is_cap else log.keep_is(*truncated_is_weights(
            logp, part["logp_sampler"], part["response_mask"], args.rollout_is_cap))   # IS, capped
        if baseline:                                               # OPD, PSR, GRPO, KD (baselines)
            loss, m = baseline.loss(logp, part, counts, args, tw)
        else:                                                      # eq. 6 with the batch's weights
            loss, m = scope_loss(logp, logp.detach(), part["logp_teacher"], part["response_mask"],
                                 part["rewards"], part["weights"], group_ids=part["groups"],
                                 counts=counts, agg=args.loss_agg, token_weights=tw)
        if log.paths:                                              # --path-grad-norms: the MLE path
            log.paths.add(scope_loss(logp, logp.detach(), part["logp_teacher"],
                                     part["response_mask"], part["rewards"],
                                     part["weights"] * part["rewards"], group_ids=part["groups"],
                                     counts=counts, agg=args.loss_agg, token_weights=tw)[0])
        (loss * rt.world).backward()                               # wrappers average ranks: undo it
        log.add(m, logp, part)
    log.before_step(batch)                                         # stale weights stop it here
    grad_norm = clip_grad_norm(student, args.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)                                # free the gradients now
    student.eval()
    return log.record(grad_norm)


def evaluate(model, tokenizer, rows, k, args, seed_key, rt):
    """Avg@k and Pass@k (k samples a problem: some sample correct) per level (rows' "level") and
    overall, sampling as in training. Under torchrun every rank samples a shard of the problems."""
    mine = list(range(rt.rank, len(rows), rt.world))
    calls = int(all_reduce([math.ceil(len(mine) / 16)], rt.device, "max")[0])   # as many a rank
    levels = sorted({r.get("level", "all") for r in rows})
    hist = {lv: [0.0] * (k + 1) for lv in levels}                  # per level: c correct, c = 0..k
    shards = torch.tensor(mine, dtype=torch.long, device="cpu").tensor_split(max(calls, 1))
    for part in (p.tolist() for p in shards):
        prompts = [prompt_text(tokenizer, rows[i]["problem"], args.instruction) for i in part]
        seeds = row_seeds(seed_key, [i * k + j for i in part for j in range(k)])
        with rt.amp():
            b = generate(model, tokenizer, prompts, k, args.max_new_tokens, args.temperature,
                         args.top_p, args.top_k, seeds if args.seeded_sampling else None,
                         synced=rt.fsdp)
        texts, cut = decode_responses(tokenizer, b), b["truncated"].tolist()
        for q, i in enumerate(part):
            c = sum(verifier.reward(texts[q * k + j], rows[i]["answer"], cut[q * k + j])
                    for j in range(k))
            hist[rows[i].get("level", "all")][int(c)] += 1
    flat = all_reduce([x for lv in levels for x in hist[lv]], rt.device)
    return avg_pass({lv: flat[i * (k + 1):(i + 1) * (k + 1)] for i, lv in enumerate(levels)}, k)


if __name__ == "__main__":
    train(parse_args())

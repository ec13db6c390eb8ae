"""The runtime under scope.py's loop: ranks and devices, seeds, FSDP2, the one collective on data (all_reduce), token-
budget micro-batches, the step's log record, and small helpers the vLLM engine shares.

Engineering a reader of the method can take on trust: scope.py calls each of these in one line and says why there.
Nothing here imports a project module, so scope.py, vllm_engine.py and checkpoints.py can all import it.
"""

import contextlib
import dataclasses
import hashlib
import math
import os
import random
import types

import numpy as np
import torch


def setup(args):
    """Ranks, device, seeds. -> a namespace: rank, world, device, fsdp (launched by torchrun: the student is sharded),
    amp (the student's compute-dtype context), own_group (this call started the process group)."""
    import torch.distributed as dist
    launched = int(os.environ.get("RANK", -1)) != -1                 # torchrun sets RANK
    own_group = launched and not dist.is_initialized()              # a caller (reproduce.py) may hold the group
    if own_group:
        init_group(args.dist_timeout)
    rank, world = (dist.get_rank(), dist.get_world_size()) if launched else (0, 1)
    if args.prompts_per_step % world:
        raise SystemExit(f"--prompts-per-step {args.prompts_per_step} is not a multiple of the {world} ranks")
    if args.path_grad_norms and launched:
        raise SystemExit("--path-grad-norms works in one process only (FSDP2 shards the gradients it compares)")
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed + rank)
    random.seed(args.seed + rank)
    np.random.seed((args.seed + rank) % 2**32)                        # vLLM draws unseeded requests' seeds from it
    autocast = args.dtype != "float32" and not launched              # FSDP2 casts by itself (mixed precision)
    amp = (lambda: torch.autocast(device.type, getattr(torch, args.dtype))) if autocast else contextlib.nullcontext
    if rank == 0:
        print("config:\n" + "\n".join(f"  {k:22s} {v}" for k, v in dataclasses.asdict(args).items()), flush=True)
    return types.SimpleNamespace(rank=rank, world=world, device=device, fsdp=launched, amp=amp, own_group=own_group)


def init_group(timeout_s=3600.0):
    """The torchrun process group: NCCL on GPUs, gloo on CPUs, with a timeout for every collective. The default 10
    minutes of NCCL's watchdog is shorter than the spread of rollout time between ranks at the paper's 12,288 tokens
    (a rank that is still sampling would be taken for a dead one)."""
    import datetime
    import torch.distributed as dist
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s))


def all_reduce(values, device, op="sum"):
    """Sum (or max) a list of numbers over ranks. EVERY collective on data goes through here, on the loop's device:
    an NCCL process group has no CPU backend ("No backend type associated with device type cpu")."""
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def single_process(device="cpu"):
    """The runtime namespace of one plain process (what setup returns without torchrun), for code outside the loop."""
    return types.SimpleNamespace(rank=0, world=1, device=torch.device(device), fsdp=False, amp=contextlib.nullcontext,
                                 own_group=False)


def shard(model, dtype):
    """FSDP2: one unit per decoder layer, then the root. Parameters (master weights), gradients and AdamW state stay
    fp32 and sharded over ranks; each unit is gathered in `dtype` for compute; gradients reduce in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    return fully_shard(model, mp_policy=mp)


def balanced_micro_batches(batch, max_tokens, count=None):
    """The released recipe's micro-batches (verl's dynamic batching, use_dynamic_bsz): ceil(real tokens / max_tokens)
    of them, or `count` (the number every rank agreed on), with each row's real tokens (prompt + response, no padding)
    spread so that their sums are balanced; a micro-batch may exceed max_tokens, as in verl. verl balances with the
    largest differencing method (Karmarkar-Karp); this greedy rule (the longest row to the lightest micro-batch) can
    group rows differently, so an update made here differs from verl's only through that grouping.
    -> list of row-index tensors, each in row order."""
    lengths = (batch["prompt_mask"].sum(-1) + batch["response_mask"].sum(-1)).tolist()
    k = max(1, count or math.ceil(sum(lengths) / max_tokens))
    if k > len(lengths):
        raise ValueError(f"cannot split {len(lengths)} rows into {k} micro-batches (a budget of {max_tokens} tokens "
                         "is below one row's length)")
    load, parts = [0] * k, [[] for _ in range(k)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        j = min(range(k), key=lambda j: (load[j], j))
        parts[j].append(i)
        load[j] += lengths[i]
    return [torch.tensor(sorted(p), dtype=torch.long, device="cpu") for p in parts]


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
            u = torch.stack([torch.rand(scores.shape[-1], generator=g, dtype=torch.float64, device="cpu")
                             for g in self.gens])
        return scores + (-torch.log(-torch.log(u.clamp(1e-300, 1 - 1e-16)))).to(scores.device, scores.dtype)  # (B, V)


def pad_cat(tensors, key, pad_id):
    """Concatenate rollout tensors of different widths (prompts left-padded, responses right-padded)."""
    if tensors[0].dim() == 1:
        return torch.cat(tensors)
    width = max(t.shape[1] for t in tensors)
    fill = pad_id if key.endswith("_ids") else 0
    left = key.startswith("prompt")
    return torch.cat([torch.nn.functional.pad(t, (width - t.shape[1], 0) if left else (0, width - t.shape[1]), value=fill)
                      for t in tensors])


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


def tied_names(model):
    """Parameter names that alias another parameter (a tied output layer: lm_head.weight = embed_tokens.weight)."""
    return {k for k, _ in model.named_parameters(remove_duplicate=False)} - {k for k, _ in model.named_parameters()}


def clip_grad_norm(model, max_norm):
    """Clip the gradient to max_norm (0: no clipping) and return its norm before clipping as a float (FSDP2: the
    norm comes back as a DTensor, made whole here)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or math.inf)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def check_sampler_gap(gap, tokens, limit):
    """The stale-weight alarm: stop before the optimizer step when the mean |log pi_sampler - log pi_trainer| per
    sampled token (summed over ranks) exceeds limit (0: off), so no update is made from such samples."""
    if limit and gap / max(tokens, 1.0) > limit:
        raise RuntimeError(f"rollout/sampler_gap {gap / max(tokens, 1.0):.3f} nats per token > --max-sampler-gap "
                           f"{limit}: the rollouts were sampled from other weights than the trainer's (stale engine "
                           "weights after a sync?); no update was made")


class PathGradNorms:
    """--path-grad-norms: the gradient norms of SCOPE's two paths. add() takes the loss of the MLE path alone on each
    micro-batch (one more backward); norms() splits the accumulated total gradient into that and the rest (OPD)."""

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.mle = [torch.zeros_like(p) for p in self.params]

    def add(self, loss_mle):
        for acc, g in zip(self.mle, torch.autograd.grad(loss_mle, self.params, retain_graph=True, allow_unused=True)):
            acc += 0 if g is None else g

    def norms(self):                                                  # total = MLE path + OPD path, before clipping
        return {"train/grad_norm_mle": float(torch.stack([g.norm() for g in self.mle]).norm()),
                "train/grad_norm_opd": float(torch.stack([(p.grad - g).norm() for p, g in zip(self.params,
                                                                                              self.mle)]).norm())}


def split_batch(args, rt, batch):
    """The update's micro-batches, as many on every rank (FSDP2 runs the same forward passes everywhere): consecutive
    rows within micro_batch_tokens padded tokens, or, with the released normalisation, verl's balanced ones."""
    if args.loss_agg == "official-microbatch":
        count = balanced_micro_batches(batch, args.micro_batch_tokens)
        return balanced_micro_batches(batch, args.micro_batch_tokens,
                                              int(all_reduce([len(count)], rt.device, "max")[0]))
    parts = micro_batches(batch, args.micro_batch_tokens)
    return micro_batches(batch, args.micro_batch_tokens, int(all_reduce([len(parts)], rt.device, "max")[0]))


def summed_is_stats(stats, rt):
    """--rollout-is-cap's log: the trainer/sampler ratio's mean and max over every token of every rank, and the
    fraction of tokens capped."""
    if not stats:
        return {}
    total, capped, tokens = all_reduce([sum(s["sum"] for s in stats), sum(s["capped"] for s in stats),
                                        sum(s["tokens"] for s in stats)], rt.device)
    return {"rollout/is_ratio_mean": total / max(tokens, 1.0), "rollout/is_capped_frac": capped / max(tokens, 1.0),
            "rollout/is_ratio_max": all_reduce([max(s["max"] for s in stats)], rt.device, "max")[0]}


def summed_logs(logs, rt):
    """The micro-batches' metrics: losses summed over micro-batches and ranks (their normalisers are global, so the
    sum is the batch's loss), the rest averaged over this rank's micro-batches. "loss" is the total."""
    losses = {k: sum(m[k] for m in logs) for k in logs[0] if k.startswith("loss/")}
    record = {k: sum(m[k] for m in logs) / len(logs) for k in logs[0]}
    record.update(zip(losses, all_reduce(losses.values(), rt.device)))
    return {**record, "loss": sum(record[k] for k in losses)}


def log_step(step, record, batch, t, device):
    """Phase 5: the step's JSON record, with batch statistics summed over ranks (docs/training.md: logging keys)."""
    mask = batch["response_mask"]
    r_sum, rows, trunc, tok, nll, gap = all_reduce([batch["rewards"].sum(), mask.shape[0], batch["truncated"].sum(),
                                                    mask.sum(), record.pop("_nll"), record.pop("_gap")], device)
    phases = ["time/generate", "time/verify", "time/score", "time/update", "end"]
    times = {k: t[nxt] - t[k] for k, nxt in zip(phases, phases[1:])}
    record = {"step": step + 1, **record, "train/reward_mean": r_sum / rows, "rollout/truncated_frac": trunc / rows,
              "rollout/mean_len": tok / rows, "rollout/nll_student": nll / max(tok, 1.0),
              "perf/tokens_per_s": tok / max(sum(times.values()), 1e-9), **times}
    return record if math.isnan(gap) else {**record, "rollout/sampler_gap": gap / max(tok, 1.0)}

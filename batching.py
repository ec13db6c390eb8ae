"""Batching under scope.py's loop: a step's rollouts as one padded batch (pad_cat), its rows cut into micro-batches
that fit a token budget (micro_batches; the released recipe's balanced ones, balanced_micro_batches), and the padding
columns dropped from a micro-batch (trim). It imports no project module but ranks.py (the micro-batch count every
rank agrees on).
"""

import math

import torch

from ranks import all_reduce

RESPONSE_KEYS = ("response_ids", "response_mask", "logp_sampler", "logp_teacher", "logp_ref")   # (B, T) tensors


def pad_cat(tensors, key, pad_id):
    """Concatenate rollout tensors of different widths (prompts left-padded, responses right-padded)."""
    if tensors[0].dim() == 1:
        return torch.cat(tensors)
    width = max(t.shape[1] for t in tensors)
    fill = pad_id if key.endswith("_ids") else 0
    left = key.startswith("prompt")
    return torch.cat([torch.nn.functional.pad(t, (width - t.shape[1], 0) if left else (0, width - t.shape[1]),
                                              value=fill) for t in tensors])


def trim(batch):
    """Drop the columns that are padding in every row (prompt on the left, response on the right), and `truncated`."""
    p0 = int((batch["prompt_mask"].sum(0) > 0).nonzero()[0]) if batch["prompt_mask"].any() else 0
    width = max(int(batch["response_mask"].sum(-1).max()), 1)
    out = {k: v for k, v in batch.items() if k not in ("truncated",)}
    out.update({k: batch[k][:, p0:] for k in ("prompt_ids", "prompt_mask")})
    out.update({k: batch[k][:, :width] for k in RESPONSE_KEYS if k in batch})
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


def split_batch(args, rt, batch):
    """The update's micro-batches, as many on every rank (FSDP2 runs the same forward passes everywhere): consecutive
    rows within micro_batch_tokens padded tokens, or, with the released normalisation, verl's balanced ones."""
    if args.loss_agg == "official-microbatch":
        count = balanced_micro_batches(batch, args.micro_batch_tokens)
        return balanced_micro_batches(batch, args.micro_batch_tokens,
                                      int(all_reduce([len(count)], rt.device, "max")[0]))
    parts = micro_batches(batch, args.micro_batch_tokens)
    return micro_batches(batch, args.micro_batch_tokens, int(all_reduce([len(parts)], rt.device, "max")[0]))

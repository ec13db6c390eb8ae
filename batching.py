"""Batching under scope.py's loop: a step's rollouts as one padded batch (pad_cat), its rows cut into micro-batches
that fit a token budget (micro_batches), the padding columns dropped from a micro-batch (trim), and the released
recipe's balanced partitions (karmarkar_karp, as verl's get_seqlen_balanced_partitions: its micro-batches and its
split of the batch over ranks). It imports no project module but ranks.py (the count every rank agrees on, and the
rows ranks exchange for the balanced rank split).
"""

import heapq
import math

import torch

from ranks import all_gather_objects, all_reduce

RESPONSE_KEYS = ("response_ids", "response_mask", "logp_sampler", "logp_teacher", "logp_ref", "logp_old")   # (B, T)


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


class _Part:
    """One part of a partition being built: its rows as (index, length) in the order they joined, and their sum.
    Parts order by (sum, number of rows, rows), as verl's do."""

    def __init__(self, rows=()):
        self.rows, self.sum = list(rows), sum(n for _, n in rows)

    def key(self):
        return self.sum, len(self.rows), self.rows


class _Partial:
    """A partition of some rows into k parts, heaviest first. On the heap, the one with the largest spread (heaviest
    - lightest part) comes first, then the one whose heaviest part is heavier."""

    def __init__(self, parts):
        self.parts = sorted(parts, key=_Part.key, reverse=True)

    def __lt__(self, other):
        a, b = self.parts, other.parts
        spread_a, spread_b = a[0].sum - a[-1].sum, b[0].sum - b[-1].sum
        return spread_a > spread_b if spread_a != spread_b else a[0].key() > b[0].key()


def karmarkar_karp(lengths, k, equal_size=False):
    """Balanced partition of rows by length into k parts: the largest differencing method (Karmarkar-Karp), with the
    rules of verl's get_seqlen_balanced_partitions (the released recipe's dynamic batching and rank balancing).
    Rows start sorted by (length, index); each starts a partial partition of its own (equal_size: each run of k
    rows in that order starts one, a row per part, so every part ends with len / k rows). The two partials first in
    heap order (_Partial) merge, the heaviest part of one with the lightest of the other, until one is left.
    -> k lists of row indices, each in row order, the heaviest part first."""
    if len(lengths) < k:
        raise ValueError(f"cannot split {len(lengths)} rows into {k} parts")
    rows = sorted((n, i) for i, n in enumerate(lengths))
    if equal_size and len(rows) % k:
        raise ValueError(f"{len(rows)} rows do not split into {k} parts of equal size")
    step = k if equal_size else 1
    heap = [_Partial([_Part([(i, n)]) for n, i in rows[s:s + step]] + [_Part() for _ in range(k - step)])
            for s in range(0, len(rows), step)]
    heapq.heapify(heap)
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        merged = [_Part(x.rows + y.rows) for x, y in zip(a.parts, reversed(b.parts))]
        heapq.heappush(heap, _Partial(merged))
    return [sorted(i for i, _ in part.rows) for part in heap[0].parts]


def real_tokens(batch):
    """Each row's real tokens, prompt + response without padding (verl's attention_mask sums). -> list of ints."""
    return (batch["prompt_mask"].sum(-1) + batch["response_mask"].sum(-1)).tolist()


def balanced_micro_batches(batch, max_tokens, count=None):
    """The released recipe's micro-batches (verl's dynamic batching, rearrange_micro_batches): ceil(real tokens /
    max_tokens) of them, or `count` (the number every rank agreed on: verl all-reduces it with MAX), partitioned by
    karmarkar_karp; a micro-batch may exceed max_tokens, as in verl. -> row-index tensors, in verl's order."""
    lengths = real_tokens(batch)
    k = max(1, count or math.ceil(sum(lengths) / max_tokens))
    if k > len(lengths):
        raise ValueError(f"cannot split {len(lengths)} rows into {k} micro-batches (a budget of {max_tokens} tokens "
                         "is below one row's length)")
    return [torch.tensor(p, dtype=torch.long, device="cpu") for p in karmarkar_karp(lengths, k)]


def rank_shards(lengths, world):
    """The released trainer's split of the global batch over ranks (ray_trainer._balance_batch): karmarkar_karp into
    `world` parts of equal size over the rows' real tokens, in the global batch's order; rank r takes part r (the
    batch reordered part after part, then cut into equal contiguous chunks). -> world lists of global row indices."""
    return karmarkar_karp(lengths, world, equal_size=True)


def balanced_ranks(batch, rt):
    """--rank-split balanced: this rank's rows after the released trainer's rank split. Every rank sends its rows (a
    prompt's whole group each, prompts r, r + W, ... as the loop sampled them, with what was computed on whole groups:
    the weights) to every rank; the global batch is put in prompt order (batch["groups"] is the prompt's position in
    it), split by rank_shards, and this rank keeps its part, in global order. -> a batch of this rank's new rows."""
    every = all_gather_objects({k: v.cpu() for k, v in batch.items()})
    whole = {k: pad_cat([b[k] for b in every], k, 0) for k in batch}   # padding is never read: the masks decide
    order = torch.sort(whole["groups"], stable=True).indices          # prompt order; a group's rows in their order
    whole = {k: v[order] for k, v in whole.items()}
    mine = torch.tensor(rank_shards(real_tokens(whole), rt.world)[rt.rank], dtype=torch.long, device="cpu")
    return {k: v[mine].to(batch[k].device) for k, v in whole.items()}


def split_batch(args, rt, batch):
    """The update's micro-batches, as many on every rank (FSDP2 runs the same forward passes everywhere): consecutive
    rows within micro_batch_tokens padded tokens, or, with the released normalisation, verl's balanced ones."""
    if args.loss_agg == "official-microbatch":
        count = balanced_micro_batches(batch, args.micro_batch_tokens)
        return balanced_micro_batches(batch, args.micro_batch_tokens,
                                      int(all_reduce([len(count)], rt.device, "max")[0]))
    parts = micro_batches(batch, args.micro_batch_tokens)
    return micro_batches(batch, args.micro_batch_tokens, int(all_reduce([len(parts)], rt.device, "max")[0]))

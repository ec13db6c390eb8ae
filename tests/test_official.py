"""The authors' released update (machine981/SCOPE @ 085fdc2, a verl fork), re-derived here in float64 from reading
its source: ray_trainer._compute_scope_dual_path_weights (the weights), compute_advantage (A = w_tea (T - o) on
incorrect rollouts), dp_actor.update_policy (the MLE term over tokens of correct rollouts whose weight is above 0, the
micro-batch loss scaled by its share of the mini-batch), core_algos.compute_policy_loss / agg_loss (dual-clip PPO,
token mean) and torch_functional.masked_mean (sum / (count + 1e-8), with the released dtypes: an int64 response mask,
a float32 mask of correct tokens, so each count + 1e-8 is a float32), and the partitions of verl's seqlen_balancing
(Karmarkar-Karp over micro-batches and, in ray_trainer._balance_batch, over ranks). Written for this test from what
that code does, not copied. scope.py's official mode must give the same gradient on verl's partitions; the paper's
default (global counts) must not, and the test states by how much (docs/method.md)."""

import dataclasses
import math

import pytest
import torch

import batching
import loading
import logprobs
import scope


# ---------------------------------------------------------------------------- the released update, re-derived
def released_weights(old, teacher, mask, rewards, uid, tau, dtype=torch.float64):
    """Per (prompt, path): softmax(+mean log-prob / tau) x the path's size (both *_PPL_POSITIVE flags True, as the
    run scripts set them); the student path from the actor's old log-probs, the teacher path from the teacher's."""
    seq_len = mask.sum(-1).clamp(min=1)
    s_lp, t_lp = ((old * mask).sum(-1) / seq_len).to(dtype), ((teacher * mask).sum(-1) / seq_len).to(dtype)
    cw, ww = torch.zeros(len(rewards), dtype=dtype), torch.zeros(len(rewards), dtype=dtype)
    for u in uid.unique():
        for path, lp, out in ((rewards > 0, s_lp, cw), (rewards <= 0, t_lp, ww)):
            idx = ((uid == u) & path).nonzero().squeeze(1)
            if len(idx):
                out[idx] = torch.softmax(lp[idx] / tau, 0) * len(idx)
    return cw, ww


def released_micro_loss(logp, old, teacher, mask, cw, ww, rows_of_rank, clip=0.2, clip_c=3.0):
    """One micro-batch's loss in update_policy: dual-clip PPO on A = w_tea (T - o), token mean over every response
    token; plus the MLE term -log p x w_stu, token mean over tokens of rollouts with w_stu > 0; times len / mini-batch.
    """
    def masked_mean(x, m):                                           # as torch_functional.masked_mean
        return (x * m).sum() / (m.sum() + 1e-8)                      # an int or float32 mask: a float32 count
    adv = ww[:, None] * (teacher - old)                              # -kl_penalty(old, teacher, "kl") x w_tea
    ratio = torch.exp(logp - old)
    l1, l2 = -adv * ratio, -adv * torch.clamp(ratio, 1 - clip, 1 + clip)
    c1 = torch.maximum(l1, l2)
    pg = torch.where(adv < 0, torch.min(-adv * clip_c, c1), c1)
    assert mask.dtype == torch.int64                                 # the attention mask's slice, as released
    mle_mask = (cw > 0)[:, None].float() * mask.float()              # correct_token_mask, float32
    loss = masked_mean(pg, mask) + masked_mean(-logp * cw[:, None], mle_mask)
    return loss * (len(logp) / rows_of_rank)


def released_gradient(logp, old, teacher, mask, cw, ww, ranks):
    """ranks: per rank, its micro-batches as row-index tensors. The gradient summed over a rank's micro-batches,
    averaged over ranks (data parallel)."""
    logp = logp.detach().clone().requires_grad_()
    total = 0.0
    for parts in ranks:
        rows = sum(len(p) for p in parts)
        for p in parts:
            total = total + released_micro_loss(logp[p], old[p], teacher[p], mask[p].long(), cw[p], ww[p], rows)
    (total / len(ranks)).backward()
    return logp.grad


# ---------------------------------------------------------------------------- scope.py, the same partition
def scope_gradient(logp, teacher, mask, rewards, uid, w, ranks, n, agg):
    """scope.py's loop on this partition: counts of each rank's rows summed over ranks (all_reduce), each micro-batch's
    loss times the world size (the loop's backward), then the data-parallel average."""
    logp = logp.detach().clone().requires_grad_()
    counts = {}
    for parts in ranks:
        rows = torch.cat(parts)
        for k, v in scope.batch_counts(mask[rows], rewards[rows], uid[rows], group_size=n).items():
            counts[k] = counts.get(k, 0.0) + v
    total = 0.0
    for parts in ranks:
        for p in parts:
            loss, _ = scope.scope_loss(logp[p], logp[p].detach(), teacher[p], mask[p], rewards[p], w[p],
                                       group_ids=uid[p], counts=counts, agg=agg)
            total = total + loss * len(ranks)
    (total / len(ranks)).backward()
    return logp.grad


def batch(seed, prompts=8, n=8, length=24, spread=3.0):
    gen = torch.Generator().manual_seed(seed)
    b = prompts * n
    lengths = torch.randint(1, length + 1, (b,), generator=gen)
    mask = (torch.arange(length)[None] < lengths[:, None]).double()            # (B, L)
    old = -spread * torch.rand(b, length, generator=gen, dtype=torch.float64)
    teacher = -spread * torch.rand(b, length, generator=gen, dtype=torch.float64)
    rewards = torch.randint(0, 2, (b,), generator=gen).double()
    uid = torch.arange(prompts).repeat_interleave(n)
    return old, teacher, mask, rewards, uid


def kk_reference(lengths, k, equal_size=False):
    """Karmarkar-Karp as verl's seqlen_balancing runs it, written again for this test without a heap: rows sorted by
    (length, index) start partials of k parts (one row each, or k rows at a time with equal_size); each round the
    partials are ordered by spread (heaviest part - lightest) and then by their heaviest part's (sum, size, rows), and
    the first two merge, the i-th heaviest part of the first with the i-th lightest of the second, its rows appended."""
    def key(part):
        return sum(n for _, n in part), len(part), part

    def order(partial):
        return key(partial[0])[0] - key(partial[-1])[0], key(partial[0])

    rows, step = sorted((n, i) for i, n in enumerate(lengths)), k if equal_size else 1
    partials = [sorted([[(i, n)] for n, i in rows[s:s + step]] + [[] for _ in range(k - step)], key=key, reverse=True)
                for s in range(0, len(rows), step)]
    while len(partials) > 1:
        partials.sort(key=order, reverse=True)
        a, b = partials.pop(0), partials.pop(0)
        partials.append(sorted([x + y for x, y in zip(a, reversed(b))], key=key, reverse=True))
    return [sorted(i for i, _ in part) for part in partials[0]]


def partition(mask, world, per_rank):
    """verl's partition of a batch whose rows are in prompt order: over ranks by _balance_batch (equal sizes), then
    each rank's rows into per_rank micro-batches by dynamic batching (a budget that makes that many on the heaviest
    rank; the count is the max over ranks). Every row's length is its real tokens (no prompt here)."""
    lengths = mask.sum(-1).long().tolist()
    shards = kk_reference(lengths, world, equal_size=True)
    budget = math.ceil(max(sum(lengths[i] for i in s) for s in shards) / per_rank)
    count = max(math.ceil(sum(lengths[i] for i in s) / budget) for s in shards)
    ranks = [[torch.tensor([shard[j] for j in part]) for part in kk_reference([lengths[i] for i in shard], count)]
             for shard in shards]
    return ranks, budget


def scope_partition(mask, world, budget):
    """The same through scope.py's own functions (batching.rank_shards, balanced_micro_batches with the count every
    rank agrees on, as split_batch takes it)."""
    lengths = mask.sum(-1).long().tolist()
    shards = batching.rank_shards(lengths, world)
    rows = [{"prompt_mask": torch.zeros(len(s), 0), "response_mask": mask[s]} for s in shards]
    count = max(len(batching.balanced_micro_batches(b, budget)) for b in rows)
    return [[torch.tensor(s)[p] for p in batching.balanced_micro_batches(b, budget, count)]
            for s, b in zip(shards, rows)]


def official_weights(old, teacher, mask, uid, rewards, tau):
    return scope.scope_weights(old, teacher, mask, uid, rewards, tau, norm="mean", student_direction="reversed",
                               teacher_direction="paper")


@pytest.mark.parametrize("world,per_rank,seed", [(1, 1, 0), (1, 3, 1), (1, 6, 5), (2, 1, 2), (2, 4, 3), (2, 6, 4)])
def test_official_mode_is_the_released_update(world, per_rank, seed):
    """Several micro-batches and 2 ranks: official mode's gradient equals the re-derived released update to 1e-12
    (float64; both sides use the float32 weights the pipelines pass on, which equal the re-derived ones to float32)."""
    old, teacher, mask, rewards, uid = batch(seed)
    w = official_weights(old, teacher, mask, uid, rewards, 1.0)
    cw, ww = released_weights(old, teacher, mask, rewards, uid, 1.0)
    assert torch.allclose(w.double(), torch.where(rewards > 0, cw, ww), rtol=1e-6, atol=0)
    w64 = w.double()
    ranks, budget = partition(mask, world, per_rank)
    assert max(len(r) for r in ranks) == per_rank
    ours = scope_partition(mask, world, budget)
    assert [[p.tolist() for p in r] for r in ours] == [[p.tolist() for p in r] for r in ranks]
    got = scope_gradient(old, teacher, mask, rewards, uid, w64, ours, 8, "official-microbatch")
    want = released_gradient(old, old, teacher, mask, w64 * rewards, w64 * (1 - rewards), ranks)
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()


def test_official_mode_in_the_underflow_case():
    """tau 0.005: float32 weights of far-apart rollouts underflow to 0. The released code then leaves those rollouts'
    tokens out of the MLE denominator (its weight > 0 mask); official mode does the same, to 1e-12. The paper's mode
    stays finite (no NaN): an underflowed rollout just contributes nothing."""
    old, teacher, mask, rewards, uid = batch(5, spread=6.0)
    w = official_weights(old, teacher, mask, uid, rewards, 0.005)
    assert ((w == 0) & (rewards > 0)).sum() >= 3                          # correct rollouts whose weight underflowed
    cw32, ww32 = released_weights(old.float(), teacher.float(), mask.float(), rewards, uid, 0.005, torch.float32)
    assert torch.equal(w == 0, torch.where(rewards > 0, cw32, ww32) == 0)  # the same rollouts underflow in both
    ranks, budget = partition(mask, 2, 3)
    w64 = w.double()
    got = scope_gradient(old, teacher, mask, rewards, uid, w64, scope_partition(mask, 2, budget), 8,
                         "official-microbatch")
    want = released_gradient(old, old, teacher, mask, w64 * rewards, w64 * (1 - rewards), ranks)
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()
    paper_w = scope.scope_weights(old, teacher, mask, uid, rewards, 0.005)
    grad = scope_gradient(old, teacher, mask, rewards, uid, paper_w.double(), ranks, 8, "paper")
    assert torch.isfinite(paper_w).all() and torch.isfinite(grad).all() and (paper_w == 0).any()


def test_global_counts_differ_from_the_released_update_by_what_micro_batching_does(capsys):
    """The documented difference: agg="token" (the official options with global counts) equals the released update
    on one micro-batch on one rank (to the released 1e-8 in its denominators), and differs once the batch is split
    over micro-batches and ranks. Measured here on 4 random batches, 2 ranks x 4 micro-batches."""
    worst = 0.0
    for seed in range(4):
        old, teacher, mask, rewards, uid = batch(10 + seed)
        w64 = official_weights(old, teacher, mask, uid, rewards, 1.0).double()
        whole = [[torch.arange(len(rewards))]]
        got = scope_gradient(old, teacher, mask, rewards, uid, w64, whole, 8, "token")
        want = released_gradient(old, old, teacher, mask, w64 * rewards, w64 * (1 - rewards), whole)
        assert (got - want).abs().max() <= 1e-8 * want.abs().max()
        ranks, _ = partition(mask, 2, 4)
        got = scope_gradient(old, teacher, mask, rewards, uid, w64, ranks, 8, "token")
        want = released_gradient(old, old, teacher, mask, w64 * rewards, w64 * (1 - rewards), ranks)
        worst = max(worst, float((got - want).norm() / want.norm()))
    with capsys.disabled():
        print(f"\nglobal token counts vs the released per-micro-batch update (2 ranks x 4 micro-batches): relative "
              f"gradient difference up to {worst:.2f}")
    assert worst > 0.05


@pytest.mark.parametrize("lengths,k,equal_size,want", [
    # rows by (length, index): (1, 1), (2, 2), (3, 0); partials {1}|{}, {2}|{}, {0}|{} of spreads 1, 2, 3. The two of
    # largest spread merge first: {0} with the empty part, {2} with the other: {0}, {2} (spread 1). Then that one
    # (spread 1, heaviest part sum 3) before {1}|{} (spread 1, sum 1): {0} + {}, {2} + {1} -> {2, 1} (3, two rows)
    # first, then {0} (3, one row).
    ([3, 1, 2], 2, False, [[1, 2], [0]]),
    # equal sizes: (1, 1), (2, 3) make {3}, {1}; (3, 2), (4, 0) make {0}, {2}; spreads 1 and 1, the second's heaviest
    # part (4) first: {0} + {1} and {2} + {3}, both summing 5 with two rows: the one whose rows list is larger first.
    ([4, 1, 3, 2], 2, True, [[2, 3], [0, 1]]),
    # all equal: ties go by the rows' indices, the larger first: {3}, {2} merge, then {1}, {0}, then {3}+{0}, {2}+{1}.
    ([5, 5, 5, 5], 2, False, [[0, 3], [1, 2]]),
    ([7], 1, False, [[0]]),
])
def test_karmarkar_karp_on_partitions_worked_out_by_hand(lengths, k, equal_size, want):
    assert batching.karmarkar_karp(lengths, k, equal_size) == want == kk_reference(lengths, k, equal_size)


def test_the_released_partitions_equal_an_independent_implementation():
    """2,000 random length lists (many ties: lengths drawn from 1-3 half the time), 1-8 parts, with and without equal
    sizes: batching.karmarkar_karp gives the partitions of kk_reference (written here without a heap); the micro-batches
    (ceil(real tokens / budget) of them, or the count the ranks agreed on) and the rank shards use it."""
    import random
    rng = random.Random(0)
    for _ in range(2000):
        n = rng.randint(1, 40)
        k = rng.randint(1, min(n, 8))
        lengths = [rng.randint(1, 3) if rng.random() < 0.5 else rng.randint(1, 60) for _ in range(n)]
        equal = n % k == 0 and rng.random() < 0.4
        assert batching.karmarkar_karp(lengths, k, equal) == kk_reference(lengths, k, equal), (lengths, k, equal)
    lengths = [rng.randint(1, 60) for _ in range(37)]
    b = {"prompt_mask": torch.ones(37, 5), "response_mask": (torch.arange(60)[None] < torch.tensor(lengths)[:, None])}
    real = [n + 5 for n in lengths]
    parts = batching.balanced_micro_batches(b, 300)
    assert [p.tolist() for p in parts] == kk_reference(real, math.ceil(sum(real) / 300))
    assert len(batching.balanced_micro_batches(b, 300, count=len(parts) + 3)) == len(parts) + 3
    assert batching.rank_shards(real[:36], 4) == kk_reference(real[:36], 4, equal_size=True)
    with pytest.raises(ValueError, match="micro-batches"):
        batching.balanced_micro_batches(b, 1)
    with pytest.raises(ValueError, match="equal size"):
        batching.rank_shards(real, 2)


def test_the_float32_counts_are_the_released_ones():
    """The released masked_mean adds 1e-8 to a float32 count: it vanishes for a count of 1 or more and stays for 0.
    official-microbatch's denominators are those float32 counts times the micro-batch's share; the float64 + 1e-8 they
    were before differs by 1e-8 / count relative, which the 1e-12 tests above would catch."""
    mask = torch.ones(4, 5)
    mask[3, 2:] = 0
    rewards, weights = torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.ones(4)
    counts = {"rollouts": 8.0}
    d_mle, d_opd = scope._normalisers(counts, "official-microbatch", mask, rewards, weights)
    assert (d_mle, d_opd) == (10.0 * 2, 17.0 * 2)                  # 10, 17 tokens; 8 rollouts over 4 rows
    assert scope._normalisers(counts, "official-microbatch", mask, torch.zeros(4), weights)[0] == pytest.approx(
        2e-8, rel=1e-6)                                             # no correct token: the 1e-8 stays
    assert abs((17.0 + 1e-8) * 2 - d_opd) / d_opd > 1e-12


def test_recipe_official_selects_the_released_recipe_in_one_flag():
    args = scope.resolve({"recipe": "official", "preset": "paper"})
    assert (args.loss_agg, args.weight_norm, args.student_weight, args.teacher_weight) == (
        "official-microbatch", "mean", "reversed", "paper")
    assert (args.micro_batch_tokens, args.logprob_temperature, args.temperature, args.grader) == (
        16384, "sampling", 0.6, "official")
    assert (args.weights_logprobs, args.rank_split) == ("trainer", "balanced")
    assert (scope.resolve({}).weights_logprobs, scope.resolve({}).rank_split) == ("sampler", "prompts")
    assert args.student == scope.PRESETS["paper"]["student"] and args.lr == 5e-5
    assert scope.resolve({"recipe": "official", "micro_batch_tokens": 4096}).micro_batch_tokens == 4096   # given wins
    assert scope.resolve({}).loss_agg == "paper" and scope.resolve({}).recipe == "paper"
    with pytest.raises(ValueError, match="recipe"):
        scope.resolve({"recipe": "released"})


def test_the_loop_in_official_mode_makes_the_released_update(micro_models):
    """scope.update_student with agg="official-microbatch" (the released weights' options, a budget that makes several
    balanced micro-batches) on the micro models in float64: its gradient is the re-derived released update's on the
    loop's own partition, to 1e-9. Both run whole sequences (gradient_checkpointing=True turns the loop's shared
    prompt pass off: that KV-cache path agrees only to about 3e-8 relative in float64)."""
    import dataclasses

    from test_train import one_batch, run_args, update
    args = run_args(micro_models, "unused", loss_agg="official-microbatch", weight_norm="mean",
                    student_weight="reversed", micro_batch_tokens=150, grad_clip=1e9,
                    gradient_checkpointing=True)
    rt, noop, _, b, lp_t = one_batch(micro_models, args)
    b = {k: v.double() if v.is_floating_point() else v for k, v in b.items()}
    lp_t = lp_t.double()
    parts = batching.split_batch(args, rt, b)
    assert len(parts) >= 3
    grads = []
    for loop in (True, False):
        model = loading.load_model(micro_models[0], "student", "float32").double()
        if loop:
            update(dataclasses.replace(args), rt, model, noop, b, lp_t)
        else:
            w = scope.batch_weights(args, {**b, "logp_teacher": lp_t})["weights"].double()
            r, mask = b["rewards"], b["response_mask"].long()
            logp = logprobs.sequence_logprobs(model, b)                                  # (B, T) with grad
            total = sum(released_micro_loss(logp[p], logp[p].detach(), lp_t[p], mask[p], (w * r)[p],
                                            (w * (1 - r))[p], len(r)) for p in parts)
            total.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert (grads[0] - grads[1]).abs().max() <= 1e-9 * grads[1].abs().max()


def test_weights_from_the_trainers_logprobs(micro_models):
    """--weights-logprobs trainer (the released trainer recomputes old_log_probs with the actor before the update): the
    weights come from the student's own no-grad log-probs at its log-prob temperature, not from the sampler's (made
    different here on purpose); the sampler's are the default."""
    from test_train import one_batch, run_args
    args = run_args(micro_models, "unused", logprob_temperature="sampling", temperature=0.7, micro_batch_tokens=150)
    rt, noop, _, b, lp_t = one_batch(micro_models, args)
    scale = torch.linspace(0.5, 2.0, len(b["rewards"]))[:, None]           # a sampler unlike the trainer,
    b["logp_sampler"] = b["logp_sampler"] * scale * b["response_mask"]     # row by row
    model = loading.load_model(micro_models[0], "student", "float32")
    with torch.no_grad():
        trainer = logprobs.sequence_logprobs(model, b, temperature=0.7)
    for source, pi_old in (("trainer", trainer), ("sampler", b["logp_sampler"])):
        batch = {**b, "logp_teacher": lp_t}
        scope.update_student(dataclasses.replace(args, weights_logprobs=source), rt, model, noop, batch)
        want = scope.scope_weights(pi_old, lp_t, b["response_mask"], b["groups"], b["rewards"])
        assert torch.allclose(batch["weights"], want, atol=1e-5), source
    assert not torch.allclose(scope.scope_weights(trainer, lp_t, b["response_mask"], b["groups"], b["rewards"]), want)


def test_the_balanced_rank_split_gives_each_rank_its_shard(monkeypatch):
    """--rank-split balanced: every rank sends its rows (its prompts r, r + W, ..., each with its weights) to every
    rank; each then holds the rows of rank_shards over the global batch in prompt order, with their weights and
    per-row tensors, in global order. Two ranks simulated in one process (all_gather_objects patched)."""
    import types
    gen = torch.Generator().manual_seed(3)
    n, prompts, world = 4, 6, 2

    def rank_batch(r):
        mine = list(range(r, prompts, world))
        rows = len(mine) * n
        lengths = torch.randint(1, 9, (rows,), generator=gen)
        return {"groups": torch.tensor(mine).repeat_interleave(n), "weights": torch.rand(rows, generator=gen),
                "prompt_mask": torch.ones(rows, 2, dtype=torch.long), "prompt_ids": torch.full((rows, 2), 7),
                "response_mask": (torch.arange(8)[None] < lengths[:, None]).long(),
                "response_ids": torch.randint(3, 50, (rows, 8), generator=gen)}
    per_rank = [rank_batch(r) for r in range(world)]
    monkeypatch.setattr(batching, "all_gather_objects", lambda obj: per_rank)
    whole = {k: torch.cat([per_rank[0][k], per_rank[1][k]]) for k in per_rank[0]}
    order = torch.sort(whole["groups"], stable=True).indices
    whole = {k: v[order] for k, v in whole.items()}                      # the global batch, prompt-major
    shards = kk_reference((whole["prompt_mask"].sum(-1) + whole["response_mask"].sum(-1)).tolist(), world, True)
    for r in range(world):
        got = batching.balanced_ranks(per_rank[r], types.SimpleNamespace(rank=r, world=world))
        for k, v in whole.items():
            assert torch.equal(got[k], v[shards[r]]), (r, k)

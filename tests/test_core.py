"""Property tests of the math section of scope.py against the paper's equations (docs/method.md)."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import baselines
import logprobs
import scope
from scope import Args


# ---------------------------------------------------------------------------- random batches of groups
@st.composite
def batches(draw, min_groups=1, max_groups=4):
    """A batch of prompt groups: sizes 1..16, random lengths, masks (some empty), rewards and log-probs."""
    sizes = draw(st.lists(st.integers(1, 16), min_size=min_groups, max_size=max_groups))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    b = sum(sizes)
    length = draw(st.integers(1, 12))
    group_ids = torch.repeat_interleave(torch.arange(len(sizes)) * 7 + 3, torch.tensor(sizes))  # any int ids
    rewards = torch.tensor(draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=b, max_size=b)))
    n_tokens = torch.randint(1, length + 1, (b,), generator=gen)   # response lengths
    n_tokens[torch.rand(b, generator=gen) < 0.1] = 0               # some empty responses
    mask = (torch.arange(length)[None, :] < n_tokens[:, None]).float()  # (B, L) right-padded
    logp_old = -4 * torch.rand(b, length, generator=gen, dtype=torch.float64)
    logp_teacher = -4 * torch.rand(b, length, generator=gen, dtype=torch.float64)
    pad = mask == 0                                                # padding holds garbage, never NaN-free assumptions
    logp_old[pad] = 123.0
    logp_teacher[pad] = -999.0
    tau = draw(st.floats(0.05, 20.0))
    return dict(logp_old=logp_old, logp_teacher=logp_teacher, mask=mask, group_ids=group_ids,
                rewards=rewards, tau=tau)


def own(mask, rewards, group_ids):
    """The loss's keyword inputs for a batch that is the whole batch (one process, one micro-batch)."""
    return dict(group_ids=group_ids, counts=scope.batch_counts(mask, rewards, group_ids, group_size=None))


def weights_of(batch, **kw):
    kw = {"tau": batch["tau"], **kw}
    return scope.scope_weights(batch["logp_old"], batch["logp_teacher"], batch["mask"], batch["group_ids"],
                               batch["rewards"], **kw).double()


def cells(batch):
    """{(group id, path): [row indices]} for the non-empty cells."""
    out = {}
    for i, (g, r) in enumerate(zip(batch["group_ids"].tolist(), batch["rewards"].tolist())):
        out.setdefault((g, r), []).append(i)
    return out


# ---------------------------------------------------------------------------- reference: eq. 4-6 by loops
def ppl(logp_row, mask_row):
    toks = [lp for lp, m in zip(logp_row.tolist(), mask_row.tolist()) if m > 0]
    return math.exp(-sum(toks) / len(toks)) if toks else 1.0


def loop_weights(batch, tau, norm="sum"):
    """Eq. 4-5 literally: PPL_S^(1/tau) / sum PPL_S^(1/tau) over Omega_c of one prompt; PPL_T^(-1/tau) over Omega_w."""
    w = [0.0] * len(batch["rewards"])
    for (g, r), idx in cells(batch).items():
        if r == 1.0:
            vals = [ppl(batch["logp_old"][i], batch["mask"][i]) ** (1 / tau) for i in idx]
        else:
            vals = [ppl(batch["logp_teacher"][i], batch["mask"][i]) ** (-1 / tau) for i in idx]
        for i, v in zip(idx, vals):
            w[i] = v / sum(vals) * (len(idx) if norm == "mean" else 1)
    return torch.tensor(w, dtype=torch.float64)


def loop_objective(batch, logp, w):
    """Eq. 6 literally: mean over prompts of sum_c w L_MLE + sum_w w L_OPD, L summing over tokens (eq. 2-3)."""
    per_prompt = {}
    for i in range(len(w)):
        toks = [t for t in range(logp.shape[1]) if batch["mask"][i, t] > 0]
        rho = [math.exp(float(logp[i, t]) - float(batch["logp_old"][i, t])) for t in toks]
        if batch["rewards"][i] == 1:
            term = -sum(rho)                                                   # eq. 2
        else:
            term = sum(r * (float(logp[i, t]) - float(batch["logp_teacher"][i, t])) for r, t in zip(rho, toks))  # eq. 3
        g = int(batch["group_ids"][i])
        per_prompt[g] = per_prompt.get(g, 0.0) + float(w[i]) * term
    return sum(per_prompt.values()) / len(per_prompt)


# ---------------------------------------------------------------------------- weights (spec section 5)
@given(batches())
def test_weights_in_unit_interval_and_sum_to_one_per_cell(batch):
    w = weights_of(batch)
    assert ((w > 0) & (w <= 1 + 1e-12)).all()
    for idx in cells(batch).values():
        assert abs(float(w[idx].sum()) - 1) < 1e-6
        if len(idx) == 1:
            assert abs(float(w[idx[0]]) - 1) < 1e-12


@given(batches())
def test_mean_norm_is_sum_norm_times_cell_size(batch):
    w_sum, w_mean = weights_of(batch), weights_of(batch, norm="mean")
    for idx in cells(batch).values():
        assert torch.allclose(w_mean[idx], w_sum[idx] * len(idx), atol=1e-5)
        assert abs(float(w_mean[idx].mean()) - 1) < 1e-5


@given(batches())
def test_vectorised_weights_equal_per_group_loop(batch):
    for norm in ("sum", "mean"):
        assert torch.allclose(weights_of(batch, norm=norm), loop_weights(batch, batch["tau"], norm), rtol=1e-5, atol=1e-6)


@given(batches(), st.integers(0, 2**31 - 1))
def test_permutation_equivariance(batch, seed):
    perm = torch.randperm(len(batch["rewards"]), generator=torch.Generator().manual_seed(seed))
    permuted = {k: (v[perm] if torch.is_tensor(v) else v) for k, v in batch.items()}
    assert torch.allclose(weights_of(permuted), weights_of(batch)[perm], atol=1e-6)


@given(batches(min_groups=2))
def test_group_independence(batch):
    w = weights_of(batch)
    other = batch["group_ids"] != batch["group_ids"][0]
    changed = dict(batch, logp_old=batch["logp_old"].clone(), logp_teacher=batch["logp_teacher"].clone())
    changed["logp_old"][other] -= 2.5
    changed["logp_teacher"][other] *= 0.3
    mine = ~other
    assert torch.allclose(weights_of(changed)[mine], w[mine], atol=1e-6)


@given(batches(), st.floats(-5, 5))
def test_constant_shift_of_a_group_leaves_weights_unchanged(batch, c):
    mask = batch["mask"].clone()
    mask[:, 0] = 1                                                 # an empty response has no token to shift
    batch = dict(batch, mask=mask)
    first = batch["group_ids"] == batch["group_ids"][0]
    shifted = dict(batch, logp_old=batch["logp_old"].clone(), logp_teacher=batch["logp_teacher"].clone())
    shifted["logp_old"][first] += c
    shifted["logp_teacher"][first] += c
    assert torch.allclose(weights_of(shifted), weights_of(batch), atol=1e-5)


@given(batches())
def test_weight_ratios_follow_perplexity_powers(batch):
    w, tau = weights_of(batch), batch["tau"]
    for (g, r), idx in cells(batch).items():
        i, j = idx[0], idx[-1]
        lp = batch["logp_old"] if r == 1 else batch["logp_teacher"]
        power = 1 / tau if r == 1 else -1 / tau                    # eq. 4: PPL^(+1/tau); eq. 5: PPL^(-1/tau)
        log_ratio_expected = power * (math.log(ppl(lp[i], batch["mask"][i])) - math.log(ppl(lp[j], batch["mask"][j])))
        assert abs(math.log(float(w[i]) / float(w[j])) - log_ratio_expected) < 1e-4 * max(1.0, abs(log_ratio_expected))


@given(batches())
def test_tau_limits(batch):
    w_inf = weights_of(batch, tau=1e9)
    for idx in cells(batch).values():
        assert torch.allclose(w_inf[idx], torch.full((len(idx),), 1 / len(idx), dtype=torch.float64), atol=1e-6)
    w0 = weights_of(batch, tau=1e-4)
    for (g, r), idx in cells(batch).items():
        lp = batch["logp_old"] if r == 1 else batch["logp_teacher"]
        log_ppls = [math.log(ppl(lp[i], batch["mask"][i])) for i in idx]
        best = max(log_ppls) if r == 1 else min(log_ppls)          # highest PPL_S / lowest PPL_T
        winners = [i for i, v in zip(idx, log_ppls) if v == best]
        if len(winners) == 1 and sorted(log_ppls, reverse=(r == 1))[1:2] != [best] and all(abs(v - best) > 1e-2 for v in log_ppls if v != best):
            assert float(w0[winners[0]]) > 1 - 1e-6


@given(batches(), st.floats(0.05, 2.0))
def test_monotone_in_perplexity(batch, bump):
    w = weights_of(batch)
    for (g, r), idx in cells(batch).items():
        i = idx[0]
        if len(idx) < 2 or batch["mask"][i].sum() == 0:
            continue
        key = "logp_old" if r == 1 else "logp_teacher"
        raised = dict(batch, **{key: batch[key].clone()})
        raised[key][i] -= bump                                     # lower log-probs = higher perplexity
        w2 = weights_of(raised)
        up, down = (w2[i], w[i]) if r == 1 else (w[i], w2[i])       # correct: higher PPL_S -> more weight;
        assert up >= down                                          # incorrect: higher PPL_T -> less weight
        if 1e-20 < w[i] < 1 - 1e-3 and 1e-20 < w2[i] < 1 - 1e-3:    # strict unless float saturation
            assert up > down
        break


@given(batches())
def test_weights_use_per_token_mean_not_length(batch):
    """Repeating every response's per-token log-probs twice leaves its PPL, so every weight, unchanged."""
    length = batch["logp_old"].shape[1]
    doubled = dict(batch)
    for key in ("logp_old", "logp_teacher", "mask"):
        doubled[key] = torch.cat([batch[key], batch[key]], dim=1)
    # right-padded rows repeated -> tokens then padding then tokens: still the same multiset of tokens twice
    assert doubled["mask"].shape[1] == 2 * length
    assert torch.allclose(weights_of(doubled), weights_of(batch), atol=1e-6)


@given(batches())
def test_reversed_and_uniform_options(batch):
    rev = weights_of(batch, student_direction="reversed", teacher_direction="reversed")
    flipped = dict(batch, logp_old=-batch["logp_old"], logp_teacher=-batch["logp_teacher"])
    assert torch.allclose(rev, weights_of(flipped), atol=1e-5)     # reversing = negating the exponent
    uni = weights_of(batch, student_direction="uniform", teacher_direction="uniform")
    for idx in cells(batch).values():
        assert torch.allclose(uni[idx], torch.full((len(idx),), 1 / len(idx), dtype=torch.float64))


# ---------------------------------------------------------------------------- losses
def loss_inputs(batch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logp = batch["logp_old"] + 0.1 * torch.randn(batch["logp_old"].shape, generator=gen, dtype=torch.float64)
    return logp.requires_grad_(True)


@given(batches())
def test_vectorised_loss_equals_eq6_loop(batch):
    logp = loss_inputs(batch)
    w = weights_of(batch)
    loss, metrics = scope.scope_loss(logp, batch["logp_old"], batch["logp_teacher"], batch["mask"],
                                     batch["rewards"], w, agg="paper",
                                     **own(batch["mask"], batch["rewards"], batch["group_ids"]))
    assert math.isclose(loss.item(), loop_objective(batch, logp.detach(), w), rel_tol=1e-7, abs_tol=1e-7)
    assert all(math.isfinite(v) for v in metrics.values())


@given(batches())
def test_gradient_at_theta_old_matches_spec(batch):
    """grad L_MLE = -sum_t grad s_it and grad L_OPD = sum_t (s_it - T_it) grad s_it, times w_i / #prompts."""
    logp = batch["logp_old"].clone().requires_grad_(True)          # theta = theta_old: s = o
    w = weights_of(batch)
    loss, _ = scope.scope_loss(logp, batch["logp_old"], batch["logp_teacher"], batch["mask"], batch["rewards"],
                               w, agg="paper", **own(batch["mask"], batch["rewards"], batch["group_ids"]))
    loss.backward()
    n_prompts = len(set(batch["group_ids"].tolist()))
    r = batch["rewards"][:, None].double()
    expected = w[:, None] * (r * -1.0 + (1 - r) * (batch["logp_old"] - batch["logp_teacher"])) * batch["mask"] / n_prompts
    assert torch.allclose(logp.grad, expected, atol=1e-9)


def test_importance_ratios_stay_finite_for_a_wild_token():
    """The log-ratio is clamped to +-20 before exp (as verl does): a sampler log-prob of -200 where the trainer has -1
    gives a capped weight and a finite logged max (e^20), not inf."""
    trainer = torch.tensor([[-1.0, -2.0, -0.5]])
    sampler = torch.tensor([[-200.0, -2.0, 0.0]])
    tw, stats = scope.truncated_is_weights(trainer, sampler, torch.ones(1, 3), cap=3.0)
    assert tw.tolist() == [[3.0, 1.0, pytest.approx(math.exp(-0.5))]]
    assert stats["max"] == pytest.approx(math.exp(20.0), rel=1e-6) and math.isfinite(stats["sum"])


@given(batches(), st.floats(0.5, 3.0), st.integers(0, 2**31 - 1))
def test_truncated_importance_weights_equal_a_float64_loop(batch, cap, seed):
    """--rollout-is-cap: each token's weight is min(exp(trainer - sampler), cap) (a float64 loop), 0 on padding, with
    no gradient; the statistics are those of the uncapped ratios; scope_loss, opd_loss and grpo_loss with those weights
    equal eq. 6's loop with every token's rho multiplied by its weight, in value and gradient (theta = theta_old)."""
    gen = torch.Generator().manual_seed(seed)
    sampler = batch["logp_old"] + 0.3 * torch.randn(batch["logp_old"].shape, generator=gen, dtype=torch.float64)
    m = batch["mask"]
    tw, stats = scope.truncated_is_weights(batch["logp_old"], sampler, m, cap)
    ratios = []
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            r = math.exp(float(batch["logp_old"][i, j]) - float(sampler[i, j])) if m[i, j] else None
            assert tw[i, j] == (min(r, cap) if r is not None else 0.0) or math.isclose(tw[i, j], min(r, cap),
                                                                                    rel_tol=1e-12)
            ratios += [] if r is None else [r]
    assert math.isclose(stats["sum"], sum(ratios), rel_tol=1e-9) and stats["tokens"] == len(ratios)
    assert stats["capped"] == sum(r > cap for r in ratios) and (not ratios or math.isclose(stats["max"], max(ratios)))
    logp = batch["logp_old"].clone().requires_grad_(True)
    w = weights_of(batch)
    loss, _ = scope.scope_loss(logp, batch["logp_old"], batch["logp_teacher"], m, batch["rewards"], w,
                               agg="paper", token_weights=tw, **own(m, batch["rewards"], batch["group_ids"]))
    loss.backward()
    n_prompts = len(set(batch["group_ids"].tolist()))
    r = batch["rewards"][:, None].double()
    expected = w[:, None] * tw * (-r + (1 - r) * (batch["logp_old"] - batch["logp_teacher"])) * m / n_prompts
    assert torch.allclose(logp.grad, expected, atol=1e-9)
    per_prompt = {}                                                 # eq. 6's loop with rho_t -> rho_t * tw_t
    for i in range(len(w)):
        toks = [t for t in range(m.shape[1]) if m[i, t] > 0]
        term = -sum(float(tw[i, t]) for t in toks) if batch["rewards"][i] == 1 else sum(
            float(tw[i, t]) * (float(batch["logp_old"][i, t]) - float(batch["logp_teacher"][i, t])) for t in toks)
        g = int(batch["group_ids"][i])
        per_prompt[g] = per_prompt.get(g, 0.0) + float(w[i]) * term
    value = sum(per_prompt.values()) / len(per_prompt)
    assert math.isclose(loss.item(), value, rel_tol=1e-9, abs_tol=1e-9)
    adv = baselines.grpo_advantages(batch["rewards"], batch["group_ids"]).double()
    logp.grad = None
    baselines.grpo_objective(logp, batch["logp_old"], batch["logp_old"], m, adv, 0.2, 1e-4, float(m.sum()),
                             token_weights=tw)[0].backward()
    assert torch.allclose(logp.grad, -adv[:, None] * tw * m / max(float(m.sum()), 1.0), atol=1e-9)   # KL 0 at s = ref


def split_grads(batch, splits, agg, method="scope"):
    """Gradient of the summed losses of the given row-splits, each normalised by the GLOBAL counts."""
    logp = loss_inputs(batch)
    w = weights_of(batch)                        # weights are per group: computed before splitting
    counts = scope.batch_counts(batch["mask"], batch["rewards"], batch["group_ids"], group_size=None)
    whole = {"rewards": batch["rewards"], "groups": batch["group_ids"]}
    rows = {**scope.METHODS[method].baseline.rows(Args(loss_agg=agg), whole)} if method != "scope" else {"weights": w}
    total = 0.0
    for idx in splits:
        idx = torch.tensor(idx, dtype=torch.long)
        args = [logp[idx], batch["logp_old"][idx], batch["logp_teacher"][idx], batch["mask"][idx]]
        if method == "scope":
            loss, _ = scope.scope_loss(*args, batch["rewards"][idx], w[idx], group_ids=batch["group_ids"][idx],
                                       counts=counts, agg=agg)
        else:                                         # a micro-batch as update_student hands it to a baseline
            part = {"logp_teacher": args[2], "response_mask": args[3], "rewards": batch["rewards"][idx],
                    "groups": batch["group_ids"][idx], **{k: v[idx] for k, v in rows.items()}}
            loss, _ = scope.METHODS[method].baseline.loss(args[0], part, counts, Args(loss_agg=agg), None)
        total = total + loss
    total.backward()
    return float(total.detach()), logp.grad


@given(batches(), st.integers(0, 2**31 - 1), st.sampled_from(["paper", "token"]),
       st.sampled_from(["scope", "opd", "grpo", "kd"]))
def test_microbatch_and_rank_split_invariance(batch, seed, agg, method):
    """Any split into micro-batches, or into ranks (each summing its micro-batches), gives the full-batch
    loss and gradient when every loss is normalised by the global counts."""
    b = len(batch["rewards"])
    perm = torch.randperm(b, generator=torch.Generator().manual_seed(seed)).tolist()
    k = 1 + seed % 4
    splits = [perm[i::k] for i in range(k) if perm[i::k]]
    full_loss, full_grad = split_grads(batch, [list(range(b))], agg, method)
    part_loss, part_grad = split_grads(batch, splits, agg, method)
    assert math.isclose(full_loss, part_loss, rel_tol=1e-9, abs_tol=1e-9)
    assert torch.allclose(full_grad, part_grad, atol=1e-12)


def test_token_aggregation_matches_official_token_mean():
    """agg='token' with norm='mean' = the official code's MLE token-mean over correct tokens plus the
    k1-advantage term averaged over all response tokens (one process, one micro-batch)."""
    gen = torch.Generator().manual_seed(1)
    b, l = 8, 6
    old = -torch.rand(b, l, generator=gen, dtype=torch.float64)
    teach = -torch.rand(b, l, generator=gen, dtype=torch.float64)
    mask = torch.ones(b, l)
    mask[2, 3:] = 0
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    r = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 1])
    w = scope.scope_weights(old, teach, mask, g, r, norm="mean", student_direction="reversed").double()
    logp = old.clone().requires_grad_(True)
    loss, _ = scope.scope_loss(logp, old, teach, mask, r, w, agg="token", **own(mask, r, g))
    cw = (w * r)[:, None] * mask
    sft = (-logp * cw).sum() / (mask * r[:, None]).sum()                    # dp_actor.py sft_loss
    adv = (w * (1 - r))[:, None] * (teach - old) * mask                     # k1 advantage w_tea (T - o)
    pg = (-adv * torch.exp(logp - old)).sum() / mask.sum()                  # token-mean over all tokens
    # eq. 2 writes the MLE term with rho (value 1) where the code writes -log_prob: equal gradients
    g_ours, = torch.autograd.grad(loss, logp)
    g_official, = torch.autograd.grad(sft + pg, logp)
    assert torch.allclose(g_ours, g_official, atol=1e-12)


@pytest.mark.parametrize("case", ["all_correct", "all_incorrect", "single", "empty_masks"])
def test_degenerate_groups_are_finite(case):
    b, l = {"single": 1}.get(case, 5), 4
    old = -torch.rand(b, l, dtype=torch.float64)
    teach = -torch.rand(b, l, dtype=torch.float64)
    mask = torch.zeros(b, l) if case == "empty_masks" else torch.ones(b, l)
    r = torch.zeros(b) if case == "all_incorrect" else torch.ones(b)
    if case == "empty_masks":
        r[::2] = 0
    g = torch.zeros(b, dtype=torch.long)
    for agg in scope.LOSS_AGGS:
        for norm in scope.WEIGHT_NORMS:
            w = scope.scope_weights(old, teach, mask, g, r, norm=norm)
            logp = old.clone().requires_grad_(True)
            loss, metrics = scope.scope_loss(logp, old, teach, mask, r, w, agg=agg, **own(mask, r, g))
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
            assert all(math.isfinite(v) for v in metrics.values())
            if case == "empty_masks":
                assert loss.item() == 0.0


def test_grpo_advantages_match_loop():
    r = torch.tensor([1.0, 0, 0, 1, 1, 1, 0, 1, 0])
    g = torch.tensor([5, 5, 5, 5, 9, 9, 2, 2, 4])
    adv = baselines.grpo_advantages(r, g)
    for gid in set(g.tolist()):
        idx = [i for i in range(len(g)) if g[i] == gid]
        vals = [float(r[i]) for i in idx]
        mu = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / len(vals))
        for i in idx:
            assert abs(float(adv[i]) - (float(r[i]) - mu) / (sd + 1e-6)) < 1e-5
    assert float(adv[8]) == 0.0 and float(adv[4]) == 0.0          # singleton and all-equal groups


def test_grpo_clip_and_kl():
    logp_old = torch.zeros(1, 2)
    logp = torch.tensor([[0.5, -0.5]], requires_grad=True)        # ratios e^0.5 = 1.65 and e^-0.5 = 0.61
    mask = torch.ones(1, 2)
    loss, m = baselines.grpo_objective(logp, logp_old, logp_old, mask, torch.tensor([1.0]), 0.2, 0.0, 2.0)
    loss.backward()
    # advantage > 0: the high ratio is clipped (no gradient), the low one is not
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] != 0 and m["train/ratio_clip_frac"] == 1.0
    _, m = baselines.grpo_objective(logp.detach(), logp_old, logp_old, mask, torch.tensor([1.0]), 0.2, 1e-4, 2.0)
    r = torch.tensor([-0.5, 0.5])
    assert abs(m["kl/ref_k3"] - float((torch.exp(r) - r - 1).mean())) < 1e-6


def test_opd_is_scope_with_every_rollout_on_the_teacher_path():
    gen = torch.Generator().manual_seed(3)
    old = -torch.rand(6, 5, generator=gen, dtype=torch.float64)
    teach = -torch.rand(6, 5, generator=gen, dtype=torch.float64)
    mask = torch.ones(6, 5)
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    part = {"logp_teacher": teach, "response_mask": mask, "rewards": torch.tensor([1.0, 0, 1, 0, 0, 1]), "groups": g,
            "weights": baselines.uniform_weights(g)}
    counts = scope.batch_counts(mask, part["rewards"], g, group_size=3)
    loss, _ = scope.METHODS["opd"].baseline.loss(old.clone().requires_grad_(True), part, counts, Args(), None)
    expected = sum(((old[i] - teach[i]).sum() / 3) for i in range(6)) / 2   # uniform 1/N, mean over prompts
    assert torch.isclose(loss, expected)


# ---------------------------------------------------------------------------- fused token log-probs
@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 12), st.integers(2, 40), st.floats(0.1, 3.0),
       st.integers(1, 7), st.sampled_from([torch.float32, torch.bfloat16]), st.integers(0, 1000))
def test_fused_logprobs_equal_naive(b, l, h, v, temperature, chunk, dtype, seed):
    """Value and both gradients (hidden states, output weight) of the chunked, recomputing kernel equal the naive
    log_softmax(h @ W.T / T).gather in float64, within rounding of the compute dtype."""
    gen = torch.Generator().manual_seed(seed)
    hidden = (2 * torch.randn(b, l, h, generator=gen)).to(dtype).requires_grad_(True)
    weight = torch.randn(v, h, generator=gen).requires_grad_(True)          # fp32 master weight
    tokens = torch.randint(0, v, (b, l), generator=gen)
    mask = (torch.rand(b, l, generator=gen) > 0.3).float()        # padding positions still computed, then masked
    got = logprobs.token_logprobs(hidden, weight, tokens, temperature, chunk=chunk)
    hd = hidden.detach().double().requires_grad_(True)             # the float64 reference, from the same inputs
    wd = weight.detach().to(dtype).double().requires_grad_(True)
    want = torch.log_softmax(hd @ wd.T / temperature, -1).gather(-1, tokens[..., None]).squeeze(-1)
    assert got.dtype == torch.float32
    rel = 1e-5 if dtype == torch.float32 else 2e-2                 # bf16 matmuls: the model's own logits' precision
    assert_close_scaled(got, want, rel)
    g_got = torch.autograd.grad((got * mask).sum(), (hidden, weight))
    g_want = torch.autograd.grad((want * mask).sum(), (hd, wd))
    for a, e in zip(g_got, g_want):
        assert_close_scaled(a, e, rel)


def assert_close_scaled(got, want, rel):
    """|got - want| <= rel * (1 + max |want|): a tolerance relative to the tensor's scale, not a fixed absolute one
    (log-probs reach |logits| / T and gradients grow as 1 / T, so an absolute 1e-5 fails at T = 0.1 on correct
    float32 results)."""
    err = (got.double() - want.double()).abs().max().item()
    assert err <= rel * (1 + want.abs().max().item()), (err, want.abs().max().item())


# ---------------------------------------------------------------------------- autograd on a tiny real model
@pytest.mark.parametrize("tied", [False, True])
def test_gradients_on_tiny_transformers_model(tied):
    """At theta = theta_old, grad of each path equals the formula of spec section 5 on a real causal LM, with the
    log-probs taken through the model's own forward with LogprobHead (tied and untied output embeddings); and
    those log-probs and their gradients equal the ones from the model's full logits."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=23, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=tied)
    model = Qwen2ForCausalLM(cfg).double()
    ids = torch.randint(0, 23, (4, 7))
    mask = torch.ones(4, 6)
    mask[1, 4:] = 0
    g = torch.tensor([0, 0, 1, 1])
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    teacher = -torch.rand(4, 6, dtype=torch.float64)

    def s_of():
        return logprobs.model_logprobs(model, ids[:, 1:], input_ids=ids).logits.double()

    def s_naive():
        return torch.log_softmax(model(input_ids=ids).logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)

    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)   # the head is put back
    old = s_of().detach()
    assert torch.allclose(old, s_naive().detach(), atol=1e-10)
    w = scope.scope_weights(old, teacher, mask, g, r).double()
    loss, _ = scope.scope_loss(s_of(), old, teacher, mask, r, w, **own(mask, r, g))
    params = list(model.parameters())
    got = torch.autograd.grad(loss, params)
    # formula: sum_i w_i/P * (correct: -sum_t grad s_it ; incorrect: sum_t (s_it - T_it) grad s_it)
    coef = w[:, None] * torch.where(r.bool()[:, None], -torch.ones_like(old), old - teacher) * mask / 2
    want = torch.autograd.grad((s_naive() * coef).sum(), params)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-10)
    assert any(a.abs().sum() > 0 for a in got)


def test_bad_input_raises_value_error_naming_the_argument():
    old = -torch.rand(3, 4)
    mask = torch.ones(3, 4)
    g = torch.tensor([0, 0, 1])
    r = torch.tensor([1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="logp_teacher"):
        scope.scope_weights(old, old[:, :3], mask, g, r)
    with pytest.raises(ValueError, match="tau"):
        scope.scope_weights(old, old, mask, g, r, tau=0.0)
    with pytest.raises(ValueError, match="tau"):
        scope.scope_weights(old, old, mask, g, r, tau=-1.0)
    bad = old.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="logp_sampler"):
        scope.scope_weights(bad, old, mask, g, r)
    inf = old.clone()
    inf[0, 0] = float("-inf")
    with pytest.raises(ValueError, match="logp_teacher"):
        scope.scope_weights(old, inf, mask, g, r)
    with pytest.raises(ValueError, match="rewards"):
        scope.scope_weights(old, old, mask, g, torch.tensor([1.0, 0.5, 0.0]))
    with pytest.raises(ValueError, match="norm"):
        scope.scope_weights(old, old, mask, g, r, norm="avg")
    with pytest.raises(ValueError, match="student_direction"):
        scope.scope_weights(old, old, mask, g, r, student_direction="positive")
    with pytest.raises(ValueError, match="group_ids"):
        scope.scope_weights(old, old, mask, g[:2], r)
    w = scope.scope_weights(old, old, mask, g, r)
    with pytest.raises(ValueError, match="agg"):
        scope.scope_loss(old, old, old, mask, r, w, agg="seq-mean", **own(mask, r, g))
    with pytest.raises(ValueError, match="weights"):
        scope.scope_loss(old, old, old, mask, r, w[:2], **own(mask, r, g))
    with pytest.raises(ValueError, match="logp"):
        scope.scope_loss(bad, old, old, mask, r, w, **own(mask, r, g))
    with pytest.raises(ValueError, match="temperature"):
        logprobs.token_logprobs(torch.randn(1, 2, 5), torch.randn(7, 5), torch.zeros(1, 2, dtype=torch.long), temperature=0)
    with pytest.raises(ValueError, match="hidden"):
        logprobs.token_logprobs(torch.randn(1, 2, 5), torch.randn(7, 5), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden"):
        logprobs.token_logprobs(torch.randn(1, 2, 5), torch.randn(7, 4), torch.zeros(1, 2, dtype=torch.long))
    # NaN in padding is not an error: padded positions are never read
    pad_nan = old.clone()
    mask2 = mask.clone()
    mask2[1, 3] = 0
    pad_nan[1, 3] = float("nan")
    assert torch.isfinite(scope.scope_weights(pad_nan, old, mask2, g, r)).all()


@given(st.integers(1, 5), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_batch_counts_with_group_size_add_up_over_any_split(groups, n, seed):
    """With group_size, the counts of parts that cut groups apart sum to the whole batch's counts (prompts too)."""
    gen = torch.Generator().manual_seed(seed)
    b = groups * n
    mask = (torch.arange(9)[None] < torch.randint(0, 10, (b, 1), generator=gen)).float()   # (B, 9), some empty
    rewards = torch.randint(0, 2, (b,), generator=gen).float()
    group_ids = torch.arange(groups).repeat_interleave(n) * 5 + 1
    cuts = sorted(set(torch.randint(0, b + 1, (3,), generator=gen).tolist()) | {0, b})
    whole = scope.batch_counts(mask, rewards, group_ids, group_size=n)
    parts = [scope.batch_counts(mask[a:c], rewards[a:c], group_ids[a:c], group_size=n) for a, c in zip(cuts, cuts[1:])]
    for k in whole:
        assert math.isclose(whole[k], sum(p[k] for p in parts), rel_tol=1e-12, abs_tol=1e-12), k
    assert whole["prompts"] == groups == scope.batch_counts(mask, rewards, group_ids, group_size=None)["prompts"]


def test_leaving_out_what_sets_the_scale_is_an_error():
    """scope_loss without group_ids or counts, or batch_counts without group_size, is a TypeError naming what to pass:
    left out, they used to default to every row its own prompt (-0.97 where the batch's loss is -3.88, a factor of
    N) or to each micro-batch's own counts (micro-batch losses summing to -6.07 instead)."""
    old = -torch.rand(4, 3, dtype=torch.float64)
    mask, r, g = torch.ones(4, 3), torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 1])
    w = scope.scope_weights(old, old - 1, mask, g, r)
    with pytest.raises(TypeError, match="group_ids.*counts|counts"):
        scope.scope_loss(old, old, old - 1, mask, r, w)
    with pytest.raises(TypeError, match="counts"):
        scope.scope_loss(old, old, old - 1, mask, r, w, group_ids=g)
    with pytest.raises(TypeError, match="group_size"):
        scope.batch_counts(mask, r, g)

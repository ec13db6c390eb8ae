"""Avg@k, unbiased Pass@k and the official code's bootstrap Pass@k."""

import math
import random


def avg_at_k(correct_counts, n):
    """Mean over problems of the fraction of the n samples judged correct (= unbiased Pass@1)."""
    return sum(c / n for c in correct_counts) / len(correct_counts)


def unbiased_pass_at_k(n, c, k):
    """Unbiased pass@k of one problem (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), from n samples, c correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_at_k(correct_counts, n, k):
    """Unbiased estimator 1 - C(n-c, k) / C(n, k) per problem (Chen et al. 2021), averaged over problems."""
    return sum(unbiased_pass_at_k(n, c, k) for c in correct_counts) / len(correct_counts)


def bootstrap_pass_at_k(correct_lists, k, n_bootstrap=1000, seed=42):
    """The official SCOPE eval's Pass@k: per problem, draw k of its samples WITH replacement n_bootstrap times,
    take the max, average. Biased low against the unbiased estimator (1 correct of 32 gives about 0.64 at k=32)."""
    rng = random.Random(seed)
    total = 0.0
    for scores in correct_lists:
        total += sum(max(rng.choice(scores) for _ in range(k)) for _ in range(n_bootstrap)) / n_bootstrap
    return total / len(correct_lists)


def ks_up_to(n):
    """1, 2, 4, ..., and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def summarize(samples, n):
    """Metrics of one benchmark from its per-sample records (one dict per problem and sample index)."""
    by_problem = {}
    for s in samples:
        by_problem.setdefault(s["problem_id"], []).append(int(s["correct"]))
    lists = list(by_problem.values())
    if any(len(x) != n for x in lists):
        raise ValueError(f"every problem needs exactly {n} samples")
    counts = [sum(x) for x in lists]
    out = {"problems": len(lists), "n": n, f"avg@{n}": avg_at_k(counts, n)}
    for k in ks_up_to(n):
        out[f"pass@{k}"] = pass_at_k(counts, n, k)
    out[f"pass@{n}_bootstrap"] = bootstrap_pass_at_k(lists, n)
    out["truncated_frac"] = sum(bool(s["truncated"]) for s in samples) / len(samples)
    out["no_box_frac"] = sum(s["extracted"] is None for s in samples) / len(samples)
    return out


def macro_average(per_benchmark):
    """Unweighted mean over benchmarks of every metric they all share."""
    keys = set.intersection(*(set(m) for m in per_benchmark.values()))
    return {k: sum(m[k] for m in per_benchmark.values()) / len(per_benchmark) for k in sorted(keys)
            if k not in ("problems", "n")}

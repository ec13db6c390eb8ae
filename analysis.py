"""The paper's section 2 analyses at tiny scale, and the statistics of the study over independently built testbeds
(harness, not method).

    python reproduce.py --analysis recovery --build-seeds 0,1,2 --out results/study/default   # per build
    python analysis.py recovery --student DIR --teacher DIR --out results/analysis

Error recovery (section 2.2, Fig. 1b): sample the student on training problems, keep EVERY incorrect rollout, score
each with the teacher (perplexity of the student's tokens), split them into teacher-perplexity quartiles Q1 (lowest)
.. Q4, cut each at 20/40/60/80% of its response (without its EOS), let the teacher complete from the cut prefix several
times, and report how often the completion ends in the right answer. The paper's premise, per cut: low teacher
perplexity on a flawed prefix predicts that the teacher can recover from it (Q1 recovers more than Q4, by up to 19.4
points). Quartiles are taken over all incorrect rollouts (pooled) and within each level (the level moves both length
and perplexity); intervals come from a bootstrap that resamples problems, keeping all rollouts and cuts of a problem
together (they are not independent).

The study: differences between methods paired by build, training seed and problem. Intervals (study_interval) take
the top level of the design as the unit: the builds when there are several (each build's mean over its seeds and
problems), else the seeds of the one build; a t-interval on units - 1 degrees of freedom, and the smallest detectable
difference (t_0.975 + t_0.80) standard errors (80% power, two-sided 5%) from the same standard error. Its coverage is
checked on planted data (tests/test_reproduce.py; bench/interval_coverage.py). The every-level bootstrap it replaces
(hierarchical, kept for that comparison) counted the seed variance about twice and the build level too little.
"""
import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

import loading
import logprobs
import scope
import tiny_testbed
import verifier

FRACTIONS = (0.2, 0.4, 0.6, 0.8)
CUTS = [f"{int(100 * f)}%" for f in FRACTIONS]


def sample_student(student, tok, rows, samples, max_new_tokens, seed, chunk=32):
    """Rollouts of every row, seeded like training; -> (prompts, list of (row, rollout text, response ids, R))."""
    prompts = [scope.prompt_text(tok, r["problem"]) for r in rows]
    out = []
    for start in range(0, len(rows), chunk):
        part = list(range(start, min(start + chunk, len(rows))))
        seeds = scope.row_seeds(seed, "recovery-student", [(i, j) for i in part for j in range(samples)])
        b = scope.generate(student, tok, [prompts[i] for i in part], samples, max_new_tokens, 1.0, seeds=seeds)
        texts = scope.decode_responses(tok, b)
        for q, i in enumerate(part):
            for j in range(samples):
                row = q * samples + j
                ids = b["response_ids"][row, :int(b["response_mask"][row].sum())]
                ok = verifier.reward(texts[row], rows[i]["answer"], bool(b["truncated"][row]))
                out.append((i, texts[row], ids, ok))
    return prompts, out


def teacher_ppl(teacher, tok, prompt, ids):
    """exp(mean NLL) of the response tokens ids under the teacher, given the prompt."""
    p = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    batch = dict(prompt_ids=p, prompt_mask=torch.ones_like(p), response_ids=ids[None],
                 response_mask=torch.ones(1, len(ids), dtype=torch.long, device=ids.device))
    with torch.inference_mode():
        lp = logprobs.sequence_logprobs(teacher, batch)                         # (1, T)
    return math.exp(-float(lp.mean()))


def quartiles(values):
    """1..4 for each value: its quartile by rank (Q1 = the lowest quarter)."""
    order = sorted(range(len(values)), key=lambda k: values[k])
    q = [0] * len(values)
    for pos, k in enumerate(order):
        q[k] = 1 + 4 * pos // len(order)
    return q


def recovery(student_dir, teacher_dir, out, problems=192, samples=8, completions=4, max_new_tokens=64, seed=0,
             log=print):
    """Run the error-recovery analysis; writes out/recovery.json and out/recovery.png and returns the dict."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = loading.load_tokenizer(student_dir, "student")
    student = loading.load_model(student_dir, "student", "float32").eval()
    teacher = loading.load_model(teacher_dir, "teacher", "float32").eval()
    rows = tiny_testbed.tiny_task("train", problems, seed=seed)
    log(f"recovery: sampling {problems} x {samples} student rollouts")
    prompts, rollouts = sample_student(student, tok, rows, samples, max_new_tokens, seed)
    eos = tok.eos_token_id
    length = [len(ids) - int(len(ids) > 0 and int(ids[-1]) == eos) for _, _, ids, _ in rollouts]   # without the EOS
    wrong = [k for k, r in enumerate(rollouts) if r[3] == 0.0 and length[k] >= 5]       # a token at the 20% cut
    log(f"recovery: {sum(r[3] == 0 for r in rollouts)} of {len(rollouts)} rollouts incorrect; all {len(wrong)} with 5+ "
        "tokens scored")
    ppl = [teacher_ppl(teacher, tok, prompts[rollouts[k][0]], rollouts[k][2]) for k in wrong]
    jobs = [(w, f) for w in range(len(wrong)) for f in FRACTIONS]
    log(f"recovery: {len(jobs)} cut prefixes x {completions} teacher completions")
    rec = [[0.0] * len(FRACTIONS) for _ in wrong]                          # recovery rate per (rollout, cut)
    for start in range(0, len(jobs), 32):
        part = jobs[start:start + 32]
        cut = [rollouts[wrong[w]][2][:max(1, round(f * length[wrong[w]]))] for w, f in part]
        prefix = [tok.decode(c, skip_special_tokens=True) for c in cut]
        texts_in = [prompts[rollouts[wrong[w]][0]] + pre for (w, _), pre in zip(part, prefix)]
        seeds = scope.row_seeds(seed, "recovery-teacher", [(start + q, j) for q in range(len(part))
                                                            for j in range(completions)])
        b = scope.generate(teacher, tok, texts_in, completions, max_new_tokens, 1.0, seeds=seeds)
        texts = scope.decode_responses(tok, b)
        for q, (w, f) in enumerate(part):
            gold = rows[rollouts[wrong[w]][0]]["answer"]
            ok = [verifier.reward(prefix[q] + texts[q * completions + j], gold,
                                  bool(b["truncated"][q * completions + j]))
                  for j in range(completions)]
            rec[w][FRACTIONS.index(f)] = sum(ok) / completions
    items = [{"problem": rollouts[k][0], "level": rows[rollouts[k][0]]["level"], "ppl": ppl[w], "recovery": rec[w]}
             for w, k in enumerate(wrong)]
    result = {"problems": problems, "samples": samples, "completions": completions, "seed": seed,
              "student_accuracy": sum(r[3] for r in rollouts) / len(rollouts), "incorrect_scored": len(wrong),
              "student": str(student_dir), "teacher": str(teacher_dir), **summarize_recovery(items, seed)}
    (out / "recovery.json").write_text(json.dumps(result, indent=1))
    (out / "items.json").write_text(json.dumps(items))                   # every rollout's perplexity and recovery
    plot(result, out / "recovery.png")
    return result


def summarize_recovery(items, seed=0, reps=2000):
    """Quartile tables and Q1 - Q4 per cut, pooled over levels and within each level, with 95% intervals from a
    bootstrap over problems (each problem's rollouts and cuts stay together)."""
    levels = sorted({it["level"] for it in items})
    pooled_q = quartiles([it["ppl"] for it in items])
    within_q = [0] * len(items)
    for lv in levels:
        idx = [i for i, it in enumerate(items) if it["level"] == lv]
        for i, q in zip(idx, quartiles([items[i]["ppl"] for i in idx])):
            within_q[i] = q
    rec = np.array([it["recovery"] for it in items])                     # (rollouts, cuts)
    problems = sorted({it["problem"] for it in items})
    by_problem = {p: [] for p in problems}
    for i, it in enumerate(items):
        by_problem[it["problem"]].append(i)
    rng = np.random.default_rng(seed)
    draws = [np.concatenate([by_problem[p] for p in rng.choice(problems, len(problems))]) for _ in range(reps)]

    def q_means(idx, q, mask=None):                                      # (4 quartiles, cuts) mean recovery
        sel = idx if mask is None else idx[mask[idx]]
        return np.array([rec[sel[q[sel] == k]].mean(0) if (q[sel] == k).any() else np.full(len(FRACTIONS), np.nan)
                         for k in (1, 2, 3, 4)])

    def summary(q, mask=None):
        q = np.array(q)
        everything = np.arange(len(items))
        point = q_means(everything, q, mask)
        boot = np.array([q_means(d, q, mask) for d in draws])           # (reps, 4, cuts)
        lo, hi = np.nanpercentile(boot, 2.5, axis=0), np.nanpercentile(boot, 97.5, axis=0)
        diff = boot[:, 0] - boot[:, 3]                                    # (reps, cuts) Q1 - Q4
        return (point, lo, hi, point[0] - point[3], np.nanpercentile(diff, 2.5, axis=0),
                np.nanpercentile(diff, 97.5, axis=0), boot)

    def table(point, lo, hi, q, mask=None):
        out = {}
        for k in (1, 2, 3, 4):
            members = [i for i in range(len(items)) if q[i] == k and (mask is None or mask[i])]
            out[f"Q{k}"] = {"rollouts": len(members), "teacher_ppl": [min(items[i]["ppl"] for i in members),
                                                                       max(items[i]["ppl"] for i in members)],
                            **{c: [float(point[k - 1, j]), float(lo[k - 1, j]), float(hi[k - 1, j])]
                               for j, c in enumerate(CUTS)}}
        return out

    def diffs(d, dlo, dhi):
        return {c: [float(d[j]), float(dlo[j]), float(dhi[j])] for j, c in enumerate(CUTS)}

    point, lo, hi, d, dlo, dhi, _ = summary(pooled_q)
    result = {"pooled": {"quartiles": table(point, lo, hi, pooled_q), "q1_minus_q4": diffs(d, dlo, dhi)},
              "within_level": {"levels": {}}}
    per_level_boot = []
    for lv in levels:
        mask = np.array([it["level"] == lv for it in items])
        point, lo, hi, d, dlo, dhi, boot = summary(within_q, mask)
        per_level_boot.append(boot[:, 0] - boot[:, 3])
        result["within_level"]["levels"][lv] = {"quartiles": table(point, lo, hi, within_q, mask),
                                               "q1_minus_q4": diffs(d, dlo, dhi)}
    combined = np.nanmean(np.stack(per_level_boot), 0)                    # (reps, cuts): mean over levels
    point = np.mean([[v["q1_minus_q4"][c][0] for c in CUTS] for v in result["within_level"]["levels"].values()], 0)
    result["within_level"]["q1_minus_q4"] = diffs(point, np.nanpercentile(combined, 2.5, 0),
                                                  np.nanpercentile(combined, 97.5, 0))
    return result


def verdict(d):
    """The premise at one cut, from (Q1 - Q4, low, high)."""
    return "holds" if d[1] > 0 else "fails" if d[2] < 0 else "not supported"


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.6))
    xs = [int(100 * f) for f in FRACTIONS]
    for q, row in result["pooled"]["quartiles"].items():
        m = [100 * row[c][0] for c in CUTS]
        lo = [100 * (row[c][0] - row[c][1]) for c in CUTS]
        hi = [100 * (row[c][2] - row[c][0]) for c in CUTS]
        ax.errorbar(xs, m, yerr=[lo, hi], marker="o", capsize=3,
                    label=f"{q} (teacher PPL {row['teacher_ppl'][0]:.2f}-{row['teacher_ppl'][1]:.2f})")
    ax.set(xlabel="prefix kept (% of the incorrect response, without EOS)", ylabel="teacher recovers (%)",
           title="Error recovery by teacher-perplexity quartile (paper Fig. 1b)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table_md(result, where="pooled"):
    """The recovery table as markdown (one row per quartile, then Q1 - Q4 and the verdict per cut)."""
    part = result[where]
    head = "| quartile (teacher PPL) | rollouts | " + " | ".join(f"cut at {c}" for c in CUTS) + " |"
    lines = [head, "|---" * (2 + len(CUTS)) + "|"]
    for q, row in part["quartiles"].items():
        lines.append(f"| {q} ({row['teacher_ppl'][0]:.2f}-{row['teacher_ppl'][1]:.2f}) | {row['rollouts']} | "
                     + " | ".join(f"{100 * row[c][0]:.1f} [{100 * row[c][1]:.1f}, {100 * row[c][2]:.1f}]" for c in CUTS)
                     + " |")
    d = part["q1_minus_q4"]
    lines.append("| **Q1 - Q4** | | " + " | ".join(
        f"**{100 * d[c][0]:+.1f}** [{100 * d[c][1]:+.1f}, {100 * d[c][2]:+.1f}]" for c in CUTS) + " |")
    lines.append("| premise | | " + " | ".join(verdict(d[c]) for c in CUTS) + " |")
    return "\n".join(lines)


def within_md(result):
    """Q1 - Q4 per cut with quartiles taken within each level, per level and averaged over levels."""
    part = result["within_level"]
    lines = ["| level | rollouts | " + " | ".join(f"Q1 - Q4, cut at {c}" for c in CUTS) + " |",
             "|---" * (2 + len(CUTS)) + "|"]
    for lv, v in part["levels"].items():
        n = sum(q["rollouts"] for q in v["quartiles"].values())
        lines.append(f"| {lv} | {n} | " + " | ".join(
            f"{100 * v['q1_minus_q4'][c][0]:+.1f} [{100 * v['q1_minus_q4'][c][1]:+.1f}, "
            f"{100 * v['q1_minus_q4'][c][2]:+.1f}]" for c in CUTS) + " |")
    d = part["q1_minus_q4"]
    lines.append("| **mean over levels** | | " + " | ".join(f"**{100 * d[c][0]:+.1f}** [{100 * d[c][1]:+.1f}, "
                                                         f"{100 * d[c][2]:+.1f}]" for c in CUTS) + " |")
    lines.append("| premise | | " + " | ".join(verdict(d[c]) for c in CUTS) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# the study: paired differences over builds, seeds and problems
# ----------------------------------------------------------------------------------------------------
def t_quantile(p, df, _cache={}):
    """The p-quantile (p >= 0.5) of Student's t with df degrees of freedom, without scipy: the density integrated by
    Simpson's rule, then bisection (checked against tabulated values to 1e-6 in the tests)."""
    if (p, df) not in _cache:
        c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

        def cdf(x, n=4000):                                              # P(T <= x), x >= 0
            f = c * (1 + np.linspace(0.0, x, n + 1) ** 2 / df) ** (-(df + 1) / 2)
            return 0.5 + x / n / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
        lo, hi = 0.0, 1.0
        while cdf(hi) < p:
            hi *= 2
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
        _cache[(p, df)] = (lo + hi) / 2
    return _cache[(p, df)]


def t_interval(units, level=0.95, power=0.8):
    """Mean of independent top-level units with a t-interval on len - 1 degrees of freedom, the standard error, and
    the smallest difference the design detects with `power` at two-sided 1 - level: (t_{1-a/2} + t_power) x se.
    -> (mean, low, high, se, smallest detectable, units); NaN spread with one unit."""
    u = np.asarray(units, dtype=np.float64)
    if len(u) < 2:
        return float(u.mean()), math.nan, math.nan, math.nan, math.nan, len(u)
    se, df = float(u.std(ddof=1) / math.sqrt(len(u))), len(u) - 1
    half = t_quantile(1 - (1 - level) / 2, df) * se
    mean = float(u.mean())
    return mean, mean - half, mean + half, se, half + t_quantile(power, df) * se, len(u)


def seed_macros(keys, m, bench_names):
    """(seeds,) macro averages of one build's (seeds, problems) differences: per seed, the mean over levels of the
    mean over that level's problems."""
    groups = [np.array([i for i, k in enumerate(keys) if k[0] == b]) for b in bench_names]
    return np.mean([m[:, g].mean(1) for g in groups if len(g)], axis=0)


def study_interval(builds, bench_names, floor=False):
    """builds: [(keys, (seeds, problems) differences)], one entry per build. The top level is the unit: each build's
    mean over its seeds when there are several builds, else the seeds of the one build. -> t_interval in points.
    floor=True: the standard error is at least what the seeds alone put into the mean of the build means,
    sqrt(mean within-build seed variance / (builds x seeds)), whatever the build means' own spread (which can come
    out smaller by chance: the t-interval over builds trusts it); same degrees of freedom."""
    per_build = [seed_macros(keys, m, bench_names) for keys, m in builds]
    units = [v.mean() for v in per_build] if len(per_build) > 1 else per_build[0]
    d, lo, hi, se, mdd, n = t_interval(100 * np.asarray(units))
    if floor and len(per_build) > 1 and all(len(v) > 1 for v in per_build):
        seeds = np.mean([len(v) for v in per_build])
        se_seeds = math.sqrt(np.mean([np.var(100 * v, ddof=1) for v in per_build]) / (len(per_build) * seeds))
        if se_seeds > se:
            t, tp = t_quantile(0.975, n - 1), t_quantile(0.8, n - 1)
            return d, d - t * se_seeds, d + t * se_seeds, se_seeds, (t + tp) * se_seeds, n
    return d, lo, hi, se, mdd, n


def slope_interval(x, y, level=0.95):
    """Least-squares slope of y on x with its t-interval on n - 2 degrees of freedom. -> (slope, low, high)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 3 or np.ptp(x) == 0:
        return math.nan, math.nan, math.nan
    xc = x - x.mean()
    b = float((xc * (y - y.mean())).sum() / (xc ** 2).sum())
    resid = y - y.mean() - b * xc
    se = math.sqrt(float((resid ** 2).sum()) / (len(x) - 2) / float((xc ** 2).sum()))
    half = t_quantile(1 - (1 - level) / 2, len(x) - 2) * se
    return b, b - half, b + half


def variance_components(builds, bench_names):
    """Method-of-moments estimates, in points^2, from each build's per-seed macro differences: the variance of a seed's
    macro difference within a build (its seed effect plus its evaluation's sampling noise), and the build variance
    (the variance of the build means less what the seeds put into them; may come out below 0 when it is near 0).
    -> (seeds within a build, builds, builds used)."""
    per_build = [100 * seed_macros(keys, m, bench_names) for keys, m in builds]
    per_build = [v for v in per_build if len(v) > 1]
    if len(per_build) < 2:
        return math.nan, math.nan, len(per_build)
    within = float(np.mean([v.var(ddof=1) for v in per_build]))
    seeds = float(np.mean([len(v) for v in per_build]))
    between = float(np.var([v.mean() for v in per_build], ddof=1)) - within / seeds
    return within, between, len(per_build)


def hierarchical(builds, bench_names, reps=2000, seed=0):
    """The every-level bootstrap study_interval replaced (kept for bench/interval_coverage.py's comparison).
    builds: [(seeds, problems) array of a - b differences, same problem keys in every build] with `keys`.
    -> (difference, 95% low, high, standard error), in points of macro Avg (mean over levels, then over builds, seeds
    and problems). Resampled: builds, then seeds within a build, then problems within each level (shared by the
    seeds of a build, as the problems are the same test problems for every seed)."""
    keys, mats = builds[0][0], [m for _, m in builds]
    groups = [np.array([i for i, k in enumerate(keys) if k[0] == b]) for b in bench_names]
    rng = np.random.default_rng(seed)

    def macro(m, cols):
        return np.mean([m[:, c].mean() for c in cols])

    point = np.mean([macro(m, groups) for m in mats])
    stats = []
    for _ in range(reps):
        total = []
        for bi in rng.integers(0, len(mats), len(mats)):
            m = mats[bi][rng.integers(0, mats[bi].shape[0], mats[bi].shape[0])]
            total.append(macro(m, [g[rng.integers(0, len(g), len(g))] for g in groups]))
        stats.append(np.mean(total))
    stats = np.sort(stats)
    return 100 * point, 100 * stats[int(0.025 * reps)], 100 * stats[int(0.975 * reps) - 1], 100 * np.std(stats)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("analysis", choices=["recovery"])
    p.add_argument("--student", required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--out", default="results/analysis")
    p.add_argument("--problems", type=int, default=192)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    r = recovery(a.student, a.teacher, a.out, a.problems, seed=a.seed)
    print(table_md(r))
    print(within_md(r))


if __name__ == "__main__":
    main()

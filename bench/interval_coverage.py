"""Coverage of the study's 95% intervals on planted data: studies simulated from the nested model of SCOPE - OPD with
known variance components (points^2; a build variance, the seeds within a build, the problems shared by every run, and
each run's per-problem noise) and a known mean, counting how often each interval covers the mean.

Two designs are planted. The earlier one (results/study/default) reused training seeds 0, 1, 2 in every build, and a
seed fixed the RL prompt stream and the rollout and evaluation noise: part of a seed's effect is then the same in every
build (`shared`), which the t-interval over builds cannot see. The calibrated one keys every stream by (build, seed):
nothing shared. Both are planted with unequal seed variances like the real ones (0.2 to 44 points^2 across builds).
The intervals: the t-interval over builds (analysis.study_interval), the same with its standard error floored at what
the seeds alone put into it (floor=True), and the every-level bootstrap the report used until 2026-12-06.

    python bench/interval_coverage.py [--studies 1000] [--bootstrap-studies 200]
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import analysis  # noqa: E402

LEVELS = ("add3", "add4", "add5", "frac")
# seed-level variances (points^2) of SCOPE - OPD within the 12 builds of the earlier study span 0.2 to 44; drawn
# log-uniformly over that range, their mean is about 10
REAL_SEED_VARS = (0.2, 44.0)


def planted_study(rng, builds, seeds, problems, mu, var_build, var_seed=17.9, var_problem=5.0, var_noise=540.0,
                  shared=0.0, unequal=False):
    """One simulated study: [(keys, (seeds, problems x levels) differences in fractions)] per build. A difference is
    mu + build + seed + problem (the same test problems for every run) + noise, in points / 100.
    shared: the fraction of the seed variance that belongs to the seed index and is the same in every build (the
    earlier design); unequal: each build's seed variance drawn log-uniformly from REAL_SEED_VARS instead of var_seed."""
    keys = [(lv, i) for lv in LEVELS for i in range(problems)]
    problem = rng.normal(0, np.sqrt(var_problem), len(keys))
    common = rng.normal(0, np.sqrt(shared * var_seed), (seeds, 1)) if shared else 0.0   # seed s: the same everywhere
    out = []
    for _ in range(builds):
        v = np.exp(rng.uniform(*np.log(REAL_SEED_VARS))) if unequal else var_seed
        b = rng.normal(0, np.sqrt(var_build))
        s = common + rng.normal(0, np.sqrt((1 - shared) * v), (seeds, 1))
        noise = rng.normal(0, np.sqrt(var_noise), (seeds, len(keys)))
        out.append((keys, (mu + b + s + problem + noise) / 100))
    return out


def coverage(studies, builds, seeds, problems, mu, var_build, method, seed=0, **kw):
    """(fraction of studies whose 95% interval covers mu, mean half-width, mean smallest detectable) in points.
    method: "t" (over builds), "floor" (t with the seed floor), "bootstrap" (every level)."""
    rng = np.random.default_rng(seed)
    hit, half, mdd = 0, [], []
    for _ in range(studies):
        study = planted_study(rng, builds, seeds, problems, mu, var_build, **kw)
        if method in ("t", "floor"):
            d, lo, hi, se, m, _ = analysis.study_interval(study, LEVELS, floor=method == "floor")
        else:
            d, lo, hi, se = analysis.hierarchical(study, LEVELS, reps=500, seed=int(rng.integers(1 << 30)))
            m = 2.8 * se
        hit += lo <= mu <= hi
        half.append((hi - lo) / 2)
        mdd.append(m)
    return hit / studies, float(np.mean(half)), float(np.mean(mdd))


DESIGNS = {"calibrated: nothing shared, unequal seed variances": dict(shared=0.0, unequal=True),
           "earlier: 25% of the seed variance shared across builds": dict(shared=0.25),
           "earlier: 50% shared, unequal seed variances": dict(shared=0.5, unequal=True)}
NAMES = {"t": "t over builds", "floor": "t, SE floored at the seeds", "bootstrap": "every-level bootstrap"}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--studies", type=int, default=1000)
    p.add_argument("--bootstrap-studies", type=int, default=200)
    p.add_argument("--problems", type=int, default=64, help="test problems per level in a simulated study")
    a = p.parse_args()
    print(f"bench/interval_coverage.py, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; planted mean 1.0 point; "
          f"3 seeds per build; {a.problems} problems x 4 levels; components: seeds 17.9 (or unequal, log-uniform "
          "0.2-44), problems 5, noise 540 per problem, build variance 0 (points^2)")
    print("| design | builds | interval | studies | coverage of the 95% interval | mean half-width | "
          "mean smallest detectable |")
    print("|---|---|---|---|---|---|---|")
    for design, kw in DESIGNS.items():
        for builds in (8, 12):
            for method in ("t", "floor", "bootstrap"):
                n = a.bootstrap_studies if method == "bootstrap" else a.studies
                cov, half, mdd = coverage(n, builds, 3, a.problems, 1.0, 0.0, method, **kw)
                print(f"| {design} | {builds} | {NAMES[method]} | {n} | {100 * cov:.1f}% | {half:.2f} | {mdd:.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()

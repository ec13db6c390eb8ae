"""Coverage of the study's 95% intervals on planted data: studies simulated from the nested model of SCOPE - OPD with
known variance components (points^2; a build variance, the seeds within a build, the problems shared by every run, and
each run's per-problem noise) and a known mean. The interval the report uses (analysis.study_interval: a t-interval
over the builds) must cover the planted mean 93-97% of the time; the every-level bootstrap it replaced
(analysis.hierarchical) is measured beside it, and the smallest detectable difference both imply.

    python bench/interval_coverage.py [--studies 1000] [--bootstrap-studies 200]

The components default to those a method-of-moments fit found in the committed study (seeds within a build 17.9,
problems about 5, per-run noise about 540 per problem), with a build variance of 0 or 3.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import analysis  # noqa: E402

LEVELS = ("add3", "add4", "add5", "frac")


def planted_study(rng, builds, seeds, problems, mu, var_build, var_seed=17.9, var_problem=5.0, var_noise=540.0):
    """One simulated study: [(keys, (seeds, problems x levels) differences in fractions)] per build. A difference is
    mu + build + seed-within-build + problem (the same test problems for every run) + noise, in points / 100."""
    keys = [(lv, i) for lv in LEVELS for i in range(problems)]
    problem = rng.normal(0, np.sqrt(var_problem), len(keys))
    out = []
    for _ in range(builds):
        b = rng.normal(0, np.sqrt(var_build))
        s = rng.normal(0, np.sqrt(var_seed), (seeds, 1))
        noise = rng.normal(0, np.sqrt(var_noise), (seeds, len(keys)))
        out.append((keys, (mu + b + s + problem + noise) / 100))
    return out


def coverage(studies, builds, seeds, problems, mu, var_build, method, seed=0, **kw):
    """(fraction of studies whose 95% interval covers mu, mean half-width, mean smallest detectable) in points."""
    rng = np.random.default_rng(seed)
    hit, half, mdd = 0, [], []
    for _ in range(studies):
        study = planted_study(rng, builds, seeds, problems, mu, var_build, **kw)
        if method == "t":
            d, lo, hi, se, m, _ = analysis.study_interval(study, LEVELS)
        else:
            d, lo, hi, se = analysis.hierarchical(study, LEVELS, reps=500, seed=int(rng.integers(1 << 30)))
            m = 2.8 * se
        hit += lo <= mu <= hi
        half.append((hi - lo) / 2)
        mdd.append(m)
    return hit / studies, float(np.mean(half)), float(np.mean(mdd))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--studies", type=int, default=1000)
    p.add_argument("--bootstrap-studies", type=int, default=200)
    p.add_argument("--problems", type=int, default=64, help="test problems per level in a simulated study")
    a = p.parse_args()
    print(f"bench/interval_coverage.py, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; planted mean 1.0 point; "
          f"3 seeds per build; {a.problems} problems x 4 levels; components: seeds 17.9, problems 5, noise 540 per "
          "problem (points^2)")
    print("| builds | build variance | method | studies | coverage of the 95% interval | mean half-width | "
          "mean smallest detectable |")
    print("|---|---|---|---|---|---|---|")
    for builds in (3, 8):
        for var_build in (0.0, 3.0):
            for method, n in (("t", a.studies), ("bootstrap", a.bootstrap_studies)):
                t0 = time.time()
                cov, half, mdd = coverage(n, builds, 3, a.problems, 1.0, var_build, method)
                print(f"| {builds} | {var_build:g} | {'t over builds' if method == 't' else 'every-level bootstrap'} | "
                      f"{n} | {100 * cov:.1f}% | {half:.2f} | {mdd:.2f} |", flush=True)


if __name__ == "__main__":
    main()

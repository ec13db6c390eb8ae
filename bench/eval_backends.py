"""The two evaluation backends against each other: `python -m eval`'s hf (transformers generate) and vllm (here vLLM's
CPU build) on the tiny student, the whole tiny test split (4 levels x 256 problems), n = 8 samples, T = 1.0, fp32 in
both, the last box graded as training does. The backends draw from different samplers (seeded Gumbel noise against
vLLM's seeded sampler), so their samples differ; what must agree is the distribution. Paired by problem: the per-problem
Avg@8 difference (vllm - hf), its mean with a 95% bootstrap interval over problems (resampled within each level),
per level and overall. (That both backends feed the same prompt token ids is a test: tests/test_vllm.py.)

    python bench/eval_backends.py --out runs/eval-backends
"""
import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tiny_testbed  # noqa: E402
from eval import benchmarks  # noqa: E402
from eval.run import EvalArgs, evaluate  # noqa: E402


def per_problem(path):
    acc = {}
    for line in path.read_text().splitlines():
        s = json.loads(line)
        acc.setdefault(s["problem_id"], []).append(s["correct"])
    return {k: sum(v) / len(v) for k, v in acc.items()}


def bootstrap(diffs_by_level, reps=4000, seed=0):
    """95% interval of the mean difference, problems resampled within each level."""
    rng = random.Random(seed)
    n = sum(len(d) for d in diffs_by_level)
    means = sorted(sum(sum(rng.choice(d) for _ in d) for d in diffs_by_level) / n for _ in range(reps))
    return means[int(0.025 * reps)], means[int(0.975 * reps)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/eval-backends")
    p.add_argument("--limit", type=int, default=256, help="problems per level")
    p.add_argument("--n", type=int, default=8)
    a = p.parse_args()
    student, _ = tiny_testbed.build_tiny_models(".cache/scope")
    names = [f"{benchmarks.TINY}-{lv}" for lv in tiny_testbed.TINY_LEVELS]
    seconds = {}
    for backend in ("hf", "vllm"):
        t0 = time.time()
        evaluate(EvalArgs(model=str(student), preset="tiny", backend=backend, benchmarks=",".join(names), limit=a.limit,
                          n=a.n, out_dir=str(Path(a.out) / backend)), progress=False)
        seconds[backend] = time.time() - t0
    print(f"tiny student {student}, {a.limit} problems per level, n {a.n}, T 1.0, fp32, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; wall: hf {seconds['hf']:.0f} s, vllm {seconds['vllm']:.0f} s")
    print("| level | hf avg@%d | vllm avg@%d | vllm - hf (points) | 95%% interval |\n|---|---|---|---|---|" % (a.n, a.n))
    all_diffs = []
    for name in names:
        hf, vl = (per_problem(Path(a.out) / b / f"{name}.samples.jsonl") for b in ("hf", "vllm"))
        d = [vl[k] - hf[k] for k in hf]
        all_diffs.append(d)
        lo, hi = bootstrap([d])
        print(f"| {name} | {100 * statistics.mean(hf.values()):.1f} | {100 * statistics.mean(vl.values()):.1f} | "
              f"{100 * statistics.mean(d):+.1f} | [{100 * lo:+.1f}, {100 * hi:+.1f}] |")
    lo, hi = bootstrap(all_diffs)
    flat = [x for d in all_diffs for x in d]
    print(f"| all | | | {100 * statistics.mean(flat):+.1f} | [{100 * lo:+.1f}, {100 * hi:+.1f}] |")
    print("agree within sampling error" if lo <= 0 <= hi else "the interval excludes 0: the backends DISAGREE")


if __name__ == "__main__":
    main()

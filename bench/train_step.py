"""Seconds per SCOPE training step on the tiny preset, split by phase, and peak RSS.

    python bench/train_step.py                 # 16 prompts x 8 rollouts, <= 64 new tokens, 1 torch thread, fp32

Builds (or reuses) the tiny models first; the build is not timed. Reports the median over --steps steps after
--warmup steps.
"""
import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import scope  # noqa: E402
import tiny_testbed  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--method", default="scope")
    p.add_argument("--micro-batch-tokens", type=int, default=scope.Args.micro_batch_tokens)
    p.add_argument("--score-tokens", type=int, default=scope.Args.score_tokens)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as out:
        args = scope.Args(method=a.method, out_dir=out, steps=a.warmup + a.steps, prompts_per_step=16, n_rollouts=8,
                          micro_batch_tokens=a.micro_batch_tokens, score_tokens=a.score_tokens, max_new_tokens=64,
                          eval_every=0, save_every=0, threads=1)
        tiny_testbed.build_tiny_models(args.cache_dir)                       # not timed
        t0 = time.time()
        scope.train(args)
        wall = time.time() - t0
        recs = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()][a.warmup:]
    phases = ["time/generate", "time/verify", "time/score", "time/update"]
    med = {k: statistics.median(r[k] for r in recs) for k in phases}
    total = statistics.median(sum(r[k] for k in phases) for r in recs)
    print(f"method {a.method}: 16 prompts x 8 rollouts, max 64 new tokens, student d96/3 layers, teacher d192/4 "
          f"layers, fp32, 1 torch thread, micro-batches of {a.micro_batch_tokens} tokens (update) and {a.score_tokens} tokens (teacher); median of {len(recs)} steps after {a.warmup} warm-up steps")
    print("| phase | seconds per step |\n|---|---|")
    for k in phases:
        print(f"| {k.split('/')[1]} | {med[k]:.3f} |")
    print(f"| **total** | **{total:.3f}** |")
    print(f"mean response length {statistics.mean(r['rollout/mean_len'] for r in recs):.1f} tokens; "
          f"reward mean {statistics.mean(r['train/reward_mean'] for r in recs):.2f}; "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; wall {wall:.0f}s")


if __name__ == "__main__":
    main()

"""What the TRL integration costs: seconds per training step of examples/trl_scope.py (SCOPE inside TRL's GRPO trainer)
against scope.py's own loop, on the same tiny settings (the tiny models, 16 prompts x 8 rollouts, at most 64 new
tokens, T 1.0, lr 3e-4, one torch thread, 4 micro-batches in TRL; scope.py splits by its token budget). Two rounds,
each running TRL then scope.py for --steps steps; the median over steps 2..N of both rounds.

    python bench/trl_step.py --steps 8
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
import torch  # noqa: E402

import scope  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=8)
    a = p.parse_args()
    torch.set_num_threads(1)
    import trl_scope
    times = {"TRL (examples/trl_scope.py)": [], "scope.py": []}
    for _ in range(2):
        with tempfile.TemporaryDirectory() as tmp:
            trainer = trl_scope.main(["--steps", str(a.steps), "--out-dir", f"{tmp}/trl"])
            steps = [r["step_time"] for r in trainer.state.log_history if "step_time" in r]
            times["TRL (examples/trl_scope.py)"] += steps[1:]
            scope.train(scope.Args(out_dir=f"{tmp}/scope", steps=a.steps, eval_every=0, save_every=0))
            recs = [json.loads(line) for line in Path(f"{tmp}/scope/metrics.jsonl").read_text().splitlines()]
            times["scope.py"] += [sum(r[k] for k in ("time/generate", "time/verify", "time/score", "time/update"))
                                  for r in recs[1:]]
    print(f"tiny models, 16 prompts x 8 rollouts, <= 64 new tokens, T 1.0, 1 thread, median of steps 2..{a.steps} of "
          f"two rounds, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| trainer | s per step (median) | steps measured |\n|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {statistics.median(v):.2f} | {len(v)} |")
    ratio = statistics.median(times["TRL (examples/trl_scope.py)"]) / statistics.median(times["scope.py"])
    print(f"TRL / scope.py: {ratio:.2f}x")


if __name__ == "__main__":
    main()

"""Seconds per SFT step of the tiny teacher (the slowest part of the tiny build) with 1 and 2 torch threads, on an
idle machine and beside one busy neighbour (another 1-thread torch process doing matmuls, like a second run).

    python bench/threads.py            # about 2 minutes

Each measurement runs in a fresh process: 2 warm-up steps, then the median of --steps steps.
"""
import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEASURE = """
import sys, time, dataclasses, torch
sys.path.insert(0, {root!r})
import tiny_testbed as tb
from transformers import AutoModelForCausalLM
torch.set_num_threads({threads})
tok = tb.tiny_tokenizer()
rows = tb.tiny_task("train", 2000)
spec = dataclasses.replace(tb.TINY_TEACHER, sft_steps={steps} + 2)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(tb.tiny_model_config(spec, tok))
times = [time.time()]
tb.sft(model, tok, rows, spec, 0, "measure", lambda s: times.append(time.time()))
print(*[b - a for a, b in zip(times[2:], times[3:])])
"""
NEIGHBOUR = "import torch; torch.set_num_threads(1); a = torch.randn(512, 512)\nwhile True: a = torch.tanh(a @ a)"


def measure(threads, steps):
    code = MEASURE.format(root=str(ROOT), threads=threads, steps=steps)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return statistics.median(float(x) for x in out.split())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args()
    print(f"tiny teacher SFT step (d192, 4 layers, batch 64), median of {a.steps} steps, {time.strftime('%c')}")
    print("| machine | 1 thread (s/step) | 2 threads (s/step) | 2 threads / 1 thread |\n|---|---|---|---|")
    for load in ("idle", "one busy neighbour"):
        neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR]) if load != "idle" else None
        try:
            time.sleep(1 if neighbour else 0)
            one, two = measure(1, a.steps), measure(2, a.steps)
        finally:
            if neighbour:
                neighbour.kill()
                neighbour.wait()
        print(f"| {load} | {one:.2f} | {two:.2f} | {two / one:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

"""Rollout throughput on this machine: HF `generate` against the vLLM engine (vllm_engine.VLLMRollouts; here vLLM's
CPU build), on the tiny preset's training step: the same prompts (16 per step, the loop's data order), N = 8 rollouts,
at most 64 new tokens, temperature 1.0, per-rollout seeds, the tiny student in fp32 (the engine holds a bf16 copy).
The two engines alternate step by step, so both see the same machine load. vLLM's time per step includes the weight
push (every step in the loop). Also: the engine's start-up (import, build) in this process.

    python bench/rollout_engines.py --steps 8
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

import loading  # noqa: E402
import scope  # noqa: E402
import tiny_testbed  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    args = scope.Args(rollout_engine="vllm", threads=a.threads)
    student, _ = tiny_testbed.build_tiny_models(args.cache_dir, threads=a.threads)
    tok = loading.load_tokenizer(str(student), "student")
    model = loading.load_model(str(student), "student", "float32")
    rows = tiny_testbed.tiny_task("train", 20000, args.seed)
    t0 = time.time()
    import vllm  # noqa: F401

    import vllm_engine
    t_import = time.time() - t0
    t0 = time.time()
    engine = vllm_engine.VLLMRollouts(args, str(student))
    t_build = time.time() - t0
    times = {"hf": [], "vllm": [], "vllm_push": []}
    tokens = {"hf": [], "vllm": []}
    for step in range(a.steps + 1):                                   # step 0: warm-up, not counted
        idx = loading.step_prompts(step, len(rows), args.prompts_per_step, args.seed)
        prompts = [scope.prompt_text(tok, rows[i]["problem"]) for i in idx]
        for name in ("hf", "vllm") if step % 2 else ("vllm", "hf"):
            t0 = time.time()
            if name == "hf":
                b = scope.generate(model, tok, prompts, args.n_rollouts, args.max_new_tokens, args.temperature,
                                   seeds=scope.row_seeds(args.seed, step, [(j, i) for j in range(len(idx))
                                                                           for i in range(args.n_rollouts)]))
            else:
                t_push = time.time()
                engine.push_weights(model)                            # generate pushes again: time it on its own
                t_push = time.time() - t_push
                b = engine.generate(model, tok, prompts, args.n_rollouts, scope.row_seeds(
                    args.seed, step, [(j,) for j in range(len(idx))]), torch.device("cpu"))
            dt = time.time() - t0
            if step:
                times[name].append(dt - (t_push if name == "vllm" else 0.0))
                tokens[name].append(int(b["response_mask"].sum()))
                if name == "vllm":
                    times["vllm_push"].append(t_push)
    med = {k: statistics.median(v) for k, v in times.items()}
    tps = {k: statistics.median(t / s for t, s in zip(tokens[k], times[k])) for k in tokens}
    print(f"tiny student, {args.prompts_per_step} prompts x {args.n_rollouts} rollouts, <= {args.max_new_tokens} new "
          f"tokens, {a.threads} thread(s), median of {a.steps} steps, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"vLLM start-up: import {t_import:.1f} s, engine build {t_build:.1f} s")
    print("| engine | s per step (generation) | response tokens per step | tokens/s |\n|---|---|---|---|")
    for k in ("hf", "vllm"):
        print(f"| {k} | {med[k]:.3f} | {statistics.median(tokens[k]):.0f} | {tps[k]:.0f} |")
    print(f"| vllm weight push (per step, on top) | {med['vllm_push']:.3f} | | |")
    print(f"vllm / hf tokens/s: {tps['vllm'] / tps['hf']:.2f}x (with the push: "
          f"{statistics.median(tokens['vllm']) / (med['vllm'] + med['vllm_push']) / tps['hf']:.2f}x)")


if __name__ == "__main__":
    main()

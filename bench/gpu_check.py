"""One GPU check, meant to finish in under 10 minutes on one CUDA GPU with no internet. Writes a JSON report and
prints a table. It runs on whatever torch / transformers it finds and states their versions.

  (a) the tiny pipeline on CUDA: small tiny-testbed models built on the spot, a few steps of every method with
      NCCL at world size 1 (FSDP2 path), periodic evaluation on the tiny test split;
  (b) paper-shaped models with random weights (Qwen2.5-1.5B-shaped student in fp32 with bf16 autocast, 7B-shaped
      teacher in bf16, vocabulary 151,936): one SCOPE step of 2 prompts x 8 rollouts at 4096 and 8192 new tokens
      (random models rarely emit eos, so the lengths are real), seconds and peak GPU memory per phase;
  (c) the vLLM rollout engine (scope.VLLMRollouts), only if `vllm` imports: the tiny SCOPE run of (a) again with
      --rollout_engine vllm (colocated engine, sleep mode, weight push every step), reporting the sampler gap per
      step (engine vs trainer log-probs of the same tokens: small when the pushed weights are the trainer's).

    python bench/gpu_check.py --out gpu_check.json
    python bench/gpu_check.py --dry-run            # CPU, gloo, tiny shapes: the bookkeeping only (a test runs it)

Status: written and run on CPU in --dry-run mode only (no GPU was lent to the sessions that wrote it; (c) has
never run).
"""
import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import platform
import socket
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

import scope  # noqa: E402
import tiny_testbed  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_pipeline(dry, work, with_vllm=False):
    """(a): every method for a few steps through scope.train at world size 1, then the periodic evaluation;
    (c) with_vllm: SCOPE once more with the vLLM rollout engine."""
    spec = dict(hidden=64, layers=2, heads=4, sft_lr=3e-3, sft_batch=32, warmup=5)
    steps = (20, 20) if dry else (300, 200)
    student, teacher = tiny_testbed.build_tiny_models(work / "cache", tiny_testbed.TinyModel(sft_steps=steps[0], **spec),
                                                      tiny_testbed.TinyModel(sft_steps=steps[1], **spec), log=print)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    out = {}
    try:
        runs = {m: dict(method=m) for m in ("scope", "opd", "grpo", "kd")}
        if with_vllm:
            runs["scope-vllm"] = dict(method="scope", rollout_engine="vllm", vllm_gpu_memory=0.2, max_prompt_tokens=256)
        for name, run in runs.items():
            n = 2 if dry else 20
            args = scope.resolve(dict(student=str(student), teacher=str(teacher), steps=n, prompts_per_step=8,
                                      n_rollouts=4, max_new_tokens=48, eval_every=n, eval_problems=16, eval_k=2,
                                      save_every=0, out_dir=str(work / name), **run))
            t0 = time.time()
            try:
                scope.train(args)
            except Exception as e:                                         # report it, keep the other checks
                out[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
                continue
            recs = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
            out[name] = {"seconds": round(time.time() - t0, 1), "reward_mean": recs[-1]["train/reward_mean"],
                         "loss": recs[-1]["loss"], "eval_avg@2": recs[-1]["eval/all/avg@2"],
                         "sampler_gap": [r.get("rollout/sampler_gap") for r in recs],
                         "time_generate": [round(r["time/generate"], 2) for r in recs]}
    finally:
        for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.pop(k, None)
    return out


class RandomPrompts:
    """The few tokenizer calls scope.generate makes, for prompts that are already token ids."""
    pad_token_id, eos_token_id = 0, 1

    def __init__(self, ids):
        self.ids = ids                                                     # (B, P)

    def __call__(self, prompts, **kw):
        return {"input_ids": self.ids, "attention_mask": torch.ones_like(self.ids)}


def paper_shaped_step(dry, device, new_tokens):
    """(b): one SCOPE step at paper shapes with random weights; per phase seconds and peak memory."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    small = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    s_cfg = Qwen2Config(**(small if dry else dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                                  num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2)))
    t_cfg = Qwen2Config(**(small if dry else dict(vocab_size=151936, hidden_size=3584, intermediate_size=18944,
                                                  num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4)))
    torch.manual_seed(0)
    bf16 = torch.bfloat16 if device.type == "cuda" else torch.float32
    student = Qwen2ForCausalLM(s_cfg).to(device).eval()                    # fp32 master weights
    teacher = Qwen2ForCausalLM(t_cfg).to(device, bf16).eval()
    args = dataclasses.replace(scope.resolve({"preset": "paper"}), n_rollouts=8, max_new_tokens=new_tokens,
                               dtype="bfloat16" if device.type == "cuda" else "float32", rollout_tokens=0,
                               gradient_checkpointing=True)
    student.gradient_checkpointing_enable()
    amp = (lambda: torch.autocast("cuda", torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    rt = types.SimpleNamespace(rank=0, world=1, device=device, fsdp=False, amp=amp)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    tok = RandomPrompts(torch.randint(2, s_cfg.vocab_size, (2, 64 if dry else 512)))
    phases, cuda = {}, device.type == "cuda"

    def phase(name, fn):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        result = fn()
        if cuda:
            torch.cuda.synchronize()
        phases[name] = {"seconds": round(time.time() - t0, 2),
                        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None}
        return result

    with amp():
        batch = phase("generate", lambda: scope.generate(student, tok, ["", ""], 8, new_tokens, args.temperature,
                                                         seeds=None))
    batch["rewards"] = (torch.arange(16, device=device) % 2).float()        # both paths get rollouts
    batch["groups"] = torch.arange(2, device=device).repeat_interleave(8)
    lp_t = phase("score", lambda: scope.score_logprobs(teacher, batch, batch["groups"], args.score_tokens))
    phase("update", lambda: scope.update_student(args, rt, student, opt, batch, lp_t, None))
    return {"response_tokens": int(batch["response_mask"].sum()), "phases": phases}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: bookkeeping only")
    p.add_argument("--out", default="gpu_check.json")
    a = p.parse_args()
    cuda = torch.cuda.is_available() and not a.dry_run
    if not cuda and not a.dry_run:
        raise SystemExit("no CUDA device: run with --dry-run on a CPU")
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    torch.set_num_threads(1 if a.dry_run else min(8, os.cpu_count() or 1))
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "dry_run": a.dry_run, "python": platform.python_version(),
              "torch": torch.__version__, "cuda": torch.version.cuda,
              "device": torch.cuda.get_device_name(0) if cuda else "cpu",
              "transformers": importlib.import_module("transformers").__version__}
    t0 = time.time()
    has_vllm = importlib.util.find_spec("vllm") is not None
    with tempfile.TemporaryDirectory() as work:
        report["a_tiny_pipeline"] = tiny_pipeline(a.dry_run, Path(work), with_vllm=has_vllm and cuda)
    report["b_paper_shaped"] = {str(n): paper_shaped_step(a.dry_run, device, n) for n in ((16, 32) if a.dry_run
                                                                                            else (4096, 8192))}
    report["c_vllm"] = {"importable": has_vllm, "engine": report["a_tiny_pipeline"].pop("scope-vllm", "not run")}
    report["seconds"] = round(time.time() - t0, 1)
    Path(a.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("date", "torch", "cuda", "device", "transformers")}))
    print("| check | result |\n|---|---|")
    for method, r in report["a_tiny_pipeline"].items():
        print(f"| (a) tiny {method} | " + (r["error"] if "error" in r else f"{r['seconds']} s, reward "
              f"{r['reward_mean']:.2f}, eval avg@2 {r['eval_avg@2']:.2f}") + " |")
    for n, r in report["b_paper_shaped"].items():
        cells = ", ".join(f"{k} {v['seconds']} s" + (f" / {v['peak_gib']} GiB" if v["peak_gib"] is not None else "")
                          for k, v in r["phases"].items())
        print(f"| (b) {n} new tokens, {r['response_tokens']} response tokens | {cells} |")
    print(f"| (c) vllm | importable: {report['c_vllm']['importable']}; engine: {report['c_vllm']['engine']} |")
    print(f"total {report['seconds']} s; report: {a.out}")


if __name__ == "__main__":
    main()

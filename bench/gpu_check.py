"""One GPU check, meant to finish in under 10 minutes on one CUDA GPU with no internet. Writes a JSON report and
prints a table. It runs on whatever torch / transformers it finds and states their versions.

  (a) the tiny pipeline on CUDA: small tiny-testbed models built on the spot, a few steps of every method with
      NCCL at world size 1 (FSDP2 path), periodic evaluation on the tiny test split;
  (b) paper-shaped models with random weights (Qwen2.5-1.5B-shaped student in fp32 with bf16 autocast, 7B-shaped
      teacher in bf16, vocabulary 151,936): one SCOPE step of 2 prompts x 8 rollouts at 4096 and 8192 new tokens
      (random models rarely emit eos, so the lengths are real), seconds and peak GPU memory per phase;
  (c) the vLLM engine path (vllm_engine.py), which needs a machine with vllm installed (without it: FAIL, not a
      skip), in one held process group: SCOPE then OPD on the engine (sleep mode on a GPU; the second run must reuse
      the engine), the sampler gap per step, a fixed-sequence check (engine vs fp32 trainer log-probs after each of 3
      large AdamW steps and pushes), teardown while asleep (sleep, close, build a second engine, generate: vLLM issue
      #36651), and on a GPU an fp8 engine (vLLM's online quantisation, so the reload path must re-quantise).
  Every part that cannot run on this machine (no vllm; no sleep mode or fp8 on the CPU) prints FAIL with the reason.

    python bench/gpu_check.py --out gpu_check.json
    python bench/gpu_check.py --dry-run            # CPU, gloo, tiny shapes: the bookkeeping only (a test runs it)

Status: run on CPU in --dry-run mode only, where (c) runs on vLLM's CPU build (no sleep mode, no fp8); no GPU was
lent to the sessions that wrote it, and the GPU machine lent to some tasks has no vllm (its wheel is over the 64 MiB that
can be carried), so (c) has never run on a GPU.
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


def tiny_models(dry, work):
    spec = dict(hidden=64, layers=2, heads=2, sft_lr=3e-3, sft_batch=32, warmup=5)
    steps = (20, 20) if dry else (300, 200)
    return tiny_testbed.build_tiny_models(work / "cache", tiny_testbed.TinyModel(sft_steps=steps[0], **spec),
                                          tiny_testbed.TinyModel(sft_steps=steps[1], **spec), log=print)


def tiny_args(dry, work, student, teacher, name, **run):
    n = 2 if dry else 20
    return scope.resolve(dict(student=str(student), teacher=str(teacher), steps=n, prompts_per_step=8, n_rollouts=4,
                              max_new_tokens=48, eval_every=n, eval_problems=16, eval_k=2, save_every=0,
                              out_dir=str(work / name), **run))


def run_record(work, name, t0):
    recs = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    return {"seconds": round(time.time() - t0, 1), "reward_mean": recs[-1]["train/reward_mean"], "loss": recs[-1]["loss"],
            "eval_avg@2": recs[-1]["eval/all/avg@2"], "sampler_gap": [r.get("rollout/sampler_gap") for r in recs],
            "time_generate": [round(r["time/generate"], 2) for r in recs]}


def tiny_pipeline(dry, work):
    """(a): every method for a few steps through scope.train at world size 1, then the periodic evaluation."""
    student, teacher = tiny_models(dry, work)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    out = {}
    try:
        for m in ("scope", "opd", "grpo", "kd"):
            t0 = time.time()
            try:
                scope.train(tiny_args(dry, work, student, teacher, m, method=m))
            except Exception as e:                                         # report it, keep the other checks
                out[m] = {"error": f"{type(e).__name__}: {e}"[:2000]}
                continue
            out[m] = run_record(work, m, t0)
    finally:
        for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.pop(k, None)
    return out


def vllm_checks(dry, work):
    """(c), when vllm imports: the engine path the CPU build cannot run completely. In one held process group (as
    reproduce.py holds it): SCOPE and then OPD on the vLLM engine (sleep mode on a GPU; the second run must reuse the
    first run's engine: CUDA allows one sleep-mode engine per process), the fixed-sequence check (after each of 3 AdamW
    steps at lr 3e-3, the pushed engine's log-probs against the fp32 trainer's), and on a GPU an fp8 engine (vLLM's
    online quantisation: the reload path must re-quantise; a rebuild after the first engine is shut down)."""
    import copy
    import torch.distributed as dist
    import vllm_engine
    from vllm import SamplingParams
    student, teacher = tiny_models(dry, work)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    out, engines = {}, []
    try:
        runs = {"scope-vllm": {}, "opd-vllm": dict(method="opd")}
        if torch.cuda.is_available():
            runs["scope-vllm-fp8"] = dict(vllm_quantization="fp8")
        for name, run in runs.items():
            t0 = time.time()
            try:
                scope.train(tiny_args(dry, work, student, teacher, name, **{"method": "scope", "rollout_engine": "vllm",
                                                                            "vllm_gpu_memory": 0.2, **run}))
                out[name] = run_record(work, name, t0)
            except Exception as e:
                out[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            engines.append(id(vllm_engine._ENGINE.get("llm")))
        out["engine_reused_by_the_second_run"] = engines[0] == engines[1]
        out["teardown_while_asleep"] = teardown_while_asleep(dry, work, student, teacher)
        try:                                                               # the fixed-sequence check
            tok, model = scope.load_tokenizer(str(student), "student"), scope.load_model(str(student), "student", "float32",
                                                                                    "cuda" if torch.cuda.is_available() else "cpu")
            engine = vllm_engine.VLLMRollouts(tiny_args(dry, work, student, teacher, "sync", rollout_engine="vllm",
                                                        vllm_gpu_memory=0.2), str(student))
            seqs = [tok(scope.prompt_text(tok, p) + r, add_special_tokens=False)["input_ids"]
                    for p, r in [("3+4-2=?", "3+4=7; 7-2=5 \\boxed{5}"), ("1/3+1/3=?", "1+1=2 \\boxed{\\frac{2}{3}}")]]
            opt, rows = torch.optim.AdamW(model.parameters(), lr=3e-3), []

            def trainer(m):
                with torch.no_grad():
                    return torch.cat([scope.model_logprobs(m, torch.tensor([q[1:]], device=model.device),
                                                           input_ids=torch.tensor([q[:-1]], device=model.device)
                                                           ).logits[0].float().cpu() for q in seqs])
            for step in range(3):
                ids = torch.tensor([seqs[step % 2]], device=model.device)
                loss = scope.model_logprobs(model, ids[:, 1:], input_ids=ids[:, :-1]).logits.sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                engine.push_weights(model)
                outs = engine.llm.generate([{"prompt_token_ids": q} for q in seqs], SamplingParams(
                    max_tokens=1, prompt_logprobs=0, detokenize=False), use_tqdm=False)
                got = torch.cat([torch.tensor([d[t].logprob for d, t in zip(o.prompt_logprobs[1:], q[1:])])
                                 for o, q in zip(outs, seqs)])
                want = trainer(model)
                bf16 = (trainer(copy.deepcopy(model).to(torch.bfloat16)) - want).abs()
                rows.append({"mean": round(float((got - want).abs().mean()), 4), "max": round(float((got - want).abs().max()), 3),
                             "bf16_copy_mean": round(float(bf16.mean()), 4)})
            out["fixed_sequences"] = rows
        except Exception as e:
            out["fixed_sequences"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
    finally:
        vllm_engine.close_engine()
        dist.destroy_process_group()
        for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.pop(k, None)
    return out


def teardown_while_asleep(dry, work, student, teacher):
    """Sleep, close, build a second engine, generate: closing an engine that sleeps must leave the next one working
    (vllm_engine.close_engine wakes it first and checks the allocator). Needs sleep mode (a GPU)."""
    import vllm_engine
    from vllm.platforms import current_platform
    if not current_platform.is_sleep_mode_available():
        return {"FAIL": "cannot run here: this platform has no sleep mode (a GPU with vllm runs it)"}
    try:
        args = tiny_args(dry, work, student, teacher, "teardown", rollout_engine="vllm", vllm_gpu_memory=0.2)
        first = vllm_engine.VLLMRollouts(args, str(student))            # built asleep
        asleep = vllm_engine._ENGINE.get("asleep")
        vllm_engine.close_engine()
        held = vllm_engine.allocator_bytes()
        second = vllm_engine.VLLMRollouts(dataclasses.replace(args, max_new_tokens=40), str(student))   # a new engine
        tok = scope.load_tokenizer(str(student), "student")
        model = scope.load_model(str(student), "student", "float32", "cuda")
        b = second.generate(model, tok, [scope.prompt_text(tok, "1+2=?")], 2, [1], torch.device("cuda"))
        return {"asleep_when_closed": bool(asleep), "allocator_bytes_after_close": held, "second_engine_built":
                second.llm is not first.llm, "generated_tokens": int(b["response_mask"].sum())}
    except Exception as e:
        return {"FAIL": f"{type(e).__name__}: {e}"[:2000]}


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
    p.add_argument("--parts", default="abc", help="which of the checks (a), (b), (c) to run")
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
        report["a_tiny_pipeline"] = tiny_pipeline(a.dry_run, Path(work)) if "a" in a.parts else {}
    report["b_paper_shaped"] = {str(n): paper_shaped_step(a.dry_run, device, n) for n in ((16, 32) if a.dry_run
                                                                                            else (4096, 8192))
                                if "b" in a.parts}
    with tempfile.TemporaryDirectory() as work:
        report["c_vllm"] = {} if "c" not in a.parts else {"importable": has_vllm, **(
            vllm_checks(a.dry_run, Path(work)) if has_vllm else
            {"FAIL": "vllm is not installed: the vLLM part needs a machine with vllm installed"})}
        if has_vllm and not cuda and "c" in a.parts:
            report["c_vllm"]["scope-vllm-fp8"] = {"FAIL": "cannot run here: fp8 needs a GPU"}
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
    fails = []
    for k, v in report["c_vllm"].items():
        bad = v.get("FAIL") or v.get("error") if isinstance(v, dict) else (v if k == "FAIL" else None)
        fails += [k] if bad else []
        print(f"| (c) vllm {k} | " + (f"FAIL: {bad}" if bad else f"{v['seconds']} s, sampler gap per step "
              f"{v['sampler_gap']}" if isinstance(v, dict) and "seconds" in v else json.dumps(v)) + " |")
    fails += [m for m, r in report["a_tiny_pipeline"].items() if "error" in r]
    print(f"total {report['seconds']} s; report: {a.out}")
    print(f"summary: {len(fails)} part(s) FAIL ({', '.join(fails)})" if fails else "summary: every part ran",
          "- the vLLM part (c) needs a machine with vllm installed" if not has_vllm else "")


if __name__ == "__main__":
    main()

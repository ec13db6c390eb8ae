"""The first GPU run, in one command: under 5 minutes on one CUDA GPU with torch + CUDA and no internet (what a lent
machine has: torch 2.11, transformers 5.17, no vllm). Every part prints PASS or FAIL against a stated threshold; the
JSON report is rewritten after every part, so a part that raises (or a crash in the last teardown) loses nothing.

  (a) the tiny pipeline on CUDA, one process, bf16 autocast: small tiny-testbed models built on the spot, 3 steps of
      every method (scope, opd, psr, grpo, kd) with the periodic evaluation. PASS: every step's loss and gradient norm
      finite, the student's weights on the GPU after training, and (not kd) the sampler gap (generate's log-probs
      against the update's, both bf16) under 0.05 nats per token;
  (t) the same tiny run under `torchrun --nproc-per-node=1` (NCCL, FSDP2): PASS: exit 0, 3 steps with finite losses,
      a checkpoint, the sampler gap under 0.05;
  (b) paper-shaped models with random weights (1.5B-shaped student, fp32 master weights and bf16 autocast; 7B-shaped
      teacher in bf16; vocabulary 151,936): one SCOPE step of 2 prompts x 8 rollouts at --paper-tokens new tokens
      (random models rarely emit eos, so the lengths are real); seconds and peak memory per phase. PASS: the step
      runs and its peak stays under 90% of the GPU;
  (c) the vLLM engine (vllm_engine.py), only where vllm imports (else FAIL, not a skip), in one held process group:
      SCOPE then OPD on the engine (the second run must reuse the engine: FAIL otherwise), sampler gap per step under
      0.05; the fixed-sequence check (engine vs fp32 trainer log-probs after each of 3 large AdamW steps and pushes,
      mean within 1.5 x a bf16 copy's + 0.005); teardown while asleep (sleep, close, build a second engine, generate:
      vLLM issue #36651); on a GPU an fp8 engine (sampler gap under 0.2).

    python bench/gpu_check.py                        # report: runs/gpu_check/gpu_check.json
    python bench/gpu_check.py --report PATH --parts ab
    python bench/gpu_check.py --dry-run              # CPU, gloo, tiny shapes: the bookkeeping only (a test runs it)

Status: run on the CPU in --dry-run mode only (docs/what_has_run.md). (c) runs there on vLLM's CPU build, without
sleep mode or fp8, which print FAIL.
"""
import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

import loading  # noqa: E402
import scope  # noqa: E402
import tiny_testbed  # noqa: E402
from logprobs import model_logprobs  # noqa: E402

GAP = 0.05          # nats per token: bf16 sampler against bf16 (or fp32) trainer
FP8_GAP = 0.2       # an fp8 engine against the fp32 trainer
METHODS = ("scope", "opd", "psr", "grpo", "kd")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def verdict(ok, threshold, **facts):
    return {"verdict": "PASS" if ok else "FAIL", "threshold": threshold, **facts}


def failed(e):
    return {"verdict": "FAIL", "threshold": "runs without an error", "error": f"{type(e).__name__}: {e}"[:2000],
            "traceback": traceback.format_exc()[-3000:]}


def tiny_models(dry, work):
    spec = dict(hidden=64, layers=2, heads=2, sft_lr=3e-3, sft_batch=32, warmup=5)
    steps = (20, 20) if dry else (300, 200)
    return tiny_testbed.build_tiny_models(work / "cache", tiny_testbed.TinyModel(sft_steps=steps[0], **spec),
                                          tiny_testbed.TinyModel(sft_steps=steps[1], **spec), log=print)


def tiny_args(dry, work, student, teacher, name, **run):
    n = 2 if dry else 3
    return scope.resolve({**dict(student=str(student), teacher=str(teacher), steps=n, prompts_per_step=8, n_rollouts=4,
                                 max_new_tokens=48, eval_every=n, eval_problems=16, eval_k=2, save_every=0,
                                 dtype="float32" if dry else "bfloat16", out_dir=str(work / name)), **run})


def read_run(out, t0, gap_limit=GAP, kd=False):
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    gaps = [r.get("rollout/sampler_gap") for r in recs]
    finite = all(math.isfinite(r["loss"]) and math.isfinite(r["train/grad_norm"]) for r in recs)
    ok = finite and (kd or all(g is not None and g < gap_limit for g in gaps))
    return verdict(ok, "finite loss and grad norm every step" + ("" if kd else f"; sampler gap < {gap_limit}"),
                   seconds=round(time.time() - t0, 1), steps=len(recs), loss=[r["loss"] for r in recs],
                   sampler_gap=gaps, eval_avg=recs[-1].get("eval/all/avg@2"),
                   time_generate=[round(r["time/generate"], 2) for r in recs])


def tiny_pipeline(dry, work, device, report, save):
    """(a): every method through scope.train in this process (no torchrun), bf16 autocast on the GPU."""
    student, teacher = tiny_models(dry, work)
    for m in METHODS:
        t0 = time.time()
        try:
            model = scope.train(tiny_args(dry, work, student, teacher, m, method=m))
            r = read_run(work / m, t0, kd=m == "kd")
            on = {p.device.type for p in model.parameters()}
            r.update(weights_on=sorted(on))
            if on != {device.type}:
                r.update(verdict="FAIL", threshold=r["threshold"] + f"; weights on {device.type}")
        except Exception as e:                                             # report it, keep the other checks
            r = failed(e)
        report["a_tiny_pipeline"][m] = r
        save()


def torchrun_part(dry, work, report, save):
    """(t): the tiny SCOPE run under torchrun with one rank: NCCL on a GPU (gloo in the dry run) and FSDP2."""
    student, teacher = tiny_models(dry, work)
    a = tiny_args(dry, work, student, teacher, "torchrun")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in dataclasses.asdict(a).items()
             if k in ("student", "teacher", "steps", "prompts_per_step", "n_rollouts", "max_new_tokens", "eval_every",
                      "eval_problems", "eval_k", "save_every", "dtype", "out_dir")]
    t0 = time.time()
    try:
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1",
                              f"--master-port={free_port()}", str(ROOT / "scope.py"), *flags], capture_output=True,
                             text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if res.returncode:
            r = verdict(False, "exit 0", returncode=res.returncode, stderr=res.stderr[-3000:])
        else:
            r = read_run(work / "torchrun", t0)
            if not (work / "torchrun" / "checkpoint" / "state.json").exists():
                r.update(verdict="FAIL", threshold=r["threshold"] + "; a checkpoint")
    except Exception as e:
        r = failed(e)
    report["t_torchrun_fsdp2"] = r
    save()


class RandomPrompts:
    """The few tokenizer calls scope.generate makes, for prompts that are already token ids."""
    pad_token_id, eos_token_id = 0, 1

    def __init__(self, ids):
        self.ids = ids                                                     # (B, P)

    def __call__(self, prompts, **kw):
        return {"input_ids": self.ids.tolist(), "attention_mask": [[1] * self.ids.shape[1]] * self.ids.shape[0]}


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
    cuda = device.type == "cuda"
    student = Qwen2ForCausalLM(s_cfg).to(device).eval()                    # fp32 master weights
    teacher = Qwen2ForCausalLM(t_cfg).to(device, torch.bfloat16 if cuda else torch.float32).eval()
    args = dataclasses.replace(scope.resolve({"preset": "paper"}), n_rollouts=8, max_new_tokens=new_tokens,
                               dtype="bfloat16" if cuda else "float32", rollout_tokens=0, gradient_checkpointing=True)
    student.gradient_checkpointing_enable()
    amp = (lambda: torch.autocast("cuda", torch.bfloat16)) if cuda else contextlib.nullcontext
    rt = types.SimpleNamespace(rank=0, world=1, device=device, fsdp=False, amp=amp)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    tok = RandomPrompts(torch.randint(2, s_cfg.vocab_size, (2, 64 if dry else 512), device="cpu"))
    phases = {}

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
    batch["logp_teacher"] = phase("score", lambda: scope.score_logprobs(teacher, batch, batch["groups"],
                                                                        args.score_tokens))
    phase("update", lambda: scope.update_student(args, rt, student, opt, batch))
    total = torch.cuda.get_device_properties(device).total_memory / 2**30 if cuda else math.inf
    peak = max((p["peak_gib"] or 0.0) for p in phases.values())
    return verdict(peak < 0.9 * total, f"peak < 90% of the GPU ({0.9 * total:.0f} GiB)" if cuda else "runs",
                   response_tokens=int(batch["response_mask"].sum()), phases=phases)


def vllm_checks(dry, work, device, report, save):
    """(c), when vllm imports: the engine path the CPU build cannot run completely, in one held process group (as
    reproduce.py holds it)."""
    import torch.distributed as dist

    import ranks
    import vllm_engine
    out = report["c_vllm"]
    student, teacher = tiny_models(dry, work)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    ranks.init_group(600)
    try:
        runs, engines = {"scope-vllm": {}, "opd-vllm": dict(method="opd")}, []
        if device.type == "cuda":
            runs["scope-vllm-fp8"] = dict(vllm_quantization="fp8")
        for name, run in runs.items():
            t0 = time.time()
            try:
                scope.train(tiny_args(dry, work, student, teacher, name, **{
                    "method": "scope", "rollout_engine": "vllm", "vllm_gpu_memory": 0.2, "dtype": "float32", **run}))
                out[name] = read_run(work / name, t0, FP8_GAP if "fp8" in name else GAP)
            except Exception as e:
                out[name] = failed(e)
            engines.append(id(vllm_engine._ENGINE.get("llm")))
            save()
        reused = engines[0] == engines[1] != id(None)
        out["engine_reused_by_the_second_run"] = verdict(reused, "the second run (same settings) reuses the engine")
        save()
        out["teardown_while_asleep"] = teardown_while_asleep(dry, work, student, teacher, device)
        save()
        try:
            out["fixed_sequences"] = fixed_sequences(dry, work, student, teacher, device)
        except Exception as e:
            out["fixed_sequences"] = failed(e)
        save()
    finally:
        try:
            vllm_engine.close_engine()
        except Exception as e:                                             # recorded, not lost
            out["final_close"] = failed(e)
        dist.destroy_process_group()
        for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.pop(k, None)
        save()


def fixed_sequences(dry, work, student, teacher, device):
    """After each of 3 AdamW steps at lr 3e-3 and a push, the engine's log-probs of fixed sequences against the fp32
    trainer's: within what a bf16 copy of the trainer is off (mean <= 1.5 x + 0.005)."""
    import copy

    from vllm import SamplingParams

    import vllm_engine
    tok = loading.load_tokenizer(str(student), "student")
    model = loading.load_model(str(student), "student", "float32", device)
    engine = vllm_engine.VLLMRollouts(tiny_args(dry, work, student, teacher, "sync", rollout_engine="vllm",
                                                vllm_gpu_memory=0.2), str(student))
    seqs = [tok(scope.prompt_text(tok, p) + r, add_special_tokens=False)["input_ids"]
            for p, r in [("3+4-2=?", "3+4=7; 7-2=5 \\boxed{5}"), ("1/3+1/3=?", "1+1=2 \\boxed{\\frac{2}{3}}")]]
    opt, rows = torch.optim.AdamW(model.parameters(), lr=3e-3), []

    def trainer(m):
        with torch.no_grad():
            return torch.cat([model_logprobs(m, torch.tensor([q[1:]], device=device),
                                             input_ids=torch.tensor([q[:-1]], device=device)).logits[0].float().cpu()
                              for q in seqs])
    for step in range(3):
        ids = torch.tensor([seqs[step % 2]], device=device)
        loss = model_logprobs(model, ids[:, 1:], input_ids=ids[:, :-1]).logits.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        engine.generate(model, tok, [scope.prompt_text(tok, "1+1=?")], 1, None, device)   # push, check, sample
        outs = engine.llm.generate([{"prompt_token_ids": q} for q in seqs], SamplingParams(
            max_tokens=1, prompt_logprobs=0, detokenize=False), use_tqdm=False)
        got = torch.cat([torch.tensor([d[t].logprob for d, t in zip(o.prompt_logprobs[1:], q[1:])], device="cpu")
                         for o, q in zip(outs, seqs)])
        want = trainer(model)
        bf16 = (trainer(copy.deepcopy(model).to(torch.bfloat16)) - want).abs()
        rows.append({"mean": round(float((got - want).abs().mean()), 4), "max": round(float((got - want).abs().max()), 3),
                     "bf16_copy_mean": round(float(bf16.mean()), 4)})
    ok = all(r["mean"] <= 1.5 * r["bf16_copy_mean"] + 0.005 for r in rows)
    return verdict(ok, "|engine - trainer| mean <= 1.5 x a bf16 copy's + 0.005 after every push", steps=rows)


def teardown_while_asleep(dry, work, student, teacher, device):
    """Sleep, close, build a second engine, generate: closing an engine that sleeps must leave the next one working
    (vllm_engine.close_engine wakes it first, runs vLLM's cleanup and checks the allocator). Needs sleep mode (a GPU).
    """
    from vllm.platforms import current_platform

    import vllm_engine
    if not current_platform.is_sleep_mode_available():
        return verdict(False, "needs sleep mode", error="cannot run here: this platform has no sleep mode (a GPU "
                                                        "with vllm runs it)")
    try:
        args = tiny_args(dry, work, student, teacher, "teardown", rollout_engine="vllm", vllm_gpu_memory=0.2)
        vllm_engine.VLLMRollouts(args, str(student))                      # built asleep
        first, asleep = id(vllm_engine.engine()), vllm_engine._ENGINE.get("asleep")
        vllm_engine.close_engine()
        held = vllm_engine.allocator_bytes()
        second = vllm_engine.VLLMRollouts(dataclasses.replace(args, max_new_tokens=40), str(student))   # a new engine
        tok = loading.load_tokenizer(str(student), "student")
        model = loading.load_model(str(student), "student", "float32", device)
        b = second.generate(model, tok, [scope.prompt_text(tok, "1+2=?")], 2, [1], device)
        ok = bool(asleep) and held == 0 and id(vllm_engine.engine()) != first and int(b["response_mask"].sum()) > 0
        return verdict(ok, "closed asleep, allocator empty, a second engine generates", asleep_when_closed=bool(asleep),
                       allocator_bytes_after_close=held, generated_tokens=int(b["response_mask"].sum()))
    except Exception as e:
        return failed(e)


def table(report):
    """The report as printed: one row per check, PASS or FAIL, and a summary."""
    rows, fails = ["| part | check | verdict | details |", "|---|---|---|---|"], []
    for part, checks in report.items():
        if not isinstance(checks, dict) or part in ("versions",):
            continue
        items = checks.items() if "verdict" not in checks else [("", checks)]
        for name, r in items:
            if not isinstance(r, dict) or "verdict" not in r:
                continue
            detail = r.get("error") or ", ".join(f"{k} {r[k]}" for k in ("seconds", "sampler_gap", "eval_avg",
                                                                           "response_tokens", "phases", "steps")
                                                 if k in r)
            rows.append(f"| {part} | {name} | {r['verdict']} ({r['threshold']}) | {str(detail)[:300]} |")
            if r["verdict"] != "PASS":
                fails.append(f"{part}/{name}".rstrip("/"))
    rows.append(f"summary: {len(fails)} check(s) FAIL ({', '.join(fails)})" if fails else "summary: every check PASS")
    return "\n".join(rows), fails


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: bookkeeping only")
    p.add_argument("--out-dir", default="runs/gpu_check", help="where the report goes (and nothing else)")
    p.add_argument("--report", default="", help="the JSON report's path (default: <out-dir>/gpu_check.json)")
    p.add_argument("--parts", default="atbc", help="which checks: (a) tiny, (t) torchrun, (b) paper-shaped, (c) vllm")
    p.add_argument("--paper-tokens", type=int, default=2048, help="(b): new tokens per rollout")
    a = p.parse_args()
    cuda = torch.cuda.is_available() and not a.dry_run
    if not cuda and not a.dry_run:
        raise SystemExit("no CUDA device: run with --dry-run on a CPU")
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    torch.set_num_threads(1 if a.dry_run else min(8, os.cpu_count() or 1))
    path = Path(a.report or Path(a.out_dir) / "gpu_check.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    has_vllm = importlib.util.find_spec("vllm") is not None
    report = {"versions": {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "dry_run": a.dry_run,
                           "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                           "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                           "transformers": importlib.import_module("transformers").__version__, "vllm": has_vllm},
              "a_tiny_pipeline": {}, "t_torchrun_fsdp2": {}, "b_paper_shaped": {}, "c_vllm": {}}
    t0 = time.time()

    def save():
        report["seconds"] = round(time.time() - t0, 1)
        path.write_text(json.dumps(report, indent=1, default=str))

    save()
    print(json.dumps(report["versions"]), flush=True)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        if "a" in a.parts:
            tiny_pipeline(a.dry_run, work, device, report, save)
        if "t" in a.parts:
            torchrun_part(a.dry_run, work, report, save)
        if "b" in a.parts:
            n = 16 if a.dry_run else a.paper_tokens
            try:
                report["b_paper_shaped"] = {str(n): paper_shaped_step(a.dry_run, device, n)}
            except Exception as e:
                report["b_paper_shaped"] = {str(n): failed(e)}
            save()
        if "c" in a.parts:
            if not has_vllm:
                report["c_vllm"]["importable"] = verdict(False, "vllm imports",
                                                         error="vllm is not installed: the vLLM part needs a machine "
                                                               "with vllm installed")
            else:
                try:
                    vllm_checks(a.dry_run, work, device, report, save)
                except Exception as e:
                    report["c_vllm"]["setup"] = failed(e)
                if not cuda:
                    report["c_vllm"]["scope-vllm-fp8"] = verdict(False, "needs a GPU",
                                                                 error="cannot run here: fp8 needs a GPU")
            save()
    text, fails = table(report)
    print(text)
    print(f"total {report['seconds']} s; report: {path}")


if __name__ == "__main__":
    main()

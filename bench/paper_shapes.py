"""The paper's shapes on this CPU: random-weight models from the published configuration of the paper's student
(DeepSeek-R1-Distill-Qwen-1.5B: hidden 1536, intermediate 8960, 12 query and 2 KV heads of 128, vocabulary 151,936),
cut to 2 decoder layers, once with a tied and once with an untied output layer, and a teacher of the same family with 4
layers (tied, stored and run in bf16), written here from those public facts (no hub download). Each variant trains 2
steps under `torchrun --nproc-per-node=2` (FSDP2 over gloo) with the vLLM CPU engine, from token-id prompts: the weight
push with its completeness and version checks, the fused log-probs at V = 151,936, the memory plan and a checkpoint.
Recorded per variant: the memory plan's prediction (before anything is loaded), wall time, peak RSS per rank (VmHWM,
polled), and whether it passed, or stopped on the plan's verdict.

    python bench/paper_shapes.py [--variants tied,untied] [--keep DIR]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
VOCAB = 151936
STUDENT = dict(vocab_size=VOCAB, hidden_size=1536, intermediate_size=8960, num_attention_heads=12,
               num_key_value_heads=2, max_position_embeddings=4096)   # R1-Distill-Qwen-1.5B, cut to 2 layers
TEACHER_LAYERS = 4


def tokenizer(path):
    """A word-level tokenizer over the whole 151,936-id vocabulary ("<pad>", "<bos>", "<eos>", then w3 .. w151935), with
    a chat template: prompts written as "w17 w942 ..." are token-id prompts."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>"] + [f"w{i}" for i in range(3, VOCAB)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    fast.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                          "{% if add_generation_prompt %} w3{% endif %}")
    fast.save_pretrained(path)
    return fast


def build(work, tied):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    dirs = {}
    for name, layers, dtype, tie in (("student", 2, torch.float32, tied), ("teacher", TEACHER_LAYERS, torch.bfloat16,
                                                                             True)):
        d = work / f"{name}-{'tied' if tied else 'untied'}"
        if not (d / "config.json").exists():
            torch.manual_seed(0)
            cfg = Qwen2Config(**STUDENT, num_hidden_layers=layers, tie_word_embeddings=tie, **ids)
            Qwen2ForCausalLM(cfg).to(dtype).save_pretrained(d)
            tokenizer(d)
        dirs[name] = d
    return dirs


def peak_rss(pid):
    """{child pid: VmHWM in GiB} of a process's children (the torchrun ranks)."""
    out = {}
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split() if Path(f"/proc/{pid}").exists() else []:
        try:
            status = Path(f"/proc/{child}/status").read_text()
            out[int(child)] = int(next(x for x in status.splitlines() if x.startswith("VmHWM")).split()[1]) / 2**20
        except (OSError, StopIteration):
            pass
    return out


def run(work, variant, dirs, data):
    out = work / f"run-{variant}"
    shutil.rmtree(out, ignore_errors=True)                                # a fresh run each time
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port", "29633",
           str(ROOT / "scope.py"), "--student", str(dirs["student"]), "--teacher", str(dirs["teacher"]), "--data",
           str(data), "--steps", "2", "--prompts-per-step", "2", "--n-rollouts", "2", "--max-new-tokens", "16",
           "--max-prompt-tokens", "64", "--rollout-engine", "vllm", "--dtype", "bfloat16", "--eval-every", "0",
           "--save-every", "0", "--out-dir", str(out)]
    t0, peaks, log = time.time(), {}, work / f"run-{variant}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
        while proc.poll() is None:
            for pid, gib in peak_rss(proc.pid).items():
                peaks[pid] = max(peaks.get(pid, 0.0), gib)
            time.sleep(0.2)
    lines = log.read_text(errors="replace").splitlines()
    plan = [x for x in lines if x.startswith("  ") and ("GiB" in x or "fits" in x or "OUT OF MEMORY" in x)]
    metrics = out / "metrics.jsonl"
    recs = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    return {"variant": variant, "returncode": proc.returncode, "wall_s": round(time.time() - t0, 1),
            "peak_rss_gib_per_rank": sorted(round(v, 2) for v in peaks.values()), "plan": plan[:24],
            "steps_logged": len(recs), "sampler_gap": [round(r.get("rollout/sampler_gap", -1), 4) for r in recs],
            "checkpoint": (out / "checkpoint" / "model.safetensors").exists(),
            "stopped_by_plan": any("does not fit: nothing was loaded" in x for x in lines),
            "tail": [x for x in lines if "memory plan" in x or "Error" in x or "error" in x][-6:]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default="tied,untied")
    p.add_argument("--keep", default="", help="a directory to build the models in and keep (default: temporary)")
    a = p.parse_args()
    work_dir = a.keep or tempfile.mkdtemp(prefix="paper-shapes-")
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps({"problem": " ".join(f"w{(7 * i + 13 * j) % (VOCAB - 3) + 3}" for j in range(24)),
                                        "answer": "1"}) + "\n" for i in range(8)))
    results = []
    for variant in a.variants.split(","):
        t0 = time.time()
        dirs = build(work, variant == "tied")
        print(f"{variant}: models built in {time.time() - t0:.0f} s", flush=True)
        r = run(work, variant, dirs, data)
        results.append(r)
        print(json.dumps(r, indent=1), flush=True)
    print(f"\nbench/paper_shapes.py, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{os.cpu_count()} cores, torch 2 ranks (gloo), vLLM CPU engine")
    print("| variant | plan: per rank peak | plan: verdict | measured peak RSS per rank (GiB) | wall | result |")
    print("|---|---|---|---|---|---|")
    for r in results:
        peak = next((x.split()[-2] for x in r["plan"] if "peak: resident" in x), "-")
        verdict = next((x.strip() for x in r["plan"] if "planned:" in x), "-")
        result = ("passed: 2 steps, checkpoint written" if r["returncode"] == 0 and r["checkpoint"] else
                  "stopped by the memory plan before loading anything" if r["stopped_by_plan"] else
                  f"FAILED (exit {r['returncode']})")
        print(f"| {r['variant']} | {peak} GiB | {verdict} | {r['peak_rss_gib_per_rank']} | {r['wall_s']} s | "
              f"{result} |")


if __name__ == "__main__":
    main()

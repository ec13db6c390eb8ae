"""Peak extra memory and time of scope.token_logprobs against the naive log_softmax(...).gather(...).

    python bench/logprobs.py                    # 1 x 8192 tokens, vocabulary 151,936 (Qwen2.5), fp32 and bf16
    python bench/logprobs.py --tokens 2048      # smaller

Each (method, dtype) runs in a fresh subprocess so its memory high-water mark is its own:
extra memory = peak - memory held once the logits exist (CPU: VmHWM - VmRSS from /proc; CUDA: allocator peak).
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def one(method, dtype, tokens, vocab, repeats, device):
    import torch
    import scope
    torch.set_num_threads(1)
    torch.manual_seed(0)
    logits = torch.randn(1, tokens, vocab, dtype=getattr(torch, dtype), device=device)
    ids = torch.randint(0, vocab, (1, tokens), device=device)
    if method == "naive":
        fn = lambda: torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None]).squeeze(-1)  # noqa: E731
    else:
        fn = lambda: scope.token_logprobs(logits, ids)  # noqa: E731
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_kib("VmRSS") * 1024
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            del out
    peak = torch.cuda.max_memory_allocated() if cuda else rss_kib("VmHWM") * 1024
    return {"method": method, "dtype": dtype, "extra_mib": (peak - base) / 2**20, "median_s": sorted(times)[len(times) // 2]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one[0], a.one[1], a.tokens, a.vocab, a.repeats, a.device)))
        return
    print(f"logits 1 x {a.tokens} x {a.vocab}, device {a.device}, {a.repeats} repeats (median), 1 torch thread")
    print("| dtype | method | peak extra memory (MiB) | median time (s) |\n|---|---|---|---|")
    for dtype in ("float32", "bfloat16"):
        res = {}
        for method in ("naive", "chunked"):
            cmd = [sys.executable, __file__, "--one", method, dtype, "--tokens", str(a.tokens), "--vocab",
                   str(a.vocab), "--repeats", str(a.repeats), "--device", a.device]
            res[method] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            r = res[method]
            print(f"| {dtype} | {method} | {r['extra_mib']:.0f} | {r['median_s']:.3f} |", flush=True)
        n, c = res["naive"], res["chunked"]
        print(f"| {dtype} | chunked / naive | {c['extra_mib'] / n['extra_mib']:.3f} | speed x{n['median_s'] / c['median_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()

"""Peak extra memory and time of logprobs.token_logprobs (fused: hidden states and output weight in, no (tokens x V)
logits) against the HF-logits path (logits = h @ W.T as the model's lm_head makes them, then
log_softmax(logits.float() / T).gather), forward + backward to both the hidden states and the weight.

    python bench/logprobs.py                    # hidden 1536, vocabulary 151,936 (Qwen2.5-1.5B), 4096 tokens, fp32
    python bench/logprobs.py --tokens 1024      # smaller

Each method runs in a fresh subprocess so its memory high-water mark is its own: extra memory = peak - memory
held once the inputs exist (CPU: VmHWM - VmRSS from /proc; CUDA: allocator peak). Both methods must also build the
(V, H) weight gradient; the table shows the extra memory with and without it.
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


def one(method, dtype, tokens, hidden, vocab, device):
    import torch

    import logprobs
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    h = (torch.randn(tokens, hidden, device=device) / 8).to(dt).requires_grad_(True)   # (N, H)
    w = (torch.randn(vocab, hidden, device=device) / 8).to(dt).requires_grad_(True)    # (V, H)
    ids = torch.randint(0, vocab, (tokens,), device=device)
    g = torch.randn(tokens, device=device)                                              # upstream d loss / d logp
    if method == "hf-logits":
        def fn():
            logits = h @ w.T                                                            # (N, V), as lm_head
            return torch.log_softmax(logits.float() / 0.6, -1).gather(-1, ids[:, None]).squeeze(-1)
    else:
        def fn():
            return logprobs.token_logprobs(h[None], w, ids[None], 0.6)[0]
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    (fn() * g).sum().backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else rss_kib("VmHWM") * 1024
    grad_w = w.numel() * w.element_size()
    return {"extra_mib": (peak - base) / 2**20, "extra_wo_grad_w_mib": (peak - base - grad_w) / 2**20, "s": seconds}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.dtype, a.tokens, a.hidden, a.vocab, a.device)))
        return
    print(f"{a.tokens} tokens, hidden {a.hidden}, vocabulary {a.vocab}, {a.dtype}, device {a.device}, T 0.6, "
          f"forward + backward, 1 torch thread, {time.strftime('%c')}")
    print("| method | peak extra memory (MiB) | without the (V, H) weight gradient (MiB) | time (s) |\n|---|---|---|---|")
    res = {}
    for method in ("hf-logits", "fused"):
        cmd = [sys.executable, __file__, "--one", method] + [f"--{k}={getattr(a, k)}" for k in ("tokens", "hidden",
                                                                                                "vocab", "dtype", "device")]
        r = res[method] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        print(f"| {method} | {r['extra_mib']:.0f} | {r['extra_wo_grad_w_mib']:.0f} | {r['s']:.2f} |", flush=True)
    f, n = res["fused"], res["hf-logits"]
    print(f"| fused / hf-logits | {f['extra_mib'] / n['extra_mib']:.3f} | "
          f"{f['extra_wo_grad_w_mib'] / n['extra_wo_grad_w_mib']:.3f} | speed x{n['s'] / f['s']:.2f} |")


if __name__ == "__main__":
    main()

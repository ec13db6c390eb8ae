"""The memory plan: GiB per rank from the models' configs, before anything is loaded, with a verdict that stops a run
that will not fit (printed at the start of every run; `python bench/memory_plan.py` for the paper's GPU layouts).

An estimate: weights, optimizer state, gradients, the teacher, saved activations, the fused log-prob blocks, the
rollout engine (and how many rollouts its KV cache holds at once); not allocator fragmentation, the CUDA context or the
graphs a sleeping vLLM engine keeps. docs/gpu.md explains each row and records it against measurements.
"""

import contextlib
import os

import torch

from ranks import all_reduce

GIB = 2**30
VLLM_CPU_KV_BYTES = 256 << 20     # vLLM's CPU build: the fixed KV cache vllm_engine.py gives it
VLLM_RESERVE_GIB = 2.0            # vLLM on a GPU: its activation peak and CUDA graphs inside its share (an estimate)
# CPU RAM of each rank's Python + torch + transformers (+ the vLLM CPU engine's runtime) itself: calibrated on
# bench/paper_shapes.py (docs/measurements.md), where 1.6 left the measured peak 1.3 GiB above the plan on rank 1.
PROCESS_GIB = {"cpu": 0.7, "cpu+vllm": 2.3}


def params(c):
    """Parameters of a decoder-only transformer config (biases ignored)."""
    kv = c.num_key_value_heads * head_dim(c)
    layer = c.hidden_size * (c.num_attention_heads * head_dim(c) + 2 * kv + c.hidden_size) \
        + 3 * c.hidden_size * c.intermediate_size
    return c.num_hidden_layers * layer + c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)


def head_dim(c):
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def kv_bytes_per_token(c, dtype_bytes=2):
    """K and V of every layer for one token (bf16 in the engine)."""
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim(c) * dtype_bytes


def memory_plan(args, s, t, world, gpu_gib=0.0, ram_gib=0.0, local_ranks=1):
    """Estimated GiB per rank from the model configs s (student), t (teacher): resident + the largest phase.
    gpu_gib: the GPU's memory (0 and no ram_gib: an 80 GiB GPU is assumed for the engine's share, no verdict);
    ram_gib: on a CPU, the RAM available to the local_ranks processes of this machine. -> (text, peak GiB)."""
    half, cpu = 2 if args.dtype == "bfloat16" else 4, bool(ram_gib) and not gpu_gib
    ps, root = params(s), s.vocab_size * s.hidden_size * (1 if s.tie_word_embeddings else 2)
    layer = (ps - root) / s.num_hidden_layers
    per_token = s.hidden_size * s.num_hidden_layers + (4 * s.hidden_size + 3 * s.intermediate_size) * (
        1 if args.gradient_checkpointing else s.num_hidden_layers)   # saved layer inputs + one layer's internals
    vllm = args.rollout_engine == "vllm" and args.method != "kd"
    resident = {"student fp32 weights + AdamW state, sharded": 12 * ps / world,
                "teacher (replicated)": half * params(t) * (args.method in ("scope", "opd", "kd")),
                "GRPO reference (replicated)": half * ps * (args.method == "grpo"),
                "gathered: embeddings + output layer, 2 decoder layers": half * (root + 2 * layer)}
    if cpu:
        resident["process: Python, torch, transformers" + (", vLLM" if vllm else "")] = \
            PROCESS_GIB["cpu+vllm" if vllm else "cpu"] * GIB
    # fp8 quantises the linear layers of the decoder (1 byte); the embeddings and the output layer stay bf16
    engine_weights = (1 if args.vllm_quantization == "fp8" else 2) * (ps - root) + 2 * root
    if not vllm:
        rollouts = ("rollouts: KV cache (rollout_tokens)", args.rollout_tokens * kv_bytes_per_token(s, half))
        kv_cache = None
    elif cpu:                                       # the CPU build: its bf16 weights beside the trainer, a fixed cache
        rollouts = ("rollouts: vLLM CPU engine (bf16 weights + its 256 MiB KV cache)",
                    engine_weights + VLLM_CPU_KV_BYTES)
        kv_cache = VLLM_CPU_KV_BYTES
    else:
        share = args.vllm_gpu_memory * (gpu_gib or 80.0) * GIB
        rollouts = ("rollouts: vLLM engine awake (vllm_gpu_memory x GPU)", share)
        kv_cache = share - engine_weights - VLLM_RESERVE_GIB * GIB
    phases = {rollouts[0]: rollouts[1],
              "scoring: teacher activations (score_tokens)":
                  args.score_tokens * (4 * t.hidden_size + t.intermediate_size) * half,
              "update: fp32 grads (sharded) + activations (micro_batch_tokens) + log-prob blocks": 4 * ps / world
              + args.micro_batch_tokens * per_token * half + 3 * 4 * 2**25 + 4 * root}
    peak = (sum(resident.values()) + max(phases.values())) / GIB
    rows = [f"  {k:80s} {v / GIB:6.1f} GiB" for k, v in {**resident, **phases, "peak: resident + the largest phase":
                                                           peak * GIB}.items()]
    if kv_cache is not None:
        rows += kv_rows(args, s, world, kv_cache)
    gather = 12 * ps / GIB                          # save_checkpoint: full fp32 weights + AdamW state on rank 0's CPU
    rows.append(f"  checkpoint save: rank 0 gathers the full fp32 weights + AdamW state in CPU memory: {gather:.1f} GiB"
                + (" (on top of every rank's peak: counted below)" if cpu else " (host RAM)"))
    ok = fits(peak, gpu_gib, ram_gib, local_ranks, gather if cpu else 0.0)
    if gpu_gib:
        rows.append(f"  this GPU has {gpu_gib:.0f} GiB: " + ("fits" if ok else
                    "LIKELY OUT OF MEMORY: lower rollout_tokens / micro_batch_tokens / score_tokens / vllm_gpu_memory"))
    elif cpu:
        rows.append(f"  this machine has {ram_gib:.1f} GiB of RAM available for {local_ranks} rank(s), "
                    f"{local_ranks * peak + gather:.1f} GiB planned: " + ("fits" if ok else "LIKELY OUT OF MEMORY"))
    return f"memory plan per rank, {world} ranks (estimate):\n" + "\n".join(rows), peak


def fits(peak, gpu_gib=0.0, ram_gib=0.0, local_ranks=1, gather=0.0):
    """The verdict: under 90% of the GPU, or of the RAM the machine's ranks share (with rank 0's checkpoint gather on
    top); True when neither is known."""
    if gpu_gib:
        return peak < 0.9 * gpu_gib
    return not ram_gib or local_ranks * peak + gather < 0.9 * ram_gib


def kv_rows(args, s, world, kv_cache):
    """How many rollouts the engine's KV cache holds at once, against the rollouts each rank asks it for."""
    per_token = kv_bytes_per_token(s)
    tokens = max(kv_cache, 0) / per_token
    at_once, asked = tokens / args.max_new_tokens, args.prompts_per_step // world * args.n_rollouts
    rows = [f"  vLLM KV cache: {max(kv_cache, 0) / GIB:.1f} GiB at {per_token / 1024:.0f} KiB per token = "
            f"{tokens / 1e3:,.0f}k tokens = {at_once:,.0f} sequences of max_new_tokens {args.max_new_tokens}; "
            f"this rank asks for {asked} rollouts"]
    if at_once < asked / 4:
        rows.append(f"  WARNING: fewer than a quarter of this rank's {asked} rollouts fit in the KV cache at once "
                    "(heavy preemption, slow rollouts): raise --vllm-gpu-memory, or lower --prompts-per-step")
    return rows


def available_ram_gib():
    """MemAvailable from /proc/meminfo (Linux), or 0 when unknown."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as f:
            return int(next(line for line in f if line.startswith("MemAvailable")).split()[1]) / 2**20
    return 0.0


def print_plan(args, rt, student_name, teacher_name, say):
    """Rank 0 prints the plan for these models on this device; a layout that will not fit stops every rank here,
    before anything is loaded (--memory-check false: warn only). A model that cannot be read is reported later."""
    from transformers import AutoConfig
    stop = 0.0
    if rt.rank == 0:
        with contextlib.suppress(OSError):
            gpu = torch.cuda.get_device_properties(rt.device).total_memory / GIB if rt.device.type == "cuda" else 0
            ram = available_ram_gib() if rt.device.type == "cpu" else 0.0
            local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
            s = AutoConfig.from_pretrained(student_name)
            text, peak = memory_plan(args, s, AutoConfig.from_pretrained(teacher_name), rt.world, gpu, ram, local)
            say(text)
            stop = float(args.memory_check and not fits(peak, gpu, ram, local, 12 * params(s) / GIB if ram else 0.0))
    if all_reduce([stop], rt.device)[0]:                       # every rank stops together
        raise SystemExit("the memory plan above says this layout does not fit: nothing was loaded (--memory-check "
                         "false runs it anyway)" if rt.rank == 0 else "the memory plan says this layout does not fit")

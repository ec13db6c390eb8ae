"""The memory plan: GiB per rank from the models' configs, before anything is loaded (printed at the start of a run).

An estimate (weights, optimizer state, gradients, the teacher, saved activations, the fused log-prob blocks and the
rollout engine); not allocator fragmentation, the CUDA context or the graphs a sleeping vLLM engine keeps.
`python bench/memory_plan.py` prints it for the paper's two GPU layouts (docs/gpu.md).
"""

import contextlib

import torch


def memory_plan(args, s, t, world, gpu_gib=0.0):
    """Estimated GiB per rank from the model configs s (student), t (teacher): resident + the largest phase (docs/gpu.md);
    the vLLM engine takes vllm_gpu_memory of a gpu_gib GPU (0: of 80 GiB, no verdict). -> (table text, peak GiB)."""
    def params(c):                                                    # decoder-only transformer, biases ignored
        kv = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
        layer = c.hidden_size * (2 * c.hidden_size + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
        return c.num_hidden_layers * layer + c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    half, gib = 2 if args.dtype == "bfloat16" else 4, 2**30
    ps, root = params(s), s.vocab_size * s.hidden_size * (1 if s.tie_word_embeddings else 2)
    layer = (ps - root) / s.num_hidden_layers
    kv_bytes = 2 * half * s.num_hidden_layers * s.num_key_value_heads * s.hidden_size // s.num_attention_heads
    per_token = s.hidden_size * s.num_hidden_layers + (4 * s.hidden_size + 3 * s.intermediate_size) * (
        1 if args.gradient_checkpointing else s.num_hidden_layers)   # saved layer inputs + one layer's internals
    resident = {"student fp32 weights + AdamW state, sharded": 12 * ps / world,
                "teacher (replicated)": half * params(t) * (args.method in ("scope", "opd", "kd")),
                "GRPO reference (replicated)": half * ps * (args.method == "grpo"),
                "gathered: embeddings + output layer, 2 decoder layers": half * (root + 2 * layer)}
    rollouts = ("rollouts: KV cache (rollout_tokens)", args.rollout_tokens * kv_bytes) if args.rollout_engine == "hf" \
        else ("rollouts: vLLM engine awake (vllm_gpu_memory x GPU)", args.vllm_gpu_memory * (gpu_gib or 80.0) * gib)
    phases = {rollouts[0]: rollouts[1],
              "scoring: teacher activations (score_tokens)": args.score_tokens * (4 * t.hidden_size + t.intermediate_size) * half,
              "update: fp32 grads (sharded) + activations (micro_batch_tokens) + log-prob blocks": 4 * ps / world
              + args.micro_batch_tokens * per_token * half + 3 * 4 * 2**25 + 4 * root}
    peak = (sum(resident.values()) + max(phases.values())) / gib
    rows = [f"  {k:80s} {v / gib:6.1f} GiB" for k, v in {**resident, **phases, "peak: resident + the largest phase":
                                                           peak * gib}.items()]
    if gpu_gib:
        rows.append(f"  this GPU has {gpu_gib:.0f} GiB: " + ("fits" if peak < 0.9 * gpu_gib else
                    "LIKELY OUT OF MEMORY: lower rollout_tokens / micro_batch_tokens / score_tokens"))
    return f"memory plan per rank, {world} ranks (estimate):\n" + "\n".join(rows), peak


def print_plan(args, rt, student_name, teacher_name, say):
    """Rank 0 prints the plan for these models on this device (a missing model is reported by loading it, later)."""
    if rt.rank != 0:
        return
    from transformers import AutoConfig
    with contextlib.suppress(OSError):
        have = torch.cuda.get_device_properties(rt.device).total_memory / 2**30 if rt.device.type == "cuda" else 0
        say(memory_plan(args, AutoConfig.from_pretrained(student_name), AutoConfig.from_pretrained(teacher_name),
                        rt.world, have)[0])

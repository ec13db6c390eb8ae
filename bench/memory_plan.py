"""memory.memory_plan for the paper preset on 8 x 80 GB and 16 x 40 GB, from the public shapes of the paper's models
(DeepSeek-R1-Distill-Qwen-1.5B student, Skywork-OR1-7B teacher; ../shared/notes/paper_scale.md). The same function
prints the plan at the start of every run, from the configs of the models actually loaded.

    python bench/memory_plan.py
"""
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformers import Qwen2Config  # noqa: E402

import memory  # noqa: E402
import scope  # noqa: E402

STUDENT = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                      num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=False)
TEACHER = Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                      num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)
QWEN3_STUDENT = Qwen2Config(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                            # 112 KiB KV/token
                            num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True)
QWEN3_TEACHER = Qwen2Config(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                            num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
SETUPS = {"8 x 80 GB (the paper preset's budgets)": (8, 80, {}),
          "16 x 40 GB": (16, 40, dict(micro_batch_tokens=16384, score_tokens=16384, rollout_tokens=1 << 19,
                                      vllm_gpu_memory=0.45)),
          "8 x 80 GB, a Qwen3-1.7B-class student with a Qwen3-8B-class teacher (the paper's second pair)":
          (8, 80, dict(student_config="qwen3"))}

if __name__ == "__main__":
    paper = scope.resolve({"preset": "paper"})
    for name, (world, gb, over) in SETUPS.items():
        models = (QWEN3_STUDENT, QWEN3_TEACHER) if over.pop("student_config", "") == "qwen3" else (STUDENT, TEACHER)
        args = dataclasses.replace(paper, **over)
        text, peak = memory.memory_plan(args, *models, world, gpu_gib=gb * 1e9 / 2**30)
        print(f"## {name}: micro_batch_tokens {args.micro_batch_tokens}, score_tokens {args.score_tokens}, "
              f"rollout_engine {args.rollout_engine}, vllm_gpu_memory {args.vllm_gpu_memory}\n{text}\n  "
              f"{gb - peak * 2**30 / 1e9:.0f} of its {gb} GB left for the allocator, the CUDA context, fragmentation\n")

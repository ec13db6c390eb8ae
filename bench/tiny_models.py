"""Sampled accuracy of the tiny teacher and student (temperature 1.0, the tiny training temperature) on the tiny
test split, per level, and how often a group of 8 student rollouts holds both correct and incorrect answers.

    python bench/tiny_models.py            # builds the tiny models first if they are not cached
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

import loading  # noqa: E402
import ranks  # noqa: E402
import scope  # noqa: E402
import tiny_testbed  # noqa: E402
import verifier  # noqa: E402


def main():
    torch.set_num_threads(1)
    args = scope.Args()
    t0 = time.time()
    student_dir, teacher_dir = tiny_testbed.build_tiny_models(args.cache_dir)
    print(f"models: {student_dir.parent} (build or cache lookup took {time.time() - t0:.0f}s)")
    tok = loading.load_tokenizer(str(student_dir), "student")
    test = tiny_testbed.tiny_task("test", 256, seed=0)
    print("| model | params | " + " | ".join(f"{lv} avg@4" for lv in tiny_testbed.TINY_LEVELS) + " | all avg@4 | all pass@4 |")
    print("|---" * (len(tiny_testbed.TINY_LEVELS) + 4) + "|")
    for name, d in (("teacher", teacher_dir), ("student", student_dir)):
        model = loading.load_model(str(d), name, "float32")
        m = scope.evaluate(model, tok, test, 4, args, ("bench", name), ranks.single_process())
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"| {name} | {params:.2f}M | " + " | ".join(f"{100 * m[f'eval/{lv}/avg@4']:.1f}" for lv in tiny_testbed.TINY_LEVELS)
              + f" | {100 * m['eval/all/avg@4']:.1f} | {100 * m['eval/all/pass@4']:.1f} |")
    student = loading.load_model(str(student_dir), "student", "float32")
    rows = tiny_testbed.tiny_task("train", 64, seed=1)
    prompts = [scope.prompt_text(tok, r["problem"]) for r in rows]
    b = scope.generate(student, tok, prompts, 8, 64, 1.0, seeds=scope.row_seeds("mixed", range(64 * 8)))
    texts = scope.decode_responses(tok, b)
    mixed = 0
    for i, r in enumerate(rows):
        c = sum(verifier.reward(texts[i * 8 + j], r["answer"], bool(b["truncated"][i * 8 + j])) for j in range(8))
        mixed += 0 < c < 8
    print(f"student groups of 8 rollouts (64 training prompts, T=1.0) holding both correct and incorrect: {mixed}/64")


if __name__ == "__main__":
    main()

"""The paper's section 2 analyses at tiny scale (harness, not method; issue #12).

    python reproduce.py --analysis recovery --out results          # through reproduce.py (writes results/analysis/)
    python analysis.py recovery --student DIR --teacher DIR --out results/analysis

Error recovery (section 2.2, Fig. 1b): sample the student on training problems, keep its incorrect rollouts, score
each with the teacher (perplexity of the student's tokens), split them into teacher-perplexity quartiles Q1 (lowest)
.. Q4, cut each at 20/40/60/80% of its length, let the teacher complete from the cut prefix several times, and
report how often the completion ends in the right answer. The paper's premise: low teacher perplexity on a flawed
prefix predicts that the teacher can recover from it (Q1 recovers more than Q4).
"""
import argparse
import json
import math
import random
from pathlib import Path

import torch

import scope
import verifier
import tiny_testbed

FRACTIONS = (0.2, 0.4, 0.6, 0.8)


def bootstrap_ci(values, reps=2000, seed=0):
    """(mean, low, high): 95% percentile interval of the mean over resampled items."""
    if not values:
        return math.nan, math.nan, math.nan
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(reps))
    return sum(values) / n, means[int(0.025 * reps)], means[int(0.975 * reps) - 1]


def sample_student(student, tok, rows, samples, max_new_tokens, seed, chunk=32):
    """Rollouts of every row, seeded like training; -> (prompts, list of (row, rollout text, response ids, R))."""
    prompts = [scope.prompt_text(tok, r["problem"]) for r in rows]
    out = []
    for start in range(0, len(rows), chunk):
        part = list(range(start, min(start + chunk, len(rows))))
        seeds = scope.row_seeds(seed, "recovery-student", [(i, j) for i in part for j in range(samples)])
        b = scope.generate(student, tok, [prompts[i] for i in part], samples, max_new_tokens, 1.0, seeds=seeds)
        texts = tok.batch_decode(b["response_ids"] * b["response_mask"], skip_special_tokens=True)
        for q, i in enumerate(part):
            for j in range(samples):
                row = q * samples + j
                ids = b["response_ids"][row, :int(b["response_mask"][row].sum())]
                out.append((i, texts[row], ids, verifier.reward(texts[row], rows[i]["answer"], bool(b["truncated"][row]))))
    return prompts, out


def teacher_ppl(teacher, tok, prompt, ids):
    """exp(mean NLL) of the response tokens ids under the teacher, given the prompt."""
    p = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    batch = dict(prompt_ids=p, prompt_mask=torch.ones_like(p), response_ids=ids[None],
                 response_mask=torch.ones(1, len(ids), dtype=torch.long))
    with torch.inference_mode():
        lp = scope.sequence_logprobs(teacher, batch)                         # (1, T)
    return math.exp(-float(lp.mean()))


def recovery(student_dir, teacher_dir, out, problems=256, samples=8, max_incorrect=400, completions=4,
             max_new_tokens=64, seed=0, log=print):
    """Run the error-recovery analysis; writes out/recovery.json and out/recovery.png and returns the dict."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = scope.load_model(student_dir, "student")
    student = scope.load_model(student_dir, "student", "float32").eval()
    teacher = scope.load_model(teacher_dir, "teacher", "float32").eval()
    rows = tiny_testbed.tiny_task("train", problems, seed=seed)
    log(f"recovery: sampling {problems} x {samples} student rollouts")
    prompts, rollouts = sample_student(student, tok, rows, samples, max_new_tokens, seed)
    wrong = [r for r in rollouts if r[3] == 0.0 and len(r[2]) >= 5]       # at least one token at the 20% cut
    random.Random(seed).shuffle(wrong)
    wrong = wrong[:max_incorrect]
    log(f"recovery: {sum(r[3] == 0 for r in rollouts)} of {len(rollouts)} rollouts incorrect; scoring {len(wrong)}")
    ppl = [teacher_ppl(teacher, tok, prompts[i], ids) for i, _, ids, _ in wrong]
    order = sorted(range(len(wrong)), key=lambda k: ppl[k])
    quartile = {k: 1 + 4 * pos // len(order) for pos, k in enumerate(order)}
    rec = {q: {f: [] for f in FRACTIONS} for q in (1, 2, 3, 4)}
    jobs = [(k, f) for k in range(len(wrong)) for f in FRACTIONS]
    log(f"recovery: {len(jobs)} cut prefixes x {completions} teacher completions")
    for start in range(0, len(jobs), 32):
        part = jobs[start:start + 32]
        cut = [wrong[k][2][:max(1, round(f * len(wrong[k][2])))] for k, f in part]
        prefix = [tok.decode(c, skip_special_tokens=True) for c in cut]
        texts_in = [prompts[wrong[k][0]] + pre for (k, _), pre in zip(part, prefix)]
        seeds = scope.row_seeds(seed, "recovery-teacher", [(start + q, j) for q in range(len(part))
                                                            for j in range(completions)])
        b = scope.generate(teacher, tok, texts_in, completions, max_new_tokens, 1.0, seeds=seeds)
        texts = tok.batch_decode(b["response_ids"] * b["response_mask"], skip_special_tokens=True)
        for q, (k, f) in enumerate(part):
            gold = rows[wrong[k][0]]["answer"]
            ok = [verifier.reward(prefix[q] + texts[q * completions + j], gold, bool(b["truncated"][q * completions + j]))
                  for j in range(completions)]
            rec[quartile[k]][f].append(sum(ok) / completions)
    table = {}
    for q in rec:
        bounds = [ppl[k] for k in order if quartile[k] == q]
        table[f"Q{q}"] = {"teacher_ppl": [min(bounds), max(bounds)], "rollouts": len(bounds),
                          **{f"{int(100 * f)}%": bootstrap_ci(rec[q][f], seed=seed) for f in FRACTIONS}}
    q1 = [x for f in FRACTIONS for x in rec[1][f]]
    q4 = [x for f in FRACTIONS for x in rec[4][f]]
    diff = bootstrap_diff(q1, q4, seed)
    result = {"problems": problems, "samples": samples, "incorrect_scored": len(wrong), "completions": completions,
              "student_accuracy": sum(r[3] for r in rollouts) / len(rollouts), "quartiles": table,
              "q1_minus_q4": diff, "premise_holds": diff[1] > 0, "premise_fails": diff[2] < 0,
              "student": str(student_dir), "teacher": str(teacher_dir), "seed": seed}
    (out / "recovery.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "recovery.png")
    return result


def bootstrap_diff(a, b, seed, reps=2000):
    """(mean(a) - mean(b), low, high): 95% percentile interval, a and b resampled independently."""
    rng = random.Random(seed)
    diffs = sorted(sum(a[rng.randrange(len(a))] for _ in a) / len(a) - sum(b[rng.randrange(len(b))] for _ in b) / len(b)
                   for _ in range(reps))
    return sum(a) / len(a) - sum(b) / len(b), diffs[int(0.025 * reps)], diffs[int(0.975 * reps) - 1]


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.6))
    xs = [int(100 * f) for f in FRACTIONS]
    for q, row in result["quartiles"].items():
        m = [100 * row[f"{x}%"][0] for x in xs]
        lo = [100 * (row[f"{x}%"][0] - row[f"{x}%"][1]) for x in xs]
        hi = [100 * (row[f"{x}%"][2] - row[f"{x}%"][0]) for x in xs]
        ax.errorbar(xs, m, yerr=[lo, hi], marker="o", capsize=3,
                    label=f"{q} (teacher PPL {row['teacher_ppl'][0]:.2f}-{row['teacher_ppl'][1]:.2f})")
    ax.set(xlabel="prefix kept (% of the incorrect rollout)", ylabel="teacher recovers (%)",
           title="Error recovery by teacher-perplexity quartile (paper Fig. 1b)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table_md(result):
    """The recovery table as markdown rows (one per quartile)."""
    head = "| quartile (teacher PPL) | rollouts | " + " | ".join(f"cut at {int(100 * f)}%" for f in FRACTIONS) + " |"
    lines = [head, "|---" * (2 + len(FRACTIONS)) + "|"]
    for q, row in result["quartiles"].items():
        cells = [f"{100 * row[f'{int(100 * f)}%'][0]:.1f} [{100 * row[f'{int(100 * f)}%'][1]:.1f}, "
                 f"{100 * row[f'{int(100 * f)}%'][2]:.1f}]" for f in FRACTIONS]
        lines.append(f"| {q} ({row['teacher_ppl'][0]:.2f}-{row['teacher_ppl'][1]:.2f}) | {row['rollouts']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("analysis", choices=["recovery"])
    p.add_argument("--student", required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--out", default="results/analysis")
    p.add_argument("--problems", type=int, default=256)
    p.add_argument("--max-incorrect", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    r = recovery(a.student, a.teacher, a.out, a.problems, max_incorrect=a.max_incorrect, seed=a.seed)
    print(table_md(r))
    print(f"Q1 - Q4 recovery: {100 * r['q1_minus_q4'][0]:+.1f} points, 95% interval "
          f"[{100 * r['q1_minus_q4'][1]:+.1f}, {100 * r['q1_minus_q4'][2]:+.1f}]")


if __name__ == "__main__":
    main()

"""The verifier on the independent corpus (tests/verifier_corpus.jsonl, cases from public verifiers' test suites, built
by bench/build_verifier_corpus.py): balanced accuracy, false-accept rate and latency, beside math-verify on the same
cases when it is importable (a developer's comparison, not a dependency).

    python bench/verifier_corpus.py            # summary table
    python bench/verifier_corpus.py --misses   # also every case the verifier gets wrong

Each case is judged as the evaluation judges a response: eval.extract.evaluation_answer(pred) finds the final answer
(the last box, else "final answer is ...", else the last math span, else the last number), and verifier.is_equiv
compares it with the gold answer (its own box / $...$ removed). Accuracy is against the project's label (`label`, which
equals the upstream label except where docs/verifier.md says otherwise); the upstream-label figures are printed too.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eval import extract  # noqa: E402

CORPUS = ROOT / "tests" / "verifier_corpus.jsonl"


def load():
    return [json.loads(line) for line in CORPUS.read_text().splitlines()]


def scope_judge(gold, pred):
    return extract.verify(pred, gold)


def math_verify_judge():
    try:
        from math_verify import parse, verify
    except ImportError:
        return None

    def judge(gold, pred):                                  # as the upstream suites call it: parse both, verify
        try:
            return bool(verify(parse(gold), parse(pred)))
        except Exception:
            return False
    return judge


def rates(cases, got, key):
    pos = [g for c, g in zip(cases, got) if c[key]]
    neg = [g for c, g in zip(cases, got) if not c[key]]
    tpr = sum(pos) / max(len(pos), 1)
    fpr = sum(neg) / max(len(neg), 1)
    return {"n": len(cases), "equal": len(pos), "not_equal": len(neg), "recall": tpr, "false_accept": fpr,
            "balanced_accuracy": (tpr + 1 - fpr) / 2}


def run(judge, cases):
    got, times = [], []
    for c in cases:
        t0 = time.perf_counter()
        got.append(bool(judge(c["gold"], c["pred"])))
        times.append(1000 * (time.perf_counter() - t0))
    return got, times


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--misses", action="store_true")
    a = p.parse_args()
    cases = load()
    for c in cases:
        c.setdefault("label", c["upstream"])
    agreed = [c for c in cases if c["label"] == c["upstream"]]
    print(f"{len(cases)} cases from {len({c['source'].split('@')[0] for c in cases})} repositories; the project's "
          f"label differs from upstream on {len(cases) - len(agreed)}")
    print("| verifier | cases | balanced accuracy | recall (equal accepted) | false accepts | median ms | max ms |")
    print("|---|---|---|---|---|---|---|")
    judges = {"scope": scope_judge}
    mv = math_verify_judge()
    if mv:
        judges["math-verify"] = mv
    for name, judge in judges.items():
        got, times = run(judge, cases)
        rows = (("project labels, all", lambda c: True, "label"),
                ("upstream labels, where the policy agrees", lambda c: c["label"] == c["upstream"], "upstream"),
                ("project labels, dev suites", lambda c: c["split"] == "dev", "label"),
                ("project labels, held-out suites", lambda c: c["split"] == "held-out", "label"),
                ("project labels, held-out suites, wave 2", lambda c: c["split"] == "held-out-2", "label"))
        for label, keep, key in rows:
            sel = [i for i, c in enumerate(cases) if keep(c)]
            r = rates([cases[i] for i in sel], [got[i] for i in sel], key)
            print(f"| {name} ({label}) | {r['n']} | {100 * r['balanced_accuracy']:.1f}% | "
                  f"{100 * r['recall']:.1f}% of {r['equal']} | {100 * r['false_accept']:.1f}% of {r['not_equal']} | "
                  f"{statistics.median(times):.2f} | {max(times):.0f} |")
        if a.misses and name == "scope":
            for c, g in zip(cases, got):
                if g != c["label"]:
                    print(f"MISS label={c['label']} got={g} gold={c['gold']!r} pred={c['pred'][:300]!r} "
                          f"[{c['source'].split('::')[-1]}]")


if __name__ == "__main__":
    main()

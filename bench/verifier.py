"""Accuracy and latency of verifier.is_equiv on the labelled cases of tests/verifier_cases.py, with math-verify
scored side by side on the same cases when it is importable (a developer's comparison tool, not a dependency).

    python bench/verifier.py
"""
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import verifier  # noqa: E402
from verifier_cases import CASES  # noqa: E402


def math_verify_judge():
    try:
        from math_verify import parse, verify
    except ImportError:
        return None

    def judge(pred, gold):
        try:  # math-verify wants delimiters to find LaTeX; give both sides the same treatment
            return bool(verify(parse(f"${gold}$"), parse(f"${pred}$")))
        except Exception:
            return False
    return judge


def score(name, judge):
    times, correct, wrong = [], 0, []
    for cat, pred, gold, expected in CASES:
        t0 = time.perf_counter()
        got = judge(pred, gold)
        times.append(1000 * (time.perf_counter() - t0))
        if got == expected:
            correct += 1
        else:
            wrong.append(cat)
    times.sort()
    p99 = times[min(len(times) - 1, int(0.99 * len(times)))]
    print(f"| {name} | {correct}/{len(CASES)} ({100 * correct / len(CASES):.1f}%) | {statistics.median(times):.2f} | "
          f"{p99:.2f} | {max(times):.1f} |")
    return wrong


def main():
    verifier.is_equiv("1", "1")  # warm-up (imports, caches) is not part of any case
    print(f"{len(CASES)} labelled cases; times in ms per case\n")
    print("| verifier | accuracy | median | p99 | max |\n|---|---|---|---|---|")
    wrong = {"verifier.is_equiv": score("verifier.is_equiv", verifier.is_equiv)}
    mv = math_verify_judge()
    if mv is None:
        print("| math-verify | not installed | | | |")
    else:
        mv("1", "1")
        wrong["math-verify"] = score("math-verify", mv)
    for name, cats in wrong.items():
        if cats:
            counts = {c: cats.count(c) for c in sorted(set(cats))}
            print(f"\n{name} misses by category: {counts}")


if __name__ == "__main__":
    main()

"""Re-judge stored tiny evaluation samples with today's verifier: how many verdicts a verifier change would move.

Reads every `*.samples.jsonl` under the given directories (evaluation writes them beside results.json; gitignored, so
they exist only where the runs ran), looks up each tiny problem's gold answer, and judges the response again with
the extraction the tiny preset evaluates with (the last box). Prints the counts and every changed verdict.

    python bench/rejudge_samples.py results
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval import benchmarks, extract  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("dirs", nargs="+")
    a = p.parse_args()
    gold = {r["id"]: r["answer"] for r in benchmarks.load(benchmarks.TINY)}
    files = sorted(f for d in a.dirs for f in Path(d).rglob("tiny-*.samples.jsonl"))
    total, changed, seen = 0, [], {}
    for f in files:
        for line in f.read_text().splitlines():
            s = json.loads(line)
            key = (s["response"], gold[s["problem_id"]], s["truncated"])
            if key not in seen:                                     # many samples repeat: judge each text once
                seen[key] = bool(extract.verify(s["response"], key[1], s["truncated"], "boxed"))
            total += 1
            if seen[key] != s["correct"]:
                changed.append((str(f), s["problem_id"], s["extracted"], key[1], s["correct"], seen[key]))
    print(f"{len(files)} sample files, {total} samples, {len(seen)} distinct (response, gold) pairs; "
          f"verdicts changed: {len(changed)}")
    for c in changed:
        print("  {} {}: box {!r} gold {!r}: {} -> {}".format(*c))


if __name__ == "__main__":
    main()

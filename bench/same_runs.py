"""Are two runs the same run? Compares two run directories (reproduce.py's runs/<method>-s<seed>/, or scope.py's
--out-dir) bit for bit: every metric of every step except the wall-clock ones, the evaluation's results, and the final
weights. Used to check that code changed after a long study still makes the study's runs (docs/reproducing.md).
The committed results/ keep no weights (.gitignore): against them the weights are not compared, and the line says so.

    python bench/same_runs.py RUN_DIR_A RUN_DIR_B [RUN_DIR_A2 RUN_DIR_B2 ...]
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

CLOCK = ("time/", "perf/")                                          # wall-clock metrics differ between any two runs


def compare(a, b):
    """-> (a list of differences (empty: the same run), whether the weights were compared)."""
    out = []
    ma, mb = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b))
    if len(ma) != len(mb):
        out.append(f"metrics.jsonl: {len(ma)} steps against {len(mb)}")
    for i, (x, y) in enumerate(zip(ma, mb)):
        keys = {k for k in set(x) | set(y) if not k.startswith(CLOCK)}
        out += [f"step {i + 1}: {k} {x.get(k)} != {y.get(k)}" for k in sorted(keys) if x.get(k) != y.get(k)]
    ea, eb = (d / "eval" / "results.json" for d in (a, b))
    if ea.exists() or eb.exists():
        ra, rb = (json.loads(p.read_text()) if p.exists() else None for p in (ea, eb))
        if ra is None or rb is None or (ra["macro_average"], ra["benchmarks"]) != (rb["macro_average"],
                                                                                     rb["benchmarks"]):
            out.append("eval/results.json: the evaluations differ")
    pa, pb = (d / "checkpoint" / "model.safetensors" for d in (a, b))
    if not (pa.exists() and pb.exists()):
        return out, False                                           # a side without weights (committed results/)
    wa, wb = load_file(str(pa)), load_file(str(pb))
    if wa.keys() != wb.keys() or any(not torch.equal(wa[k], wb[k]) for k in wa):
        out.append("checkpoint/model.safetensors: the weights differ")
    return out, True


if __name__ == "__main__":
    dirs = [Path(p) for p in sys.argv[1:]]
    if not dirs or len(dirs) % 2:
        sys.exit(__doc__)
    bad = 0
    for a, b in zip(dirs[::2], dirs[1::2]):
        diffs, weights = compare(a, b)
        bad += bool(diffs)
        what = "metrics but the clock, evaluation, weights" if weights else \
            "metrics but the clock, evaluation; weights not compared: one side has no checkpoint/model.safetensors"
        print(f"{a} vs {b}: " + (f"the same run ({what})" if not diffs else
                                 f"{len(diffs)} differences: " + "; ".join(diffs[:5])))
    sys.exit(1 if bad else 0)

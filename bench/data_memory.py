"""Memory of loading training data (loading.load_problems): peak while loading, what stays held, and reading one step's
rows, measured with tracemalloc (Python allocations) in a fresh process. Run it with the scope.py to measure:

    python bench/data_memory.py --data ../shared/benchmarks/deepmath_train_sample.jsonl
    python bench/data_memory.py --data runs/deepmath_shaped.jsonl --make-shaped 2000   # rows shaped like DeepMath-103K
    python bench/data_memory.py --repo /path/to/an/older/checkout ...                  # the same with older code

--make-shaped N writes N rows shaped like DeepMath-103K's (a problem, an answer and three R1 solutions of 16,000
characters each: 5 GB / 103,110 rows is about 48 KB per row), built from the shared sample's problems; the real file
is not available offline.
"""
import argparse
import json
import sys
import time
import tracemalloc
from pathlib import Path


def make_shaped(src, dst, n):
    rows = [json.loads(line) for line in Path(src).open()]
    with open(dst, "w") as f:
        for i in range(n):
            r = rows[i % len(rows)]
            f.write(json.dumps({"problem": r["problem"], "answer": r["answer"],
                                **{f"r1_solution_{k}": (r["problem"] * 200)[:16000] for k in (1, 2, 3)}}) + "\n")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]))
    p.add_argument("--make-shaped", type=int, default=0)
    a = p.parse_args()
    if a.make_shaped:
        make_shaped(Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "deepmath_train_sample.jsonl",
                    a.data, a.make_shaped)
    sys.path.insert(0, a.repo)
    import loading
    tracemalloc.start()
    t0 = time.time()
    rows = loading.load_problems(a.data)
    seconds = time.time() - t0
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    step = [rows[i]["problem"] for i in range(0, len(rows), max(1, len(rows) // 16))][:16]
    _, step_peak = tracemalloc.get_traced_memory()
    mb = 2 ** 20
    print(json.dumps({"repo": a.repo, "data": a.data, "file_MB": round(Path(a.data).stat().st_size / mb, 1),
                      "rows": len(rows), "load_s": round(seconds, 2), "peak_MB": round(peak / mb, 2),
                      "held_MB": round(held / mb, 2), "held_bytes_per_row": round(held / len(rows)),
                      "reading_16_rows_peak_MB": round(step_peak / mb, 2), "type": type(rows).__name__,
                      "rows_read": len(step)}))


if __name__ == "__main__":
    main()

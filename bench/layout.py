"""The sizes of the reference (docs/layout.md), measured as the side-by-side table of issue #32 measured the anchors:
per file, its lines, lines over 100 columns, branches on the method's name, functions and the largest; for scope.py
also how many calls separate the loop from the loss, and what a reader takes to copy the loss (the part from
"# 1. The loss" to "END of the loss").

    python bench/layout.py
"""
import ast
import datetime
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = ["scope.py", "baselines.py", "verifier.py", "logprobs.py", "loading.py", "checkpoints.py", "memory.py",
         "ranks.py", "batching.py", "step_log.py", "cli.py", "vllm_engine.py", "tiny_testbed.py"]
NAMES = {"scope", "opd", "psr", "grpo", "kd"}


def method_branches(tree):
    """Comparisons that test which method runs: `x.method == "kd"`, `method in ("scope", "opd")`, ..."""
    def is_method(n):
        return (isinstance(n, ast.Attribute) and n.attr == "method") or (isinstance(n, ast.Name) and n.id == "method")

    def names(n):
        return {c.value for c in ast.walk(n) if isinstance(c, ast.Constant) and isinstance(c.value, str)} & NAMES
    return sum(1 for n in ast.walk(tree) if isinstance(n, ast.Compare)
               and (any(is_method(x) for x in [n.left, *n.comparators]) or names(n)))


def main():
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"bench/layout.py, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit} "
          "(plus the working tree)")
    print("| file | lines | lines over 100 columns | branches on the method | functions | largest function (lines) |")
    print("|---|---|---|---|---|---|")
    for name in FILES:
        src = (ROOT / name).read_text()
        tree = ast.parse(src)
        fns = [(f.end_lineno - f.lineno + 1, f.name) for f in ast.walk(tree)
               if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
        big = max(fns) if fns else (0, "-")
        lines = src.splitlines()
        wide = sum(len(line) > 100 for line in lines)
        print(f"| {name} | {len(lines)} | {wide} ({100 * wide / len(lines):.0f}%) | {method_branches(tree)} | "
              f"{len(fns)} | {big[1]} ({big[0]}) |")
    lines = (ROOT / "scope.py").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# 1. The loss"))
    end = next(i for i, line in enumerate(lines) if "END of the loss" in line)
    part = "\n".join(lines[start:end])
    tree = ast.parse(part)
    imports = sorted({a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names})
    defs = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    code = sum(1 for line in part.splitlines() if line.strip() and not line.strip().startswith("#"))
    print(f"\nthe loss a reader copies: scope.py lines {start + 1}-{end}, {end - start} lines ({code} not blank or "
          f"comment), imports {', '.join(imports)}; defines {', '.join(defs)}")
    fn = next(f for f in ast.walk(ast.parse("\n".join(lines))) if isinstance(f, ast.FunctionDef)
              and f.name == "update_student")
    calls = sorted({c.func.id for c in ast.walk(fn) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)})
    print(f"update_student: {fn.end_lineno - fn.lineno + 1} lines; calls {', '.join(calls)}; loop -> update_student "
          "-> scope_loss")


if __name__ == "__main__":
    main()

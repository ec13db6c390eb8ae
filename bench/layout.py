"""The sizes of the reference (docs/layout.md): lines of scope.py and of each module beside it, the largest function
of each, and what a reader takes to copy the loss (the part from "# 1. The loss" to "end of the loss").

    python bench/layout.py
"""
import ast
import datetime
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = ["scope.py", "verifier.py", "logprobs.py", "loading.py", "checkpoints.py", "memory.py", "runtime.py", "cli.py",
         "vllm_engine.py", "tiny_testbed.py"]


def main():
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"bench/layout.py, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit} "
          "(plus the working tree)")
    print("| file | lines | functions | largest function (lines) | lines over 120 characters |")
    print("|---|---|---|---|---|")
    for name in FILES:
        src = (ROOT / name).read_text()
        fns = [(f.end_lineno - f.lineno + 1, f.name) for f in ast.walk(ast.parse(src))
               if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
        big = max(fns) if fns else (0, "-")
        wide = sum(len(line) > 120 for line in src.splitlines())
        print(f"| {name} | {len(src.splitlines())} | {len(fns)} | {big[1]} ({big[0]}) | {wide} |")
    lines = (ROOT / "scope.py").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# 1. The loss"))
    end = next(i for i, line in enumerate(lines) if line.startswith("# ---") and "end of the loss" in line)
    part = "\n".join(lines[start:end])
    tree = ast.parse(part)
    imports = sorted({a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names})
    defs = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    code = sum(1 for line in part.splitlines() if line.strip() and not line.strip().startswith("#"))
    print(f"\nthe loss a reader copies: scope.py lines {start + 1}-{end}, {end - start} lines ({code} not blank or "
          f"comment), imports {', '.join(imports)}; defines {', '.join(defs)}")


if __name__ == "__main__":
    main()

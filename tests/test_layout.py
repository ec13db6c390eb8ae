"""The reference a reader copies: scope.py's budget, the copyable loss part, the import graph without circles, one copy
of scope under `python scope.py`, and the README's copy instructions run in an empty directory (docs/layout.md)."""

import ast
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

import scope
from conftest import ROOT

# The project's own modules: top-level files and the eval package (tests, bench and examples only import them).
MODULES = {p.stem: p for p in ROOT.glob("*.py")} | {f"eval.{p.stem}": p for p in (ROOT / "eval").glob("*.py")}


def loss_part():
    """The text of scope.py from its "# 1. The loss" heading to the "END of the loss" ruler: what a reader copies.
    The end marker appears once in the file, so a reader who cuts at its first match cuts the whole part."""
    src = (ROOT / "scope.py").read_text()
    assert src.lower().count("end of the loss") == 1
    lines = src.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith("# 1. The loss"))
    end = next(i for i, line in enumerate(lines) if "END of the loss" in line)
    return "".join(lines[start:end])


def imports_of(path):
    """Every project module a file imports, at the top or inside a function (a lazy import is an import too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in MODULES}
    return found


def test_method_files_keep_their_budget_and_direction():
    """scope.py at most 850 lines, at most 10% of them over 100 columns, no function in it over 60; verifier.py, which
    scope.py imports, needs neither torch nor any project module (a reader can swap it, or use it alone as a reward
    function); baselines.py imports no project module (scope.py hands OPD and PSR its loss)."""
    src = (ROOT / "scope.py").read_text()
    lines = src.splitlines()
    assert len(lines) <= 850 and sum(len(x) > 100 for x in lines) <= 0.10 * len(lines)
    assert imports_of(ROOT / "baselines.py") == set()
    long = [(f.name, f.end_lineno - f.lineno + 1) for f in ast.walk(ast.parse(src))
            if isinstance(f, ast.FunctionDef) and f.end_lineno - f.lineno + 1 > 60]
    assert long == []
    imported = {a.name.split(".")[0] for n in ast.walk(ast.parse((ROOT / "verifier.py").read_text()))
                if isinstance(n, (ast.Import, ast.ImportFrom)) for a in (n.names if isinstance(n, ast.Import) else
                                                                          [ast.alias(n.module or "")])}
    assert imported <= {"math", "random", "re", "time", "sympy"}, imported


def test_the_import_graph_has_no_circle():
    """No module reaches itself through imports, lazy ones included (scope -> tiny_testbed -> scope was one)."""
    graph = {m: imports_of(p) - {m} for m, p in MODULES.items()}
    assert graph["scope"] >= {"verifier", "ranks", "batching", "step_log", "baselines", "loading", "checkpoints",
                              "memory", "logprobs"}                 # sanity

    def reach(start):
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += graph.get(m, ())
        return seen

    circles = {m: sorted(reach(m)) for m in graph if m in reach(m)}
    assert circles == {}


def test_scope_imports_no_harness_module_at_import_time():
    """scope.py is the method: importing it loads neither the testbed nor eval/ nor reproduce.py, nor the vLLM engine."""
    code = ("import sys; sys.path.insert(0, %r); import scope; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('tiny_testbed', 'eval', 'reproduce', 'vllm_engine', 'vllm'))))" % str(ROOT))
    res = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    assert json.loads(res.stdout) == []


def random_batch(seed, groups=5, n=6, length=9):
    gen = torch.Generator().manual_seed(seed)
    b = groups * n
    mask = (torch.arange(length)[None] < torch.randint(0, length + 1, (b, 1), generator=gen)).double()
    return dict(logp=-3 * torch.rand(b, length, generator=gen, dtype=torch.float64),
                logp_old=-3 * torch.rand(b, length, generator=gen, dtype=torch.float64),
                logp_teacher=-3 * torch.rand(b, length, generator=gen, dtype=torch.float64), mask=mask,
                rewards=torch.randint(0, 2, (b,), generator=gen).double(),
                group_ids=torch.arange(groups).repeat_interleave(n) * 3 + 1)


LOSS_CHECK = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
import scope_loss_part as part
project = {"scope", "verifier", "ranks", "batching", "step_log", "baselines", "loading", "checkpoints", "memory",
           "logprobs", "cli", "tiny_testbed"}
assert not project & set(sys.modules), project & set(sys.modules)
out = {}
for key, b in torch.load(sys.argv[2]).items():
    agg, norm, student, teacher = key.split("/")
    w = part.scope_weights(b["logp_old"], b["logp_teacher"], b["mask"], b["group_ids"], b["rewards"], 0.7, norm,
                           student, teacher)
    counts = part.batch_counts(b["mask"], b["rewards"], b["group_ids"], group_size=6)
    logp = b["logp"].clone().requires_grad_()
    total = 0.0
    for rows in (slice(0, 7), slice(7, 20), slice(20, 30)):          # micro-batches that cut groups apart
        loss, _ = part.scope_loss(logp[rows], b["logp_old"][rows], b["logp_teacher"][rows], b["mask"][rows],
                                  b["rewards"][rows], w[rows], group_ids=b["group_ids"][rows], counts=counts, agg=agg)
        total = total + loss
    total.backward()
    out[key] = dict(w=w.tolist(), loss=float(total), grad=logp.grad.flatten().tolist())
print(json.dumps(out))
"""


def test_the_loss_part_runs_alone_and_equals_scope(tmp_path):
    """The part of scope.py a reader copies (weights, normalisation, losses) is cut out of the file's text into a fresh
    module, imported in a process with nothing of the project on its path, and gives scope.py's weights, loss and
    gradient on random float64 batches, micro-batched, for every weight and aggregation option."""
    text = loss_part()
    assert 100 <= len(text.splitlines()) <= 240
    tops = {a.name for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Import) for a in n.names}
    assert tops == {"math", "torch"} and not any(isinstance(n, ast.ImportFrom) for n in ast.walk(ast.parse(text)))
    assert "logp_old" in text and "world" in text and "before any micro-batching" in text   # the contract is stated
    assert "stays on one rank" in text and "temperature" in text and "below" not in text     # ... all of it, inside
    (tmp_path / "part").mkdir()
    (tmp_path / "part" / "scope_loss_part.py").write_text(text)
    cases = {f"{agg}/{norm}/{s}/{t}": random_batch(i) for i, (agg, norm, s, t) in enumerate(
        [("paper", "sum", "paper", "paper"), ("token", "mean", "reversed", "paper"), ("paper", "mean", "uniform",
                                                                                      "reversed"),
         ("official-microbatch", "mean", "reversed", "paper")])}
    torch.save(cases, tmp_path / "cases.pt")
    res = subprocess.run([sys.executable, "-I", "-c", LOSS_CHECK, str(tmp_path / "part"), str(tmp_path / "cases.pt")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout)
    for key, b in cases.items():
        agg, norm, student, teacher = key.split("/")
        w = scope.scope_weights(b["logp_old"], b["logp_teacher"], b["mask"], b["group_ids"], b["rewards"], 0.7, norm,
                                student, teacher)
        counts = scope.batch_counts(b["mask"], b["rewards"], b["group_ids"], group_size=6)
        logp = b["logp"].clone().requires_grad_()
        loss = sum(scope.scope_loss(logp[r], b["logp_old"][r], b["logp_teacher"][r], b["mask"][r], b["rewards"][r],
                                    w[r], group_ids=b["group_ids"][r], counts=counts, agg=agg)[0]
                   for r in (slice(0, 7), slice(7, 20), slice(20, 30)))   # the same micro-batches
        loss.backward()
        assert torch.equal(torch.tensor(got[key]["w"], dtype=w.dtype), w)
        assert got[key]["loss"] == pytest.approx(float(loss), rel=1e-12, abs=1e-12)
        assert torch.allclose(torch.tensor(got[key]["grad"], dtype=torch.float64), logp.grad.flatten(), rtol=1e-12,
                              atol=1e-14)


SITE = """
import atexit, json, os, sys
def _report():
    def path(m):                                     # CPython drops __main__.__file__ once the script returns
        return getattr(m, "__file__", None) or getattr(getattr(m, "__loader__", None), "path", None) or ""
    files = [name for name, m in list(sys.modules.items())
             if os.path.realpath(path(m)) == os.path.realpath(os.environ["SCOPE_FILE"])]
    distinct = {id(sys.modules[name]) for name in files}     # multiprocessing aliases __main__ as __mp_main__
    print("SCOPE_MODULES " + json.dumps([len(distinct), sorted(files)]), flush=True)
atexit.register(_report)
"""


def test_python_scope_py_loads_the_module_once(micro_models, tmp_path):
    """`python scope.py` runs the embedded default (tiny task, evaluation on its test split: tiny_testbed.py is
    imported lazily) and at exit sys.modules holds one module whose file is scope.py (before, tiny_testbed.py and
    vllm_engine.py imported it a second time as `scope`)."""
    student, teacher = micro_models
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITE)
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path / "site"), "SCOPE_FILE": str(ROOT / "scope.py")}
    res = subprocess.run([sys.executable, str(ROOT / "scope.py"), "--student", student, "--teacher", teacher,
                          "--steps", "1", "--prompts-per-step", "2", "--n-rollouts", "2", "--max-new-tokens", "16",
                          "--eval-every", "1", "--eval-problems", "2", "--eval-k", "1", "--out-dir",
                          str(tmp_path / "run")], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("SCOPE_MODULES "))
    count, names = json.loads(line.split(" ", 1)[1])
    assert count == 1 and "__main__" in names and "scope" not in names, names
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "eval/all/avg@1" in record                                   # the embedded default's evaluation ran


def copied_files():
    """The files the README tells a reader to copy to run the loop on their own models: its `cp ... DEST` line."""
    readme = (ROOT / "README.md").read_text()
    lines = [x for x in readme.splitlines() if re.match(r"cp (\S+\.py ?)+ \S+/?$", x.strip())]
    assert len(lines) == 1, lines
    return lines[0].split()[1:-1]


def test_the_readme_copy_instructions_run_in_an_empty_directory(micro_models, tmp_path):
    """Copy exactly the files the README names into an empty directory: `--help` and one training step on the micro
    models and a small data file run there, with nothing else of the project importable."""
    files = copied_files()
    assert files[:2] == ["scope.py", "verifier.py"] and all((ROOT / f).exists() for f in files)
    dest = tmp_path / "mine"
    dest.mkdir()
    for f in files:
        shutil.copy(ROOT / f, dest / f)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"problem": f"{a}+{a}=?", "answer": str(2 * a)}) + "\n" for a in range(6)))
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    run = [sys.executable, "-s", "scope.py"]
    res = subprocess.run(run + ["--help"], capture_output=True, text=True, cwd=dest, env=env, timeout=120)
    assert res.returncode == 0 and "--loss-agg" in res.stdout, res.stderr[-2000:]
    student, teacher = micro_models
    res = subprocess.run(run + ["--student", student, "--teacher", teacher, "--data", str(data), "--steps", "1",
                                "--prompts-per-step", "2", "--n-rollouts", "2", "--max-new-tokens", "16",
                                "--out-dir", str(tmp_path / "run")], capture_output=True, text=True, cwd=dest, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoint" / "model.safetensors").exists()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


def test_update_student_reads_as_scopes_update():
    """No comparison on the method's name anywhere in scope.py (the METHODS table carries what differs between the
    methods); update_student branches on the method once, the loss dispatch, with SCOPE's scope_loss inline beside it
    and the baselines' loss one call away (bench/layout.py counts the same way for docs/layout.md)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import layout
    tree = ast.parse((ROOT / "scope.py").read_text())
    assert layout.method_branches(tree) == 0
    fn = next(f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "update_student")
    dispatch = [n for n in ast.walk(fn) if isinstance(n, (ast.If, ast.IfExp)) and "baseline" in ast.unparse(n.test)]
    calls = {ast.unparse(c.func) for c in ast.walk(fn) if isinstance(c, ast.Call)}
    assert len(dispatch) == 1 and {"batch_weights", "scope_loss", "baseline.loss", "(loss * rt.world).backward"} <= calls
    assert layout.method_branches(ast.parse((ROOT / "baselines.py").read_text())) == 0

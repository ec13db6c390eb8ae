"""bench/gpu_check.py in --dry-run mode: the same code path as on a GPU, at tiny shapes on the CPU (gloo). This checks
the script's bookkeeping and that every phase it calls exists and runs; it says nothing about GPU speed or memory.
bench/vllm_api_check.py against the installed vLLM; bench/same_runs.py on run directories made here."""

import json
import math
import subprocess
import sys

import pytest

from conftest import ROOT


def gpu_check(tmp_path, *argv, patch=""):
    """bench/gpu_check.py --dry-run in a subprocess, with `patch` (Python) run first; -> (result, report)."""
    script = (f"import runpy, sys; sys.path.insert(0, {str(ROOT)!r}); {patch or 'pass'}; sys.argv = ['gpu_check.py', "
              f"'--dry-run', *{list(argv)!r}]; runpy.run_path({str(ROOT / 'bench' / 'gpu_check.py')!r}, "
              "run_name='__main__')")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    return res, json.loads((tmp_path / "runs" / "gpu_check" / "gpu_check.json").read_text())


def test_gpu_check_dry_run_writes_its_report(tmp_path):
    """Every part on the CPU at tiny shapes: the report under the output directory (runs/gpu_check/ by default, not
    the repository root), a PASS or FAIL with its threshold for every check, and FAIL for what the CPU cannot run."""
    res, report = gpu_check(tmp_path)
    assert report["versions"]["dry_run"] and report["versions"]["torch"] and report["versions"]["transformers"]
    assert set(report["a_tiny_pipeline"]) == {"scope", "opd", "psr", "grpo", "kd"}
    for r in [*report["a_tiny_pipeline"].values(), report["t_torchrun_fsdp2"]]:
        assert r["verdict"] == "PASS" and all(math.isfinite(x) for x in r["loss"]) and 0 <= r["eval_avg"] <= 1, r
    for r in report["b_paper_shaped"].values():
        assert set(r["phases"]) == {"generate", "score", "update"} and r["response_tokens"] > 0
    c = report["c_vllm"]                                             # vLLM's CPU build: installed in CI
    assert c["engine_reused_by_the_second_run"]["verdict"] == "PASS"
    assert all(0 <= g < 0.02 for run in ("scope-vllm", "opd-vllm") for g in c[run]["sampler_gap"]), c
    assert c["fixed_sequences"]["verdict"] == "PASS" and len(c["fixed_sequences"]["steps"]) == 3, c
    assert "| c_vllm | engine_reused_by_the_second_run | PASS (the second run (same settings) reuses" in res.stdout
    assert "| c_vllm | teardown_while_asleep | FAIL (needs sleep mode) | cannot run here" in res.stdout
    assert "| c_vllm | scope-vllm-fp8 | FAIL (needs a GPU) | cannot run here: fp8 needs a GPU |" in res.stdout
    assert "summary: 2 check(s) FAIL (c_vllm/teardown_while_asleep, c_vllm/scope-vllm-fp8)" in res.stdout
    assert not (ROOT / "gpu_check.json").exists()


def test_gpu_check_keeps_its_report_when_a_part_raises(tmp_path):
    """A part that raises is a FAIL with its error, the later parts still run, and a raise in the last teardown is
    recorded too: the report is written after every part."""
    patch = ("import scope, vllm_engine; scope.update_student = lambda *a: 1 / 0; real = vllm_engine.close_engine; "
             "vllm_engine.close_engine = lambda: (real(), 1 / 0)")
    res, report = gpu_check(tmp_path, "--parts", "abc", patch=patch)
    assert all(r["verdict"] == "FAIL" and "ZeroDivisionError" in r["error"] for r in report["a_tiny_pipeline"].values())
    assert report["c_vllm"]["final_close"]["verdict"] == "FAIL" and "ZeroDivisionError" in report["c_vllm"][
        "final_close"]["error"]
    assert "| a_tiny_pipeline | kd | FAIL (runs without an error) | ZeroDivisionError" in res.stdout


def test_gpu_check_without_vllm_says_fail_not_skip(tmp_path):
    """On a machine without vllm, part (c) prints FAIL and the summary names it."""
    patch = "import importlib.util as u; real = u.find_spec; u.find_spec = lambda n, *a: None if n == 'vllm' else real(n, *a)"
    res, report = gpu_check(tmp_path, "--parts", "c", patch=patch)
    assert "| c_vllm | importable | FAIL (vllm imports) | vllm is not installed" in res.stdout
    assert "summary: 1 check(s) FAIL (c_vllm/importable)" in res.stdout


@pytest.mark.parametrize("path,cls", [("eval/run.py", "VLLMBackend"), ("vllm_engine.py", None)])
def test_vllm_api_check_lists_every_vllm_name_the_code_uses(path, cls):
    """bench/vllm_api_check.py checks USES against vLLM's source (docs/evaluation.md); this keeps USES in step with the
    code: every keyword passed to LLM(...) / SamplingParams(...), every method called on the engine and every attribute
    read from its outputs in vllm_engine.py and eval's VLLMBackend is in USES."""
    import ast
    sys.path.insert(0, str(ROOT / "bench"))
    import vllm_api_check
    declared = {(c, member): set(names) for _, c, member, names in vllm_api_check.USES}
    tree = ast.parse((ROOT / path).read_text())
    code = tree if cls is None else next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls)
    seen = {"LLM": set(), "SamplingParams": set(), "engine": set(), "attrs": set()}
    for node in ast.walk(code):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            if name in ("LLM", "SamplingParams"):                     # keywords, also inside **{...}
                seen[name] |= {k.arg for c in ast.walk(node) if isinstance(c, ast.Call) for k in c.keywords if k.arg}
            on = node.func.value if isinstance(node.func, ast.Attribute) else None   # llm.X(...), engine().X(...)
            if getattr(on, "attr", None) == "llm" or (isinstance(on, ast.Call) and getattr(
                    on.func, "attr", getattr(on.func, "id", None)) == "engine"):
                seen["engine"].add(node.func.attr)
        if isinstance(node, ast.Attribute) and node.attr in ("outputs", "finish_reason", "token_ids", "logprobs",
                                                             "logprob", "prompt_logprobs", "text"):
            seen["attrs"].add(node.attr)
    keys = {k.value for n in ast.walk(code) if isinstance(n, ast.Dict) for k in n.keys if isinstance(k, ast.Constant)}
    assert "prompt_token_ids" in keys and keys & {"prompt_token_ids"} <= declared[("TokensPrompt", "fields")]
    assert seen["LLM"] <= declared[("LLM", "__init__")] | declared[("EngineArgs", "fields")], seen["LLM"]
    assert seen["SamplingParams"] and seen["SamplingParams"] <= declared[("SamplingParams", "fields")]
    assert seen["engine"] and seen["engine"] <= {m for (c, m) in declared if c == "LLM"}
    assert seen["attrs"] <= (declared[("RequestOutput", "attributes")] | declared[("CompletionOutput", "attributes")]
                             | declared[("Logprob", "attributes")])


def test_vllm_api_check_passes_on_the_installed_build():
    """The same check against the vllm this Python imports (CI: the CPU build the vLLM tests run on)."""
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "vllm_api_check.py"), "--installed"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "all names found" in res.stdout, res.stdout[-2000:]


def test_same_runs_tells_the_same_run_from_another(tmp_path):
    """bench/same_runs.py: two copies of one run are the same run whatever their clocks say; a changed metric, a changed
    evaluation or one changed weight is a difference (exit 1, named)."""
    import shutil

    import torch
    from safetensors.torch import save_file

    a = tmp_path / "a"
    (a / "eval").mkdir(parents=True)
    (a / "checkpoint").mkdir()
    steps = [{"step": s, "loss": s / 3, "time/update": 0.1 * s, "perf/tokens_per_s": 99.0} for s in (1, 2)]
    (a / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    (a / "eval" / "results.json").write_text(json.dumps({"macro_average": {"avg@8": 0.5}, "benchmarks": {}}))
    save_file({"w": torch.arange(4.0)}, str(a / "checkpoint" / "model.safetensors"))

    def same(b):
        res = subprocess.run([sys.executable, str(ROOT / "bench" / "same_runs.py"), str(a), str(b)],
                             capture_output=True, text=True, timeout=120)
        return res.returncode, res.stdout

    b = tmp_path / "b"
    shutil.copytree(a, b)
    (b / "metrics.jsonl").write_text("".join(json.dumps({**r, "time/update": 7.0}) + "\n" for r in steps))
    assert same(b) == (0, f"{a} vs {b}: the same run (metrics but the clock, evaluation, weights)\n")
    (b / "metrics.jsonl").write_text("".join(json.dumps({**r, "loss": r["loss"] + (r["step"] == 2)}) + "\n"
                                             for r in steps))
    code, out = same(b)
    assert code == 1 and "step 2: loss" in out and "step 1" not in out
    shutil.rmtree(b)
    shutil.copytree(a, b)
    save_file({"w": torch.tensor([0.0, 1.0, 2.0, 3.0 + 1e-6])}, str(b / "checkpoint" / "model.safetensors"))
    (b / "eval" / "results.json").write_text(json.dumps({"macro_average": {"avg@8": 0.25}, "benchmarks": {}}))
    code, out = same(b)
    assert code == 1 and "the weights differ" in out and "the evaluations differ" in out
    shutil.rmtree(b)                                    # against a run without weights (the committed results/):
    shutil.copytree(a, b, ignore=shutil.ignore_patterns("checkpoint"))
    assert same(b) == (0, f"{a} vs {b}: the same run (metrics but the clock, evaluation; weights not compared: one "
                          "side has no checkpoint/model.safetensors)\n")
    (b / "eval" / "results.json").write_text(json.dumps({"macro_average": {"avg@8": 0.25}, "benchmarks": {}}))
    assert same(b)[0] == 1

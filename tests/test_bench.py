"""bench/gpu_check.py in --dry-run mode: the same code path as on a GPU, at tiny shapes on the CPU (gloo). This checks
the script's bookkeeping and that every phase it calls exists and runs; it says nothing about GPU speed or memory."""

import json
import math
import subprocess
import sys

import pytest

from conftest import ROOT


def test_gpu_check_dry_run_writes_its_report(tmp_path):
    out = tmp_path / "gpu_check.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] and report["torch"] and report["transformers"]
    assert set(report["a_tiny_pipeline"]) == {"scope", "opd", "grpo", "kd"}
    for r in report["a_tiny_pipeline"].values():
        assert math.isfinite(r["loss"]) and 0 <= r["eval_avg@2"] <= 1
    for r in report["b_paper_shaped"].values():
        assert set(r["phases"]) == {"generate", "score", "update"} and r["response_tokens"] > 0
    c = report["c_vllm"]                                             # vLLM's CPU build: installed in CI
    assert c["importable"] and c["engine_reused_by_the_second_run"] is True
    assert all(0 <= g < 0.02 for run in ("scope-vllm", "opd-vllm") for g in c[run]["sampler_gap"]), c
    assert len(c["fixed_sequences"]) == 3 and all(r["mean"] < 0.02 for r in c["fixed_sequences"]), c
    assert "| (c) vllm engine_reused_by_the_second_run | true |" in res.stdout
    assert "| (c) vllm teardown_while_asleep | FAIL: cannot run here: this platform has no sleep mode" in res.stdout
    assert "| (c) vllm scope-vllm-fp8 | FAIL: cannot run here: fp8 needs a GPU |" in res.stdout
    assert "summary: 2 part(s) FAIL (teardown_while_asleep, scope-vllm-fp8)" in res.stdout


def test_gpu_check_without_vllm_says_fail_not_skip(tmp_path):
    """On a machine without vllm, part (c) prints FAIL and the summary says the vLLM part needs vllm installed."""
    hide = ("import importlib.util as u, runpy, sys; real = u.find_spec; "
            "u.find_spec = lambda n, *a: None if n == 'vllm' else real(n, *a); "
            f"sys.argv = ['gpu_check.py', '--dry-run', '--parts', 'c', '--out', {str(tmp_path / 'r.json')!r}]; "
            f"runpy.run_path({str(ROOT / 'bench' / 'gpu_check.py')!r}, run_name='__main__')")
    res = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "| (c) vllm FAIL | FAIL: vllm is not installed" in res.stdout
    assert "summary: 1 part(s) FAIL (FAIL) - the vLLM part (c) needs a machine with vllm installed" in res.stdout


@pytest.mark.parametrize("path,cls", [("eval/run.py", "VLLMBackend"), ("vllm_engine.py", None)])
def test_vllm_api_check_lists_every_vllm_name_the_code_uses(path, cls):
    """bench/vllm_api_check.py checks USES against vLLM's source (docs/evaluation.md); this keeps USES in step with the code:
    every keyword passed to LLM(...) / SamplingParams(...), every method called on the engine and every attribute
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
            if isinstance(node.func, ast.Attribute) and getattr(node.func.value, "attr", None) == "llm":
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

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
    assert report["c_vllm"]["importable"] is False and "| (c) vllm |" in res.stdout


@pytest.mark.parametrize("path,cls", [("eval/run.py", "VLLMBackend"), ("scope.py", "VLLMRollouts")])
def test_vllm_api_check_lists_every_vllm_name_the_code_uses(path, cls):
    """bench/vllm_api_check.py checks USES against vLLM's source (README); this keeps USES in step with the code:
    every keyword passed to LLM(...) / SamplingParams(...), every method called on the engine and every attribute
    read from its outputs in eval's VLLMBackend and scope's VLLMRollouts is in USES. (The check against vLLM itself
    is the script.)"""
    import ast
    sys.path.insert(0, str(ROOT / "bench"))
    import vllm_api_check
    declared = {(c, member): set(names) for _, c, member, names in vllm_api_check.USES}
    tree = ast.parse((ROOT / path).read_text())
    backend = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls)
    seen = {"LLM": set(), "SamplingParams": set(), "engine": set(), "attrs": set(), "model": set()}
    for node in ast.walk(backend):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            if name in ("LLM", "SamplingParams"):
                seen[name] |= {k.arg for k in node.keywords}
            if isinstance(node.func, ast.Attribute) and getattr(node.func.value, "attr", None) == "llm":
                seen["engine"].add(node.func.attr)
            if isinstance(node.func, ast.Attribute) and getattr(node.func.value, "id", None) == "model":
                seen["model"].add(node.func.attr)                         # inside apply_model(lambda model: ...)
        if isinstance(node, ast.Attribute) and node.attr in ("outputs", "text", "finish_reason", "token_ids",
                                                             "logprobs", "logprob"):
            seen["attrs"].add(node.attr)
    keys = {k.value for n in ast.walk(backend) if isinstance(n, ast.Dict) for k in n.keys if isinstance(k, ast.Constant)}
    assert keys <= declared[("TokensPrompt", "fields")]                # prompts as token ids
    assert seen["LLM"] and seen["LLM"] <= declared[("LLM", "__init__")] | declared[("EngineArgs", "fields")]
    assert seen["SamplingParams"] and seen["SamplingParams"] <= declared[("SamplingParams", "fields")]
    assert seen["engine"] and seen["engine"] <= {m for (c, m) in declared if c == "LLM"}
    assert seen["model"] <= {m for (c, m) in declared if c == "Qwen2ForCausalLM"}
    assert seen["attrs"] <= (declared[("RequestOutput", "attributes")] | declared[("CompletionOutput", "attributes")]
                             | declared[("Logprob", "attributes")])

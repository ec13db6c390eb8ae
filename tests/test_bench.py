"""bench/gpu_check.py in --dry-run mode: the same code path as on a GPU, at tiny shapes on the CPU (gloo). This checks
the script's bookkeeping and that every phase it calls exists and runs; it says nothing about GPU speed or memory."""

import json
import math
import subprocess
import sys

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

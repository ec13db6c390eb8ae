"""reproduce.py smoke runs: one process (then a second invocation that skips finished work) and torchrun."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import reproduce
from conftest import ROOT


def smoke_argv(micro_models, out, methods="base,grpo,kd,opd,scope"):
    student, teacher = micro_models
    return ["--smoke", "--student", student, "--teacher", teacher, "--out", str(out / "results"),
            "--results-md", str(out / "RESULTS.md"), "--methods", methods, "--preset", "tiny"]


def test_smoke_run_writes_results_tables_plots_and_resumes(micro_models, tmp_path, capsys):
    reproduce.main(smoke_argv(micro_models, tmp_path))
    results = tmp_path / "results"
    for run in ("base", "grpo", "kd", "opd", "scope"):
        run_dir = results / "runs" / f"{run}-s0"
        assert (run_dir / "eval" / "results.json").exists(), run
        if run != "base":
            assert (run_dir / "metrics.jsonl").exists() and (run_dir / "checkpoint" / "model.safetensors").exists()
            assert (run_dir / "config.json").exists()
    md = (tmp_path / "RESULTS.md").read_text()
    for label in ("student (no training)", "+ GRPO", "+ KD", "+ OPD", "+ SCOPE", "delta % of SCOPE vs OPD"):
        assert label in md, label
    assert "nan" not in md.lower() and "`python reproduce.py --smoke" in md and "hardware:" in md
    for png in ("pass_at_k.png", "training_dynamics.png"):
        assert (results / "plots" / png).stat().st_size > 1000
        assert f"plots/{png}" in md
    stamp = (results / "runs" / "scope-s0" / "metrics.jsonl").stat().st_mtime_ns
    capsys.readouterr()
    reproduce.main(smoke_argv(micro_models, tmp_path))                # finished work is skipped
    out = capsys.readouterr().out
    assert out.count("training done earlier") == 4 and out.count("evaluation done earlier") == 5
    assert (results / "runs" / "scope-s0" / "metrics.jsonl").stat().st_mtime_ns == stamp
    assert "## Does the paper's ordering hold here?" in md
    (tmp_path / "RESULTS.md").unlink()
    reproduce.main([*smoke_argv(micro_models, tmp_path), "--report-only"])   # the report from the files alone
    assert "+ SCOPE" in (tmp_path / "RESULTS.md").read_text()


def test_smoke_run_under_torchrun(micro_models, tmp_path):
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29519",
                          str(ROOT / "reproduce.py"), *smoke_argv(micro_models, tmp_path, "base,opd,scope")],
                         env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    md = (tmp_path / "RESULTS.md").read_text()
    assert "+ SCOPE" in md and "torchrun --nproc_per_node=2" in md


def test_paper_preset_trains_with_the_papers_config(tmp_path):
    """reproduce.py --preset paper resolves scope.PRESETS["paper"] plus its own overrides for every method."""
    from eval import benchmarks
    a = reproduce.RArgs(preset="paper", seeds="0")
    train_over, ev, names = reproduce.preset_settings(a)
    for run in ("scope", "opd", "grpo", "kd"):
        t = reproduce.train_args(a, run, 0, tmp_path, train_over)
        assert (t.student, t.teacher) == ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "Skywork/Skywork-OR1-7B")
        assert t.method == run and t.data == "zwhe99/DeepMath-103K" and t.lr == 5e-5 and t.weight_decay == 0.01
        assert (t.prompts_per_step, t.n_rollouts, t.temperature, t.max_new_tokens) == (256, 8, 0.6, 12288)
        assert t.dtype == "bfloat16" and t.gradient_checkpointing and t.resume
    assert ev["preset"] == "paper" and names == benchmarks.PAPER_BENCHMARKS
    tiny = reproduce.train_args(reproduce.RArgs(), "scope", 0, tmp_path, reproduce.preset_settings(reproduce.RArgs())[0])
    assert tiny.student == "" and tiny.lr == 3e-4 and tiny.dtype == "float32"          # the default is tiny


def test_a_gpu_does_not_start_the_paper_preset_silently(micro_models, tmp_path, monkeypatch, capsys):
    """Without --preset, reproduce.py runs the tiny preset even where CUDA is available, and says so."""
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    argv = [a for a in smoke_argv(micro_models, tmp_path) if a not in ("--preset", "tiny")]
    with pytest.raises(SystemExit, match="no evaluation results"):                    # report-only on an empty dir
        reproduce.main([*argv, "--report-only"])
    assert "running the TINY preset" in capsys.readouterr().out


def test_each_invocation_gets_a_fresh_directory_unless_one_is_named():
    """A new user's `python reproduce.py` trains and evaluates: it never finds earlier runs to skip."""
    a = reproduce.RArgs()
    out1, md1 = reproduce.output_paths(a, 1_800_000_000.0)
    out2, _ = reproduce.output_paths(a, 1_800_000_001.0)
    assert out1 != out2 and str(out1).startswith("runs/reproduce-") and md1 == out1 / "RESULTS.md"
    named = reproduce.RArgs(out="results", results_md="RESULTS.md")
    assert reproduce.output_paths(named, 0.0) == (Path("results"), Path("RESULTS.md"))
    with pytest.raises(SystemExit, match="--report-only rebuilds a report from existing runs"):
        reproduce.output_paths(reproduce.RArgs(report_only=True), 0.0)

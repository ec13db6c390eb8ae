"""reproduce.py smoke runs: one process (then a second invocation that skips finished work) and torchrun."""

import os
import re
import shutil
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
    assert "+ SCOPE" in md and "torchrun --nproc-per-node=2" in md


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
        assert t.dtype == "bfloat16" and t.gradient_checkpointing and not t.resume      # nothing to resume yet
    (tmp_path / "runs" / "scope-s0" / "checkpoint").mkdir(parents=True)
    (tmp_path / "runs" / "scope-s0" / "checkpoint" / "state.json").write_text("{}")
    assert reproduce.train_args(a, "scope", 0, tmp_path, train_over).resume          # a killed run continues
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


def test_study_over_builds_recovery_and_report_at_smoke_size(micro_models, tmp_path):
    """The study's code paths at smoke size: two builds (here the same micro models, so only the bookkeeping is
    tested), the teacher as a reference run, two seeds, an ablation, path gradient norms, the error-recovery analysis
    per build, and the report that gathers them with the answers first. Smoke numbers say nothing about the method."""
    import json
    student, teacher = micro_models
    study = tmp_path / "results" / "study" / "default"
    common = ["--smoke", "--student", student, "--teacher", teacher, "--out", str(study), "--build-seeds", "0,1"]
    reproduce.main([*common, "--seeds", "0,1", "--methods", "teacher,base,opd,scope", "--ablations",
                    "--ablation-runs", "scope-no_teacher_w", "--path-grad-norms"])
    reproduce.main([*common, "--analysis", "recovery", "--analysis-problems", "8"])
    for b in (0, 1):
        r = json.loads((study / f"build{b}" / "analysis" / "recovery-default" / "recovery.json").read_text())
        assert set(r["pooled"]["quartiles"]) == {"Q1", "Q2", "Q3", "Q4"} and r["build"] == b
        assert set(r["pooled"]["q1_minus_q4"]) == {"20%", "40%", "60%", "80%"}
        items = json.loads((study / f"build{b}" / "analysis" / "recovery-default" / "items.json").read_text())
        assert len(items) == r["incorrect_scored"] and all(len(it["recovery"]) == 4 for it in items)
        assert (study / f"build{b}" / "RESULTS.md").exists()                  # each build a complete directory
        recs = [json.loads(line) for line in (study / f"build{b}" / "runs" / "scope-s0" / "metrics.jsonl").open()]
        assert all(r["train/grad_norm_mle"] > 0 and "train/grad_clipped" in r for r in recs)
    # the calibrated design's report: 3 builds reach the target, 1 does not
    cal = tmp_path / "results" / "study" / "calibrated"
    for b, src, reached, shift in ((0, 0, True, 0.0), (1, 1, True, 0.05), (2, 0, True, 0.1), (3, 1, False, 0.0)):
        shutil.copytree(study / f"build{src}", cal / f"build{b}", ignore=shutil.ignore_patterns("analysis"))
        stages = [{"steps": 190 * (i + 2), "macro": 0.8 + 0.04 * i} for i in range(3 if not reached else 2)]
        (cal / f"build{b}" / "strength.json").write_text(json.dumps({"target": 0.9, "teacher": stages,
                                                                    "reached": reached}))
        for path in (cal / f"build{b}" / "runs").glob("teacher-s*/eval/results.json"):   # margins that differ
            r = json.loads(path.read_text())
            r["macro_average"] = {k: v + shift if k.startswith("avg@") else v for k, v in r["macro_average"].items()}
            path.write_text(json.dumps(r))
    (tmp_path / "results" / "runs" / "base-s0" / "eval").mkdir(parents=True)                # a main table beside it
    (tmp_path / "results" / "runs" / "base-s0" / "eval" / "results.json").write_text(
        (study / "build0" / "runs" / "base-s0" / "eval" / "results.json").read_text())
    reproduce.main(["--out", str(tmp_path / "results"), "--results-md", str(tmp_path / "R.md"), "--report-only"])
    md = (tmp_path / "R.md").read_text()
    assert md.index("## What this testbed says") < md.index("## Main table")   # the answers first
    answer = md[md.index("**The calibrated design** (3 builds whose teacher reached the target, 2 training seeds"):]
    assert answer.index("Both intervals: a t-interval over the builds") < answer.index("**The earlier design**")
    assert "floored at what the seeds alone put in" in answer and "the verdict is read on the wider" in answer
    assert "- build 3: its teacher did not reach the target (88.0 at best on validation, target 90)" in answer
    assert "validation macro Avg@4 by stage: 80.0, 84.0)" in answer                  # strength.json beside its build
    assert "The slope of SCOPE - OPD on that margin over 3 builds" in answer
    assert "### Regime `calibrated`" in md
    assert "### Regime `default`" in md and "| 0 | pooled |" in md and "| 1 | within level |" in md
    assert "| SCOPE - OPD | " in md and "| teacher weight uniform - SCOPE |" in md and "issue #" not in md
    assert "Spearman rank correlation over these 2 pairs" in md and "| 0 | scope | 4 |" in md
    for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md):                  # every image renders
        assert (tmp_path / link).exists(), link


def test_every_image_in_the_committed_results_exists():
    for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", (ROOT / "RESULTS.md").read_text()):
        assert (ROOT / link).exists(), link


def test_hierarchical_bootstrap_over_builds_finds_a_planted_difference():
    """Three builds, three seeds, 200 problems in two levels: run a = run b + 0.1 everywhere gives exactly 10 points
    with an interval of width 0; adding build-level noise widens it, and the build level is resampled (an interval
    from builds that disagree covers all of them)."""
    import numpy as np

    import analysis
    keys = [("x", i) for i in range(100)] + [("y", i) for i in range(100)]
    rng = np.random.default_rng(0)
    same = [(keys, np.full((3, 200), 0.1)) for _ in range(3)]
    assert analysis.hierarchical(same, ["x", "y"])[:3] == pytest.approx((10.0, 10.0, 10.0))
    builds = [(keys, shift + rng.normal(0, 0.3, (3, 200))) for shift in (-0.05, 0.0, 0.2)]
    d, lo, hi, se = analysis.hierarchical(builds, ["x", "y"])
    per = [analysis.hierarchical([b], ["x", "y"]) for b in builds]
    assert lo < min(p[0] for p in per) + 2 and hi > max(p[0] for p in per) - 2 and se > max(p[3] for p in per)


def test_t_quantiles_equal_the_tables():
    import analysis
    table = {(1, 0.975): 12.7062, (2, 0.975): 4.3027, (2, 0.8): 1.0607, (7, 0.975): 2.3646, (7, 0.8): 0.8960,
             (23, 0.975): 2.0687, (200, 0.975): 1.9719}
    for (df, p), want in table.items():
        assert analysis.t_quantile(p, df) == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("builds", [8, 12])
def test_the_t_interval_fails_on_shared_seeds_and_covers_the_calibrated_design(builds):
    """1,000 studies simulated from the nested model (problems shared by every run 5 points^2, per-problem noise 540,
    3 seeds, 32 problems in each of 4 levels, a planted SCOPE - OPD of +1 point), with planted effects that can break
    the interval. The earlier design (training seeds 0, 1, 2 reused in every build, 25% of the seed variance the same
    in every build): the t-interval over builds covers the mean well under 95% of the time. The calibrated design
    (every stream keyed by (build, seed)), with unequal seed variances like the real ones (0.2 to 44): 93-97%, and the
    interval with its standard error floored at the seeds at least as often (bench/interval_coverage.py)."""
    import sys
    sys.path.insert(0, str(ROOT / "bench"))
    import interval_coverage
    shared, _, _ = interval_coverage.coverage(1000, builds, 3, 32, 1.0, 0.0, "t", shared=0.25)
    assert shared < 0.85, shared
    cov, half, smallest = interval_coverage.coverage(1000, builds, 3, 32, 1.0, 0.0, "t", unequal=True)
    assert 0.93 <= cov <= 0.97, cov
    floored, half_floored, _ = interval_coverage.coverage(1000, builds, 3, 32, 1.0, 0.0, "floor", unequal=True)
    assert floored >= cov and half_floored >= half and smallest > half      # (t_.975 + t_.80) se > t_.975 se


def test_the_floored_interval_is_never_narrower_than_the_seeds_allow():
    """Build means that agree far better than their seeds predict: the t-interval over builds is narrow, the floored
    one has sqrt(mean seed variance / (builds x seeds)) as its standard error; where the build means spread more than
    that, both are the same interval."""
    import numpy as np

    import analysis
    keys = [("x", i) for i in range(50)] + [("y", i) for i in range(50)]
    seeds = np.array([[-0.1], [0.0], [0.1]])                                  # seed effects: variance 100 points^2
    builds = [(keys, 0.02 + seeds + 0.001 * b + np.zeros((3, 100))) for b in range(8)]
    d, lo, hi, se, _, n = analysis.study_interval(builds, ["x", "y"])
    fd, flo, fhi, fse, _, fn = analysis.study_interval(builds, ["x", "y"], floor=True)
    assert d == fd and n == fn == 8 and se < 0.1 and fse == pytest.approx((100 / 24) ** 0.5)
    assert fhi - fd == pytest.approx(analysis.t_quantile(0.975, 7) * fse)
    spread = [(keys, 0.2 * b + seeds + np.zeros((3, 100))) for b in range(8)]
    assert analysis.study_interval(spread, ["x", "y"], floor=True) == analysis.study_interval(spread, ["x", "y"])


def test_slope_interval_recovers_a_planted_line():
    import numpy as np

    import analysis
    x = np.arange(10.0)
    assert analysis.slope_interval(x, 2 * x + 1) == pytest.approx((2.0, 2.0, 2.0))
    y = 0.5 * x + np.random.default_rng(0).normal(0, 1, 10)
    b, lo, hi = analysis.slope_interval(x, y)
    assert lo < 0.5 < hi and lo < b < hi


def test_study_interval_takes_builds_as_the_unit():
    """Builds that agree exactly give their common difference with a zero-width interval; builds whose means differ
    give the t-interval of those means on builds - 1 degrees of freedom, whatever the seeds inside them say."""
    import numpy as np

    import analysis
    keys = [("x", i) for i in range(50)] + [("y", i) for i in range(50)]
    same = [(keys, np.full((3, 100), 0.1)) for _ in range(3)]
    assert analysis.study_interval(same, ["x", "y"])[:4] == pytest.approx((10.0, 10.0, 10.0, 0.0))
    rng = np.random.default_rng(0)
    builds = [(keys, shift + rng.normal(0, 0.3, (3, 100))) for shift in (-0.05, 0.0, 0.2)]
    means = [100 * analysis.seed_macros(k, m, ["x", "y"]).mean() for k, m in builds]
    d, lo, hi, se, smallest, units = analysis.study_interval(builds, ["x", "y"])
    assert d == pytest.approx(np.mean(means)) and se == pytest.approx(np.std(means, ddof=1) / 3 ** 0.5)
    assert hi - d == pytest.approx(4.302653 * se, rel=1e-5) and units == 3
    assert smallest == pytest.approx((4.302653 + 1.060660) * se, rel=1e-5)


def test_variance_components_recover_planted_ones():
    """The method-of-moments fit on 400 simulated builds of 3 seeds recovers the planted seed-level variance (seed
    effect + sampling noise of a seed's mean) and build variance within a few percent."""
    import sys

    import numpy as np

    import analysis
    sys.path.insert(0, str(ROOT / "bench"))
    import interval_coverage
    study = interval_coverage.planted_study(np.random.default_rng(0), 400, 3, 32, 1.0, 9.0)
    within, between, n = analysis.variance_components(study, interval_coverage.LEVELS)
    assert n == 400 and within == pytest.approx(17.9 + 540 / 128, rel=0.08) and between == pytest.approx(9.0, rel=0.25)


def test_paper_gap_answer_names_each_outcome():
    """The report's one-sentence answer: separated from 0 (and whether the paper's +2.9 is excluded), only +2.9
    excluded, or unresolved (naming a design too weak to see +2.9). (d, lo, hi, se, smallest, units)"""
    below = reproduce.paper_gap_answer((-0.9, -1.6, -0.2, 0.3, 1.0, 12))
    assert "pooled over 12 builds: -0.9" in below and "below OPD" in below and "excludes the paper's +2.9" in below
    above = reproduce.paper_gap_answer((3.5, 1.0, 6.0, 1.2, 4.0, 8))
    assert "above OPD" in above and "excludes" not in above
    assert "excludes the paper's +2.9" in reproduce.paper_gap_answer((-0.8, -2.4, 0.7, 0.7, 2.1, 6))
    weak = reproduce.paper_gap_answer((0.5, -3.0, 4.0, 1.6, 5.0, 3))
    assert "Not resolved" in weak and "only differences of 5.0" in weak
    assert "only differences" not in reproduce.paper_gap_answer((0.5, -1.0, 3.0, 0.9, 2.0, 10))


def test_recovery_summary_per_cut_and_within_level():
    """summarize_recovery: recovery that falls with teacher perplexity gives Q1 - Q4 > 0 at every cut, pooled and
    within levels; recovery that does not depend on perplexity gives exactly 0 with a zero-width interval."""
    import random

    import analysis
    rng = random.Random(0)
    planted, flat = [], []
    for p in range(120):
        for j in range(4):
            ppl = rng.uniform(1, 3) + 0.5 * (p % 4)
            planted.append({"problem": p, "level": f"l{p % 4}", "ppl": ppl,
                            "recovery": [max(0.0, 1.2 - 0.4 * (ppl - 0.5 * (p % 4)) - 0.1 * c) for c in range(4)]})
            flat.append({**planted[-1], "recovery": [0.5] * 4})
    r = analysis.summarize_recovery(planted)
    for where in ("pooled", "within_level"):
        assert all(analysis.verdict(v) == "holds" for v in r[where]["q1_minus_q4"].values())
    z = analysis.summarize_recovery(flat)
    assert all(v == [0.0, 0.0, 0.0] for v in z["pooled"]["q1_minus_q4"].values())
    assert all(analysis.verdict(v) == "not supported" for v in z["within_level"]["q1_minus_q4"].values())


def test_paired_bootstrap_finds_a_planted_difference(tmp_path):
    """paired(): run a is run b except that it solves every 5th problem outright in every seed: the difference is
    that planted amount and its interval excludes 0; a copy of b differs from b by exactly 0."""
    import json
    import random
    planted = []
    for seed in range(5):
        rng = random.Random(seed)
        rows = {"a": [], "b": []}
        for pid in range(200):
            b_ok = [rng.random() < 0.5 for _ in range(2)]
            a_ok = [True, True] if pid % 5 == 0 else b_ok
            planted.append((sum(a_ok) - sum(b_ok)) / 2)
            for run, ok in (("a", a_ok), ("b", b_ok)):
                rows[run] += [json.dumps({"problem_id": pid, "sample": j, "correct": o}) for j, o in enumerate(ok)]
        for run in ("a", "b", "c"):
            d = tmp_path / "runs" / f"{run}-s{seed}" / "eval"
            d.mkdir(parents=True)
            (d / "x.samples.jsonl").write_text("\n".join(rows["b" if run == "c" else run]) + "\n")
    assert reproduce.paired(tmp_path, "c", "b", list(range(5)), ["x"], 2)[:3] == (0.0, 0.0, 0.0)
    d, lo, hi, se, smallest, units = reproduce.paired(tmp_path, "a", "b", list(range(5)), ["x"], 2)
    assert abs(d - 100 * sum(planted) / len(planted)) < 1e-9 and 0 < lo <= d <= hi and se > 0 and units == 5


def test_clipping_arm_difference_of_differences_and_its_answer(tmp_path):
    """study_comparisons' 'change of SCOPE - OPD when clipping is removed' is (scope-noclip - opd-noclip) - (scope -
    opd), paired by seed and problem: planted runs where SCOPE ties OPD with clipping and wins by 2 of 4 samples on
    every 2nd problem without it give +25 points exactly, and the answer line says the verdict moved."""
    import json
    import random
    build = tmp_path / "study" / "default" / "build0"
    rng = random.Random(0)
    for seed in (0, 1, 2):
        base = {str(pid): rng.randint(0, 2) for pid in range(60)}
        counts = {"scope": base, "opd": base, "opd-noclip": base,
                  "scope-noclip": {p: c + 2 * (int(p) % 2 == 0) for p, c in base.items()}}
        for run, c in counts.items():
            ev = build / "runs" / f"{run}-s{seed}" / "eval"
            ev.mkdir(parents=True)
            (ev / "per_problem.json").write_text(json.dumps({"x": c}))
            (ev / "results.json").write_text(json.dumps({"config": {"n": 4}}))
    comps = reproduce.study_comparisons({0: build}, ["x"])
    change = comps["change of SCOPE - OPD when clipping is removed"][0]
    assert change[0] == pytest.approx(25.0) and change[1] > 0
    assert comps["SCOPE - OPD"][0][:3] == (0.0, 0.0, 0.0)
    (line,) = reproduce.clipping_answer(comps)
    assert "with clipping +0.0 (not separated from 0), without +25.0 (above 0)" in line and "**Yes**" in line


def test_the_calibrated_design_keys_every_stream_by_build_and_seed(micro_models, tmp_path):
    """reproduce.py --design calibrated: each (build, seed) trains and is evaluated with its own stream seed (RL prompt
    order, rollout and evaluation noise; never the same for two builds) on RL prompts from the "rl" half of the problem
    space; the default design keeps the training seed, as `python scope.py --seed S`."""
    import json

    import tiny_testbed
    a = reproduce.RArgs(design="calibrated")
    derived = {(b, s): reproduce.stream_seed(a, b, s) for b in range(16) for s in range(5)}
    assert len(set(derived.values())) == len(derived) and reproduce.stream_seed(reproduce.RArgs(), 3, 2) == 2
    student, teacher = micro_models
    reproduce.main(["--smoke", "--design", "calibrated", "--student", student, "--teacher", teacher, "--build-seeds",
                    "0,1", "--seeds", "0", "--methods", "base,scope", "--out", str(tmp_path)])
    for b in (0, 1):
        cfg = json.loads((tmp_path / f"build{b}" / "runs" / "scope-s0" / "config.json").read_text())
        ev = json.loads((tmp_path / f"build{b}" / "runs" / "base-s0" / "eval" / "results.json").read_text())
        assert cfg["seed"] == ev["config"]["seed"] == derived[(b, 0)]
        rows = [json.loads(line) for line in open(cfg["data"])]
        assert len(rows) == 20000 and all(tiny_testbed.half(r["problem"]) == "rl" for r in rows)
    with pytest.raises(SystemExit):
        reproduce.main(["--design", "calibrated", "--data", "x.jsonl", "--out", str(tmp_path / "x")])

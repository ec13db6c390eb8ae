"""reproduce.py: train every method, evaluate every trained student, write RESULTS.md and plots.

    python reproduce.py                                 # tiny preset, seed 0, into a fresh runs/reproduce-<time>/
    python reproduce.py --seeds 0,1,2 --ablations       # + the SCOPE ablations, tau sweep and official recipe
    torchrun --nproc_per_node=2 reproduce.py --smoke    # smallest settings on two processes
    torchrun --nproc_per_node=8 reproduce.py --preset paper --data-dir /data/benchmarks   # a GPU node
    python reproduce.py --out results --results-md RESULTS.md --report-only              # the committed report

Every invocation writes to a fresh directory unless --out names one; in a named directory finished (run, seed)
trainings and evaluations are skipped and a killed training continues from its last checkpoint (resume). Per run:
config.json, metrics.jsonl, checkpoint/, eval/results.json; the report is rebuilt from those files alone.
"""

import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

import scope
import tiny_testbed
import vllm_engine
from eval import benchmarks, metrics
from eval.run import EvalArgs, evaluate, versions

METHODS = ["base", "grpo", "kd", "psr", "opd", "scope"]
LABELS = {"base": "student (no training)", "grpo": "+ GRPO", "kd": "+ KD", "psr": "+ PSR (correct rollouts only)",
          "opd": "+ OPD", "scope": "+ SCOPE"}
# Paper Fig. 5 ablations, Fig. 6 tau sweep, and the official code's recipe (README: official-code differences).
ABLATIONS = {
    "scope-no_teacher_w": dict(teacher_weight="uniform"),
    "scope-no_student_w": dict(student_weight="uniform"),
    "scope-uniform": dict(student_weight="uniform", teacher_weight="uniform"),
    "scope-reversed_teacher_w": dict(teacher_weight="reversed"),
    "scope-reversed_student_w": dict(student_weight="reversed"),
    "scope-tau0.5": dict(tau=0.5),
    "scope-tau2": dict(tau=2.0),
    # the released scripts' recipe at their own sampling temperature, with their training grader; beside it the
    # paper-default SCOPE at the same temperature
    "scope-official": dict(weight_norm="mean", student_weight="reversed", loss_agg="token",
                           logprob_temperature="sampling", temperature=0.6, grader="official"),
    "scope-t0.6": dict(temperature=0.6),
}
# SCOPE_SPEC.md section 8: the PAPER's Table 1 (R1-Distill-Qwen-1.5B), Avg@32 / Pass@32. Shown beside ours for the
# paper preset, never as ours.
PAPER_TABLE1 = {
    "base": {"aime24": (29.4, 76.5), "aime25": (23.9, 46.9), "amc23": (72.7, 94.7), "math500": (84.6, 97.3),
             "minerva": (32.3, 55.9), "olympiadbench": (44.2, 67.5), "average": (47.9, 73.1)},
    "grpo": {"aime24": (35.5, 68.3), "aime25": (24.5, 45.1), "amc23": (75.1, 95.0), "math500": (87.0, 96.7),
             "minerva": (35.1, 53.5), "olympiadbench": (40.5, 67.7), "average": (49.6, 71.1)},
    "kd": {"aime24": (26.6, 71.4), "aime25": (22.2, 45.6), "amc23": (69.1, 96.3), "math500": (84.1, 97.4),
           "minerva": (30.7, 54.1), "olympiadbench": (39.7, 66.9), "average": (45.4, 72.0)},
    "opd": {"aime24": (40.2, 75.0), "aime25": (28.9, 48.5), "amc23": (75.9, 95.0), "math500": (89.0, 97.7),
            "minerva": (34.9, 53.0), "olympiadbench": (44.9, 69.3), "average": (52.3, 73.1)},
    "scope": {"aime24": (42.7, 77.9), "aime25": (30.4, 50.9), "amc23": (80.9, 97.2), "math500": (89.8, 97.9),
              "minerva": (37.8, 55.1), "olympiadbench": (49.7, 70.9), "average": (55.2, 75.0)},
}
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


@dataclasses.dataclass
class RArgs:
    preset: str = "tiny"
    """tiny (minutes on a CPU) or paper (the paper's models and data; days on a GPU node: never chosen implicitly)"""
    seeds: str = "0"
    """comma-separated training seeds"""
    methods: str = ",".join(METHODS)
    """which of base, grpo, kd, opd, scope to run"""
    ablations: bool = False
    """also run the SCOPE ablations (Fig. 5), the tau sweep (Fig. 6) and the official-code recipe"""
    steps: int = 0
    """training steps per run (0: the preset's)"""
    smoke: bool = False
    """the smallest settings (a few steps and problems): checks the pipeline, not the method"""
    student: str = ""
    """student model path/id (default: the preset's)"""
    teacher: str = ""
    """teacher model path/id (default: the preset's)"""
    data_dir: str = ""
    """benchmark JSONL directory for the paper preset (default: $SCOPE_DATA_DIR)"""
    data: str = ""
    """training problems: a .jsonl file or a directory of them (default: the preset's)"""
    out: str = ""
    """output directory; empty: a fresh runs/reproduce-<date>-<time>/. Pass an existing one to resume what an
    invocation there left unfinished (the committed runs are --out results)"""
    results_md: str = ""
    """the report to write (empty: <out>/RESULTS.md; the committed report: --out results --results-md RESULTS.md)"""
    report_only: bool = False
    """train and evaluate nothing: rebuild the report from the files under --out (which it needs)"""
    ablation_runs: str = ""
    """with --ablations: only these ablations (comma-separated names; empty: all)"""
    eval_limit: int = 0
    """test problems per tiny level (0: the preset's 32; the study uses all 256)"""
    regime: str = "default"
    """tiny teacher: default, or weak-add5 (trained on 2% of the add5 problems: the second regime, issue #12)"""
    analysis: str = ""
    """recovery: run the error-recovery analysis (paper section 2.2) for --regime into <out>/analysis/, no training"""
    rollout_engine: str = ""
    """training rollouts: hf or vllm (empty: the preset's, hf for tiny, vllm for paper); one engine per process, reused
    by every run"""


def preset_settings(a):
    """(training overrides, eval settings, benchmark names) of the chosen preset."""
    if a.preset == "paper":
        train = {}
        ev = dict(preset="paper", data_dir=a.data_dir)
        names = benchmarks.PAPER_BENCHMARKS
    else:
        # tiny: 50 steps x 16 prompts x 8 rollouts at scope.Args' tiny defaults
        train = dict(steps=50, eval_every=10, eval_problems=64, eval_k=4, save_every=10)
        ev = dict(preset="tiny", n=8, limit=a.eval_limit or 32)
        names = [f"{benchmarks.TINY}-{level}" for level in tiny_testbed.TINY_LEVELS]
    if a.smoke:
        train.update(steps=2, prompts_per_step=4, n_rollouts=4, micro_batch_tokens=400, max_new_tokens=48,
                     eval_every=2, eval_problems=4, eval_k=2, save_every=1)
        ev.update(n=2, limit=2)
    if a.steps:
        train["steps"] = a.steps
    train.update({k: v for k, v in (("student", a.student), ("teacher", a.teacher), ("data", a.data),
                                    ("rollout_engine", a.rollout_engine)) if v})
    if a.preset == "tiny" and a.regime != "default" and not a.teacher:
        train["teacher"] = str(regime_models(a)[1])
    return train, ev, names


def regime_models(a):
    """(student dir, teacher dir) of the tiny regime (built once and cached like the default models)."""
    if a.regime not in tiny_testbed.REGIMES:
        raise SystemExit(f"--regime must be one of {list(tiny_testbed.REGIMES)}, got {a.regime!r}")
    return tiny_testbed.build_tiny_models(scope.Args().cache_dir, teacher=tiny_testbed.REGIMES[a.regime])


def train_args(a, run, seed, out, train_over):
    """The scope.Args of one training run: the preset's (scope.PRESETS), then reproduce's overrides, then the run's."""
    over = {"preset": a.preset, "out_dir": str(out / "runs" / f"{run}-s{seed}"), "seed": seed, "resume": True}
    return scope.resolve({**over, **train_over, **runs_of(a)[run]})


def runs_of(a):
    names = [m for m in a.methods.split(",") if m]
    for m in names:
        if m not in METHODS:
            raise SystemExit(f"--methods: unknown method {m!r}; known: {METHODS}")
    runs = {m: ({} if m == "base" else {"method": m}) for m in names}
    if a.ablations:
        chosen = [r for r in a.ablation_runs.split(",") if r] or list(ABLATIONS)
        for r in chosen:
            if r not in ABLATIONS:
                raise SystemExit(f"--ablation-runs: unknown {r!r}; known: {list(ABLATIONS)}")
        runs.update({k: dict(ABLATIONS[k], method="scope") for k in chosen})
    return runs


def run_analysis(a):
    """--analysis recovery: the error-recovery analysis of the tiny regime into <out>/analysis/recovery-<regime>."""
    import analysis
    if a.analysis != "recovery" or a.preset != "tiny":
        raise SystemExit("--analysis: only `recovery`, on the tiny preset")
    out = Path(a.out or "runs/analysis") / "analysis" / f"recovery-{a.regime}"
    student, teacher = regime_models(a)
    result = analysis.recovery(a.student or student, a.teacher or teacher, out, log=print)
    result["command"], result["date"], result["commit"] = command_line(None), now(), git_commit()
    (out / "recovery.json").write_text(json.dumps(result, indent=1))
    print(analysis.table_md(result))
    return result


def output_paths(a, started):
    """(output directory, report path). Without --out every invocation gets a fresh directory, so a new user's
    `python reproduce.py` trains and evaluates instead of finding earlier runs and skipping them."""
    if a.report_only and not a.out:
        raise SystemExit("--report-only rebuilds a report from existing runs: name them with --out (the committed "
                         "ones: --out results --results-md RESULTS.md)")
    stamp = datetime.datetime.fromtimestamp(started, datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = Path(a.out or f"runs/reproduce-{stamp}")
    return out, Path(a.results_md or out / "RESULTS.md")


def fmt_time(s):
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def main(argv=None):
    _, given = scope.dataclass_cli(RArgs, argv, __doc__.splitlines()[0], dashes=True)
    a = RArgs(**given)
    if a.preset not in ("tiny", "paper"):
        raise SystemExit("--preset must be tiny or paper")
    if a.analysis:
        return run_analysis(a)
    if torch.cuda.is_available() and "preset" not in given:
        print("reproduce.py: a GPU is present, running the TINY preset (minutes). The paper's runs (days on 8 GPUs) "
              "need an explicit --preset paper.", flush=True)

    import torch.distributed as dist
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:                                           # one process group for every training run
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    master = rank == 0
    say = print if master else (lambda *x, **k: None)
    train_over, ev, bench_names = preset_settings(a)
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    runs = runs_of(a)
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if ddp and torch.cuda.is_available() else "cpu"
    started = scope.all_reduce([time.time() if master else 0.0], device)[0]   # rank 0's clock names the directory
    out, a.results_md = output_paths(a, started)
    say(f"output: {out} (to resume this invocation after a crash: the same command with --out {out})", flush=True)
    if a.preset == "paper" and master:                # fail early and clearly when data cannot be reached
        for name in bench_names:
            benchmarks.load(name, a.data_dir or None)
    if master:
        out.mkdir(parents=True, exist_ok=True)

    t_start = time.time()
    phases = [] if a.report_only else [(r, s) for s in seeds for r in runs]
    done_phases = 0
    for run, seed in phases:
        run_dir = out / "runs" / f"{run}-s{seed}"
        targs = train_args(a, run, seed, out, train_over)
        elapsed = time.time() - t_start
        eta = elapsed / done_phases * (len(phases) - done_phases) if done_phases else float("nan")
        say(f"[{done_phases + 1}/{len(phases)}] {run} seed {seed}: elapsed {fmt_time(elapsed)}"
            + (f", about {fmt_time(eta)} to go" if math.isfinite(eta) else ""), flush=True)
        # -- train (the base student is evaluated untrained)
        if run == "base":
            model_dir = None
        elif (run_dir / "train_done.json").exists():
            say(f"  training done earlier: {run_dir}")
            model_dir = run_dir / "checkpoint"
        else:
            t0 = time.time()
            scope.train(targs)
            if master:
                (run_dir / "train_done.json").write_text(json.dumps({"seconds": time.time() - t0}))
            model_dir = run_dir / "checkpoint"
        if model_dir is None:                        # the untrained student: the tiny one is built like in training
            model_dir = targs.student or tiny_testbed.build_tiny_models(targs.cache_dir, log=say, threads=targs.threads)[0]
        # -- evaluate: every rank a shard of the problems, merged by rank 0 (eval.run.evaluate: no collective waits)
        eargs = EvalArgs(model=str(model_dir), benchmarks=",".join(bench_names), out_dir=str(run_dir / "eval"),
                         seed=seed, **ev)
        if (run_dir / "eval" / "results.json").exists():
            say(f"  evaluation done earlier: {run_dir / 'eval' / 'results.json'}")
        else:
            evaluate(eargs, progress=master, rank=rank, world=world)
            if master:
                write_per_problem(run_dir / "eval", bench_names)
        if ddp:
            dist.barrier()                            # everyone has finished: eval waited on the files
        done_phases += 1
    wall = time.time() - t_start
    if master:
        if phases:
            with (out / "invocations.jsonl").open("a") as f:                 # every invocation that wrote here
                f.write(json.dumps({"command": command_line(argv), "date": now(), "wall_s": round(wall),
                                    "commit": git_commit()}) + "\n")
        write_report(a, out, bench_names)
        say(f"wrote {a.results_md} and {out / 'plots'} in {fmt_time(wall)}")
    if ddp:
        vllm_engine.close_engine()                    # its teardown would end the group (vllm_engine.close_engine)
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# the report: tables and plots from the files under --out
# ----------------------------------------------------------------------------------------------------
def load_results(out):
    """{run: {seed: eval results}} for every finished evaluation on disk, whichever invocation made it."""
    res = {}
    for path in sorted((out / "runs").glob("*-s*/eval/results.json")):
        run, _, seed = path.parent.parent.name.rpartition("-s")
        if run in LABELS or run in ABLATIONS:
            res.setdefault(run, {})[int(seed)] = json.loads(path.read_text())
    return res


def models_note(a, res):
    """Which untrained student the runs start from (the base runs' evaluated model), and, on the tiny preset, whether it
    is the one this code builds (the cache key of tiny_testbed's models); a report must not pass off results of a model
    the code no longer builds as its own."""
    starts = sorted({(r["model"]["id"], r["model"]["revision"]) for r in res.get("base", {}).values()})
    if not starts:
        return []
    line = "- untrained student: " + ", ".join(f"`{i}` (weights {rev})" for i, rev in starts)
    if a.preset == "tiny":
        key = f"tiny-{tiny_testbed._key(tiny_testbed.TINY_TEACHER, tiny_testbed.TINY_STUDENT, 0, scope.Args().threads)}"
        if all(Path(i).parent.name == key for i, _ in starts):
            line += f"; the models this code builds ({key})"
        else:
            line += (f"; **not the models this code builds** (`{key}`): tiny_testbed changed after these runs, so "
                     "these results describe the earlier models only")
    return [line]


def mean_ci(values):
    """(mean, half-width of the 95% t-interval); half-width None for one value."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, None
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return m, T975.get(n - 1, 1.96) * sd / math.sqrt(n)


def cell(values):
    m, h = mean_ci([100 * v for v in values])
    return f"{m:.1f}" if h is None else f"{m:.1f} ± {h:.1f}"


def metric_values(res, run, bench, key):
    out = []
    for r in res.get(run, {}).values():
        m = r["macro_average"] if bench == "average" else r["benchmarks"][bench]
        out.append(m[key])
    return out


def run_label(run, out=None):
    """The table label; ablations that change sampling or grading say so, read from their training config."""
    label = LABELS.get(run, run)
    cfgs = sorted(out.glob(f"runs/{run}-s*/config.json")) if out is not None and run.startswith("scope-") else []
    if cfgs:
        c = json.loads(cfgs[0].read_text())
        notes = ([f"T {c['temperature']:g}"] if c["temperature"] != 1.0 else []) + (
            [f"{c['grader']} grader"] if c.get("grader", "verify") != "verify" else [])
        label += f" ({', '.join(notes)})" if notes else ""
    return label


def results_table(res, runs, bench_names, n, out=None):
    cols = bench_names + ["average"]
    head = "| method | " + " | ".join(f"{c} Avg@{n} / Pass@{n}" for c in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]
    for run in runs:
        if run not in res:
            continue
        cells = [f"{cell(metric_values(res, run, c, f'avg@{n}'))} / {cell(metric_values(res, run, c, f'pass@{n}'))}"
                 for c in cols]
        lines.append(f"| {run_label(run, out)} | " + " | ".join(cells) + " |")
    if "scope" in res and "opd" in res:
        deltas = []
        for c in cols:
            parts = []
            for key in (f"avg@{n}", f"pass@{n}"):
                o = sum(metric_values(res, "opd", c, key)) / len(res["opd"])
                s = sum(metric_values(res, "scope", c, key)) / len(res["scope"])
                parts.append(f"{100 * (s - o) / o:+.1f}%" if o > 0 else "n/a")
            deltas.append(" / ".join(parts))
        lines.append("| delta % of SCOPE vs OPD (means) | " + " | ".join(deltas) + " |")
    return "\n".join(lines)


def ordering(res, n):
    """The paper's claims (SCOPE > OPD > GRPO on Avg@k; SCOPE >= OPD on Pass@k), checked on the macro averages."""
    def stat(run, key):
        return mean_ci([100 * v for v in metric_values(res, run, "average", key)])

    def show(run, key):
        m, h = stat(run, key)
        return f"{LABELS[run].lstrip('+ ')} {m:.1f}" + ("" if h is None else f" ± {h:.1f}")

    if not all(r in res for r in ("scope", "opd", "grpo")):
        return "Needs the scope, opd and grpo runs."
    avg, pas = f"avg@{n}", f"pass@{n}"
    (s, hs), (o, ho), (g, hg) = stat("scope", avg), stat("opd", avg), stat("grpo", avg)
    (sp, hsp), (op, hop) = stat("scope", pas), stat("opd", pas)
    intervals = hs is not None
    sep = (lambda a, ha, b, hb: a - ha > b + hb) if intervals else (lambda a, ha, b, hb: False)
    lines = [
        f"- Avg@{n}, SCOPE > OPD > GRPO: **{'holds' if s > o > g else 'does not hold'}** on the means "
        f"({show('scope', avg)}, {show('opd', avg)}, {show('grpo', avg)}).",
        f"- Pass@{n}, SCOPE >= OPD: **{'holds' if sp >= op else 'does not hold'}** on the means "
        f"({show('scope', pas)}, {show('opd', pas)}).",
    ]
    if intervals:
        lines.append(f"- Separated by their 95% intervals: SCOPE vs OPD on Avg@{n}: "
                     f"{'yes' if sep(s, hs, o, ho) or sep(o, ho, s, hs) else 'no (the intervals overlap)'}; OPD vs GRPO: "
                     f"{'yes' if sep(o, ho, g, hg) or sep(g, hg, o, ho) else 'no (the intervals overlap)'}; SCOPE vs OPD on "
                     f"Pass@{n}: {'yes' if sep(sp, hsp, op, hop) or sep(op, hop, sp, hsp) else 'no (the intervals overlap)'}.")
    else:
        lines.append("- One seed only: no intervals, so no ordering here is distinguishable from seed noise.")
    return "\n".join(lines)


def write_per_problem(eval_dir, bench_names):
    """eval/per_problem.json: {benchmark: {problem id: samples correct}}, the compact form of the per-sample files
    (which are not committed) that the paired statistics need."""
    counts = {}
    for bench in bench_names:
        path = Path(eval_dir) / f"{bench}.samples.jsonl"
        if not path.exists():
            return
        for line in path.read_text().splitlines():
            s = json.loads(line)
            counts.setdefault(bench, {})[s["problem_id"]] = counts.get(bench, {}).get(s["problem_id"], 0) + s["correct"]
    (Path(eval_dir) / "per_problem.json").write_text(json.dumps(counts, sort_keys=True))


def per_problem(out, run, seed, bench_names, n):
    """{(benchmark, problem id): fraction of the n samples correct} of one evaluated run, or None."""
    ev = out / "runs" / f"{run}-s{seed}" / "eval"
    if not (ev / "per_problem.json").exists():
        write_per_problem(ev, bench_names)
    if not (ev / "per_problem.json").exists():
        return None
    counts = json.loads((ev / "per_problem.json").read_text())
    if not all(b in counts for b in bench_names):
        return None
    return {(b, pid): c / n for b in bench_names for pid, c in counts[b].items()}


def paired(out, run_a, run_b, seeds, bench_names, n, reps=2000):
    """Macro Avg@n of run_a minus run_b, paired by seed and problem (same data order, sampling and evaluation seeds
    across methods): (difference, 95% interval low, high, standard error) in points, from a bootstrap that
    resamples seeds and, within each benchmark, problems. None when a file is missing."""
    import numpy as np
    rows = []
    for seed in seeds:
        a, b = per_problem(out, run_a, seed, bench_names, n), per_problem(out, run_b, seed, bench_names, n)
        if a is None or b is None:
            return None
        rows.append({k: a[k] - b[k] for k in a})
    keys = sorted(rows[0])
    diff = np.array([[r[k] for k in keys] for r in rows])                 # (seeds, problems)
    groups = [np.array([i for i, k in enumerate(keys) if k[0] == bench]) for bench in bench_names]
    rng = np.random.default_rng(0)
    stats = []
    for _ in range(reps):
        s = diff[rng.integers(0, len(seeds), len(seeds))]
        stats.append(np.mean([s[:, g[rng.integers(0, len(g), len(g))]].mean() for g in groups]))
    stats = np.sort(stats)
    point = np.mean([diff[:, g].mean() for g in groups])
    return 100 * point, 100 * stats[int(0.025 * reps)], 100 * stats[int(0.975 * reps) - 1], 100 * np.std(stats)


PAIRS = [("scope", "opd"), ("opd", "base"), ("scope", "base"), ("psr", "base")]


def paired_table(out, res, runs, bench_names, n):
    """SCOPE - OPD and each ablation - SCOPE (and the baselines against the untrained student), paired."""
    pairs = [p for p in PAIRS if p[0] in res and p[1] in res] + [(r, "scope") for r in runs
                                                               if r.startswith("scope-") and "scope" in res]
    lines = [f"| comparison | seeds | difference in macro Avg@{n} (points) | 95% interval | smallest detectable "
             "difference | separated from 0? |", "|---|---|---|---|---|---|"]
    for a, b in pairs:
        seeds = sorted(set(res[a]) & set(res[b]))
        r = paired(out, a, b, seeds, bench_names, n) if len(seeds) >= 2 else None
        if r is None:
            continue
        d, lo, hi, se = r
        lines.append(f"| {LABELS.get(a, a).lstrip('+ ')} - {LABELS.get(b, b).lstrip('+ ')} | {len(seeds)} | {d:+.1f} | "
                     f"[{lo:+.1f}, {hi:+.1f}] | {2.8 * se:.1f} | {'yes' if lo > 0 or hi < 0 else 'no'} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def pass_at_k_table(res, n):
    """Paper section 2.1: Pass@1 and Pass@k of the untrained student, PSR, OPD and SCOPE (macro, mean over seeds)."""
    runs = [r for r in ("base", "psr", "opd", "scope") if r in res]
    ks = metrics.ks_up_to(n)
    lines = ["| method | " + " | ".join(f"Pass@{k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
    for run in runs:
        lines.append(f"| {LABELS[run]} | " + " | ".join(cell(metric_values(res, run, "average", f"pass@{k}"))
                                                         for k in ks) + " |")
    return "\n".join(lines)


def recovery_section(out):
    """The error-recovery analyses found under <out>/analysis/ (paper section 2.2, Fig. 1b)."""
    import analysis
    lines = []
    for path in sorted((out / "analysis").glob("recovery-*/recovery.json")):
        r = json.loads(path.read_text())
        regime = path.parent.name.removeprefix("recovery-")
        d, lo, hi = (100 * x for x in r["q1_minus_q4"])
        verdict = ("holds (Q1 recovers more than Q4, interval above 0)" if r["premise_holds"] else
                   "fails (Q1 recovers less than Q4, interval below 0)" if r["premise_fails"] else
                   "is not supported: the Q1 - Q4 interval contains 0")
        lines += [f"### Regime `{regime}`", "",
                  f"`{r.get('command', '')}` ({r.get('date', '')}, code {r.get('commit', '')}): {r['problems']} training "
                  f"problems x {r['samples']} student rollouts (student accuracy {100 * r['student_accuracy']:.1f}%), "
                  f"{r['incorrect_scored']} incorrect rollouts scored by the teacher, {r['completions']} teacher "
                  "completions per cut; recovery rate (%) with 95% bootstrap intervals over rollouts:", "",
                  analysis.table_md(r), "",
                  f"Q1 minus Q4, averaged over the four cuts: {d:+.1f} points, 95% interval [{lo:+.1f}, {hi:+.1f}]: "
                  f"the premise **{verdict}**.", "",
                  f"![recovery {regime}]({os.path.relpath(path.parent / 'recovery.png', out)})", ""]
    return lines


def study_answers(out, bench_names):
    """Issue #12's questions, answered per regime from the result files: premise, SCOPE vs OPD, weight directions."""
    lines = []
    for d in sorted(p for p in (out / "study").glob("*") if (p / "runs").exists()):
        res = load_results(d)
        if "scope" not in res:
            continue
        n = next(iter(res["scope"].values()))["config"]["n"]
        rec = out / "analysis" / f"recovery-{d.name}" / "recovery.json"
        lines.append(f"- **Regime `{d.name}`**")
        if rec.exists():
            r = json.loads(rec.read_text())
            q = [100 * x for x in r["q1_minus_q4"]]
            lines.append(f"  - Premise (low teacher perplexity predicts recovery): "
                         f"{'holds' if r['premise_holds'] else 'fails' if r['premise_fails'] else 'not supported'}"
                         f" (Q1 - Q4 recovery {q[0]:+.1f} points, 95% interval [{q[1]:+.1f}, {q[2]:+.1f}]).")

        def diff(a, b):
            seeds = sorted(set(res.get(a, {})) & set(res.get(b, {})))
            return paired(d, a, b, seeds, bench_names, n) if len(seeds) >= 2 else None

        def say(r):
            return (f"{r[0]:+.1f} points [{r[1]:+.1f}, {r[2]:+.1f}], "
                    + ("separated from 0" if r[1] > 0 or r[2] < 0 else "not separated from 0"))
        r = diff("scope", "opd")
        if r:
            lines.append(f"  - SCOPE - OPD, macro Avg@{n}: {say(r)}.")
        for path in ("teacher", "student"):
            parts = [f"{kind} {say(r)}" for kind, run in (("uniform", f"scope-no_{path}_w"),
                                                          ("reversed", f"scope-reversed_{path}_w"))
                     if (r := diff(run, "scope"))]
            if parts:
                lines.append(f"  - The paper's {path} weight against (ablation - SCOPE): " + "; ".join(parts) + ".")
    return lines


def study_sections(out, bench_names):
    """Each regime of the statistical study under <out>/study/<regime>/ (issue #12): main table, paired
    comparisons, Pass@k."""
    lines = []
    for d in sorted(p for p in (out / "study").glob("*") if (p / "runs").exists()):
        res = load_results(d)
        if not res:
            continue
        runs = [r for r in [*METHODS, *ABLATIONS] if r in res]
        n = next(iter(next(iter(res.values())).values()))["config"]["n"]
        limit = next(iter(next(iter(res.values())).values()))["config"]["limit"]
        log = d / "invocations.jsonl"
        calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        lines += [f"### Regime `{d.name}`", "",
                  *[f"- `{c['command']}` ({c['date']}, {fmt_time(c['wall_s'])}, code {c.get('commit', '')})" for c in calls],
                  f"- {limit} test problems per level, {n} samples each; seeds per run: "
                  + "; ".join(f"{r}: {len(res[r])}" for r in runs), "",
                  results_table(res, runs, bench_names, n, d), "", paired_table(d, res, runs, bench_names, n), "",
                  "Pass@k (paper section 2.1, Fig. 1a):", "", pass_at_k_table(res, n), ""]
    return lines


def paper_table():
    cols = ["aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench", "average"]
    lines = ["| model (paper, not ours) | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for run, row in PAPER_TABLE1.items():
        lines.append(f"| {LABELS[run]} | " + " | ".join(f"{row[c][0]} / {row[c][1]}" for c in cols) + " |")
    return "\n".join(lines)


def command_line(argv):
    cmd = " ".join(["python", "reproduce.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        cmd = f"torchrun --nproc_per_node={os.environ['WORLD_SIZE']} " + cmd[len("python "):]
    return cmd


def git_commit():
    """The code's commit, with '+changes' when the code differs from it (results/ and RESULTS.md, which runs rewrite,
    do not count; '' outside git)."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!results",
                                ":!RESULTS.md"], cwd=here, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""
    return head + ("+changes" if dirty else "")


def now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def hardware():
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} CPU cores{gpu}"


def plots(out, res, runs, seeds, n):
    """Pass@k curves (Fig. 4), training dynamics (Fig. 3), ablation bars (Fig. 5). Returns {title: path}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pdir = out / "plots"
    pdir.mkdir(parents=True, exist_ok=True)
    made = {}
    ks = metrics.ks_up_to(n)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for run in runs:
        if run in res and not run.startswith("scope-"):
            ys = [100 * sum(metric_values(res, run, "average", f"pass@{k}")) / len(res[run]) for k in ks]
            ax.plot(ks, ys, marker="o", label=LABELS.get(run, run))
    ax.set(xscale="log", xlabel="k", ylabel="Pass@k (%), macro average", title="Pass@k (unbiased)")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(pdir / "pass_at_k.png", dpi=110)
    plt.close(fig)
    made["Pass@k per method (paper Fig. 4)"] = pdir / "pass_at_k.png"

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for run in runs:
        if run == "base" or run.startswith("scope-"):
            continue
        path = out / "runs" / f"{run}-s{seeds[0]}" / "metrics.jsonl"
        if not path.exists():
            continue
        recs = [json.loads(line) for line in path.read_text().splitlines()]
        axes[0].plot([r["step"] for r in recs], [r["rollout/nll_student"] for r in recs], label=LABELS[run])
        ev = [r for r in recs if any(k.startswith("eval/all/avg@") for k in r)]
        if ev:
            key = next(k for k in ev[0] if k.startswith("eval/all/avg@"))
            axes[1].plot([r["step"] for r in ev], [100 * r[key] for r in ev], marker="o", label=LABELS[run])
    axes[0].set(xlabel="step", ylabel="nats / token", title="student NLL of the trained tokens (KD: teacher's)")
    axes[1].set(xlabel="step", ylabel="%", title="eval Avg@k during training")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(pdir / "training_dynamics.png", dpi=110)
    plt.close(fig)
    made[f"Training dynamics, seed {seeds[0]} (paper Fig. 3)"] = pdir / "training_dynamics.png"

    abl = [r for r in runs if r.startswith("scope") and r in res]
    if len(abl) > 1:
        fig, ax = plt.subplots(figsize=(8, 3.6))
        vals = [mean_ci([100 * v for v in metric_values(res, r, "average", f"avg@{n}")]) for r in abl]
        ax.bar(range(len(abl)), [m for m, _ in vals], yerr=[h or 0 for _, h in vals], capsize=3)
        ax.set_xticks(range(len(abl)), [r.replace("scope-", "") for r in abl], rotation=30, ha="right", fontsize=8)
        ax.set(ylabel=f"Avg@{n} (%), macro", title="SCOPE ablations (paper Fig. 5, 6)")
        fig.tight_layout()
        fig.savefig(pdir / "ablations.png", dpi=110)
        plt.close(fig)
        made["SCOPE ablations, tau sweep and official recipe (paper Fig. 5-6)"] = pdir / "ablations.png"
    return made


def write_report(a, out, bench_names):
    res = load_results(out)
    if not res:
        raise SystemExit(f"no evaluation results under {out}")
    runs = [r for r in [*METHODS, *ABLATIONS] if r in res]                 # everything on disk, in table order
    n = next(iter(next(iter(res.values())).values()))["config"]["n"]
    main_runs = [r for r in runs if not r.startswith("scope-")]
    seeds = sorted({s for r in main_runs for s in res[r]})
    log = out / "invocations.jsonl"
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    seed_note = "; ".join(f"{r}: {', '.join(map(str, sorted(res[r])))}" for r in runs)
    lines = [
        "# Results", "",
        f"Generated by `reproduce.py` from the files in `{out}/`; every number below comes from that run.", "",
        "- commands that produced these files (each skips what an earlier one finished), with date and wall time:",
        *[f"  - `{c['command']}` ({c['date']}, {fmt_time(c['wall_s'])}"
          + (f", code {c['commit']}" if c.get("commit") else "") + ")" for c in calls],
        f"- hardware: {hardware()}",
        "- packages (as the runs' evaluations recorded them): " + "; ".join(sorted({", ".join(
            f"{k} {v}" for k, v in r.get("versions", versions()).items()) for rs in res.values() for r in rs.values()})),
        f"- preset: {a.preset}{' (smoke settings: checks the pipeline, says nothing about the method)' if a.smoke else ''};"
        f" seeds per run: {seed_note}; cells are the mean over a run's seeds, ± the 95% t-interval when it has"
        " more than one",
        *models_note(a, res),
        f"- evaluation: {n} samples per problem, Avg@{n} and unbiased Pass@{n} (%), per "
        + ("tiny-task level (the tiny test split)" if a.preset == "tiny" else "benchmark") + "; average = macro over columns",
        "", "## Main table (layout of the paper's Table 1)", "", results_table(res, main_runs, bench_names, n), ""]
    if a.preset == "paper":
        lines += ["## The paper's own numbers (Table 1, R1-Distill-Qwen-1.5B; NOT produced by this run)", "",
                  paper_table(), ""]
    abl = [r for r in runs if r.startswith("scope-")]
    if abl:
        lines += ["## SCOPE ablations", "", results_table(res, ["scope"] + abl, bench_names, n, out), "",
                  "no_teacher_w / no_student_w: that path's weights uniform; uniform: both; reversed_*: the exponent's "
                  "sign flipped; tau0.5 / tau2: weight temperature; official: the released scripts' recipe (mean-1 "
                  "weights, reversed student weight, token-mean, student log-probs at the sampling temperature); a label "
                  "in brackets gives a run's sampling temperature and grader where they are not the defaults (T 1, "
                  "is_equiv).", ""]
    lines += ["## Does the paper's ordering hold here?", "", ordering(res, n), ""]
    if (out / "analysis").exists():
        lines += ["## Does the premise hold here? Error recovery (paper section 2.2, Fig. 1b)", "",
                  *recovery_section(out)]
    study = study_sections(out, bench_names)
    if study:
        lines += ["## The questions of issue #12, answered from the files", "",
                  *study_answers(out, bench_names), ""]
        lines += ["## Paired study: whole test split, 5 seeds, two regimes (issue #12)", "",
                  "Differences are paired by seed and problem (every method sees the same data order, rollout seeds "
                  "and evaluation seeds); intervals from 2000 bootstrap resamples of seeds and, within each level, "
                  "problems; the smallest detectable difference is 2.8 standard errors (80% power, two-sided 5%).", "",
                  *study]
    lines += ["## Plots", ""]
    for title, path in plots(out, res, runs, seeds, n).items():
        lines += [f"### {title}", "", f"![{title}]({os.path.relpath(path, Path(a.results_md).parent)})", ""]
    Path(a.results_md).write_text("\n".join(lines))


if __name__ == "__main__":
    main()

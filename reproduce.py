"""reproduce.py: train every method, evaluate every trained student, write RESULTS.md and plots.

    python reproduce.py                                 # tiny preset, seed 0, into a fresh runs/reproduce-<time>/
    python reproduce.py --seeds 0,1,2 --ablations       # + the SCOPE ablations, tau sweep and official recipe
    torchrun --nproc-per-node=2 reproduce.py --smoke    # smallest settings on two processes
    torchrun --nproc-per-node=8 reproduce.py --preset paper --data-dir /data/benchmarks   # a GPU node
    python reproduce.py --out results --results-md RESULTS.md --report-only              # the committed report

Every invocation writes to a fresh directory unless --out names one; in a named directory finished (run, seed)
trainings and evaluations are skipped and a killed training continues from its last checkpoint (resume). Per run:
config.json, metrics.jsonl, checkpoint/, eval/results.json; the report is rebuilt from those files alone.
"""

import dataclasses
import datetime
import hashlib
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

import cli
import ranks
import scope
import tiny_testbed
import verifier
import vllm_engine
from eval import benchmarks, metrics
from eval.run import EvalArgs, evaluate, versions

METHODS = ["base", "grpo", "kd", "psr", "opd", "scope"]
KNOWN = ["teacher", *METHODS]           # teacher: the teacher itself evaluated, as a reference (not a default run)
LABELS = {"teacher": "teacher (reference)", "base": "student (no training)", "grpo": "+ GRPO", "kd": "+ KD",
          "psr": "+ PSR (correct rollouts only)", "opd": "+ OPD", "scope": "+ SCOPE"}
# Paper Fig. 5 ablations, Fig. 6 tau sweep, and the official code's recipe (docs/method.md: where the official code
# differs).
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
    # gradient clipping off: the tiny preset's norms are far above its clip of 1.0, so every step is clipped
    "scope-noclip": dict(grad_clip=0.0),
    "opd-noclip": dict(method="opd", grad_clip=0.0),
}
# The PAPER's Table 1 (R1-Distill-Qwen-1.5B), Avg@32 / Pass@32. Shown beside ours for the
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
    design: str = "default"
    """tiny builds: default (SFT data, RL prompts and every random stream as `python scope.py --seed S` has them) or
    calibrated (the study's design: RL prompts from the other half of the problem space than the SFT problems, every
    random stream keyed by (build, seed), a teacher trained to a stated validation accuracy; docs/reproducing.md)"""
    analysis: str = ""
    """recovery: run the error-recovery analysis (paper section 2.2) for --regime into <out>/analysis/, no training"""
    analysis_problems: int = 192
    """--analysis recovery: training problems sampled (8 student rollouts each; every incorrect one is analysed)"""
    build_seeds: str = "0"
    """tiny preset: the testbed builds to run on, each its own teacher/student pair from the same recipe (cached by
    seed). Given on the command line, each build gets its own directory <out>/build<seed>/"""
    path_grad_norms: bool = False
    """log the gradient norms of SCOPE's two paths per step (scope.Args.path_grad_norms)"""
    dist_timeout: float = 3600.0
    """torchrun: seconds a collective waits for the slowest rank (scope.Args.dist_timeout)"""
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
                                    ("rollout_engine", a.rollout_engine), ("path_grad_norms", a.path_grad_norms)) if v})
    return train, ev, names


def build_dirs(a, build, log=print):
    """(student dir, teacher dir) of one tiny build of the regime: its own pair from the same recipe, seeded by the
    build seed (initialisation, SFT data and order), built once and cached by that seed (tiny_testbed._key)."""
    if a.regime not in tiny_testbed.REGIMES:
        raise ValueError(f"--regime must be one of {list(tiny_testbed.REGIMES)}, got {a.regime!r}")
    calibrated = a.design == "calibrated"
    return tiny_testbed.build_tiny_models(scope.Args().cache_dir, teacher=tiny_testbed.REGIMES[a.regime], seed=build,
                                          log=log, design=tiny_testbed.CALIBRATED if calibrated else None,
                                          strength=validation_strength if calibrated else None)


def validation_strength(model, tok, design=tiny_testbed.CALIBRATED):
    """The calibrated recipe's stopping rule: a model's accuracy on the validation split (tiny_testbed.validation_rows,
    no test problem), val_k samples a problem at the tiny preset's sampling (T 1, 64 new tokens, seeded), per level
    and macro (the mean over levels). -> {"macro": ..., level: ...}."""
    rows, k = tiny_testbed.validation_rows(design.val_per_level), design.val_k
    hits = {}
    for start in range(0, len(rows), 64):
        part = rows[start:start + 64]
        seeds = scope.row_seeds("validation", [(r["id"], j) for r in part for j in range(k)])
        b = scope.generate(model, tok, [scope.prompt_text(tok, r["problem"]) for r in part], k, 64, 1.0, seeds=seeds)
        texts = scope.decode_responses(tok, b)
        for q, r in enumerate(part):
            hits.setdefault(r["level"], []).extend(
                verifier.reward(texts[q * k + j], r["answer"], bool(b["truncated"][q * k + j])) for j in range(k))
    per = {lv: sum(v) / len(v) for lv, v in hits.items()}
    return {"macro": sum(per.values()) / len(per), **per}


def stream_seed(a, build, seed):
    """The seed a run's random streams come from (RL prompt order, rollout and evaluation noise). The default design
    uses the training seed itself, as `python scope.py --seed S` does; the calibrated one derives it from (build,
    seed), so that no two builds share a stream."""
    if a.design != "calibrated":
        return seed
    return int.from_bytes(hashlib.sha256(f"build{build}-seed{seed}".encode()).digest()[:4], "little") >> 1


def rl_data(out, build, seed, rank):
    """The calibrated design's RL prompts of (build, seed) as a JSONL file under <out>/data/ (written once, atomically;
    not committed): tiny_testbed.rl_rows, from the half of the problem space that no build fine-tunes on."""
    path = out / "data" / f"rl-build{build}-seed{seed}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{rank}.tmp")
        tmp.write_text("".join(json.dumps({"problem": r["problem"], "answer": r["answer"]}) + "\n"
                               for r in tiny_testbed.rl_rows(build, seed)))
        tmp.replace(path)
    return str(path)


def train_args(a, run, seed, out, train_over):
    """The scope.Args of one training run: the preset's (scope.PRESETS), then reproduce's overrides, then the run's."""
    run_dir = out / "runs" / f"{run}-s{seed}"                          # a killed run continues from its checkpoint
    resume = any((run_dir / d / "state.json").exists() for d in ("checkpoint", "checkpoint.old"))
    over = {"preset": a.preset, "out_dir": str(run_dir), "seed": seed, "resume": resume}
    return scope.resolve({**over, **train_over, **runs_of(a)[run]})


def runs_of(a):
    names = [m for m in a.methods.split(",") if m]
    for m in names:
        if m not in KNOWN:
            raise ValueError(f"--methods: unknown method {m!r}; known: {KNOWN}")
    runs = {m: ({} if m in ("base", "teacher") else {"method": m}) for m in names}
    if a.ablations:
        chosen = [r for r in a.ablation_runs.split(",") if r] or list(ABLATIONS)
        for r in chosen:
            if r not in ABLATIONS:
                raise ValueError(f"--ablation-runs: unknown {r!r}; known: {list(ABLATIONS)}")
        runs.update({k: {"method": "scope", **ABLATIONS[k]} for k in chosen})
    return runs


def run_analysis(a, per_build):
    """--analysis recovery: the error-recovery analysis of each build of the tiny regime into
    <out>[/build<seed>]/analysis/recovery-<regime>."""
    import analysis
    if a.analysis != "recovery" or a.preset != "tiny":
        raise ValueError("--analysis: only `recovery`, on the tiny preset")
    for b in build_seeds(a):
        out = Path(a.out or "runs/analysis") / (f"build{b}" if per_build else "") / "analysis" / f"recovery-{a.regime}"
        student, teacher = (a.student, a.teacher) if a.student and a.teacher else build_dirs(a, b)
        t0 = time.time()
        result = analysis.recovery(student, teacher, out, problems=a.analysis_problems, log=print)
        result.update(command=command_line(None), date=now(), commit=git_commit(), wall_s=round(time.time() - t0),
                      build=b)
        (out / "recovery.json").write_text(json.dumps(result, indent=1))
        print(analysis.table_md(result))


def build_seeds(a):
    return [int(b) for b in a.build_seeds.split(",") if b.strip()]


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


def check(a):
    """Every option value reproduce.py takes, checked before anything runs (ValueError: a usage error)."""
    if a.preset not in ("tiny", "paper"):
        raise ValueError(f"--preset must be tiny or paper, got {a.preset!r}")
    for name in ("seeds", "build_seeds"):
        if not all(x.strip().isdigit() for x in getattr(a, name).split(",")):
            raise ValueError(f"--{name.replace('_', '-')} must be comma-separated integers, got {getattr(a, name)!r}")
    if a.analysis and (a.analysis != "recovery" or a.preset != "tiny"):
        raise ValueError("--analysis: only `recovery`, on the tiny preset")
    if a.regime not in tiny_testbed.REGIMES:
        raise ValueError(f"--regime must be one of {list(tiny_testbed.REGIMES)}, got {a.regime!r}")
    if a.design not in ("default", "calibrated") or (a.design == "calibrated" and (a.preset != "tiny" or a.data)):
        raise ValueError(f"--design must be default or calibrated (tiny preset, its own data), got {a.design!r}")
    runs_of(a)


def main(argv=None):
    try:
        return run(argv)
    except benchmarks.DataError as e:                                 # names the file, line, field: no traceback
        raise SystemExit(f"error: {e}") from None


def run(argv=None):
    p, given = cli.dataclass_cli(RArgs, argv, __doc__.splitlines()[0])
    a = RArgs(**given)
    try:
        check(a)
    except ValueError as e:                           # a usage error, not a traceback
        p.error(str(e))
    per_build = "build_seeds" in given                 # each build in its own directory <out>/build<seed>/
    if a.analysis:
        return run_analysis(a, per_build)
    if torch.cuda.is_available() and "preset" not in given:
        print("reproduce.py: a GPU is present, running the TINY preset (minutes). The paper's runs (days on 8 GPUs) "
              "need an explicit --preset paper.", flush=True)

    import torch.distributed as dist
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:                                           # one process group for every training run
        ranks.init_group(a.dist_timeout)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    master = rank == 0
    say = print if master else (lambda *x, **k: None)
    train_over, ev, bench_names = preset_settings(a)
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    runs = runs_of(a)
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if ddp and torch.cuda.is_available() else "cpu"
    started = ranks.all_reduce([time.time() if master else 0.0], device)[0]   # rank 0's clock names the directory
    out, a.results_md = output_paths(a, started)
    say(f"output: {out} (to resume this invocation after a crash: the same command with --out {out})", flush=True)
    if a.preset == "paper" and master:                # fail early and clearly when data cannot be reached
        for name in bench_names:
            benchmarks.load(name, a.data_dir or None)
    outs = {b: out / f"build{b}" if per_build else out for b in build_seeds(a)}
    if master:
        for d in outs.values():
            d.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    phases = [] if a.report_only else [(b, r, s) for b in outs for s in seeds for r in runs]
    try:
        for done, (b, run, seed) in enumerate(phases):
            elapsed = time.time() - t_start
            eta = elapsed / done * (len(phases) - done) if done else float("nan")
            say(f"[{done + 1}/{len(phases)}] {run} seed {seed}" + (f" build {b}" if per_build else "") + f": elapsed "
                f"{fmt_time(elapsed)}" + (f", about {fmt_time(eta)} to go" if math.isfinite(eta) else ""), flush=True)
            over = dict(train_over)
            if a.preset == "tiny" and not (a.student and a.teacher):   # this build's pair (build 0, default: the usual)
                student, teacher = build_dirs(a, b, log=say)
                over.setdefault("student", str(student))
                over.setdefault("teacher", str(teacher))
            if a.design == "calibrated":                  # streams keyed by (build, seed); RL prompts apart from SFT
                over.update(seed=stream_seed(a, b, seed), data=rl_data(outs[b], b, seed, rank))
                strength = Path(over["teacher"]).parent / "strength.json"   # the teacher's validation scores
                if rank == 0 and strength.exists():
                    (outs[b] / "strength.json").write_text(strength.read_text())
            run_phase(a, outs[b], run, seed, over, ev, bench_names, rank, world, say)
            if ddp:
                dist.barrier()                        # everyone has finished: eval waited on the files
    finally:                                          # the runs share one engine: released here, also after an error
        vllm_engine.close_engine()                    # (woken first; the group kept: vllm_engine.close_engine)
    wall = time.time() - t_start
    if master:
        for d in outs.values():
            if phases:
                with (d / "invocations.jsonl").open("a") as f:               # every invocation that wrote here
                    f.write(json.dumps({"command": command_line(argv), "date": now(), "wall_s": round(wall),
                                        "commit": git_commit()}) + "\n")
            write_report(dataclasses.replace(a, results_md=str(d / "RESULTS.md")) if per_build else a, d, bench_names)
        say(f"wrote {a.results_md if not per_build else [str(d / 'RESULTS.md') for d in outs.values()]} in "
            f"{fmt_time(wall)}")
    if ddp:
        dist.destroy_process_group()


def run_phase(a, out, run, seed, over, ev, bench_names, rank, world, say):
    """Train one (run, seed) unless done earlier (base and teacher train nothing), then evaluate it unless done."""
    run_dir = out / "runs" / f"{run}-s{seed}"
    targs = train_args(a, run, seed, out, over)
    if run in ("base", "teacher"):                    # evaluated untrained; the tiny ones built like in training
        model_dir = (targs.student or tiny_testbed.build_tiny_models(targs.cache_dir, log=say, threads=targs.threads)[0]
                     ) if run == "base" else targs.teacher
    elif (run_dir / "train_done.json").exists():
        say(f"  training done earlier: {run_dir}")
        model_dir = run_dir / "checkpoint"
    else:
        t0 = time.time()
        scope.train(targs)
        if rank == 0:
            (run_dir / "train_done.json").write_text(json.dumps({"seconds": time.time() - t0}))
        model_dir = run_dir / "checkpoint"
    # evaluate: every rank a shard of the problems, merged by rank 0 (eval.run.evaluate: no collective waits)
    eargs = EvalArgs(model=str(model_dir), benchmarks=",".join(bench_names), out_dir=str(run_dir / "eval"),
                     seed=targs.seed, **ev)                  # the run's stream seed (stream_seed)
    if (run_dir / "eval" / "results.json").exists():
        say(f"  evaluation done earlier: {run_dir / 'eval' / 'results.json'}")
    else:
        evaluate(eargs, progress=rank == 0, rank=rank, world=world)
        if rank == 0:
            write_per_problem(run_dir / "eval", bench_names)


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
    cfgs = sorted(out.glob(f"runs/{run}-s*/config.json")) if out is not None and run in ABLATIONS else []
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
        def apart(x, hx, y, hy):
            return "yes" if sep(x, hx, y, hy) or sep(y, hy, x, hx) else "no (the intervals overlap)"
        lines.append(f"- Separated by their 95% intervals: SCOPE vs OPD on Avg@{n}: {apart(s, hs, o, ho)}; OPD vs "
                     f"GRPO: {apart(o, ho, g, hg)}; SCOPE vs OPD on Pass@{n}: {apart(sp, hsp, op, hop)}.")
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


def diffs(out, run_a, run_b, seeds, bench_names, n):
    """(keys, (seeds, problems) array of run_a - run_b fractions correct), paired by seed and problem; None when a file
    is missing."""
    import numpy as np
    rows = []
    for seed in seeds:
        a, b = per_problem(out, run_a, seed, bench_names, n), per_problem(out, run_b, seed, bench_names, n)
        if a is None or b is None:
            return None
        rows.append({k: a[k] - b[k] for k in a})
    keys = sorted(rows[0])
    return keys, np.array([[r[k] for k in keys] for r in rows])


def paired(out, run_a, run_b, seeds, bench_names, n):
    """Macro Avg@n of run_a minus run_b, paired by seed and problem (same data order, sampling and evaluation seeds
    across methods): (difference, 95% interval low, high, standard error, smallest detectable, seeds) in points, a
    t-interval over the seeds (analysis.study_interval with one build). None when a file is missing."""
    import analysis
    d = diffs(out, run_a, run_b, seeds, bench_names, n)
    return None if d is None else analysis.study_interval([d], bench_names)


PAIRS = [("scope", "opd"), ("opd", "base"), ("scope", "base"), ("psr", "base")]


def paired_table(out, res, runs, bench_names, n):
    """SCOPE - OPD and each ablation - SCOPE (and the baselines against the untrained student), paired."""
    pairs = [p for p in PAIRS if p[0] in res and p[1] in res] + [(r, "scope") for r in runs
                                                               if r in ABLATIONS and "scope" in res]
    lines = [f"| comparison | seeds | difference in macro Avg@{n} (points) | 95% interval | smallest detectable "
             "difference | separated from 0? |", "|---|---|---|---|---|---|"]
    for a, b in pairs:
        seeds = sorted(set(res[a]) & set(res[b]))
        r = paired(out, a, b, seeds, bench_names, n) if len(seeds) >= 2 else None
        if r is None:
            continue
        d, lo, hi, se, mdd, _ = r
        lines.append(f"| {LABELS.get(a, a).lstrip('+ ')} - {LABELS.get(b, b).lstrip('+ ')} | {len(seeds)} | {d:+.1f} | "
                     f"[{lo:+.1f}, {hi:+.1f}] | {mdd:.1f} | {'yes' if lo > 0 or hi < 0 else 'no'} |")
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


def study_dirs(out):
    """{regime: {build seed: directory}} of the study under <out>/study/<regime>/build<seed>/, in build order. A build
    whose runs are still being made (no finished invocation in invocations.jsonl yet) is left out of the report."""
    found = {}
    for d in sorted((out / "study").glob("*/build*"), key=lambda d: (d.parent.name, int(d.name.removeprefix("build")))):
        if (d / "invocations.jsonl").exists() or ((d / "analysis").exists() and not (d / "runs").exists()):
            found.setdefault(d.parent.name, {})[int(d.name.removeprefix("build"))] = d
    return found


def recovery_of(d):
    paths = sorted(d.glob("analysis/recovery-*/recovery.json"))
    return json.loads(paths[0].read_text()) if paths else None


def pct(r, signed=True):
    """(difference, low, high) as points with its interval."""
    f = "{:+.1f}" if signed else "{:.1f}"
    return f"{f.format(100 * r[0])} [{f.format(100 * r[1])}, {f.format(100 * r[2])}]"


# (run a, run b, label, and optionally a pair (c, d) whose difference is subtracted: (a - b) - (c - d))
COMPARISONS = [("scope", "opd", "SCOPE - OPD"), ("scope-no_teacher_w", "scope", "teacher weight uniform - SCOPE"),
               ("scope-no_student_w", "scope", "student weight uniform - SCOPE"),
               ("scope-noclip", "opd-noclip", "SCOPE - OPD, no gradient clipping"),
               ("scope-noclip", "opd-noclip", "change of SCOPE - OPD when clipping is removed", ("scope", "opd")),
               ("scope-noclip", "scope", "SCOPE without clipping - SCOPE"),
               ("opd-noclip", "opd", "OPD without clipping - OPD")]


def study_comparisons(builds, bench_names):
    """{label: {build: (d, lo, hi, se, smallest detectable, units, seeds), "pooled": ...}}: each comparison per build (a
    t-interval over its seeds) and pooled over builds (a t-interval over the builds: analysis.study_interval)."""
    import analysis
    table = {}
    for a_run, b_run, label, *rest in COMPARISONS:
        minus = rest[0] if rest else ()                                  # (c, d) of (a - b) - (c - d), or none
        row, mats = {}, []
        for b, d in builds.items():
            res = load_results(d)
            seeds = sorted(set.intersection(*(set(res.get(r, {})) for r in (a_run, b_run, *minus))))
            if not seeds:
                continue
            n = next(iter(res[a_run].values()))["config"]["n"]
            m = diffs(d, a_run, b_run, seeds, bench_names, n)
            if m is not None and minus:                                  # paired per seed and problem, like the rest
                m2 = diffs(d, *minus, seeds, bench_names, n)
                m = (m[0], m[1] - m2[1]) if m2 is not None and m2[0] == m[0] else None
            if m is None:
                continue
            row[b] = (*analysis.study_interval([m], bench_names), len(seeds))
            mats.append(m)
        if len(mats) > 1 and all(m[0] == mats[0][0] for m in mats):
            row["pooled"] = (*analysis.study_interval(mats, bench_names), sum(m[1].shape[0] for m in mats))
        if row:
            table[label] = row
    return table


def scope_opd_mats(builds, bench_names):
    """{build: (keys, (seeds, problems) SCOPE - OPD differences)} over the seeds both runs have."""
    mats = {}
    for b, d in builds.items():
        res = load_results(d)
        seeds = sorted(set(res.get("scope", {})) & set(res.get("opd", {})))
        m = diffs(d, "scope", "opd", seeds, bench_names, next(iter(res["scope"].values()))["config"]["n"]) \
            if seeds else None
        if m is not None:
            mats[b] = m
    return mats


def strength_of(d):
    """The calibrated design's record of a build's teacher and student (tiny_testbed.Calibrated), or None."""
    path = d / "strength.json"
    return json.loads(path.read_text()) if path.exists() else None


def mean_avg(d, run):
    """A run's macro Avg@n on the test split in points, the mean over its seeds (None when it has none)."""
    res = load_results(d)
    if run not in res:
        return None
    vals = metric_values(res, run, "average", f"avg@{next(iter(res[run].values()))['config']['n']}")
    return 100 * sum(vals) / len(vals)


def points(v):
    return "-" if v is None else f"{v:.1f}"


def components(within, between, n):
    """analysis.variance_components' numbers, as a sentence."""
    return (f"Variance components of SCOPE - OPD over these {n} builds (points^2, method of moments): seeds within a "
            f"build {within:.1f}, builds {between:+.1f}"
            + (" (below 0: the builds differ less than their seeds predict)." if between <= 0 else "."))


def pooled_answer(mats, bench_names):
    """SCOPE - OPD pooled over builds (scope_opd_mats' values) with both intervals, a t-interval over the builds and
    the same with its standard error floored at what the seeds alone put in (analysis.study_interval(floor=True)); the
    verdict is read on the wider; then the variance components."""
    import analysis
    t_iv = analysis.study_interval(mats, bench_names)
    floored = analysis.study_interval(mats, bench_names, floor=True)
    wider = floored if floored[2] - floored[1] > t_iv[2] - t_iv[1] else t_iv
    return (paper_gap_answer(wider) + f" Both intervals: a t-interval over the builds [{t_iv[1]:+.1f}, {t_iv[2]:+.1f}] "
            f"(standard error {t_iv[3]:.2f}); with its standard error floored at what the seeds alone put in "
            f"[{floored[1]:+.1f}, {floored[2]:+.1f}] ({floored[3]:.2f}); the verdict is read on the wider. "
            + components(*analysis.variance_components(mats, bench_names)))


def calibrated_answer(builds, excluded, bench_names):
    """The calibrated design's answer: SCOPE - OPD pooled over the builds whose teacher reached the target, both
    intervals (t over builds; the standard error floored at what the seeds put in) with the verdict on the wider, each
    build's pair beside its own difference, and whether SCOPE - OPD grows with the teacher's margin over the student."""
    import analysis
    mats = scope_opd_mats(builds, bench_names)
    if len(mats) < 2:
        return []
    seeds = sorted({m[1].shape[0] for m in mats.values()})
    lines = [f"**The calibrated design** ({len(mats)} builds whose teacher reached the target, "
             f"{'/'.join(map(str, seeds))} training seeds each; RL prompts from the half of the problem space no SFT "
             "problem comes from): " + pooled_answer(list(mats.values()), bench_names), ""]
    xs, ys = [], []
    for b, m in mats.items():
        d, st = builds[b], strength_of(builds[b]) or {}
        teacher, base = mean_avg(d, "teacher"), mean_avg(d, "base")
        own = analysis.study_interval([m], bench_names)
        stages = ", ".join(f"{100 * s['macro']:.1f}" for s in st.get("teacher", []))
        lines.append(f"- build {b}: teacher {points(teacher)}, untrained student {points(base)} (Avg on the test "
                     f"split; the teacher's validation macro Avg@4 by stage: {stages or '-'}); SCOPE - OPD "
                     f"{own[0]:+.1f} [{own[1]:+.1f}, {own[2]:+.1f}] ({separated(own)})")
        if teacher is not None and base is not None:
            xs.append(teacher - base)
            ys.append(own[0])
    for b, d in excluded.items():
        st = strength_of(d) or {}
        best = max((s["macro"] for s in st.get("teacher", [])), default=None)
        lines.append(f"- build {b}: its teacher did not reach the target "
                     + (f"({100 * best:.1f} at best on validation, target {100 * st['target']:.0f})"
                        if best is not None else "(no strength.json)") + "; left out of the pooled answer")
    slope = analysis.slope_interval(xs, ys)
    if slope[0] == slope[0]:                                             # not nan: 3 builds or more, margins differ
        lines += ["", f"Does SCOPE gain more over OPD where the teacher leads the untrained student by more? The "
                  f"slope of SCOPE - OPD on that margin over {len(xs)} builds (margins {min(xs):.1f} to "
                  f"{max(xs):.1f} points) is {slope[0]:+.3f} [{slope[1]:+.3f}, {slope[2]:+.3f}] points per point "
                  f"(least squares, t-interval on {len(xs) - 2} degrees of freedom): "
                  + ("it rises with the margin." if slope[1] > 0 else "it falls as the margin grows." if slope[2] < 0
                     else "no relation resolved.")]
    return lines + [""]


PAPER_GAP = 2.9   # SCOPE - OPD in the paper's Table 1, average Avg@32 (55.2 - 52.3)


def paper_gap_answer(p):
    """The study's answer in one sentence: SCOPE - OPD pooled over builds against 0 and against the paper's +2.9."""
    d, lo, hi, se, smallest, units = p[:6]
    head = (f"**SCOPE - OPD, pooled over {units} builds: {d:+.1f} points of macro Avg [{lo:+.1f}, {hi:+.1f}] "
            f"(smallest detectable difference {smallest:.1f}).** ")
    if lo > 0 or hi < 0:
        return head + (f"It is separated from 0: SCOPE is {'above' if lo > 0 else 'below'} OPD in this testbed"
                       + (f", and the interval excludes the paper's +{PAPER_GAP}." if hi < PAPER_GAP else "."))
    if hi < PAPER_GAP:
        return head + f"The interval excludes the paper's +{PAPER_GAP}: a gain of the paper's size is not here."
    return head + (f"Not resolved at this power: the interval holds both 0 and the paper's +{PAPER_GAP}"
                   + (f", and this design detects only differences of {smallest:.1f} or more." if smallest > PAPER_GAP
                      else "."))


def separated(r):
    return "above 0" if r[1] > 0 else "below 0" if r[2] < 0 else "not separated from 0"


def grad_stats(d, run):
    """Median gradient norm, fraction of steps clipped, and SCOPE's median path norms, over a run's seeds and steps."""
    import statistics
    recs, clip = [], None
    for path in sorted((d / "runs").glob(f"{run}-s*/metrics.jsonl")):
        clip = json.loads((path.parent / "config.json").read_text())["grad_clip"]
        recs += [json.loads(line) for line in path.read_text().splitlines()]
    if not recs:
        return None
    norms = [r["train/grad_norm"] for r in recs]
    out = {"steps": len(recs), "median grad norm": statistics.median(norms), "clip": clip,
           "clipped": sum(0 < clip < g for g in norms) / len(norms)}
    if "train/grad_norm_mle" in recs[0]:
        out["median MLE-path norm"] = statistics.median(r["train/grad_norm_mle"] for r in recs)
        out["median OPD-path norm"] = statistics.median(r["train/grad_norm_opd"] for r in recs)
    return out


def study_report(out, bench_names, md_dir):
    """The study over independently built testbeds: per build and pooled, the premise per cut, SCOPE - OPD, the two
    weights, how they relate across builds, and what the gradient does. (lines of the report, answers first)"""
    import analysis
    regimes = study_dirs(out)
    excluded = {}                                                        # calibrated builds short of the target
    if "calibrated" in regimes:
        excluded = {b: d for b, d in regimes["calibrated"].items() if not (strength_of(d) or {}).get("reached")}
        regimes["calibrated"] = {b: d for b, d in regimes["calibrated"].items() if b not in excluded}
        if not regimes["calibrated"]:
            del regimes["calibrated"]
    if not regimes:
        return []
    comps = {reg: study_comparisons(builds, bench_names) for reg, builds in regimes.items()}
    recs = {reg: {b: recovery_of(d) for b, d in builds.items()} for reg, builds in regimes.items()}
    lines = ["## What this testbed says (answers from the files below)", ""]
    if "calibrated" in regimes:
        lines += calibrated_answer(regimes["calibrated"], excluded, bench_names)
    if comps.get("default", {}).get("SCOPE - OPD", {}).get("pooled"):
        lines += ["**The earlier design** (the `default` regime: every build's RL prompts drawn from its own SFT "
                  "problems' space, one seed stream for all builds): "
                  + pooled_answer(list(scope_opd_mats(regimes["default"], bench_names).values()), bench_names),
                  ""]
    lines += ["Every regime, comparison by comparison (the tables below give each build's runs):", ""]
    for reg, builds in regimes.items():
        lines.append(f"- **Regime `{reg}`** ({len(builds)} build{'s' if len(builds) > 1 else ''}"
                     + (", where the premise holds by construction: its teacher saw 2% of the add5 problems, so it is "
                        "unsure exactly where it is unreliable; the line below measures how far it holds"
                        if reg == "weak-add5" else "") + ")")
        prem = {b: r for b, r in recs[reg].items() if r}
        if prem:
            lines.append("  - Premise, per cut (pooled quartiles): " + "; ".join(
                f"build {b}: " + ", ".join(f"{c} {analysis.verdict(r['pooled']['q1_minus_q4'][c])}"
                                           for c in analysis.CUTS) for b, r in prem.items()) + ".")
        for label, row in comps[reg].items():
            per = [f"build {b}: {row[b][0]:+.1f} [{row[b][1]:+.1f}, {row[b][2]:+.1f}] ({separated(row[b])})"
                   for b in row if b != "pooled"]
            pooled = row.get("pooled")
            signs = {separated(row[b]) for b in row if b != "pooled"}
            lines.append(f"  - {label} (macro Avg, points): " + "; ".join(per)
                         + (f"; pooled (t over builds) {pooled[0]:+.1f} [{pooled[1]:+.1f}, {pooled[2]:+.1f}] "
                            f"({separated(pooled)})"
                            if pooled else "")
                         + (". The builds agree." if len(signs) == 1 and len(per) > 1 else
                            ". **The verdict depends on the build.**" if len(per) > 1 else "."))
        lines += clipping_answer(comps[reg])
    lines += ["", "## The study over independently built testbeds", "",
              "A build is one teacher/student pair from the same recipe (tiny_testbed.py), seeded by the build seed "
              "(initialisation, SFT data and order); one build's verdict is one draw of the testbed. Differences are "
              "paired by build, training seed and test problem (every method sees the same data order, rollout seeds "
              "and evaluation seeds). Intervals are 95% t-intervals over the top level of the design: per build, over "
              "its training seeds (each seed's macro average over the whole test split); pooled, over the builds (each "
              "build's mean over its seeds), on units - 1 degrees of freedom (analysis.study_interval; its coverage on "
              "planted data is tested and recorded in docs/reproducing.md). The answers above also give the pooled "
              "interval with its standard error floored at what the seeds alone put into the mean of the build means "
              "(the build means' spread can come out smaller by chance) and read the verdict on the wider. The "
              "smallest detectable difference is (t_0.975 + t_0.80) standard errors on the same degrees of freedom "
              "(80% power, two-sided 5%): 5.4 SE with 3 units, 3.3 with 8. With 3 seeds a build's own interval is "
              "wide; the pooled answer is the answer.",
              ""]
    for reg, builds in regimes.items():
        lines += [f"### Regime `{reg}`", ""]
        for b, d in builds.items():
            log = d / "invocations.jsonl"
            for c in ([json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []):
                lines.append(f"- build {b}: `{c['command']}` ({c['date']}, {fmt_time(c['wall_s'])}, "
                             f"code {c.get('commit', '')})")
            r = recs[reg][b]
            if r:
                lines.append(f"- build {b}: `{r.get('command', '')}` ({r.get('date', '')}, "
                             f"{fmt_time(r.get('wall_s', 0))}, code {r.get('commit', '')})")
        recovered = any(recs[reg].values())                   # the recovery columns only where the analysis ran
        lines += ["", "**The pairs** (Avg@n on the test split; the untrained student and the teacher, each "
                  "evaluated as the runs are):", "",
                  "| build | teacher | student (untrained) |" + (" student accuracy on the recovery sample | incorrect "
                                                                   "rollouts analysed |" if recovered else ""),
                  "|---|---|---|" + ("---|---|" if recovered else "")]
        for b, d in builds.items():
            r = recs[reg][b]
            lines.append(f"| {b} | {points(mean_avg(d, 'teacher'))} | {points(mean_avg(d, 'base'))} |" + (
                "" if not recovered else f" {100 * r['student_accuracy']:.1f}% | {r['incorrect_scored']} |" if r
                else " - | - |"))
        lines += ["", "**Does the premise hold at each cut?** Q1 - Q4 recovery (points) per cut; quartiles of teacher "
                  "perplexity over all incorrect rollouts (pooled) and within each level (the level moves both length "
                  "and perplexity); intervals resample problems with all their rollouts and cuts:", "",
                  "| build | quartiles | " + " | ".join(f"cut at {c}" for c in analysis.CUTS) + " |",
                  "|---" * (2 + len(analysis.CUTS)) + "|"] if recovered else []
        for b, r in recs[reg].items():
            for where, name in (("pooled", "pooled"), ("within_level", "within level")):
                if r:
                    d = r[where]["q1_minus_q4"]
                    lines.append(f"| {b} | {name} | " + " | ".join(f"{pct(d[c])} {analysis.verdict(d[c])}"
                                                                for c in analysis.CUTS) + " |")
        lines += ["", "**Does SCOPE beat OPD, and do the two weights help?** (macro Avg, points; training seeds in "
                  "parentheses)", "",
                  "| comparison | " + " | ".join(f"build {b}" for b in builds) + " | pooled (t over builds) | smallest "
                  "detectable (pooled) |", "|---" * (len(builds) + 3) + "|"]
        for label, row in comps[reg].items():
            cells = [f"{row[b][0]:+.1f} [{row[b][1]:+.1f}, {row[b][2]:+.1f}] ({row[b][6]})" if b in row else "-"
                     for b in builds]
            p = row.get("pooled")
            lines.append(f"| {label} | " + " | ".join(cells) + " | "
                         + (f"{p[0]:+.1f} [{p[1]:+.1f}, {p[2]:+.1f}] | {p[4]:.1f} |" if p else "- | - |"))
        lines += ["", "**What the gradient does** (over every step of every seed; clipped: the step's norm exceeded "
                  "`--grad-clip`):", "", "| build | run | steps | median grad norm | clip | steps clipped | median MLE-"
                  "path norm | median OPD-path norm |", "|---|---|---|---|---|---|---|---|"]
        for b, d in builds.items():
            for run in ("scope", "opd", "scope-no_teacher_w", "scope-no_student_w", "scope-noclip", "opd-noclip"):
                g = grad_stats(d, run)
                if g:
                    paths = [f"{g[k]:.2f}" if k in g else "-" for k in ("median MLE-path norm", "median OPD-path norm")]
                    lines.append(f"| {b} | {run} | {g['steps']} | {g['median grad norm']:.2f} | {g['clip'] or 'off'} | "
                                 f"{100 * g['clipped']:.0f}% | {paths[0]} | {paths[1]} |")
        plots_ = [(b, d / "analysis" / f"recovery-{reg}" / "recovery.png") for b, d in builds.items()]
        lines += [""] + [f"![error recovery, regime {reg}, build {b}]({os.path.relpath(p, md_dir)})"
                         for b, p in plots_ if p.exists()] + [""]
    lines += relation_section(regimes, recs, comps)
    return lines


def clipping_answer(comps):
    """Does removing gradient clipping change the SCOPE - OPD verdict? One line per build that has the no-clip arm."""
    on, off = comps.get("SCOPE - OPD", {}), comps.get("SCOPE - OPD, no gradient clipping", {})
    change = comps.get("change of SCOPE - OPD when clipping is removed", {})
    out = []
    for b in [b for b in off if b != "pooled" and b in on and b in change]:
        same = separated(on[b]) == separated(off[b])
        moved = separated(change[b]) != "not separated from 0"
        out.append(f"  - Does the SCOPE - OPD verdict change without gradient clipping? Build {b}: with clipping "
                   f"{on[b][0]:+.1f} ({separated(on[b])}), without {off[b][0]:+.1f} ({separated(off[b])}); the change "
                   f"{change[b][0]:+.1f} [{change[b][1]:+.1f}, {change[b][2]:+.1f}] is {separated(change[b])}. "
                   + ("**Yes**: removing clipping moves SCOPE - OPD measurably." if moved else
                      "**No**: the verdict is the same." if same else
                      "**Not measurably**: the verdict's label moves, but the change itself is not separated from 0, "
                      "so clipping does not explain SCOPE - OPD here."))
    return out


def relation_section(regimes, recs, comps):
    """Across builds and regimes: does a pair where the premise holds more strongly show a better SCOPE - OPD?"""
    pts = []
    for reg, builds in regimes.items():
        for b in builds:
            r, c = recs[reg].get(b), comps[reg].get("SCOPE - OPD", {}).get(b)
            if r and c:
                strength = sum(r["pooled"]["q1_minus_q4"][k][0] for k in r["pooled"]["q1_minus_q4"]) / 4
                pts.append((reg, b, 100 * strength, c[0]))
    if len(pts) < 2:
        return []
    lines = ["### Does a stronger premise go with a better SCOPE - OPD?", "",
             "| regime | build | premise strength: Q1 - Q4, mean over the four cuts (points) | SCOPE - OPD (points) |",
             "|---|---|---|---|", *[f"| {reg} | {b} | {x:+.1f} | {y:+.1f} |" for reg, b, x, y in pts], ""]
    xs, ys = [p[2] for p in pts], [p[3] for p in pts]
    rank = lambda v: [sorted(v).index(x) for x in v]                              # noqa: E731  (no ties expected)
    rx, ry = rank(xs), rank(ys)
    m = (len(pts) - 1) / 2
    num = sum((a - m) * (b - m) for a, b in zip(rx, ry))
    den = (sum((a - m) ** 2 for a in rx) * sum((b - m) ** 2 for b in ry)) ** 0.5
    rho = num / den if den else float("nan")
    lines += [f"Spearman rank correlation over these {len(pts)} pairs: {rho:+.2f}. With {len(pts)} pairs, "
              "only a perfect ordering (|rho| = 1) would be unlikely by chance (probability "
              f"{2 / math.factorial(len(pts)):.3f} "
              "for either sign), and the pairs differ in more than the premise (student accuracy, teacher), so this "
              "can show a direction, not establish one.", ""]
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
        cmd = f"torchrun --nproc-per-node={os.environ['WORLD_SIZE']} " + cmd[len("python "):]
    return cmd


def git_commit():
    """The code's commit, with '+changes' when the code differs from it (results/ and RESULTS.md, which runs rewrite,
    do not count; '' outside git)."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                              text=True).stdout.strip()
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
    cuda = torch.cuda.is_available()
    gpu = f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if cuda else ", no GPU"
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
        if run in res and run not in ABLATIONS:
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
        if run in ("base", "teacher") or run in ABLATIONS:
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

    abl = [r for r in runs if (r == "scope" or r in ABLATIONS) and r in res]
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
    runs = [r for r in [*KNOWN, *ABLATIONS] if r in res]                   # everything on disk, in table order
    n = next(iter(next(iter(res.values())).values()))["config"]["n"]
    main_runs = [r for r in runs if r not in ABLATIONS]
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
            f"{k} {v}" for k, v in r.get("versions", versions()).items())
            for rs in res.values() for r in rs.values()})),
        f"- preset: {a.preset}"
        + (" (smoke settings: checks the pipeline, says nothing about the method)" if a.smoke else "") + ";"
        f" seeds per run: {seed_note}; cells are the mean over a run's seeds, ± the 95% t-interval when it has"
        " more than one",
        *models_note(a, res),
        f"- evaluation: {n} samples per problem, Avg@{n} and unbiased Pass@{n} (%), per "
        + ("tiny-task level (the tiny test split)" if a.preset == "tiny" else "benchmark")
        + "; average = macro over columns",
        "", "## Main table (layout of the paper's Table 1)", "", results_table(res, main_runs, bench_names, n), ""]
    if a.preset == "paper":
        lines += ["## The paper's own numbers (Table 1, R1-Distill-Qwen-1.5B; NOT produced by this run)", "",
                  paper_table(), ""]
    abl = [r for r in runs if r in ABLATIONS]
    if abl:
        lines += ["## SCOPE ablations", "", results_table(res, ["scope"] + abl, bench_names, n, out), "",
                  "no_teacher_w / no_student_w: that path's weights uniform; uniform: both; reversed_*: the exponent's "
                  "sign flipped; tau0.5 / tau2: weight temperature; official: the released scripts' recipe (mean-1 "
                  "weights, reversed student weight, token-mean, student log-probs at the sampling temperature); a "
                  "label in brackets gives a run's sampling temperature and grader where they are not the defaults "
                  "(T 1, is_equiv).", ""]
    lines += ["## Does the paper's ordering hold here?", "", ordering(res, n), ""]
    pt = paired_table(out, res, runs, bench_names, n)
    if pt:
        lines += ["## Paired differences", "", "Paired by seed and problem; 95% t-intervals over the seeds (each "
                  "seed's macro average), smallest detectable difference (t_0.975 + t_0.80) standard errors on the "
                  "same degrees of freedom (analysis.study_interval).", "", pt, ""]
    if "base" in res:
        lines += ["## Pass@k (paper section 2.1, Fig. 1a)", "", pass_at_k_table(res, n), ""]
    study = study_report(out, bench_names, Path(a.results_md).parent)
    at = lines.index("## Main table (layout of the paper's Table 1)")
    lines[at:at] = study                                                # the study's answers come first
    lines += ["## Plots", ""]
    for title, path in plots(out, res, runs, seeds, n).items():
        lines += [f"### {title}", "", f"![{title}]({os.path.relpath(path, Path(a.results_md).parent)})", ""]
    Path(a.results_md).write_text("\n".join(lines))


if __name__ == "__main__":
    main()

"""The edges a user meets: every row of docs/training.md's bad-input table on scope.py, `python -m eval` and
reproduce.py (a clear message naming the field, file or value, no traceback, nothing already written lost), checkpoint
files that could run code, and both flag spellings on every entry point."""

import json
import os
import subprocess
import sys

import pytest
import torch

import checkpoints
import cli as flags
import loading
import reproduce
import scope
from conftest import ROOT
from eval import run as eval_run
from test_train import cli, run_args


def cli_run(args, timeout=120):
    """An entry point in its own process: (exit code, stderr)."""
    res = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    return res.returncode, res.stderr


@pytest.mark.parametrize("argv,message", [
    (["scope.py", "--method", "foo"], "method='foo' is not one of"),
    (["scope.py", "--resume", "maybe"], "expected true or false, got 'maybe'"),
    (["scope.py", "--steps", "0"], "--steps must be at least 1"),
    (["scope.py", "--out-dirr", "x"], "unrecognized arguments: --out-dirr"),
    (["-m", "eval", "--model", "m", "--backend", "foo"], "--backend must be hf or vllm, got 'foo'"),
    (["reproduce.py", "--methods", "scope,foo"], "--methods: unknown method 'foo'"),
    (["reproduce.py", "--build-seeds", "0,x"], "--build-seeds must be comma-separated integers"),
])
def test_unknown_option_values_are_usage_errors(argv, message):
    code, err = cli_run(argv)
    assert code == 2 and message in err and "Traceback" not in err, err


def test_bad_data_is_named_with_its_file_and_line(micro_models, tmp_path):
    """scope.py --data: missing, empty, malformed and incomplete files stop at once, naming the file (and line)."""
    cases = {"missing.jsonl": (None, "no such file"), "empty.jsonl": ("", "no problems in .*empty.jsonl"),
             "bad.jsonl": ('{"problem": "1+1", "answer": "2"}\n{not json\n', r"bad.jsonl:2: not a JSON object"),
             "field.jsonl": ('{"problem": "1+1"}\n', r"field.jsonl:1: field 'answer' is missing"),
             "list.jsonl": ('[1, 2]\n', r"list.jsonl:1: field 'problem' is missing")}
    for name, (text, message) in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(SystemExit, match=message):
            scope.train(run_args(micro_models, tmp_path / "out", data=str(tmp_path / name)))
    (tmp_path / "dir").mkdir()
    with pytest.raises(SystemExit, match="no .jsonl file in this directory"):
        loading.load_problems(str(tmp_path / "dir"))
    code, err = cli_run(["scope.py", *cli(micro_models, tmp_path / "o", ["--data", str(tmp_path / "empty.jsonl")])])
    assert code == 1 and "no problems in" in err and "Traceback" not in err, err      # the reported ZeroDivisionError


def test_jsonl_problems_are_read_lazily_and_keep_only_problem_and_answer(tmp_path):
    rows = [{"problem": f"{i}+1=?", "answer": str(i + 1), "r1_solution": "x" * 1000} for i in range(5)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]) + "\n")   # a blank line
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[3:]))
    data = loading.load_problems(str(tmp_path))
    assert len(data) == 5 and [data[i] for i in range(5)] == [{"problem": r["problem"], "answer": r["answer"]}
                                                              for r in rows]
    assert all(isinstance(x, tuple) and len(x) == 2 for x in data.index)   # offsets held, no row


def test_resume_edges_stop_before_anything_is_written(micro_models, tmp_path):
    """--resume with nothing to resume; a checkpoint of other settings; one written by another number of ranks; a fresh
    run over an earlier run's checkpoint: each stops with a message, and the earlier run's files are untouched."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="--resume: no checkpoint in"):
        scope.train(run_args(micro_models, out, resume=True))
    scope.train(run_args(micro_models, out, steps=1))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit, match=r"other settings: --lr 0.0003 \(now 0.1\), --tau 1.0 \(now 2.0\)"):
        scope.train(run_args(micro_models, out, steps=2, resume=True, lr=0.1, tau=2.0))
    with pytest.raises(SystemExit, match="holds an earlier run's checkpoint: --resume continues it"):
        scope.train(run_args(micro_models, out, steps=2))
    state = out / "checkpoint" / "state.json"
    s = json.loads(state.read_text())
    state.write_text(json.dumps({**s, "world": 2}))
    with pytest.raises(SystemExit, match=r"written by 2 rank\(s\), this run has 1"):
        scope.train(run_args(micro_models, out, steps=2, resume=True))
    state.write_text(json.dumps(s))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    scope.train(run_args(micro_models, out, steps=2, resume=True, eval_every=1))   # resumable settings may change
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_checkpoint_that_would_run_code_is_refused(micro_models, tmp_path):
    """optimizer.pt is loaded with weights_only: a file whose unpickling runs code (os.system here) is refused with a
    message, and the code never runs. The RNG files, which now also hold NumPy's state, load the same way."""
    out = tmp_path / "run"
    scope.train(run_args(micro_models, out, steps=1))
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    good = torch.load(out / "checkpoint" / "optimizer.pt", weights_only=True)   # the real file passes
    torch.save({"state": {}, "param_groups": [], "x": Payload()}, out / "checkpoint" / "optimizer.pt")
    with pytest.raises(SystemExit, match=r"optimizer.pt: refused: it holds more than tensors.*could run code"):
        scope.train(run_args(micro_models, out, steps=2, resume=True))
    assert not marker.exists() and "state" in good
    rng = checkpoints.load_tensors(out / "checkpoint" / "rng_rank0.pt")
    assert set(rng) == {"torch", "python", "numpy"}


@pytest.mark.parametrize("fails_at", [None, "fsync", "replace"])
def test_resume_rewrites_the_metrics_atomically(tmp_path, monkeypatch, fails_at):
    """resume keeps the metric lines up to the checkpoint's step (and drops a last line a kill cut short); a kill while
    it rewrites them (here: the write to disk or the rename fails) leaves the file exactly as it was, never truncated,
    and a rewrite that completes leaves no temporary file behind."""
    path = tmp_path / "metrics.jsonl"
    before = "".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo'
    path.write_text(before)
    if fails_at:
        def killed(*a):
            raise KeyboardInterrupt("killed")
        monkeypatch.setattr(checkpoints.os, fails_at, killed)
        with pytest.raises(KeyboardInterrupt):
            checkpoints.keep_metrics(path, 3)
        assert path.read_text() == before
    else:
        checkpoints.keep_metrics(path, 3)
        assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_a_tokenizer_without_a_chat_template_is_named(micro_models, tmp_path):
    student, _ = micro_models
    tok = loading.load_tokenizer(student, "student")
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "tok")
    with pytest.raises(SystemExit, match="tokenizer .* has no chat template"):
        loading.load_tokenizer(str(tmp_path / "tok"), "student")


def test_prompts_per_step_not_divisible_by_the_ranks(micro_models, tmp_path):
    code, err = cli_run(["-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=29524", "scope.py",
                         *cli(micro_models, tmp_path, ["--prompts-per-step", "3"])], timeout=180)
    assert code != 0 and err.count("--prompts-per-step 3 is not a multiple of the 2 ranks") == 2   # both ranks
    assert "scope.py\", line" not in err                                # torchrun reports the exit; no frame of ours


def test_eval_bad_inputs_name_the_file(tmp_path):
    (tmp_path / "aime24.jsonl").write_text("")
    code, err = cli_run(["-m", "eval", "--model", "m", "--benchmarks", "aime24", "--data-dir", str(tmp_path)])
    assert code == 1 and "aime24.jsonl: expected 30 problems for aime24, found 0" in err and "Traceback" not in err
    code, err = cli_run(["-m", "eval", "--model", "m", "--benchmarks", "gsm8k"])
    assert code == 1 and "unknown benchmark 'gsm8k'" in err and "Traceback" not in err
    code, err = cli_run(["-m", "eval", "--model", str(tmp_path / "nope"), "--preset", "tiny", "--limit", "1"])
    assert code == 1 and "cannot load the model model" in err and "Traceback" not in err


def test_every_flag_takes_both_spellings():
    """--out-dir and --out_dir (and so for every field) on every entry point; --help shows the hyphen spelling only."""
    import dataclasses
    for cls in (scope.Args, eval_run.EvalArgs, reproduce.RArgs):
        parser = flags.dataclass_cli(cls, [])[0]
        for f in dataclasses.fields(cls):
            value = {bool: "true", int: "3", float: "0.5"}.get(f.type, "x")
            for flag in ("--" + f.name, "--" + f.name.replace("_", "-")):
                given = flags.dataclass_cli(cls, [flag, value])[1]
                assert given == {f.name: {bool: True, int: 3, float: 0.5}.get(f.type, "x")}, (cls.__name__, flag)
            if "_" in f.name:
                assert "--" + f.name.replace("_", "-") in parser.format_help() and "--" + f.name not in parser.format_help()


@pytest.mark.parametrize("argv,flag", [(["scope.py"], "--out-dir"), (["-m", "eval"], "--data-dir"),
                                       (["reproduce.py"], "--results-md")])
def test_help_of_every_entry_point(argv, flag):
    """--help works everywhere (reproduce.py's crashed on a % in a docstring until 2026-11-30)."""
    res = subprocess.run([sys.executable, *argv, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and flag in res.stdout, res.stderr[-2000:]


def test_a_bad_data_file_fails_in_seconds_before_the_tiny_models_are_built(tmp_path):
    """A fresh clone's `python scope.py --data empty.jsonl` (no models named, an empty model cache): the data is read
    and refused before the embedded default would spend minutes building the tiny models; nothing is built."""
    import time
    (tmp_path / "empty.jsonl").write_text("")
    t0 = time.time()
    code, err = cli_run(["scope.py", "--data", str(tmp_path / "empty.jsonl"), "--cache-dir", str(tmp_path / "cache"),
                         "--out-dir", str(tmp_path / "out")])
    assert code == 1 and "empty.jsonl" in err and "no problems" in err and time.time() - t0 < 30, err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_one_run_per_output_directory_and_kill_9_leaves_it_free(micro_models, tmp_path):
    """Real processes: while a run trains into a directory, a second run into it, and a second torchrun group of 2
    ranks, stop at once naming the first one's pid (and change nothing there); after a kill -9 of the first (no lock
    file left behind: the kernel drops the flock with the process), a rerun with --resume proceeds from its
    checkpoint."""
    import signal
    import time
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "scope.py", *cli(micro_models, out, ["--steps", "400", "--save-every",
                                                                                  "1"])],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.time() + 120
        while not (out / "checkpoint" / "state.json").exists():
            assert first.poll() is None and time.time() < deadline, "the first run did not reach a checkpoint"
            time.sleep(0.2)
        code, err = cli_run(["scope.py", *cli(micro_models, out, ["--steps", "400", "--resume"])])
        assert code == 1 and f"in use by a live run (pid {first.pid})" in err and "Traceback" not in err, err
        group = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port",
                                "29641", "scope.py", *cli(micro_models, out, ["--steps", "400", "--resume"])],
                               cwd=ROOT, capture_output=True, text=True, timeout=300,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))   # a second torchrun group: every rank stops
        assert group.returncode != 0 and f"in use by a live run (pid {first.pid})" in group.stderr, group.stderr[-3000:]
        assert "see rank 0" in group.stderr and first.poll() is None    # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert not [p for p in out.iterdir() if "lock" in p.name]
    done = json.loads((out / "checkpoint" / "state.json").read_text())["step"]
    code, err = cli_run(["scope.py", *cli(micro_models, out, ["--steps", str(done + 1), "--resume"])])
    assert code == 0, err
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == done + 1


def test_a_layout_the_memory_plan_says_will_not_fit_stops_before_loading(micro_models, tmp_path, monkeypatch):
    """On a CPU the plan compares itself with the RAM the machine has available; a layout predicted not to fit stops
    every rank with the plan's verdict before any model is loaded (--memory-check false only prints it)."""
    import loading
    import memory
    monkeypatch.setattr(memory, "available_ram_gib", lambda: 0.5)          # a machine with 0.5 GiB free
    loaded = []
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: loaded.append(a) or pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit, match="the memory plan above says this layout does not fit: nothing was loaded"):
        scope.train(run_args(micro_models, tmp_path / "run"))
    assert not loaded and not (tmp_path / "run").exists()
    monkeypatch.undo()
    scope.train(run_args(micro_models, tmp_path / "run2", steps=1, memory_check=False))   # fits here anyway


@pytest.mark.parametrize("source", ["list", "jsonl"])
def test_prompts_over_the_limit_are_left_out_at_load_and_counted(tmp_path, source):
    """drop_long_prompts keeps exactly the problems whose prompt has at most `limit` tokens (checked against every
    prompt tokenized), in their order, whether a problem is tokenized or passed on the byte bound; it says how many it
    left out, and stops when none is left."""
    import loading
    import tiny_testbed
    tok = tiny_testbed.tiny_tokenizer()
    problems = [("1+" * k)[:-1] + "=?" for k in range(1, 60, 3)]           # prompts of 10 to 124 tokens
    rows = [{"problem": p, "answer": "0"} for p in problems]
    if source == "jsonl":
        (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        rows = loading.load_problems(str(tmp_path / "p.jsonl"))
    count = lambda p: len(tok(scope.prompt_text(tok, p), add_special_tokens=False)["input_ids"])   # noqa: E731
    assert [count(p) for p in problems[:2]] == [10, 16] and count(problems[-1]) == 124
    for limit in (9, 10, 40, 75, 123, 124, 200):
        said = []
        text = lambda p: scope.prompt_text(tok, p)                             # noqa: E731
        kept = loading.drop_long_prompts(rows, tok, text, limit, said.append) if limit > 9 else None
        if limit == 9:
            with pytest.raises(SystemExit, match="every training problem's prompt is longer"):
                loading.drop_long_prompts(rows, tok, text, limit, said.append)
            continue
        want = [p for p in problems if count(p) <= limit]
        assert [kept[k]["problem"] for k in range(len(kept))] == want
        assert said == ([] if len(want) == len(problems) else
                        [f"--max-prompt-tokens {limit}: left out {len(problems) - len(want)} of {len(problems)} "
                         "training problems whose prompt is longer"])


def test_a_long_prompt_no_longer_stops_the_run(micro_models, tmp_path, capsys):
    """A training file with one prompt longer than --max-prompt-tokens trains (that problem never drawn) instead of
    stopping at the step that would draw it."""
    rows = [{"problem": f"{i}+1=?", "answer": str(i + 1)} for i in range(7)] + [{"problem": "1+" * 200 + "1=?",
                                                                                 "answer": "201"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    scope.train(run_args(micro_models, tmp_path / "out", data=str(tmp_path / "p.jsonl"), max_prompt_tokens=100,
                         steps=2, prompts_per_step=7, n_rollouts=2))
    assert "left out 1 of 8 training problems" in capsys.readouterr().out

"""The tiny testbed (harness side): task, tokenizer, and a model build that survives being killed."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import loading
import scope
import tiny_testbed
import verifier
from conftest import ROOT

# Small enough that a build takes seconds; the same code path as the real tiny models.
BUILDER = """
import sys
sys.path.insert(0, {root!r})
import tiny_testbed as tb
spec = dict(hidden=16, layers=1, heads=2, sft_lr=3e-3, sft_batch=8, warmup=2)
dirs = tb.build_tiny_models({cache!r}, tb.TinyModel(sft_steps=400, **spec), tb.TinyModel(sft_steps=40, **spec),
                            log=lambda *a: print(*a, flush=True), wait_report_s=0.2)
print("RESULT", dirs[0], flush=True)
"""


def _wait_for(predicate, what, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_killed_build_is_taken_over_and_nothing_half_built_is_used(tmp_path):
    """A builds; B waits and reports A's progress; A is SIGKILLed mid-build; B sees A is gone, says so, builds
    from scratch and finishes; the result is a complete, loadable model, and a third call reuses it at once."""
    cache = tmp_path / "cache"
    script = tmp_path / "build.py"
    script.write_text(BUILDER.format(root=str(ROOT), cache=str(cache)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a = subprocess.Popen([sys.executable, str(script)], stdout=log_a.open("w"), stderr=subprocess.STDOUT, env=env)
    _wait_for(lambda: bool(status := list(cache.glob("tiny-*.status"))) and "SFT step" in status[0].read_text(),
              "the builder's progress")
    b = subprocess.Popen([sys.executable, str(script)], stdout=log_b.open("w"), stderr=subprocess.STDOUT, env=env)
    _wait_for(lambda: f"waiting for process {a.pid}" in log_b.read_text(), "the waiter's message")
    assert "teacher: SFT step" in log_b.read_text()                 # the waiter shows how far the builder got
    a.send_signal(signal.SIGKILL)
    a.wait()
    finished = [p for p in cache.glob("tiny-*") if p.is_dir() and not p.name.endswith(".building")]
    assert finished == [], "a killed build left a directory that looks finished"
    assert b.wait(timeout=300) == 0, log_b.read_text()[-2000:]
    out = log_b.read_text()
    assert f"the build by process {a.pid}" in out and "taking over" in out
    student = out.split("RESULT ")[1].split()[0]
    assert (tmp_path / "cache" / os.path.basename(os.path.dirname(student)) / "DONE").exists()
    assert not list(cache.glob("*.building")) and not list(cache.glob("*.status"))
    tok = loading.load_tokenizer(student, "student")
    model = loading.load_model(student, "student", "float32")
    rollouts = scope.generate(model, tok, [scope.prompt_text(tok, "1+2=?")], 2, 4, seeds=[1, 2])
    assert rollouts["response_ids"].shape == (2, 4)
    t0 = time.time()
    again = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 0 and f"RESULT {student}" in again.stdout and "building" not in again.stdout
    assert "waiting" not in again.stdout and time.time() - t0 < 60


def test_tiny_task_is_deterministic_and_verifiable():
    a, b = tiny_testbed.tiny_task("train", 50, seed=3), tiny_testbed.tiny_task("train", 50, seed=3)
    assert a == b and a != tiny_testbed.tiny_task("test", 50, seed=3)
    assert {r["level"] for r in a} == set(tiny_testbed.TINY_LEVELS)
    for r in a:
        assert verifier.reward(r["solution"], r["answer"]) == 1.0
        if r["level"] != "frac":                                    # a near miss is rejected
            assert verifier.reward(r["solution"], str(int(r["answer"]) + 1)) == 0.0


def test_calibrated_rl_prompts_are_never_sft_problems_and_validation_is_apart_from_test():
    """The study's recipe: every build fine-tunes on the "sft" half of the problem space and every RL stream draws
    from the "rl" half, so no RL prompt of any (build, seed) is an SFT problem of any build; two builds' RL streams
    differ; the validation split holds no test problem; every level keeps its share."""
    sft = {b: {r["problem"] for r in tiny_testbed.sft_rows(b)} for b in (0, 1)}
    for b in (0, 1):
        for s in (0, 1):
            rl = tiny_testbed.rl_rows(b, s)
            assert len(rl) == 20000 and not {r["problem"] for r in rl} & (sft[0] | sft[1])
            assert [r["level"] for r in rl[:8]] == list(tiny_testbed.TINY_LEVELS) * 2
    assert [r["problem"] for r in tiny_testbed.rl_rows(0, 0)[:40]] != [r["problem"] for r in tiny_testbed.rl_rows(1, 0)[:40]]
    val = tiny_testbed.validation_rows(64)
    test = {r["problem"] for r in tiny_testbed.tiny_task("test", 1024, 0)}
    assert len(val) == 256 and not {r["problem"] for r in val} & test
    assert all(tiny_testbed.half(p) == "sft" for p in sft[0])


def test_a_calibrated_teacher_trains_in_stages_until_it_reaches_the_target(tmp_path):
    """The teacher trains stage after stage while its validation score is below the target, at most max_stages; the
    scores and whether the target was reached are recorded beside the models (strength.json); the student is scored
    once. A target the stages cannot reach is recorded as not reached, not hidden."""
    import json
    spec = dict(hidden=16, layers=1, heads=2, sft_lr=3e-3, sft_batch=8, warmup=2)
    scores = iter([0.5, 0.7, 0.95, 0.3])                              # teacher: 3 stages; then the student
    design = tiny_testbed.Calibrated(target=0.9, stage_steps=3, max_stages=3, val_per_level=1)
    dirs = tiny_testbed.build_tiny_models(tmp_path, tiny_testbed.TinyModel(sft_steps=4, **spec),
                                          tiny_testbed.TinyModel(sft_steps=4, **spec), log=lambda *a: None,
                                          design=design, strength=lambda m, t: {"macro": next(scores)})
    rec = json.loads((dirs[0].parent / "strength.json").read_text())
    assert [s["steps"] for s in rec["teacher"]] == [4, 7, 10] and rec["reached"] and rec["target"] == 0.9
    assert [s["macro"] for s in rec["student"]] == [0.3]
    low = tiny_testbed.Calibrated(target=0.99, stage_steps=2, max_stages=2, val_per_level=1)
    dirs = tiny_testbed.build_tiny_models(tmp_path, tiny_testbed.TinyModel(sft_steps=4, **spec),
                                          tiny_testbed.TinyModel(sft_steps=4, **spec), log=lambda *a: None,
                                          design=low, strength=lambda m, t: {"macro": 0.5})
    rec = json.loads((dirs[0].parent / "strength.json").read_text())
    assert len(rec["teacher"]) == 3 and rec["reached"] is False


def test_the_default_build_ships_with_the_repository(tmp_path, monkeypatch):
    """The embedded default's two models are in the repository (testbed/) and used when the cache key matches: an empty
    cache builds nothing, and they are RESULTS.md's models (the student's sha256 there). Another seed is still built."""
    import hashlib

    import pytest
    monkeypatch.setattr(tiny_testbed, "_build", lambda *a, **k: pytest.fail("the default build was built, not used"))
    student, teacher = tiny_testbed.build_tiny_models(tmp_path / "empty-cache")
    assert student.parent == tiny_testbed.SHIPPED / "tiny-db1d467d93e4" and (teacher / "model.safetensors").exists()
    sha = hashlib.sha256((student / "model.safetensors").read_bytes()).hexdigest()
    assert f"sha256:{sha[:16]}" in (ROOT / "RESULTS.md").read_text()
    with pytest.raises(pytest.fail.Exception, match="was built"):
        tiny_testbed.build_tiny_models(tmp_path / "empty-cache", seed=1)


def test_the_suites_micro_models_are_the_shipped_build(micro_models):
    """tests/micro/ holds the build the micro_models fixture asks for (its cache key), so the suite copies it instead of
    spending a minute building: a change to MICRO_TEACHER or MICRO_STUDENT without a new tests/micro/ build fails here
    (the suite would still pass, a minute slower). Refresh: delete tests/micro/tiny-*, run this test with
    SCOPE_TEST_CACHE=DIR (it builds them, then fails), copy DIR/tiny-<key>/ (student/, teacher/, DONE) into
    tests/micro/."""
    from conftest import MICRO_SHIPPED
    student, teacher = (Path(p) for p in micro_models)
    shipped = MICRO_SHIPPED / student.parent.name
    assert (shipped / "DONE").exists(), f"tests/micro/ has no {student.parent.name}: the micro models changed"
    for role, built in (("student", student), ("teacher", teacher)):
        assert (shipped / role / "model.safetensors").read_bytes() == (built / "model.safetensors").read_bytes()


def test_a_fresh_clone_trains_its_first_step_within_a_minute(tmp_path):
    """`python scope.py --steps 1` with an empty cache (as on a fresh clone): the shipped models load, one step of the
    default trains and the evaluation at the end runs, in under a minute of wall time."""
    t0 = time.time()
    res = subprocess.run([sys.executable, str(ROOT / "scope.py"), "--steps", "1", "--out-dir", str(tmp_path / "run"),
                          "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    wall = time.time() - t0
    assert res.returncode == 0, res.stderr[-2000:]
    assert "building tiny" not in res.stderr and (tmp_path / "run" / "checkpoint").exists()
    assert wall < 60, wall

"""The embedded default and the training loop: tiny task/tokenizer/models, generation, every method end to end,
torchrun equivalence, and exact resume after SIGKILL. Uses small models built by the code itself."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import batching
import loading
import logprobs
import ranks
import scope
import tiny_testbed
from conftest import (
    MICRO_STUDENT,  # noqa: E402  (the micro_models fixture lives in conftest)
    ROOT,
)


def run_args(micro_models, out_dir, **kw):
    student, teacher = micro_models
    base = dict(student=student, teacher=teacher, out_dir=str(out_dir), steps=2, prompts_per_step=4, n_rollouts=4,
                micro_batch_tokens=400, max_new_tokens=48, eval_every=0, save_every=0)
    return scope.Args(**{**base, **kw})


def read_metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def params(model_dir):
    from safetensors.torch import load_file
    return load_file(str(model_dir / "checkpoint" / "model.safetensors"))


def cli(micro_models, out_dir, extra=()):
    student, teacher = micro_models
    return ["--student", student, "--teacher", teacher, "--out_dir", str(out_dir), "--prompts_per_step", "4",
            "--n_rollouts", "4", "--micro_batch_tokens", "200", "--max_new_tokens", "48", "--eval_every", "0",
            *extra]


# ---------------------------------------------------------------------------- task, tokenizer, generation
def test_tokenizer_round_trip(tmp_path):
    tok = tiny_testbed.tiny_tokenizer()
    # beside a Qwen2 config, as in a model dir
    tiny_testbed.tiny_model_config(MICRO_STUDENT, tok).save_pretrained(tmp_path)
    text = scope.prompt_text(tok, "1+2=?") + "1+2=3 \\boxed{3}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    tok.save_pretrained(tmp_path)
    again = loading.load_tokenizer(str(tmp_path), "student")
    assert again(text, add_special_tokens=False)["input_ids"] == ids
    assert again.pad_token_id != again.eos_token_id and again.chat_template


def test_generation_masks_truncation_and_seeds(micro_models):
    from transformers import AutoModelForCausalLM
    student, _ = micro_models
    tok = loading.load_tokenizer(student, "student")
    model = AutoModelForCausalLM.from_pretrained(student).eval()
    prompts = [scope.prompt_text(tok, "1+2=?"), scope.prompt_text(tok, "3+4-5+6=?")]
    seeds = scope.row_seeds(0, 1, range(6))
    b = scope.generate(model, tok, prompts, 3, 40, 1.0, seeds=seeds)
    assert b["prompt_ids"].shape[0] == 6 and (b["prompt_ids"][:, -1] != tok.pad_token_id).all()   # left padding
    for i in range(6):
        m = b["response_mask"][i]
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()                     # contiguous from the start
        if not b["truncated"][i]:
            assert b["response_ids"][i, n - 1] == tok.eos_token_id  # ends with (and includes) eos
    # the same seeds give the same rollout whatever else is in the batch
    alone = scope.generate(model, tok, prompts[1:], 3, 40, 1.0, seeds=seeds[3:])
    w = alone["response_ids"].shape[1]
    assert torch.equal(b["response_ids"][3:, :w], alone["response_ids"])
    # a tight length limit truncates, and truncated rollouts score 0
    short = scope.generate(model, tok, prompts, 1, 3, 1.0, seeds=seeds[:2])
    assert short["truncated"].all() and short["response_mask"].all()
    # the trainer's forward reproduces the sampler's log-probs
    lp = logprobs.sequence_logprobs(model, b)
    assert ((lp - b["logp_sampler"]).abs() * b["response_mask"]).max() < 1e-4
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    shared = logprobs.shared_prompt_logprobs(model, b, groups)         # one prompt pass per group: the same values
    assert ((lp - shared).abs() * b["response_mask"]).max() < 1e-5


def test_teacher_failure_raises_never_a_number(micro_models):
    from transformers import AutoModelForCausalLM
    student, teacher = micro_models
    tok = loading.load_tokenizer(student, "student")
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    b = scope.generate(model, tok, [scope.prompt_text(tok, "1+1=?")], 2, 8, 1.0, seeds=[1, 2])
    with torch.no_grad():
        model.model.embed_tokens.weight[:] = float("nan")           # a broken teacher
    with pytest.raises(RuntimeError, match="teacher"):
        scope.score_logprobs(model, b, torch.tensor([0, 0]), 1000)


def test_student_and_teacher_must_share_a_tokenizer(micro_models, tmp_path):
    student, teacher = micro_models
    import shutil
    other = tmp_path / "teacher"
    shutil.copytree(teacher, other)
    cfg = json.loads((other / "tokenizer.json").read_text())
    vocab = cfg["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (other / "tokenizer.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit, match="tokenizer"):
        scope.train(run_args(micro_models, tmp_path / "run", teacher=str(other)))


def test_paper_preset_fails_clearly_offline(tmp_path):
    args = scope.parse_args(["--preset", "paper", "--out_dir", str(tmp_path)])
    assert args.lr == 5e-5 and args.temperature == 0.6 and args.n_rollouts == 8 and args.prompts_per_step == 256
    env = dict(os.environ, HF_HUB_OFFLINE="1")                      # the hub is unreachable
    cmd = [sys.executable, str(ROOT / "scope.py"), "--preset", "paper", "--out_dir", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode != 0                                      # the data first: it is the cheaper check
    assert "cannot load training data 'zwhe99/DeepMath-103K'" in res.stderr and "Traceback" not in res.stderr
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"problem": "1+1=?", "answer": "2"}) + "\n")
    res = subprocess.run(cmd + ["--data", str(data)], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode != 0
    assert "cannot load the student model 'deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B'" in res.stderr
    assert "local path" in res.stderr and "Traceback" not in res.stderr


def test_help_comes_from_the_dataclass():
    out = subprocess.run([sys.executable, str(ROOT / "scope.py"), "--help"], capture_output=True, text=True, check=True)
    assert "SCOPE weight temperature (eq. 4-5)" in out.stdout and "--micro-batch-tokens" in out.stdout
    assert "--micro_batch_tokens" not in out.stdout                     # one spelling shown; both accepted


# ---------------------------------------------------------------------------- the loop, every method
@pytest.mark.parametrize("method", ["scope", "opd", "grpo", "kd", "psr"])
def test_each_method_runs_and_logs_finite_metrics(micro_models, tmp_path, method, capsys):
    scope.train(run_args(micro_models, tmp_path, method=method, eval_every=2, eval_problems=8, eval_k=2))
    assert "memory plan per rank, 1 ranks (estimate)" in capsys.readouterr().out      # printed before step 1
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float)), r
        for key in ("loss", "train/reward_mean", "rollout/truncated_frac", "time/generate", "time/update",
                    "perf/tokens_per_s"):
            assert key in r
    if method == "scope":
        assert {"loss/mle", "loss/opd", "train/w_stu_max", "train/w_tea_entropy", "kl/teacher_k1"} <= set(recs[0])
        assert recs[0]["rollout/sampler_gap"] < 1e-4
    assert "eval/all/avg@2" in recs[-1] and "eval/all/pass@2" in recs[-1]
    assert (tmp_path / "checkpoint" / "model.safetensors").exists()
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2 and state["config"]["method"] == method


def test_scope_raises_training_reward(micro_models, tmp_path):
    """On a fixed seed, a short SCOPE run raises the student's training reward. The run trains on 8 fixed problems,
    so every step sees the same prompts and the reward mean moves only with the student."""
    data = tmp_path / "fixed8.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tiny_testbed.tiny_task("train", 8, seed=5)))
    scope.train(run_args(micro_models, tmp_path, data=str(data), steps=16, prompts_per_step=8, n_rollouts=8,
                         micro_batch_tokens=2000, lr=3e-4))
    rewards = [r["train/reward_mean"] for r in read_metrics(tmp_path)]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    print(f"SCOPE training reward on 8 fixed problems: first 3 steps {first:.3f}, last 3 steps {last:.3f}")
    assert last > first + 0.1, rewards


# ---------------------------------------------------------------------------- torchrun equivalence
def one_and_two_ranks(micro_models, tmp_path, args, port):
    """The same run in one process and under torchrun with 2 ranks. -> (its out dir, the 2-rank out dir)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, str(ROOT / "scope.py"), *cli(micro_models, one, args)], check=True, env=env,
                   capture_output=True, timeout=300)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                          str(ROOT / "scope.py"), *cli(micro_models, two, args)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return one, two


def test_torchrun_two_ranks_equals_one_process(micro_models, tmp_path):
    one, two = one_and_two_ranks(micro_models, tmp_path, ["--steps", "2", "--save_every", "0"], 29517)
    a, b = params(one), params(two)
    for r1, r2 in zip(read_metrics(one), read_metrics(two)):          # logged losses are global sums too
        assert math.isclose(r1["loss"], r2["loss"], rel_tol=1e-5, abs_tol=1e-6)
        assert r1["train/reward_mean"] == r2["train/reward_mean"]   # the same rollouts on 1 and 2 ranks
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    assert any(not torch.equal(a[k], params_initial(micro_models)[k]) for k in a)   # training changed something


def test_the_released_recipe_under_torchrun(micro_models, tmp_path):
    """--recipe official on 2 ranks (gloo, FSDP2): the weights from the trainer's recomputed log-probs (a no-grad
    forward of the sharded student, as many on every rank), the rank split balanced by tokens (rows move between the
    ranks), verl's micro-batches: 2 steps train, with the same rollouts as one process (seeded) and finite losses."""
    one, two = one_and_two_ranks(micro_models, tmp_path,
                                 ["--recipe", "official", "--steps", "2", "--save_every", "0"], 29523)
    recs = read_metrics(two)
    assert len(recs) == 2 and all(math.isfinite(r["loss"]) and math.isfinite(r["train/grad_norm"]) for r in recs)
    assert recs[0]["train/reward_mean"] == read_metrics(one)[0]["train/reward_mean"]
    config = json.loads((two / "config.json").read_text())
    assert (config["rank_split"], config["weights_logprobs"], config["loss_agg"]) == ("balanced", "trainer",
                                                                                        "official-microbatch")


def params_initial(micro_models):
    from safetensors.torch import load_file
    return load_file(os.path.join(micro_models[0], "model.safetensors"))


def children_of(pid):
    """The pids whose parent is pid (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid):
    """pid runs: a zombie no one reaped counts as gone once its last thread has exited (until then it holds its
    files, and their locks)."""
    try:
        zombie = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        return not zombie or len(list((Path("/proc") / str(pid) / "task").iterdir())) > 1
    except OSError:
        return False


def test_ranks_stop_when_their_launcher_is_killed(micro_models, tmp_path):
    """kill -9 of torchrun alone (torch elastic starts its ranks in sessions of their own, so they are not killed with
    it): both ranks notice within a step, say which launcher went, exit, and the output directory's lock is free."""
    import fcntl
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out, err = tmp_path / "run", tmp_path / "stderr.txt"
    with err.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                 "--master_port=29531", str(ROOT / "scope.py"),
                                 *cli(micro_models, out, ["--steps", "1000", "--save_every", "0"])],
                                env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.time() + 240
        while not (out / "metrics.jsonl").exists() or len(read_metrics(out)) < 2:   # training, a step at a time
            assert proc.poll() is None and time.time() < deadline, err.read_text()[-3000:]
            time.sleep(0.1)
        rank_pids = children_of(proc.pid)
        assert len(rank_pids) == 2, rank_pids
        steps, t0 = len(read_metrics(out)), time.time()
        step_s = (t0 - out.stat().st_ctime) / steps                 # an upper bound on one step's time
    finally:
        proc.kill()                                                 # SIGKILL, the launcher only
        proc.wait()
    while any(alive(p) for p in rank_pids) and time.time() < t0 + 60:
        time.sleep(0.05)
    gone_after = time.time() - t0
    for p in filter(alive, rank_pids):                              # a failed run leaves nothing running
        os.kill(p, signal.SIGKILL)
    assert not any(alive(p) for p in rank_pids), "the ranks outlived their launcher by a minute"
    assert len(read_metrics(out)) <= steps + 1, "the ranks went on training"   # within a step
    assert gone_after < max(5.0, step_s + 2), (gone_after, step_s)
    messages = err.read_text()
    for rank in (0, 1):
        assert f"rank {rank}: its launcher (torchrun, pid {proc.pid}) is gone" in messages, messages[-3000:]
    fd = os.open(out, os.O_RDONLY)                                  # the lock is free: a new run could start
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_fsdp2_sigkill_and_resume_with_sharded_optimizer_state_is_exact(micro_models, tmp_path):
    """2 ranks, FSDP2 with bf16 compute over fp32 master weights: a run SIGKILLed (every process of it) after a
    checkpoint and resumed equals the uninterrupted run bit for bit (the AdamW state is gathered to rank 0 at save and
    re-sharded at resume; every rank's RNG state comes back)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    extra = ["--dtype", "bfloat16", "--steps", "6", "--save_every", "2"]

    def torchrun(out, more=()):
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29518",
                str(ROOT / "scope.py"), *cli(micro_models, out, [*extra, *more])]

    full, killed = tmp_path / "full", tmp_path / "killed"
    res = subprocess.run(torchrun(full), env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    proc = subprocess.Popen(torchrun(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    state = killed / "checkpoint" / "state.json"
    deadline = time.time() + 240
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)                             # torchrun and both ranks
    proc.wait()
    step = json.loads(state.read_text())["step"]
    assert step in (2, 4), "the kill came after a checkpoint and before the end"
    res = subprocess.run(torchrun(killed, ["--resume", "true"]), env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = params(full), params(killed)
    assert all(v.dtype == torch.float32 for v in a.values())        # master weights saved in fp32
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["step"] for r in read_metrics(killed)] == [1, 2, 3, 4, 5, 6]


def test_bf16_compute_keeps_fp32_master_weights(micro_models):
    """A 5e-5 AdamW step moves a weight of magnitude 1 when the student keeps fp32 master weights and computes in
    bf16 (what the loop does); the same step on bf16 parameters is lost to rounding (bf16 spacing at 1 is 2^-7)."""
    student, _ = micro_models
    moved = {}
    for master in (torch.float32, torch.bfloat16):
        model = loading.load_model(student, "student", "float32" if master == torch.float32 else "bfloat16")
        norm = model.model.norm.weight
        with torch.no_grad():
            norm.fill_(1.0)                                         # a weight of magnitude 1
        opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
        ids = torch.randint(3, 90, (2, 12))
        with torch.autocast("cpu", torch.bfloat16):
            lp = logprobs.model_logprobs(model, ids[:, 1:], input_ids=ids).logits
        (-lp.sum()).backward()
        opt.step()
        moved[master] = (norm.detach().float() - 1).abs().max().item()
    assert 2e-5 < moved[torch.float32] < 1e-4                        # the intended ~lr-sized step
    assert moved[torch.bfloat16] == 0.0


# ---------------------------------------------------------------------------- resume after SIGKILL
@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_resume_after_sigkill_matches_uninterrupted_run(micro_models, tmp_path, engine):
    """SIGKILL after the first checkpoint, then --resume: the run ends where the uninterrupted one does, bit for bit.
    With the vLLM engine (the real one, vLLM's CPU build) too: it is built after the RNG state was restored (building
    reseeds the global RNGs; vllm_engine puts them back) and takes its weights from the checkpoint."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    extra = ["--steps", "4", "--save_every", "2", "--rollout_engine", engine]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, str(ROOT / "scope.py"), *cli(micro_models, full, extra)], check=True,
                   capture_output=True, timeout=300, env=env)
    proc = subprocess.Popen([sys.executable, str(ROOT / "scope.py"), *cli(micro_models, killed, extra)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    state = killed / "checkpoint" / "state.json"
    deadline = time.time() + 240
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads(state.read_text())["step"] == 2, "the kill came after the first checkpoint"
    subprocess.run([sys.executable, str(ROOT / "scope.py"), *cli(micro_models, killed, [*extra, "--resume", "true"])],
                   check=True, capture_output=True, timeout=300, env=env)
    a, b = params(full), params(killed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["step"] for r in read_metrics(killed)] == [1, 2, 3, 4]
    assert [r["rollout/sampler_gap"] for r in read_metrics(killed)] == [r["rollout/sampler_gap"] for r in read_metrics(full)]


# ---------------------------------------------------------------------------- token budgets, collectives
def one_process():
    """The loop's runtime namespace for one CPU process, and an optimizer that does nothing (gradients stay)."""
    import contextlib
    import types
    rt = types.SimpleNamespace(rank=0, world=1, device=torch.device("cpu"), fsdp=False, amp=contextlib.nullcontext)
    return rt, types.SimpleNamespace(zero_grad=lambda set_to_none: None, step=lambda: None)


def one_batch(micro_models, args):
    """One step's verified rollouts of 4 prompts x 4 from the micro student, with both SCOPE paths present, and the
    teacher's log-probs. -> (rt, noop optimizer, teacher, batch, teacher log-probs)."""
    from transformers import AutoModelForCausalLM
    student_dir, teacher_dir = micro_models
    rt, noop = one_process()
    tok = loading.load_tokenizer(student_dir, "student")
    teacher = loading.load_model(teacher_dir, "teacher", "float32")
    rows = tiny_testbed.tiny_task("train", 64, seed=0)
    idx, my = loading.step_prompts(0, len(rows), 4, 0), [0, 1, 2, 3]
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    batch = scope.sample_rollouts(args, rt, 0, student, teacher, tok, rows, idx, my, {})
    batch["rewards"] = scope.verify_rollouts(tok, batch, [rows[idx[j]]["answer"] for j in my], 4, rt.device)
    batch["groups"] = torch.tensor(my).repeat_interleave(4)
    assert 0 < batch["rewards"].sum() < 16                           # both paths have rollouts
    return rt, noop, teacher, batch, scope.score_logprobs(teacher, batch, batch["groups"], 100000)


def update(args, rt, model, opt, batch, logp_teacher=None, logp_ref=None):
    """scope.update_student on a copy of the batch with the teacher's (and reference's) log-probs in it, as the loop
    hands it over. -> the update's metrics."""
    scored = {"logp_teacher": logp_teacher, "logp_ref": logp_ref}
    return scope.update_student(args, rt, model, opt, {**batch, **{k: v for k, v in scored.items() if v is not None}})[0]


@pytest.mark.parametrize("method", ["scope", "opd", "grpo"])
def test_token_budget_split_inside_groups_leaves_the_gradient_unchanged(micro_models, method):
    """The loop's update phase with the whole batch in one micro-batch and with micro-batches so small that they cut
    prompt groups apart give the same gradient and loss: the weights are computed once for the batch and every
    normaliser is global (batch_counts with group_size)."""
    from transformers import AutoModelForCausalLM
    student_dir, teacher_dir = micro_models
    args = run_args(micro_models, "unused", method=method, grad_clip=1e9, prompts_per_step=4, n_rollouts=4)
    rt, noop, teacher, batch, lp_t = one_batch(micro_models, args)
    small = scope.score_logprobs(teacher, batch, batch["groups"], 60)   # teacher micro-batches cut groups too
    assert ((lp_t - small).abs() * batch["response_mask"]).max() < 1e-5
    grads, losses = [], []
    for budget in (100000, 150):
        model = AutoModelForCausalLM.from_pretrained(student_dir).eval()
        rec = update(dataclasses.replace(args, micro_batch_tokens=budget), rt, model, noop, batch, lp_t,
                     lp_t if method == "grpo" else None)
        grads.append([p.grad.clone() for p in model.parameters()])
        losses.append(rec["loss"])
    cut = batching.micro_batches(batch, 150)
    assert len(cut) > 4 and any(p.start % 4 or p.stop % 4 for p in cut)          # groups of 4 rows are cut
    assert math.isclose(losses[0], losses[1], rel_tol=1e-5, abs_tol=1e-6)
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= 1e-5 * (1 + a.abs().max())


def test_a_non_finite_sampler_logprob_stops_every_method_that_reads_it(micro_models):
    """The sampler's log-probs feed SCOPE's weights, every method's sampler gap and the importance ratio: a NaN on a
    response token stops the update with a message naming them (OPD and GRPO read them only there)."""
    from transformers import AutoModelForCausalLM
    student_dir, _ = micro_models
    for method in ("scope", "opd", "psr", "grpo"):
        args = run_args(micro_models, "unused", method=method, prompts_per_step=4, n_rollouts=4)
        rt, noop, teacher, batch, lp_t = one_batch(micro_models, args)
        batch["logp_sampler"][3, 0] = float("nan")
        model = AutoModelForCausalLM.from_pretrained(student_dir).eval()
        with pytest.raises(ValueError, match="logp_sampler contains NaN or inf"):
            update(args, rt, model, noop, batch, lp_t, lp_t)


def test_path_gradient_norms_split_the_scope_gradient(micro_models):
    """--path_grad_norms: train/grad_norm_mle is the norm of the gradient of the MLE path alone (checked against a
    separate update whose OPD path is zero because the teacher's log-probs are the student's own: sg(s - T) = 0), and
    train/grad_norm_opd the norm of the rest; micro-batches cut the groups apart, as in the loop."""
    from transformers import AutoModelForCausalLM
    student_dir, _ = micro_models
    args = run_args(micro_models, "unused", method="scope", grad_clip=1e9, micro_batch_tokens=150)
    rt, noop, _, batch, lp_t = one_batch(micro_models, args)
    grads = {}
    for name, teacher_lp, flag in (("both", lp_t, True), ("mle", batch["logp_sampler"], False)):
        model = AutoModelForCausalLM.from_pretrained(student_dir).eval()
        rec = update(dataclasses.replace(args, path_grad_norms=flag), rt, model, noop, batch, teacher_lp)
        grads[name] = [p.grad.clone() for p in model.parameters()]
        grads[name + "_rec"] = rec
    mle = torch.stack([g.norm() for g in grads["mle"]]).norm()
    opd = torch.stack([(a - b).norm() for a, b in zip(grads["both"], grads["mle"])]).norm()
    rec = grads["both_rec"]
    assert math.isclose(rec["train/grad_norm_mle"], float(mle), rel_tol=1e-3)
    assert math.isclose(rec["train/grad_norm_opd"], float(opd), rel_tol=1e-3) and opd > 0.1 * mle
    assert rec["train/grad_clipped"] == 0.0 and "train/grad_norm_mle" not in grads["mle_rec"]


def test_micro_batches_respect_the_budget_and_a_requested_count():
    lengths = torch.tensor([5, 9, 3, 30, 4, 4, 4, 4])
    batch = {"prompt_mask": torch.ones(8, 2), "response_mask": (torch.arange(30)[None] < lengths[:, None]).long()}
    parts = batching.micro_batches(batch, 40)
    assert [p.start for p in parts][0] == 0 and parts[-1].stop == 8
    assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))               # consecutive, covering
    for p in parts:
        rows = p.stop - p.start
        longest = int((lengths[p] + 2).max())
        assert rows * longest <= 40 or rows == 1                                  # a row over budget goes alone
    more = batching.micro_batches(batch, 40, count=len(parts) + 2)
    assert len(more) == len(parts) + 2 and more[-1].stop == 8
    with pytest.raises(ValueError, match="micro-batches"):
        batching.micro_batches(batch, 40, count=9)


def test_every_collective_goes_through_the_device_helper():
    """Contract: in scope.py, the modules beside it and reproduce.py, every torch.distributed collective on data is
    inside ranks.py's all_reduce (and barrier, which takes no tensor), or its all_gather_objects (CPU objects, the
    released recipe's rank split). This proves the routing; that all_reduce puts its tensor on the loop's device is the
    next test. Neither proves NCCL itself runs: no GPU here."""
    import ast
    collectives = {"all_reduce", "broadcast", "all_gather", "all_gather_object", "reduce_scatter", "gather",
                   "scatter", "reduce", "broadcast_object_list", "all_to_all", "send", "recv"}
    for path in sorted(ROOT.glob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef):
                continue
            for node in ast.walk(fn):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in collectives and isinstance(node.func.value, ast.Name)
                        and node.func.value.id == "dist"):
                    assert path.name == "ranks.py" and fn.name in ("all_reduce", "all_gather_objects"), \
                        f"{path.name}:{node.lineno} {fn.name}"


def test_all_reduce_helper_puts_the_tensor_on_the_loop_device(monkeypatch):
    """With a fake 2-rank process group, the helper hands dist.all_reduce a tensor on the device it was given
    (meta stands for cuda here), never a CPU tensor; sum and max are the ops asked for."""
    import torch.distributed as dist

    class Seen(Exception):
        pass

    def fake_all_reduce(t, op=None):
        raise Seen(t.device, op)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    for op, want in (("sum", dist.ReduceOp.SUM), ("max", dist.ReduceOp.MAX)):
        with pytest.raises(Seen) as e:
            ranks.all_reduce([1.0, 2.0], torch.device("meta"), op)
        assert e.value.args == (torch.device("meta"), want)


def test_every_entry_point_takes_a_timeout_for_its_process_group(monkeypatch):
    """--dist-timeout (default 1 h) reaches init_process_group for NCCL and gloo alike: NCCL's own default (10 min)
    is shorter than the spread of rollout time between ranks at the paper's lengths."""
    import datetime

    import torch.distributed as dist

    import ranks
    import reproduce
    from eval import run as eval_run
    seen = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **k: seen.append((backend, k["timeout"])))
    ranks.init_group(123)
    assert seen == [("gloo", datetime.timedelta(seconds=123))]
    for cls in (scope.Args, reproduce.RArgs, eval_run.EvalArgs):
        assert cls().dist_timeout == 3600.0


def test_data_is_a_jsonl_file_or_a_directory_of_them(tmp_path):
    rows = [{"problem": f"{i}+1=?", "answer": str(i + 1)} for i in range(5)]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    (tmp_path / "d" / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[2:]) + "\n")
    assert list(loading.load_problems(str(tmp_path / "d"))) == rows               # read lazily, row by row
    assert list(loading.load_problems(str(tmp_path / "d" / "a.jsonl"))) == rows[:2]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no .jsonl file in this directory"):
        loading.load_problems(str(tmp_path / "empty"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(SystemExit, match="expected a .jsonl file or a directory"):
        loading.load_problems(str(tmp_path / "x.txt"))
    with pytest.raises(SystemExit, match="no such file"):
        loading.load_problems(str(tmp_path / "missing.jsonl"))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"problem": "1+1=?"}) + "\n")
    with pytest.raises(SystemExit, match="bad.jsonl:1: field 'answer'"):
        loading.load_problems(str(tmp_path / "bad.jsonl"))


def test_rollouts_in_kv_budget_chunks_equal_one_generate_call(micro_models):
    """rollout_tokens splits a rank's prompts over several generate calls; with seeded sampling every rollout and
    its sampler log-probs are the ones a single call draws."""
    import contextlib
    import types
    student_dir, _ = micro_models
    rt = types.SimpleNamespace(rank=0, world=1, device=torch.device("cpu"), fsdp=False, amp=contextlib.nullcontext)
    tok = loading.load_tokenizer(student_dir, "student")
    model = loading.load_model(student_dir, "student", "float32")
    rows = tiny_testbed.tiny_task("train", 64, seed=0)
    idx, my = loading.step_prompts(0, len(rows), 6, 0), list(range(6))
    out = {}
    for budget in (0, 250):                                          # 250 tokens: one prompt (x4 rollouts) per call
        args = run_args(micro_models, "unused", prompts_per_step=6, rollout_tokens=budget)
        out[budget] = scope.sample_rollouts(args, rt, 0, model, None, tok, rows, idx, my, {})
    one, chunked = out[0], out[250]
    for k in ("response_ids", "response_mask", "truncated"):
        w = one[k].shape[1] if one[k].dim() > 1 else None
        assert torch.equal(one[k], chunked[k][:, :w] if w else chunked[k]), k
    m = one["response_mask"].bool()
    assert torch.allclose(one["logp_sampler"][m], chunked["logp_sampler"][:, :m.shape[1]][m], atol=1e-5)


def test_grpo_reference_is_scored_at_the_students_temperature(micro_models, tmp_path):
    """--logprob-temperature sampling scores the student at the sampling temperature; the GRPO reference (the initial
    student) is scored at the same one, so the KL to it is 0 at step 0 (it was 0.0048 per token with the reference at
    T = 1)."""
    scope.train(run_args(micro_models, tmp_path, method="grpo", steps=1, temperature=0.6,
                         logprob_temperature="sampling"))
    assert read_metrics(tmp_path)[0]["kl/ref_k3"] < 1e-6

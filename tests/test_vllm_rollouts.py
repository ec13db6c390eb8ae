"""CONTRACT TESTS of the vLLM rollout engine (scope.VLLMRollouts) against tests/vllm_standin.py, a stand-in that
implements exactly the vLLM API surface the engine calls, with generation delegated to the tiny HF model. They prove
the engine's calls, its sleep/wake/sync order and its bookkeeping; they do not prove vLLM's own behaviour (names:
bench/vllm_api_check.py; behaviour: bench/gpu_check.py on a GPU)."""

import dataclasses

import pytest
import torch

import scope
import tiny_testbed
import vllm_standin
from test_train import read_metrics, run_args


def snapshot_updates(monkeypatch):
    """The student's weights as each update starts, i.e. the weights the step's rollouts must come from."""
    seen, real = [], scope.update_student

    def update(args, rt, student, *rest):
        seen.append({k: v.detach().clone() for k, v in student.state_dict().items()})
        return real(args, rt, student, *rest)

    monkeypatch.setattr(scope, "update_student", update)
    return seen


@pytest.mark.parametrize("push", [True, False])
def test_rollouts_come_from_the_trainers_current_weights(micro_models, tmp_path, monkeypatch, push):
    """With the push, every step's rollouts come from the trainer's weights of that step (in bf16); a stand-in whose
    push is skipped after the engine is built generates from stale weights from step 2 on, and the check sees it."""
    vllm_standin.install(monkeypatch)
    if not push:
        monkeypatch.setattr(scope.VLLMRollouts, "push_weights", lambda self, student: self.llm.wake_up())
    seen = snapshot_updates(monkeypatch)
    args = run_args(micro_models, tmp_path, rollout_engine="vllm", steps=3, lr=3e-3, max_sampler_gap=0)
    scope.train(args)
    engine = vllm_standin.INSTANCES[-1]
    assert len(engine.generated_with) == len(seen) == 3
    match = [all(torch.equal(g[k], w[k].to(torch.bfloat16)) for k in g) for g, w in zip(engine.generated_with, seen)]
    assert match == ([True] * 3 if push else [True, False, False])
    assert engine.asleep == {"weights", "kv_cache"}                       # asleep while the student trains
    if push:
        assert engine.prefix_resets == 3
        gaps = [r["rollout/sampler_gap"] for r in read_metrics(tmp_path)]
        assert all(0 <= g < 0.05 for g in gaps), gaps                     # bf16 engine vs fp32 trainer


def test_prompts_are_token_ids_without_a_second_bos(micro_models, tmp_path, monkeypatch):
    vllm_standin.install(monkeypatch)
    args = run_args(micro_models, tmp_path, rollout_engine="vllm", steps=1)
    scope.train(args)
    tok = scope.load_model(args.student, "student")
    rows = tiny_testbed.tiny_task("train", 20000, args.seed)                # the embedded default's training rows
    idx = scope.step_prompts(0, len(rows), args.prompts_per_step, args.seed)
    want = [tok(scope.prompt_text(tok, rows[i]["problem"]), add_special_tokens=False)["input_ids"] for i in idx]
    assert vllm_standin.INSTANCES[-1].prompts == want


def test_batch_layout_matches_the_hf_engine(micro_models, monkeypatch):
    """The engine returns the `generate` contract: prompt-major rows, left-padded prompts, responses up to and
    including eos, truncation from finish_reason, the sampled tokens' log-probs; seeded rollouts are repeatable."""
    vllm_standin.install(monkeypatch)
    student, _ = micro_models
    tok = scope.load_model(student, "student")
    model = scope.load_model(student, "student", "float32")
    args = scope.Args(student=student, rollout_engine="vllm", max_new_tokens=12)
    engine = scope.VLLMRollouts(args, student, rank=0)
    prompts = [scope.prompt_text(tok, p) for p in ("12+30=", "1/2+1/3=")]
    b = engine.generate(model, tok, prompts, 3, [5, 9], torch.device("cpu"))
    assert b["prompt_ids"].shape[0] == b["response_ids"].shape[0] == 6
    assert set(b) == {"prompt_ids", "prompt_mask", "response_ids", "response_mask", "truncated", "logp_sampler"}
    for i in range(6):
        n_resp = int(b["response_mask"][i].sum())
        ids = b["response_ids"][i, :n_resp].tolist()
        assert b["truncated"][i] == (tok.eos_token_id not in ids)
        assert not b["truncated"][i] or n_resp == 12
        assert (b["logp_sampler"][i, :n_resp] < 0).all() and (b["logp_sampler"][i, n_resp:] == 0).all()
        assert (b["prompt_mask"][i] == (torch.arange(b["prompt_ids"].shape[1]) >= b["prompt_ids"].shape[1] -
                                        b["prompt_mask"][i].sum())).all()   # left padding
    again = engine.generate(model, tok, prompts, 3, [5, 9], torch.device("cpu"))
    assert torch.equal(again["response_ids"], b["response_ids"])


def test_sampler_gap_over_the_threshold_stops_the_run(micro_models, tmp_path, monkeypatch):
    vllm_standin.install(monkeypatch)
    with pytest.raises(RuntimeError, match="rollout/sampler_gap .* > --max_sampler_gap 1e-09.*no update was made"):
        scope.train(run_args(micro_models, tmp_path, rollout_engine="vllm", steps=1, max_sampler_gap=1e-9))


def test_missing_vllm_is_a_clear_error(micro_models, tmp_path, no_vllm):
    with pytest.raises(SystemExit, match="--rollout_engine vllm needs vllm"):
        scope.train(run_args(micro_models, tmp_path, rollout_engine="vllm", steps=1))


def test_paper_preset_uses_the_vllm_engine_and_plans_for_it():
    from transformers import Qwen2Config
    args = scope.resolve({"preset": "paper"})
    assert args.rollout_engine == "vllm" and scope.resolve({}).rollout_engine == "hf"
    cfg = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    text, _ = scope.memory_plan(args, cfg, cfg, 8, gpu_gib=80.0)
    assert "rollouts: vLLM engine awake (vllm_gpu_memory x GPU)" in text and "24.0 GiB" in text
    assert "this GPU has 80 GiB: fits" in text                        # the verdict, when the GPU's size is known
    big = dataclasses.replace(args, micro_batch_tokens=10**9)          # activations of 1e9 tokens cannot fit 80 GiB
    assert "LIKELY OUT OF MEMORY" in scope.memory_plan(big, cfg, cfg, 8, gpu_gib=80.0)[0]
    unknown = scope.memory_plan(args, cfg, cfg, 8)[0]                  # no GPU: 80 GiB assumed for the engine's share
    assert "this GPU" not in unknown and "24.0 GiB" in unknown
    with pytest.raises(ValueError, match="rollout_engine"):
        scope.resolve({"rollout_engine": "sglang"})

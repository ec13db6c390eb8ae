"""examples/: SCOPE inside other trainers. trl_scope.py (TRL's GRPO trainer; trl in CI from requirements-examples.txt):
on a batch TRL produced, the example's loss and gradient equal those of scope.py's own loop functions (verify_rollouts,
scope_weights, update_student) given the same rollouts and teacher log-probs; a few training steps change the weights.
verl_scope.py: the advantages and the policy loss it registers in verl give scope_loss's loss and gradient, here without
verl (verl 0.9.1's own code runs in tests/test_verl.py)."""

import json
import math
import sys

import torch

import batching
import loading
import scope
import tiny_testbed
from conftest import ROOT
from test_train import one_process, run_args

sys.path.insert(0, str(ROOT / "examples"))
import trl_scope  # noqa: E402  (needs trl: a missing trl fails here, it is not skipped)


def trainer_for(micro_models, tmp_path, dtype=torch.float64, **over):
    from trl import GRPOConfig
    student_dir, teacher_dir = micro_models
    tok = loading.load_tokenizer(student_dir, "student")
    student = loading.load_model(student_dir, "student", "float32").to(dtype)
    teacher = loading.load_model(teacher_dir, "teacher", "float32").to(dtype)
    rows = tiny_testbed.tiny_task("train", 64, seed=0)
    data = trl_scope.Dataset.from_dict({"prompt": [[{"role": "user", "content": r["problem"]}] for r in rows],
                                        "answer": [r["answer"] for r in rows]})
    config = GRPOConfig(output_dir=str(tmp_path / "trl"), max_steps=2, learning_rate=3e-3, lr_scheduler_type="constant",
                        per_device_train_batch_size=8, gradient_accumulation_steps=2, num_generations=4,
                        max_completion_length=32, temperature=1.0, beta=0.0, logging_steps=1, save_strategy="no",
                        report_to="none", bf16=False, **over)
    return trl_scope.SCOPETrainer(model=student, args=config, train_dataset=data, processing_class=tok,
                                  teacher=teacher), rows, tok, teacher


def test_the_examples_loss_and_gradient_equal_scope_pys_loop(micro_models, tmp_path):
    """fp64, so that agreement to 1e-6 tests the mapping, not rounding: the same rewards (scope.verify_rollouts on
    TRL's completions), the same weights and loss (scope.update_student, micro-batched and with its own fused
    log-probs, against the example's scope_loss over TRL's log-probs), the same gradient."""
    trainer, rows, tok, teacher = trainer_for(micro_models, tmp_path)
    rows = rows[:4]                                                 # one of each level: prompts of four lengths
    inputs = [{"prompt": [{"role": "user", "content": r["problem"]}], "answer": r["answer"]} for r in rows
              for _ in range(4)]                                   # groups of N, as TRL's sampler lays them out
    trainer.model.train()
    out = trainer._generate_and_score_completions(inputs)
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(model, out)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]

    # scope.py's own loop functions on the same rollouts
    mask = out["completion_mask"]
    batch = {"prompt_ids": out["prompt_ids"], "prompt_mask": out["prompt_mask"], "response_mask": mask,
             "response_ids": torch.where(mask.bool(), out["completion_ids"], tok.pad_token_id),
             "truncated": ~(out["completion_ids"] == tok.eos_token_id).any(-1)}
    assert not out["prompt_mask"].all()                              # left padding: positions from the mask
    rewards = scope.verify_rollouts(tok, batch, [r["answer"] for r in rows], 4, "cpu")
    assert torch.equal(rewards, out["scope_rewards"]) and 0 < rewards.sum() < 16   # both paths present
    groups = torch.arange(16) // 4
    teacher_scope = scope.score_logprobs(teacher, batch, groups, 10**6)   # phase 3 (fp32 output)
    assert ((teacher_scope - out["logp_teacher"]).abs() * mask).max() < 1e-5
    batch.update(rewards=rewards, groups=groups, logp_sampler=out["logp_old"])     # pi_old, eq. 4
    copy = loading.load_model(micro_models[0], "student", "float32").to(torch.float64)
    args = run_args(micro_models, tmp_path, n_rollouts=4, micro_batch_tokens=150, grad_clip=1e9)
    rt, noop = one_process()
    record, _ = scope.update_student(args, rt, copy, noop, dict(batch, logp_teacher=out["logp_teacher"]))
    assert len(batching.micro_batches(batching.trim(batch), 150)) > 2         # scope.py split the batch; TRL did not
    assert math.isclose(float(loss), record["loss"], rel_tol=1e-6), (float(loss), record["loss"])
    for g, p in zip(grads, copy.parameters()):
        assert (g - p.grad).abs().max() <= 1e-6 * (1 + p.grad.abs().max()), (g - p.grad).abs().max()


def test_a_few_steps_on_the_tiny_testbed_change_the_weights(micro_models, tmp_path):
    student, teacher = micro_models
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tiny_testbed.tiny_task("train", 64, seed=0)))
    before = {k: v.clone() for k, v in loading.load_model(student, "student", "float32").state_dict().items()}
    trainer = trl_scope.main(["--student", student, "--teacher", teacher, "--data", str(data), "--steps", "2",
                              "--prompts-per-step", "4", "--n-rollouts", "4", "--micro-batches", "2",
                              "--max-new-tokens", "32", "--out-dir", str(tmp_path / "run")])
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k].float()) for k in before)
    logs = [r for r in trainer.state.log_history if "loss/opd" in r]
    assert len(logs) == 2 and all(math.isfinite(r["loss"]) for r in logs)


def test_the_verl_mapping_gives_scope_loss_and_its_gradient():
    """-A * rho, summed per sequence and averaged over sequences (verl's seq-mean-token-sum), with the advantages of
    verl_scope.scope_token_advantages, equals scope.scope_loss (agg="paper") at theta = theta_old, value and gradient.
    """
    import verl_scope
    g = torch.Generator().manual_seed(0)
    b, t, n = 12, 7, 4
    logp = (torch.randn(b, t, generator=g, dtype=torch.float64) - 2).requires_grad_()
    old, teacher = logp.detach().clone(), torch.randn(b, t, generator=g, dtype=torch.float64) - 2
    mask = (torch.rand(b, t, generator=g) > 0.3).double()
    mask[:, 0] = 1
    rewards = torch.tensor([1, 0, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1], dtype=torch.float64)   # mixed, all wrong, all right
    groups = torch.arange(b) // n
    adv = verl_scope.scope_token_advantages(old, teacher, mask, rewards, groups, n)
    loss_verl, _ = verl_scope.scope_policy_loss(old, logp, adv, mask)
    w = scope.scope_weights(old, teacher, mask, groups, rewards)
    counts = scope.batch_counts(mask, rewards, groups, group_size=n)
    loss_scope, _ = scope.scope_loss(logp, old, teacher, mask, rewards, w, group_ids=groups, counts=counts)
    assert math.isclose(float(loss_verl), float(loss_scope), rel_tol=1e-12)
    grad_verl, = torch.autograd.grad(loss_verl, logp)
    grad_scope, = torch.autograd.grad(loss_scope, logp)
    assert torch.allclose(grad_verl, grad_scope, rtol=0, atol=1e-12)

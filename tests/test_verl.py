"""examples/verl_scope.py against verl 0.9.1 itself (installed by `bash install.sh --verl` into .verl/, or the directory
SCOPE_VERL_DIR names). verl runs in a process of its own (tests/verl_inside.py), so nothing it sets up reaches the
other tests. Without verl these tests skip with the reason; CI sets SCOPE_REQUIRE_VERL=1, so a missing verl fails
there instead of skipping.

What ran: verl's policy-loss registry, its actor config, agg_loss with the global counts over simulated ranks, and its
actor's micro-batch loop (FSDPEngine.forward_backward_batch with verl's batch conversion, micro-batching and ppo_loss)
with the model forward stubbed. What did not: Ray workers, FSDP inside verl, vLLM rollouts, verl's advantage step
(the example's scope_token_advantages stands where verl's compute_advantage would be called)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import scope
from conftest import ROOT
from test_train import one_batch, run_args

VERL = Path(os.environ.get("SCOPE_VERL_DIR") or ROOT / ".verl")
MISSING = None if (VERL / "verl" / "version" / "version").exists() else (
    f"verl 0.9.1 is not installed in {VERL} (bash install.sh --verl)")
REQUIRED = bool(os.environ.get("SCOPE_REQUIRE_VERL"))
pytestmark = pytest.mark.skipif(bool(MISSING) and not REQUIRED, reason=str(MISSING))


@pytest.fixture(autouse=True)
def verl_installed():
    if MISSING:                                                     # only where SCOPE_REQUIRE_VERL is set
        pytest.fail(f"SCOPE_REQUIRE_VERL is set and {MISSING}")


def inside(part, **given):
    """tests/verl_inside.py <part> in a process with verl first on the path. -> its JSON answer."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(VERL), str(ROOT)]), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "verl_inside.py"), part, json.dumps(given)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_scope_from_verls_registry_gives_scope_loss_over_ranks_and_micro_batches():
    """get_policy_loss_fn("scope") is the example's loss; called as verl's actor calls it (FSDPActorConfig,
    loss_agg_mode, global_batch_info with dp_size, the global token count and the global batch size) on 1-3 simulated
    ranks of 1-4 micro-batches, the ranks' mean gradient and verl's loss (the sum over micro-batches, averaged over
    ranks) equal scope.scope_loss's (agg="paper") to 1e-12 in float64, with verl's rollout-correction weights as
    scope_loss's token_weights too. A loss_agg_mode other than seq-mean-token-sum is refused by name."""
    got = inside("registry", seed=0)
    assert got["registered"]
    assert {(c["dp"], c["micro"]) for c in got["cases"]} >= {(1, 1), (1, 4), (2, 3), (3, 2)}
    for c in got["cases"]:
        assert math.isclose(c["loss_verl"], c["loss_scope"], rel_tol=1e-12), c
        assert c["grad_err"] <= 1e-12 * c["grad_max"] and c["grad_max"] > 0.01, c
    assert "loss_agg_mode='token-mean'" in got["token_mean_error"]
    assert "seq-mean-token-sum" in got["token_mean_error"]


@pytest.mark.parametrize("split", [dict(dynamic=True, max_tokens=120, micro_rows=0),
                                   dict(dynamic=False, max_tokens=0, micro_rows=4)])
def test_verls_actor_update_gives_scope_pys_gradient(micro_models, tmp_path, split):
    """verl's actor micro-batch loop (FSDPEngine.forward_backward_batch: its batch conversion, the all-reduced
    token count, its micro-batches by token budget or by rows, ppo_loss, the backward), model forward stubbed to return
    the micro student's log-probs, on a batch of rollouts from the loop's sampler carrying the example's advantages,
    leaves the same parameter gradient and loss as scope.update_student on that batch (float64, theta = theta_old). The
    gradient to 1e-6 of its largest entry, not 1e-12: transformers' RMSNorm computes in float32 even in a float64
    model, so two layouts of the same forward (a padded batch with a shared prompt pass, one row at a time) differ at
    about 2e-8 (measured; scope.py's own paths with and without the shared prompt pass differ as much)."""
    from transformers import AutoModelForCausalLM
    args = run_args(micro_models, tmp_path, grad_clip=1e9, micro_batch_tokens=150, prompts_per_step=4, n_rollouts=4)
    rt, noop, teacher, batch, lp_t = one_batch(micro_models, args)
    student = AutoModelForCausalLM.from_pretrained(micro_models[0]).double().eval()
    with torch.no_grad():                                           # pi_old = the student now, in float64
        old = scope.student_logprobs(student, batch, args) * batch["response_mask"]
    teacher = teacher.double()
    lp_t = scope.score_logprobs(teacher, batch, batch["groups"], 100000).double() * batch["response_mask"]
    batch = dict(batch, logp_sampler=old, logp_teacher=lp_t)
    record, _ = scope.update_student(args, rt, student, noop, dict(batch))
    grads = [p.grad for p in student.parameters()]

    keep = ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "rewards", "groups")
    torch.save(dict({k: batch[k] for k in keep}, logp_old=old, logp_teacher=lp_t, n=4), tmp_path / "batch.pt")
    got = inside("engine", batch=str(tmp_path / "batch.pt"), student=micro_models[0], grads=str(tmp_path / "g.pt"),
                 **split)
    assert len(got["micro_batches"]) > 1 and sum(got["micro_batches"]) == 16, got   # verl split the batch
    assert math.isclose(got["loss"], record["loss"], rel_tol=1e-9), (got["loss"], record["loss"])
    for g_verl, g in zip(torch.load(tmp_path / "g.pt"), grads):
        assert g.abs().max() > 0
        assert (g_verl - g).abs().max() <= 1e-6 * g.abs().max(), (g_verl - g).abs().max()

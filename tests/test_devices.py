"""Every tensor on its inputs' device, checked on a machine without a GPU.

A tensor made without naming a device lands on torch's default device. On a GPU run that is the CPU, and the first
index_add / scatter / where that meets the CUDA inputs raises ("expected ... the same device"). Here the default
device is switched to "meta" while the inputs stay on the CPU: a tensor the project makes on the default device is
then a meta tensor that meets CPU inputs, and fails the same way, or gives a result that cannot be read. So a pass
here means no project code relied on the default device; what it does not show is anything CUDA-specific (kernels,
NCCL, memory), which bench/gpu_check.py runs on a GPU.

Library calls that make host tensors by design run before the switch, and only these: loading the models and the
tokenizer (transformers builds its modules on the default device) and AdamW's first step (torch makes its step counter
on the default device). Nothing of the project's own is exempt."""

import ast
import contextlib
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import baselines
import scope
from conftest import ROOT
from test_core import batches
from test_train import read_metrics, run_args

FACTORIES = {"zeros", "ones", "full", "arange", "tensor", "empty", "rand", "randn", "randint", "randperm", "eye",
             "linspace", "as_tensor"}


@contextlib.contextmanager
def default_device(meta):
    if not meta:
        yield
        return
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def same(a, b):
    """Equal results: tensors (on the same device, bit for bit), numbers, and containers of them."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.device == b.device and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)                               # NaN == NaN here


def on_both(fn):
    """fn() with CPU inputs, once as usual and once with "meta" as the default device. -> (plain, meta)."""
    plain = fn()
    with default_device(True):
        meta = fn()
    return plain, meta


def test_every_tensor_factory_in_the_project_names_its_device():
    """The rule, read from the source: torch.zeros/ones/full/arange/tensor/empty/rand*/randperm/... in the project's
    modules (the top level and eval/) pass device= (device="cpu" where host-side index arithmetic is meant)."""
    files = sorted(ROOT.glob("*.py")) + sorted((ROOT / "eval").glob("*.py"))
    bad = []
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                    and not any(k.arg == "device" for k in node.keywords)):
                bad.append(f"{f.name}:{node.lineno} torch.{node.func.attr}")
    assert not bad, bad


# ---------------------------------------------------------------------------- (a) the loss part and the baselines
@given(batches(), st.sampled_from(["paper", "token", "official-microbatch"]))
def test_the_loss_part_and_the_baselines_follow_their_inputs_device(batch, agg):
    b, lt, mask, g, r = batch["logp_old"].shape[0], batch["logp_teacher"], batch["mask"], batch["group_ids"], \
        batch["rewards"]
    logp = batch["logp_old"].clone().requires_grad_(True)
    counts = scope.batch_counts(mask, r, g, group_size=None)
    args = scope.Args(loss_agg=agg)

    def run():
        logp.grad = None
        w = scope.scope_weights(batch["logp_old"], lt, mask, g, r, batch["tau"])
        out = {"seq_nll": scope.seq_nll(batch["logp_old"], mask), "weights": w,
               "softmax_mean": scope.group_softmax(batch["logp_old"].sum(-1), g, "mean"),
               "counts": scope.batch_counts(mask, r, g, group_size=2)}
        loss, m = scope.scope_loss(logp, logp.detach(), lt, mask, r, w, group_ids=g, counts=counts, agg=agg)
        loss.backward()
        out.update(scope_loss=loss.detach(), scope_metrics=m, scope_grad=logp.grad.clone())
        tw, stats = scope.truncated_is_weights(logp, lt, mask, 2.0)
        out.update(is_weights=tw, is_stats=stats)
        whole = {"rewards": r, "groups": g, "logp_teacher": lt, "logp_ref": lt, "response_mask": mask}
        for name in ("opd", "psr", "grpo", "kd"):                    # each baseline's rows, then its loss
            baseline = scope.METHODS[name].baseline
            part = {**whole, **baseline.rows(args, whole)}
            out[name] = (part, *baseline.loss(logp, part, counts, args, tw))
        return {k: (tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in v) if isinstance(v, tuple)
                    else v) for k, v in out.items()}

    plain, meta = on_both(run)
    assert b and same(plain, meta), {k: (plain[k], meta[k]) for k in plain if not same(plain[k], meta[k])}


def test_the_four_functions_of_the_issue_no_longer_use_the_default_device():
    """scope_loss (its weight statistics), OPD and uniform_weights (their zero scores), grpo_advantages (its sums)
    made tensors on the default device until 2026-12-07; on "meta" they now give the CPU result."""
    g = torch.tensor([0, 0, 0, 1, 1])
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
    logp = -torch.rand(5, 3, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(5, 3)
    counts = scope.batch_counts(mask, r, g, group_size=None)
    w = scope.scope_weights(logp, logp - 1, mask, g, r)
    part = {"logp_teacher": logp - 1, "response_mask": mask, "rewards": r, "groups": g, "weights": w}
    opd = scope.METHODS["opd"].baseline.loss
    for fn in (lambda: scope.scope_loss(logp, logp, logp - 1, mask, r, w, group_ids=g, counts=counts)[0],
               lambda: opd(logp, part, counts, scope.Args(), None)[0],
               lambda: baselines.uniform_weights(g), lambda: baselines.grpo_advantages(r, g)):
        plain, meta = on_both(fn)
        assert same(plain, meta)


# ---------------------------------------------------------------------------- (b) the loop's phases, every method
def train_with_default_device(args, meta, monkeypatch):
    """scope.train with the default device on "meta" from the end of loading to the end of the run: rollouts, verify,
    weights, scoring, update_student, logging, the periodic evaluation's counting and the checkpoint all run on it.
    Before the switch: the models and tokenizer are loaded (transformers) and AdamW takes its first step on zero
    gradients (torch makes its step counter on the default device), in both runs alike."""
    load = scope.load_models

    def load_then_switch(*a, **k):
        tok, student, teacher, ref = load(*a, **k)
        adamw = torch.optim.AdamW                                      # the loop makes its AdamW next: its
        m.setattr(torch.optim, "AdamW", lambda params, **kw: first_step(adamw(params, **kw)))   # state by torch
        if meta:
            torch.set_default_device("meta")
        return tok, student, teacher, ref

    def first_step(opt):
        with torch.device("cpu"):
            for group in opt.param_groups:
                for p in group["params"]:
                    p.grad = torch.zeros_like(p)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return opt

    with monkeypatch.context() as m:                                   # undone before the next run patches it again
        m.setattr(scope, "load_models", load_then_switch)
        try:
            return scope.train(args)
        finally:
            torch.set_default_device(None)


@pytest.mark.parametrize("method", sorted(scope.METHODS))
def test_the_loop_makes_no_tensor_on_the_default_device(micro_models, tmp_path, monkeypatch, method):
    """Every method through the whole loop, once as usual and once with "meta" as the default device after loading:
    the same metrics (rewards, losses, weights' statistics, gradient norms, the periodic evaluation's Avg@k/Pass@k)
    and the same trained weights."""
    students = {}
    for meta in (False, True):
        out = tmp_path / ("meta" if meta else "plain")
        args = run_args(micro_models, out, method=method, steps=2, eval_every=2, eval_problems=4, eval_k=2,
                        grpo_kl_coef=1e-2)
        students[meta] = train_with_default_device(args, meta, monkeypatch)
        assert (out / "checkpoint").exists()
    plain, meta = (read_metrics(tmp_path / d) for d in ("plain", "meta"))
    drop = lambda r: {k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))}   # noqa: E731
    assert [drop(r) for r in plain] == [drop(r) for r in meta]
    assert "eval/all/avg@2" in plain[-1] and json.dumps(plain)
    for (k, a), (_, b) in zip(students[False].state_dict().items(), students[True].state_dict().items()):
        assert a.device.type == "cpu" and torch.equal(a, b), k

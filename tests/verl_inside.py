"""The verl side of tests/test_verl.py, run in a process of its own with verl 0.9.1 (.verl/, `bash install.sh --verl`)
first on the path: importing verl sets the logging configuration and brings its own tensordict, which the project's
other tests should not meet. Usage: python tests/verl_inside.py registry|engine '<json arguments>'; prints one JSON
line, which the test asserts on.

registry: examples/verl_scope.py's loss taken from verl's registry (get_policy_loss_fn) and called as verl's actor
  calls it (verl/workers/utils/losses.py, ppo_loss: an FSDPActorConfig, its loss_agg_mode, config.global_batch_info
  filled with dp_size, the global token count and global batch size) on each micro-batch of each simulated rank; the
  ranks' gradients averaged as FSDP averages them. Compared with scope.scope_loss (agg="paper") on the whole batch.
engine: verl's own actor update path on CPU: the padded batch converted by verl (left_right_2_no_padding), the global
  token count all-reduced over a 1-rank gloo group, micro-batches made by verl (prepare_micro_batches: a token budget
  or a fixed size), verl's ppo_loss and agg_loss, the backward, all in FSDPEngine.forward_backward_batch. Stubbed:
  the model forward (forward_step hands back the micro student's log-probs in verl's no-padding layout, one forward
  per row), the device (verl has no CPU platform: a CUDA one answering "cpu", set by set_platform), no FSDP wrapping. The gradient
  of the student's parameters is written out for the test to compare with scope.update_student's.
"""
import contextlib
import json
import sys
import tempfile
import types
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

from verl.trainer.ppo.core_algos import get_policy_loss_fn  # noqa: E402
from verl.workers.config import FSDPActorConfig  # noqa: E402

import scope  # noqa: E402
import verl_scope  # noqa: E402  (registers "scope" in verl's registry)


def actor_config(n, mini_batch, **kw):
    """The actor config a verl run with SCOPE sets (docs/trainers.md)."""
    if not kw.get("use_dynamic_bsz"):
        kw["ppo_micro_batch_size_per_gpu"] = kw.get("ppo_micro_batch_size_per_gpu") or 1
    return FSDPActorConfig(strategy="fsdp", ppo_mini_batch_size=mini_batch, rollout_n=n, ppo_epochs=1,
                           loss_agg_mode="seq-mean-token-sum", policy_loss={"loss_mode": "scope"}, **kw)


def random_batch(seed, prompts, n, t):
    """fp64 log-probs, responses of 1..t tokens (a mask that ends, as verl's does), mixed rewards."""
    g = torch.Generator().manual_seed(seed)
    b = prompts * n
    old = torch.randn(b, t, generator=g, dtype=torch.float64) - 2
    teacher = torch.randn(b, t, generator=g, dtype=torch.float64) - 2
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).long()                       # int, as verl's response_mask
    rewards = (torch.rand(b, generator=g) < 0.5).double()
    rewards[:n], rewards[n:2 * n] = 1, 0                                            # an all-correct, an all-wrong group
    tw = torch.rand(b, t, generator=g, dtype=torch.float64) * 2                      # rollout-correction weights
    return old, teacher, mask, rewards, torch.arange(b) // n, tw


def registry(args):
    fn = get_policy_loss_fn("scope")
    out = {"registered": fn is verl_scope.scope_policy_loss, "cases": []}
    prompts, n, t = 6, 4, 9
    old, teacher, mask, rewards, groups, tw = random_batch(args.get("seed", 0), prompts, n, t)
    b = prompts * n
    adv = verl_scope.scope_token_advantages(old, teacher, mask, rewards, groups, n)   # the driver: whole batch
    for dp, micro, is_weights in [(1, 1, False), (1, 4, False), (2, 3, False), (3, 2, False), (2, 3, True)]:
        logp = old.clone().requires_grad_()                                           # theta = theta_old
        losses = []
        for rank_rows in torch.arange(b).chunk(dp):                                  # verl's dispatch: contiguous
            config = actor_config(n, prompts)
            for rows in rank_rows.chunk(micro):                                      # micro-batches on the rank
                config.global_batch_info.update(dp_size=dp, batch_num_tokens=int(mask.sum()),  # as ppo_loss sets
                                                global_batch_size=b, loss_scale_factor=config.loss_scale_factor)
                loss_fn = get_policy_loss_fn(config.policy_loss.get("loss_mode", "vanilla"))
                loss, _ = loss_fn(old_log_prob=old[rows], log_prob=logp[rows], advantages=adv[rows],
                                  response_mask=mask[rows].bool(), loss_agg_mode=config.loss_agg_mode,
                                  config=config, rollout_is_weights=tw[rows] if is_weights else None)
                loss.backward()                                                      # the ranks' sum
                losses.append(float(loss))
        grad_verl = logp.grad / dp                                                   # FSDP: the ranks' mean
        logp2 = old.clone().requires_grad_()
        w = scope.scope_weights(old, teacher, mask, groups, rewards)
        counts = scope.batch_counts(mask, rewards, groups, group_size=n)
        loss_scope, _ = scope.scope_loss(logp2, old, teacher, mask, rewards, w, group_ids=groups, counts=counts,
                                         agg="paper", token_weights=tw if is_weights else None)
        loss_scope.backward()
        out["cases"].append({"dp": dp, "micro": micro, "is_weights": is_weights,
                             "loss_verl": sum(losses) / dp, "loss_scope": float(loss_scope),   # verl: AVG over dp
                             "grad_err": float((grad_verl - logp2.grad).abs().max()),
                             "grad_max": float(logp2.grad.abs().max())})
    try:
        get_policy_loss_fn("scope")(old, old, adv, mask.bool(), "token-mean", actor_config(n, prompts))
        out["token_mean_error"] = None
    except ValueError as e:
        out["token_mean_error"] = str(e)
    return out


class StubEngine:
    """The attributes FSDPEngine.forward_backward_batch and _gradient_sync_context read, and a forward_step that hands
    the loss verl's model output: log_probs, nested, position j holding log p(token j+1) as verl's LM head gives."""

    def __init__(self, model):
        self.module, self.ulysses_sequence_parallel_size, self.ulysses_device_mesh = model, 1, None
        self.engine_config = types.SimpleNamespace(use_no_sync_for_gradient_accumulation=True)
        self.micro_batch_rows = []

    def forward_step(self, micro_batch, loss_function, forward_only):
        ids = micro_batch["input_ids"]                                               # nested (b, j)
        rows = []
        for seq in ids.unbind():                                                     # one forward a row, no padding
            logits = self.module(input_ids=seq[None], use_cache=False).logits[0].double()   # (j, V)
            lp = torch.log_softmax(logits[:-1], -1).gather(-1, seq[1:, None])[:, 0]
            rows.append(torch.cat([lp, lp.new_zeros(1)]))                           # the last position: no next token
        self.micro_batch_rows.append(len(rows))
        log_probs = torch.nested.nested_tensor_from_jagged(torch.cat(rows), offsets=ids.offsets())
        loss, metrics = loss_function(model_output={"log_probs": log_probs}, data=micro_batch,
                                      dp_group=self.get_data_parallel_group())
        return loss, {"model_output": {"log_probs": log_probs.detach()}, "loss": loss.detach().item(),
                      "metrics": metrics}


def cpu_platform():
    """verl 0.9.1 has no CPU platform (with no accelerator it falls back to CUDA): its CUDA one, answering "cpu", set
    through verl's own set_platform."""
    from verl.plugin.platform.platform_cuda import PlatformCUDA

    class CPUPlatform(PlatformCUDA):
        device_name = property(lambda self: "cpu")
        device_module = property(lambda self: torch.cpu)

        def current_device(self):
            return "cpu"

        def communication_backend_name(self):
            return "gloo"
    return CPUPlatform()


def engine(args):
    from tensordict import TensorDict
    from transformers import AutoModelForCausalLM
    from verl.plugin.platform.platform_manager import set_platform
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine.fsdp import transformer_impl
    from verl.workers.utils.losses import ppo_loss
    from verl.workers.utils.padding import left_right_2_no_padding

    set_platform(cpu_platform())                                                      # stub: the device
    cls = type("CPUEngine", (StubEngine, transformer_impl.FSDPEngine), {})           # verl's methods, our forward
    with tempfile.TemporaryDirectory() as tmp:
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            b = torch.load(args["batch"])
            model = AutoModelForCausalLM.from_pretrained(args["student"]).double().train()
            n = b["n"]
            adv = verl_scope.scope_token_advantages(b["logp_old"], b["logp_teacher"], b["response_mask"], b["rewards"],
                                                    b["groups"], n)
            attention = torch.cat([b["prompt_mask"], b["response_mask"]], -1)       # verl's padded DataProto layout
            td = TensorDict({"prompts": b["prompt_ids"], "responses": b["response_ids"],
                             "input_ids": torch.cat([b["prompt_ids"], b["response_ids"]], -1),
                             "attention_mask": attention, "position_ids": (attention.cumsum(-1) - 1).clamp(min=0),
                             "response_mask": b["response_mask"], "old_log_probs": b["logp_old"],
                             "advantages": adv}, batch_size=[len(adv)])
            tu.assign_non_tensor(td, temperature=1.0)
            td = left_right_2_no_padding(td)                                          # verl's conversion
            tu.assign_non_tensor(td, global_batch_size=len(adv), use_remove_padding=True, use_fused_kernels=False,
                                 use_dynamic_bsz=args["dynamic"], max_token_len_per_gpu=args["max_tokens"],
                                 micro_batch_size_per_gpu=args["micro_rows"], calculate_entropy=False)
            config = actor_config(n, len(adv) // n, use_dynamic_bsz=args["dynamic"],
                                  ppo_max_token_len_per_gpu=args["max_tokens"],
                                  ppo_micro_batch_size_per_gpu=None if args["dynamic"] else args["micro_rows"])
            eng = cls(model)
            out = transformer_impl.FSDPEngine.forward_backward_batch(eng, td, partial(ppo_loss, config=config))
            torch.save([p.grad for p in model.parameters()], args["grads"])
            return {"loss": float(sum(out["loss"])) if isinstance(out["loss"], list) else float(out["loss"]),
                    "micro_batches": eng.micro_batch_rows}
        finally:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    part, given = sys.argv[1], json.loads(sys.argv[2])
    with contextlib.redirect_stdout(sys.stderr):                                    # verl's prints stay off stdout
        result = {"registry": registry, "engine": engine}[part](given)
    print(json.dumps(result))

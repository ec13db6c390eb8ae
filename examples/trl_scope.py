"""SCOPE inside TRL's GRPO trainer: TRL samples the groups and calls the reward function; the weights and the loss
are scope.py's (`scope.scope_weights`, `scope.scope_loss`, imported, not copied).

    python examples/trl_scope.py                        # the tiny testbed on a CPU (builds the tiny models once)
    python examples/trl_scope.py --student deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --teacher Skywork/Skywork-OR1-7B \\
        --data ../shared/benchmarks/deepmath_train_sample.jsonl --temperature 0.6 --max-new-tokens 12288 --bf16
                                                        # real models on a GPU (not run by this project: no GPU)

The same as scope.py's loop: the reward (verifier.reward: the last box; 0 when cut off), the weights (eq. 4-5, on
whole groups, from pi_old), the loss (eq. 1-3, 6, agg="paper", divided by the counts of the whole generation batch,
so the gradient summed over TRL's micro-batches is the batch's), AdamW at a constant lr, clipping at 1.0, one
optimizer step per generation batch (num_iterations=1, steps_per_generation = gradient_accumulation_steps).
Different, by TRL: rollouts come from its own generate (no per-rollout seeds, so not the rollouts scope.py draws), and
pi_old is the student's log-probs recomputed after generation (scope.py records the sampler's; no sampler gap check);
TRL shuffles a generation batch's rows before its micro-batches (harmless: weights and counts belong to the whole
batch). Replaced or switched off because they would change the method: TRL's advantages and loss, its log-probs (on
logits / temperature, with positions that count left padding: logprobs.sequence_logprobs instead), its KL to a reference
(beta=0), masking of truncated completions (they stay, with reward 0, on the OPD path), several updates per batch.
"""
import argparse
import sys
from pathlib import Path

import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import loading  # noqa: E402
import logprobs  # noqa: E402
import scope  # noqa: E402
import verifier  # noqa: E402


class SCOPETrainer(GRPOTrainer):
    """GRPOTrainer with SCOPE's loss. TRL's tensors map onto scope.py's arguments as marked `# TRL -> scope`."""

    def __init__(self, *args, teacher, tau=1.0, **kwargs):
        super().__init__(*args, reward_funcs=[self.reward], **kwargs)
        a = self.args
        if self.beta or self.num_iterations != 1 or self.mask_truncated_completions or a.steps_per_generation != \
                a.gradient_accumulation_steps:
            raise ValueError("SCOPE needs beta=0, num_iterations=1, mask_truncated_completions=False and "
                             "steps_per_generation == gradient_accumulation_steps (one update per batch)")
        self.teacher, self.tau = teacher.to(self.accelerator.device).eval(), tau

    def reward(self, prompts, completions, completion_ids, answer, **kwargs):
        """R_i in {0, 1} (scope.py's phase 2): the last box against the gold answer; 0 when no eos came (cut off)."""
        eos = self.processing_class.eos_token_id
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]   # chat prompts: messages
        return [verifier.reward(t, gold, truncated=eos not in ids)
                for t, gold, ids in zip(texts, answer, completion_ids)]

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)   # gathered: all ranks
        rank = self.accelerator.process_index
        self._rewards = rewards[rank * len(prompts):(rank + 1) * len(prompts), 0]   # this rank's rows, one function
        return rewards

    @torch.no_grad()
    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)      # TRL: N completions per prompt, rewards, advantages
        n = self.num_generations
        if len(self._rewards) % n:
            raise ValueError(f"a rank's generation batch ({len(self._rewards)} rows) must hold whole groups of {n}")
        # TRL -> scope: left-padded prompts
        batch = {"prompt_ids": out["prompt_ids"], "prompt_mask": out["prompt_mask"],
                 "response_ids": out["completion_ids"],           # TRL -> scope: completions are the responses,
                 "response_mask": out["completion_mask"]}         # right-padded, mask up to and including eos
        groups = torch.arange(len(self._rewards), device=self._rewards.device) // n   # TRL -> scope: rows come in
        logp_old = self.logprobs(self.model, out)                                     # groups of N, prompt-major
        logp_teacher = logprobs.sequence_logprobs(self.teacher, batch)[:, :logp_old.shape[1]].float()   # (B, T) T_it
        weights = scope.scope_weights(logp_old, logp_teacher, batch["response_mask"], groups, self._rewards,
                                      self.tau)                     # eq. 4-5 on whole groups, before TRL splits them
        local = scope.batch_counts(batch["response_mask"], self._rewards, groups, group_size=n)
        totals = self.accelerator.reduce(torch.tensor(list(local.values()), device=logp_old.device), "sum")
        self._counts = dict(zip(local, totals.tolist()))            # the whole batch over every rank
        out.update(scope_rewards=self._rewards, scope_weights=weights, scope_groups=groups, logp_old=logp_old,
                   logp_teacher=logp_teacher)
        return out

    @staticmethod
    def logprobs(model, inputs):
        """s_it: log-probs of the completion tokens at T = 1 by scope.py (fused, positions from the mask), rather than
        TRL's forward, which takes them on logits / temperature and positions that count left padding. (B, T)"""
        return logprobs.sequence_logprobs(model, {"prompt_ids": inputs["prompt_ids"],
                                                  "prompt_mask": inputs["prompt_mask"],
                                               "response_ids": inputs["completion_ids"],   # TRL -> scope
                                               "response_mask": inputs["completion_mask"]})

    def _compute_loss(self, model, inputs):
        loss, metrics = scope.scope_loss(self.logprobs(model, inputs), inputs["logp_old"], inputs["logp_teacher"],
                                         inputs["completion_mask"], inputs["scope_rewards"], inputs["scope_weights"],
                                         group_ids=inputs["scope_groups"], counts=self._counts)   # eq. 6, global
        for k, v in metrics.items():
            self._metrics["train"][k].append(v)
        return loss                        # TRL takes it as already scaled for gradient accumulation: summed, as here


def load_data(args):
    """(student, teacher, tokenizer, dataset with prompt (chat messages, as scope.prompt_text builds) and answer)."""
    if args.student:
        rows = list(loading.load_problems(args.data))
        student, teacher = args.student, args.teacher
    else:                                                          # the tiny testbed (harness)
        import tiny_testbed
        student, teacher = map(str, tiny_testbed.build_tiny_models(".cache/scope"))
        rows = tiny_testbed.tiny_task("train", 20000, args.seed)
    tok = loading.load_tokenizer(student, "student")
    messages = [[{"role": "user", "content": r["problem"] + (" " + args.instruction if args.instruction else "")}]
                for r in rows]
    dtype = "bfloat16" if args.bf16 else "float32"
    return (loading.load_model(student, "student", "float32"), loading.load_model(teacher, "teacher", dtype), tok,
            Dataset.from_dict({"prompt": messages, "answer": [r["answer"] for r in rows]}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", default="")
    p.add_argument("--teacher", default="")
    p.add_argument("--data", default="")
    p.add_argument("--instruction", default="")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--n-rollouts", type=int, default=8)
    p.add_argument("--micro-batches", type=int, default=4, help="TRL micro-batches (gradient accumulation) per step")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--tau", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--out-dir", default="runs/trl-scope")
    a = p.parse_args(argv)
    student, teacher, tok, data = load_data(a)
    rows = a.prompts_per_step * a.n_rollouts                        # TRL counts batches in completions
    config = GRPOConfig(output_dir=a.out_dir, max_steps=a.steps, learning_rate=a.lr, lr_scheduler_type="constant",
                        weight_decay=0.01, max_grad_norm=1.0, per_device_train_batch_size=rows // a.micro_batches,
                        gradient_accumulation_steps=a.micro_batches, num_generations=a.n_rollouts,
                        max_completion_length=a.max_new_tokens, temperature=a.temperature, beta=0.0, seed=a.seed,
                        bf16=a.bf16, logging_steps=1, save_strategy="no", report_to="none")
    trainer = SCOPETrainer(model=student, args=config, train_dataset=data, processing_class=tok, teacher=teacher,
                           tau=a.tau)
    trainer.train()
    return trainer


if __name__ == "__main__":
    main()

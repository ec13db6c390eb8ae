"""What scope.py's update and loop record about a step, and the alarms that stop one: the micro-batches' metrics
summed over ranks, the student's NLL of its own rollouts, the sampler gap (the stale-weight alarm), truncated
importance sampling's ratios, SCOPE's two paths' gradient norms, and the step's JSON record.

Engineering a reader of the method can take on trust: scope.update_student calls each in one line. It imports no
project module but ranks.py (the sums over ranks).
"""

import math

import torch

from ranks import all_reduce


class UpdateLog:
    """One update's bookkeeping for a method (scope.METHODS' entry): when the rollouts are the student's own (not KD's
    teacher samples) their sampler log-probs are read (the gap, the importance ratio) and must be finite; SCOPE's
    (no baseline) gets its path norms with --path-grad-norms."""

    def __init__(self, args, rt, student, batch, method):
        self.args, self.rt, self.logs, self.is_stats = args, rt, [], []
        self.sampler, self.nll, self.gap = method.sampler == "student", 0.0, 0.0
        self.paths = PathGradNorms(student) if args.path_grad_norms and method.baseline is None else None
        if self.sampler and not torch.isfinite(batch["logp_sampler"][batch["response_mask"].bool()]).all():
            raise ValueError("logp_sampler contains NaN or inf")

    def keep_is(self, token_weights, stats):
        """--rollout-is-cap: keep the ratios' statistics of a micro-batch for the log; -> its token weights."""
        self.is_stats.append(stats)
        return token_weights

    def add(self, metrics, logp, part):
        """A micro-batch's metrics, and its sums: the student's NLL of its own tokens, |sampler - trainer|."""
        self.logs.append(metrics)
        mask = part["response_mask"]
        self.nll += float(-(logp.detach() * mask).sum())
        if self.sampler:
            self.gap += float(((part["logp_sampler"] - logp.detach()).abs() * mask).sum())

    def before_step(self, batch):
        """After the last backward, before clipping and the optimizer step: stop when the sampler gap says the
        rollouts came from other weights (no update is made), and read the gradients' path norms."""
        if self.args.max_sampler_gap and self.sampler:
            check_sampler_gap(*all_reduce([self.gap, batch["response_mask"].sum()], self.rt.device),
                              self.args.max_sampler_gap)
        self.pre = {**(self.paths.norms() if self.paths else {}), **summed_is_stats(self.is_stats, self.rt)}

    def record(self, grad_norm):
        """The update's part of the step record; the sums log_step reads are returned beside it."""
        out = {**self.pre, **summed_logs(self.logs, self.rt), "train/grad_norm": grad_norm,
               "train/grad_clipped": float(0 < self.args.grad_clip < grad_norm)}
        return out, {"nll": self.nll, "gap": self.gap if self.sampler else math.nan}


def check_sampler_gap(gap, tokens, limit):
    """The stale-weight alarm: stop before the optimizer step when the mean |log pi_sampler - log pi_trainer| per
    sampled token (summed over ranks) exceeds limit (0: off), so no update is made from such samples."""
    if limit and gap / max(tokens, 1.0) > limit:
        raise RuntimeError(f"rollout/sampler_gap {gap / max(tokens, 1.0):.3f} nats per token > --max-sampler-gap "
                           f"{limit}: the rollouts were sampled from other weights than the trainer's (stale engine "
                           "weights after a sync?); no update was made")


class PathGradNorms:
    """--path-grad-norms: the gradient norms of SCOPE's two paths. add() takes the loss of the MLE path alone on each
    micro-batch (one more backward); norms() splits the accumulated total gradient into that and the rest (OPD)."""

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.mle = [torch.zeros_like(p) for p in self.params]

    def add(self, loss_mle):
        for acc, g in zip(self.mle, torch.autograd.grad(loss_mle, self.params, retain_graph=True, allow_unused=True)):
            acc += 0 if g is None else g

    def norms(self):                                                  # total = MLE path + OPD path, before clipping
        return {"train/grad_norm_mle": float(torch.stack([g.norm() for g in self.mle]).norm()),
                "train/grad_norm_opd": float(torch.stack([(p.grad - g).norm() for p, g in zip(self.params,
                                                                                              self.mle)]).norm())}


def summed_is_stats(stats, rt):
    """--rollout-is-cap's log: the trainer/sampler ratio's mean and max over every token of every rank, and the
    fraction of tokens capped."""
    if not stats:
        return {}
    total, capped, tokens = all_reduce([sum(s["sum"] for s in stats), sum(s["capped"] for s in stats),
                                        sum(s["tokens"] for s in stats)], rt.device)
    return {"rollout/is_ratio_mean": total / max(tokens, 1.0), "rollout/is_capped_frac": capped / max(tokens, 1.0),
            "rollout/is_ratio_max": all_reduce([max(s["max"] for s in stats)], rt.device, "max")[0]}


def summed_logs(logs, rt):
    """The micro-batches' metrics: losses summed over micro-batches and ranks (their normalisers are global, so the
    sum is the batch's loss), the rest averaged over this rank's micro-batches. "loss" is the total."""
    losses = {k: sum(m[k] for m in logs) for k in logs[0] if k.startswith("loss/")}
    record = {k: sum(m[k] for m in logs) / len(logs) for k in logs[0]}
    record.update(zip(losses, all_reduce(losses.values(), rt.device)))
    return {**record, "loss": sum(record[k] for k in losses)}


def avg_pass(hist, k):
    """Avg@k and Pass@k per level and overall from {level: [problems with c of k samples correct, c = 0..k]}: Avg@k
    the mean accuracy, Pass@k the share of problems with one correct sample or more (unbiased, from k samples)."""
    if "all" not in hist:
        hist = {**hist, "all": [sum(h[c] for h in hist.values()) for c in range(k + 1)]}
    out = {}
    for lv, h in sorted(hist.items(), key=lambda x: x[0] == "all"):
        total = max(sum(h), 1.0)
        out[f"eval/{lv}/avg@{k}"] = sum(c * h[c] for c in range(k + 1)) / (k * total)
        out[f"eval/{lv}/pass@{k}"] = sum(h[1:]) / total
    return out


def log_step(step, record, sums, batch, t, device):
    """Phase 5: the step's JSON record, with batch statistics summed over ranks (docs/training.md: logging keys).
    sums: the update's {"nll", "gap"} on this rank (UpdateLog.record)."""
    mask = batch["response_mask"]
    r_sum, rows, trunc, tok, nll, gap = all_reduce([batch["rewards"].sum(), mask.shape[0], batch["truncated"].sum(),
                                                    mask.sum(), sums["nll"], sums["gap"]], device)
    phases = ["time/generate", "time/verify", "time/score", "time/update", "end"]
    times = {k: t[nxt] - t[k] for k, nxt in zip(phases, phases[1:])}
    record = {"step": step + 1, **record, "train/reward_mean": r_sum / rows, "rollout/truncated_frac": trunc / rows,
              "rollout/mean_len": tok / rows, "rollout/nll_student": nll / max(tok, 1.0),
              "perf/tokens_per_s": tok / max(sum(times.values()), 1e-9), **times}
    return record if math.isnan(gap) else {**record, "rollout/sampler_gap": gap / max(tok, 1.0)}

"""Checkpoints and resume for scope.py's loop: one run per output directory, atomic saves, a resume that continues
the uninterrupted run bit for bit, and files that cannot run code when loaded. Engineering beside the method
(docs/training.md, "Checkpoints").
"""

import dataclasses
import fcntl
import json
import os
import random
import shutil

import numpy as np
import torch

from ranks import all_reduce, tied_names


class OutDirLock:
    """One run per output directory: rank 0 holds an flock on the directory itself for the whole run (no lock file:
    the kernel drops it when the process dies, even on kill -9, so nothing stale is ever left). A second run, or
    another torchrun group, pointed at a directory a live run holds stops at once on every rank, naming the pid that
    holds it (read from /proc/locks). A directory this run created and left empty is removed on release."""

    def __init__(self, out, rt):
        self.out, self.fd, self.created, holder = out, None, False, None
        if rt.rank == 0:
            self.created = not out.exists()
            out.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(out, os.O_RDONLY)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = lock_holder(out) or "another process"
                self.release()
        if all_reduce([holder is not None], rt.device, "max")[0]:       # every rank of this run stops
            raise SystemExit(f"{out} is in use by a live run (pid {holder}): one run per --out-dir; wait for it, or "
                             "choose another" if rt.rank == 0 else f"{out} is in use by a live run (see rank 0)")

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            if self.created and not any(self.out.iterdir()):
                self.out.rmdir()


def lock_holder(path):
    """The pid holding an flock on path, from /proc/locks (Linux), or None."""
    st = os.stat(path)
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            dev = parts[5].split(":") if len(parts) > 5 and parts[1] == "FLOCK" else []
            if len(dev) == 3 and (int(dev[0], 16), int(dev[1], 16), int(dev[2])) == (os.major(st.st_dev),
                                                                                   os.minor(st.st_dev), st.st_ino):
                return int(parts[4])
    return None


def save_checkpoint(out, step, model, tokenizer, opt, args, rt):
    """Atomic: everything goes to checkpoint.tmp, which then replaces checkpoint in one rename. Model and optimizer
    state are gathered to rank 0 (full state dicts, so the directory is a plain Hugging Face model for eval)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    barrier = dist.barrier if rt.world > 1 else (lambda: None)
    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    if rt.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    tied = tied_names(model)
    msd = {k: v for k, v in msd.items() if k not in tied}             # e.g. lm_head.weight = embed_tokens.weight
    name, keys, *rest = np.random.get_state()                         # as tensors and numbers: weights_only loads
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate(),
                "numpy": (name, torch.from_numpy(keys.astype("int64")), *rest)}, tmp / f"rng_rank{rt.rank}.pt")
    if rt.rank == 0:
        model.save_pretrained(tmp, state_dict=msd, safe_serialization=True)
        cfg = json.loads((tmp / "config.json").read_text())           # FSDP2 renames the class: FSDPQwen2ForCausalLM
        cfg["architectures"] = [a.removeprefix("FSDP") for a in cfg.get("architectures") or []]
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        tokenizer.save_pretrained(tmp)
        torch.save(osd, tmp / "optimizer.pt")
        state = {"step": step, "world": rt.world, "config": dataclasses.asdict(args)}
        (tmp / "state.json").write_text(json.dumps(state))
    barrier()
    if rt.rank == 0:
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


# Settings a resumed run may change: they do not change what the run computes.
RESUMABLE = {"resume", "steps", "out_dir", "threads", "eval_every", "eval_problems", "eval_k", "save_every",
             "cache_dir", "micro_batch_tokens", "score_tokens", "rollout_tokens", "max_sampler_gap", "vllm_gpu_memory",
             "gradient_checkpointing", "path_grad_norms", "memory_check", "recipe"}


def find_checkpoint(args, out, world):
    """The checkpoint to resume from, or None for a fresh run. Stops before anything is written on --resume with
    nothing to resume, a checkpoint of other settings or another number of ranks, or a fresh run over a checkpoint."""
    found = [d for d in (out / "checkpoint", out / "checkpoint.old") if (d / "state.json").exists()]   # .old: a crash
    if found and not args.resume:                                                                     # mid-rename
        raise SystemExit(f"{out} holds an earlier run's checkpoint: --resume continues it, another --out-dir starts "
                         "afresh (nothing was changed)")
    if not args.resume:
        return None
    if not found:
        raise SystemExit(f"--resume: no checkpoint in {out} (no checkpoint/state.json); without --resume a run starts")
    state = json.loads((found[0] / "state.json").read_text())
    if state["world"] != world:
        raise SystemExit(f"--resume: {found[0]} was written by {state['world']} rank(s), this run has {world}: resume "
                         "with as many ranks (the RNG state is per rank)")
    differ = [f"--{k.replace('_', '-')} {v!r} (now {getattr(args, k)!r})" for k, v in state["config"].items()
              if k not in RESUMABLE and hasattr(args, k) and getattr(args, k) != v]
    if differ:
        raise SystemExit(f"--resume: {found[0]} was trained with other settings: {', '.join(differ)}")
    return found[0]


def load_tensors(path):
    """torch.load that cannot run code (weights_only): a checkpoint file from elsewhere may hold anything."""
    import pickle
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise SystemExit(f"{path}: refused: it holds more than tensors, numbers and strings, and unpickling it could "
                         f"run code ({str(e).splitlines()[0]})") from None


def resume(ckpt, student, opt, rt, out):
    """Restore optimizer (re-sharded over this run's ranks) and RNG state; drop metric lines the checkpoint does not
    cover. The weights were loaded from the checkpoint directory. Returns the start step."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    once = rt.world > 1                                               # rank 0 reads the file and broadcasts it
    osd = load_tensors(ckpt / "optimizer.pt") if rt.rank == 0 or not once else {}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=once)
    set_optimizer_state_dict(student, opt, osd, options=options)
    rng = load_tensors(ckpt / f"rng_rank{rt.rank}.pt")
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "numpy" in rng:
        np.random.set_state((rng["numpy"][0], rng["numpy"][1].numpy().astype(np.uint32), *rng["numpy"][2:]))
    start = json.loads((ckpt / "state.json").read_text())["step"]
    if rt.rank == 0:
        keep_metrics(out / "metrics.jsonl", start)
    return start


def keep_metrics(path, last_step):
    """metrics.jsonl without the lines after last_step (steps the checkpoint does not cover) or a line a kill cut
    short, rewritten atomically: a temporary file, flushed to disk, then renamed over it. A kill at any moment leaves
    the old file or the new one, never a truncated one."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):          # the last append, cut short by a kill
            continue
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

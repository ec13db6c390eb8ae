"""Ranks, devices and the sharded student under scope.py's loop: one process or torchrun, the process group, the
collectives on data (all_reduce; all_gather_objects for the released recipe's rank split), FSDP2's wrap and its
gradient sync, the gradient norm.

Engineering a reader of the method can take on trust: scope.py calls each of these in one line and says why there.
It imports no project module.
"""

import contextlib
import dataclasses
import datetime
import math
import os
import random
import sys
import threading
import time
import types

import numpy as np
import torch


def setup(args):
    """Ranks, device, seeds. -> a namespace: rank, world, device, fsdp (launched by torchrun: the student is sharded),
    amp (the student's compute-dtype context), own_group (this call started the process group)."""
    import torch.distributed as dist
    launched = int(os.environ.get("RANK", -1)) != -1                 # torchrun sets RANK
    own_group = launched and not dist.is_initialized()              # a caller (reproduce.py) may hold the group
    if own_group:
        init_group(args.dist_timeout)
    rank, world = (dist.get_rank(), dist.get_world_size()) if launched else (0, 1)
    if args.prompts_per_step % world:
        raise SystemExit(f"--prompts-per-step {args.prompts_per_step} is not a multiple of the {world} ranks")
    if args.path_grad_norms and launched:
        raise SystemExit("--path-grad-norms works in one process only (FSDP2 shards the gradients it compares)")
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed + rank)
    random.seed(args.seed + rank)
    np.random.seed((args.seed + rank) % 2**32)                        # vLLM draws unseeded requests' seeds from it
    autocast = args.dtype != "float32" and not launched              # FSDP2 casts by itself (mixed precision)
    amp = (lambda: torch.autocast(device.type, getattr(torch, args.dtype))) if autocast else contextlib.nullcontext
    if rank == 0:
        print("config:\n" + "\n".join(f"  {k:22s} {v}" for k, v in dataclasses.asdict(args).items()), flush=True)
    return types.SimpleNamespace(rank=rank, world=world, device=device, fsdp=launched, amp=amp, own_group=own_group)


_WATCHED = []


def stop_with_launcher(poll_s=0.5):
    """torchrun starts each rank in a session of its own, so a launcher killed alone (kill -9) would leave its ranks
    training to the end. A daemon thread checks every poll_s that this rank's parent is still the launcher; when it is
    not, the rank says so and exits at once (code 1) from that thread, even while the main thread waits in a
    collective. A rank whose peer stopped first fails in a collective before its own check: an error raised once the
    launcher is gone gets the same message and exit, not the collective's traceback. Nothing is left behind: the
    output directory's flock dies with the process. Once per process, after the process group exists (torch wraps
    sys.excepthook when it makes the group)."""
    if _WATCHED:
        return
    launcher, rank = os.getppid(), os.environ.get("RANK", "?")

    def stop():
        print(f"rank {rank}: its launcher (torchrun, pid {launcher}) is gone; this rank stops (exit 1); start the "
              "run again with --resume to go on from the last checkpoint.", file=sys.stderr, flush=True)
        os._exit(1)

    def watch():
        while os.getppid() == launcher:
            time.sleep(poll_s)
        stop()

    def on_error(*exc, previous=sys.excepthook):
        if os.getppid() != launcher:                                # the error follows from the launcher's death
            stop()
        previous(*exc)
    sys.excepthook = on_error
    threading.Thread(target=watch, name="stop-with-launcher", daemon=True).start()
    _WATCHED.append(launcher)


def init_group(timeout_s=3600.0):
    """The torchrun process group: NCCL on GPUs, gloo on CPUs, with a timeout for every collective. The default 10
    minutes of NCCL's watchdog is shorter than the spread of rollout time between ranks at the paper's 12,288 tokens
    (a rank that is still sampling would be taken for a dead one). Under torchrun, each rank stops with it."""
    import torch.distributed as dist
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s))
    if "TORCHELASTIC_RUN_ID" in os.environ:                          # torchrun (elastic) started this process
        stop_with_launcher()


def all_reduce(values, device, op="sum"):
    """Sum (or max) a list of numbers over ranks. EVERY collective on data goes through here, on the loop's device:
    an NCCL process group has no CPU backend ("No backend type associated with device type cpu")."""
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def all_gather_objects(obj):
    """Every rank's `obj` (CPU tensors), in rank order: the one collective that moves rows between ranks, used only by
    the released recipe's balanced rank split (batching.balanced_ranks). One process: [obj]."""
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def single_process(device="cpu"):
    """The runtime namespace of one plain process (what setup returns without torchrun), for code outside the loop."""
    return types.SimpleNamespace(rank=0, world=1, device=torch.device(device), fsdp=False, amp=contextlib.nullcontext,
                                 own_group=False)


def shard(model, dtype):
    """FSDP2: one unit per decoder layer, then the root. Parameters (master weights), gradients and AdamW state stay
    fp32 and sharded over ranks; each unit is gathered in `dtype` for compute; gradients reduce in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    return fully_shard(model, mp_policy=mp)


def sync_gradients(model, rt, last):
    """FSDP2: reduce-scatter the accumulated gradients once, after the last micro-batch, not after every one."""
    if rt.fsdp:
        model.set_requires_gradient_sync(last)


def clip_grad_norm(model, max_norm):
    """Clip the gradient to max_norm (0: no clipping) and return its norm before clipping as a float (FSDP2: the
    norm comes back as a DTensor, made whole here)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or math.inf)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def tied_names(model):
    """Parameter names that alias another parameter (a tied output layer: lm_head.weight = embed_tokens.weight)."""
    return {k for k, _ in model.named_parameters(remove_duplicate=False)} - {k for k, _ in model.named_parameters()}

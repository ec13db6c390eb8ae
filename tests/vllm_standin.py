"""A stand-in for the slice of vLLM 0.33.0's API that scope.VLLMRollouts calls. CONTRACT TESTS ONLY: vLLM cannot be
installed on the project's machines, so the rollout engine is tested against this module, installed as `vllm` in
sys.modules. It defines exactly the names the engine may call (LLM with its constructor keywords, sleep, wake_up,
apply_model, reset_prefix_cache, generate; SamplingParams; RequestOutput, CompletionOutput, Logprob) with vLLM's
argument names, and it behaves as vLLM does where the engine depends on it (taken from vLLM's source, see
../shared/notes/vllm_colocate.md):
  - unknown constructor or SamplingParams keywords raise TypeError, as they would in vLLM;
  - external_launcher needs RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in the environment;
  - a sleeping engine refuses to generate, loading weights into sleeping weights raises, and sleep level 2 leaves
    garbage weights (as real level 2 does without a reload);
  - string prompts are refused (vLLM would add special tokens: a second BOS);
  - generation is delegated to the HF model the engine was built from, holding its own bf16 copy of the weights,
    so rollouts come from whatever weights the engine was last given;
  - raw_logprobs are the model's T=1 log-probs, processed_logprobs those after temperature.
What it does NOT prove: that vLLM itself behaves like this (bench/vllm_api_check.py checks the names against
vLLM's source; the behaviour needs a GPU run of bench/gpu_check.py)."""

import os
import types

import torch

import scope

INSTANCES = []                 # every LLM built, for the tests to inspect


class Logprob:
    def __init__(self, logprob, rank=None, decoded_token=None):
        self.logprob, self.rank, self.decoded_token = logprob, rank, decoded_token


class SamplingParams:
    def __init__(self, *, n=1, temperature=1.0, top_p=1.0, top_k=0, max_tokens=16, seed=None, logprobs=None,
                 stop_token_ids=None, detokenize=True):
        if not 0 <= temperature <= 2.0:
            raise ValueError("temperature must be in [0, 2]")
        if top_k < -1:
            raise ValueError("top_k must be -1 (off), 0 (off) or positive")
        self.n, self.temperature, self.top_p, self.top_k, self.max_tokens = n, temperature, top_p, top_k, max_tokens
        self.seed, self.logprobs, self.stop_token_ids, self.detokenize = seed, logprobs, stop_token_ids, detokenize


class LLM:
    def __init__(self, model, *, tokenizer=None, dtype="auto", seed=0, gpu_memory_utilization=0.92,
                 distributed_executor_backend=None, enable_sleep_mode=False, max_model_len=None,
                 logprobs_mode="raw_logprobs"):
        if distributed_executor_backend == "external_launcher":
            missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
            assert not missing, f"external_launcher needs {missing} in the environment"
        assert logprobs_mode in ("raw_logprobs", "processed_logprobs", "raw_logits", "processed_logits")
        self.tokenizer = scope.load_model(model, "engine")
        self.model = scope.load_model(model, "engine", "bfloat16" if dtype == "bfloat16" else "float32")
        self.sleep_mode, self.max_model_len, self.logprobs_mode = enable_sleep_mode, max_model_len, logprobs_mode
        self.asleep, self.prompts, self.generated_with, self.prefix_resets = set(), [], [], 0
        INSTANCES.append(self)

    def sleep(self, level=1, mode="abort"):
        assert self.sleep_mode, "sleep needs enable_sleep_mode=True"
        self.asleep = {"weights", "kv_cache"}
        if level == 2:                                              # weights discarded: memory comes back as garbage
            with torch.no_grad():
                for p in self.model.parameters():
                    p.normal_()

    def wake_up(self, tags=None):
        tags = tags or ["weights", "kv_cache"]
        if any(t not in self.asleep for t in tags):                 # vLLM warns and wakes nothing
            return False
        self.asleep -= set(tags)
        return not self.asleep

    def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False):
        self.prefix_resets += 1
        return True

    def apply_model(self, func):
        if "weights" in self.asleep:
            raise RuntimeError("loading into sleeping weights writes to unmapped memory")
        self.model.load_weights = types.MethodType(_load_weights, self.model)
        return [func(self.model)]

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True):
        if self.asleep:
            raise RuntimeError(f"the engine is asleep ({sorted(self.asleep)}): requests would never be scheduled")
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        self.generated_with.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        out = []
        for prompt, sp in zip(prompts, params):
            if not isinstance(prompt, dict) or set(prompt) != {"prompt_token_ids"}:
                raise TypeError("the stand-in takes prompts as token ids only (a string would get special tokens)")
            ids = prompt["prompt_token_ids"]
            assert len(ids) + sp.max_tokens <= self.max_model_len, "prompt + max_tokens over max_model_len"
            self.prompts.append(list(ids))
            out.append(types.SimpleNamespace(prompt_token_ids=ids, outputs=[self._sample(ids, sp, j) for j in range(sp.n)]))
        return out

    def _sample(self, ids, sp, j):
        """One completion through HF generate with scope's seeded sampler (seed + j for child j, as vLLM does)."""
        from transformers import GenerationConfig, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper
        raw = self.logprobs_mode == "raw_logprobs"
        record = scope.SamplerLogprobs(1.0 if raw else sp.temperature)
        procs = [record, TemperatureLogitsWarper(sp.temperature)] + ([TopKLogitsWarper(sp.top_k)] if sp.top_k > 0 else [])
        seeds = None if sp.seed is None else [sp.seed + j]
        cfg = GenerationConfig(do_sample=False, max_new_tokens=sp.max_tokens, eos_token_id=sp.stop_token_ids,
                               pad_token_id=self.tokenizer.pad_token_id)
        with torch.no_grad():
            seq = self.model.generate(input_ids=torch.tensor([ids]), generation_config=cfg,
                                      logits_processor=LogitsProcessorList(procs + [scope.GumbelSampler(seeds)]))
            record.collect(seq[:, -1])
        tokens = seq[0, len(ids):].tolist()
        if sp.stop_token_ids and sp.stop_token_ids[0] in tokens:
            tokens = tokens[:tokens.index(sp.stop_token_ids[0]) + 1]          # the stop token is in token_ids
        lps = [{t: Logprob(float(record.out[i][0]), rank=1)} for i, t in enumerate(tokens)]
        stopped = bool(sp.stop_token_ids) and tokens[-1] in sp.stop_token_ids
        return types.SimpleNamespace(token_ids=tokens, logprobs=lps if sp.logprobs is not None else None, text="",
                                     finish_reason="stop" if stopped else "length")


def _load_weights(model, weights):
    """vLLM's model.load_weights contract: (HF name, tensor) pairs, copied in place with a shape check; an unknown
    name raises ValueError; returns the names loaded."""
    params, loaded = dict(model.named_parameters()), set()
    with torch.no_grad():
        for name, t in weights:
            if name not in params:
                raise ValueError(f"there is no module or parameter named {name!r}")
            assert params[name].shape == t.shape, name
            params[name].copy_(t)
            loaded.add(name)
    return loaded


def install(monkeypatch):
    """Put this module in sys.modules as `vllm` for one test."""
    import sys
    INSTANCES.clear()
    monkeypatch.setitem(sys.modules, "vllm", sys.modules[__name__])

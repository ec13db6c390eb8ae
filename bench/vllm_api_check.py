"""Check, against vLLM's own source, that every vLLM class, method, keyword argument and output attribute this
project calls exists under that name. The source is read with `ast` (nothing is imported or executed): a downloaded
wheel, or an installed vllm package.

    python bench/vllm_api_check.py                       # pip download --no-deps vllm==0.33.0 (GPU), then check
    python bench/vllm_api_check.py --wheel path/to/vllm-*.whl
    python bench/vllm_api_check.py --installed           # the vllm this Python imports (CI: the CPU build, a test)

USES lists what vllm_engine.py and eval/run.py's VLLMBackend call (a test keeps the list in step with the code). The
CPU build runs these calls in CI; the GPU wheel (~340 MB) is checked by hand, output recorded in docs/evaluation.md.
"""
import argparse
import ast
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VERSION = "0.33.0"
# (file in the package, class, member, keyword arguments or attributes used)
USES = [
    ("vllm/__init__.py", None, "exports", ["LLM", "SamplingParams"]),
    ("vllm/entrypoints/llm.py", "LLM", "__init__", ["model", "dtype", "seed", "gpu_memory_utilization",
                                                    "enforce_eager", "kv_cache_memory_bytes", "quantization",
                                                    "skip_tokenizer_init"]),
    ("vllm/engine/arg_utils.py", "EngineArgs", "fields", ["max_model_len", "distributed_executor_backend",
                                                          "enable_sleep_mode", "logprobs_mode", "max_num_seqs",
                                                          "max_num_batched_tokens"]),  # LLM(**kwargs)
    ("vllm/config/parallel.py", None, "exports", ["external_launcher"]),            # a distributed_executor_backend
    ("vllm/config/model.py", None, "exports", ["raw_logprobs", "processed_logprobs"]),   # LogprobsMode values
    ("vllm/config/model.py", "ModelConfig", "fields", ["quantization"]),          # worker.vllm_config.model_config
    ("vllm/inputs/llm.py", "TokensPrompt", "fields", ["prompt_token_ids"]),
    ("vllm/entrypoints/llm.py", "LLM", "generate", ["prompts", "sampling_params", "use_tqdm"]),
    ("vllm/entrypoints/llm.py", "LLM", "sleep", ["level"]),
    ("vllm/entrypoints/llm.py", "LLM", "wake_up", ["tags"]),
    ("vllm/entrypoints/llm.py", "LLM", "collective_rpc", ["method", "args"]),
    ("vllm/entrypoints/llm.py", "LLM", "reset_prefix_cache", []),
    ("vllm/v1/engine/core_client.py", "InprocClient", "shutdown", []),              # llm.llm_engine.engine_core
    ("vllm/v1/engine/llm_engine.py", "LLMEngine", "attributes", ["engine_core", "_finalizer"]),   # close_engine
    ("vllm/v1/engine/llm_engine.py", "LLMEngine", "_cleanup_instance_caches", ["model_ref"]),     # what it runs
    ("vllm/model_executor/models/qwen2.py", None, "exports", ["packed_modules_mapping", "qkv_proj", "gate_up_proj"]),
    ("vllm/v1/worker/gpu_worker.py", "Worker", "sleep", ["level"]),                   # level 2 saves the buffers:
    ("vllm/v1/worker/gpu_worker.py", None, "exports", ["_sleep_saved_buffers"]),      # sleep_level
    ("vllm/platforms/interface.py", "Platform", "is_sleep_mode_available", []),
    ("vllm/platforms/interface.py", "Platform", "is_cpu", []),
    ("vllm/v1/worker/gpu_worker.py", "Worker", "reload_weights", []),                 # (weights_iterator=, ...)
    ("vllm/v1/worker/gpu_worker.py", "Worker", "get_model", []),
    ("vllm/v1/worker/gpu_model_runner.py", "GPUModelRunner", "reload_weights", ["weights_iterator",
                                                                                  "is_checkpoint_format"]),
    ("vllm/v1/worker/gpu/model_runner.py", "GPUModelRunner", "reload_weights", ["weights_iterator",   # runner V2
                                                                                 "is_checkpoint_format"]),
    ("vllm/model_executor/models/qwen2.py", "Qwen2ForCausalLM", "load_weights", ["weights"]),
    ("vllm/model_executor/layers/vocab_parallel_embedding.py", "UnquantizedEmbeddingMethod",
     "process_weights_after_loading", ["layer"]),                                   # the tied head's rebuild
    ("vllm/sampling_params.py", "SamplingParams", "fields", ["n", "temperature", "top_p", "top_k", "max_tokens", "seed",
                                                             "logprobs", "stop_token_ids", "detokenize",
                                                             "prompt_logprobs"]),
    ("vllm/outputs.py", "RequestOutput", "attributes", ["outputs", "prompt_logprobs"]),
    ("vllm/outputs.py", "CompletionOutput", "attributes", ["finish_reason", "token_ids", "logprobs"]),
    ("vllm/logprobs.py", "Logprob", "attributes", ["logprob"]),
    ("vllm/device_allocator/cumem.py", None, "exports", ["CuMemAllocator", "cumem_available"]),   # close_engine's check
    ("vllm/device_allocator/cumem.py", "CuMemAllocator", "get_instance", []),
    ("vllm/device_allocator/cumem.py", "CuMemAllocator", "get_current_usage", []),
    ("vllm/device_allocator/cumem.py", "CuMemAllocator", "attributes", ["pointer_to_data", "instance"]),
]


def class_def(tree, name):
    return next((n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == name), None)


def attributes(cls):
    """Annotated fields of the class body and self.X assignments in its methods."""
    out = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    for n in ast.walk(cls):
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self" and \
                isinstance(n.ctx, ast.Store):
            out.add(n.attr)
    return out


def check(source):
    """source: a wheel, or the directory that holds the vllm package."""
    if Path(source).is_dir():
        def read(path):
            return (Path(source) / path).read_text()
    else:
        z = zipfile.ZipFile(source)

        def read(path):
            return z.read(path).decode()
    rows = []
    for path, cls_name, member, names in USES:
        tree = ast.parse(read(path))
        if cls_name is None:                                   # names the package exports
            text = read(path)
            found = {n: n in text for n in names}
        else:
            cls = class_def(tree, cls_name)
            if cls is None:
                found = {f"class {cls_name}": False}
            elif member in ("fields", "attributes"):
                have = attributes(cls)
                found = {n: n in have for n in names}
            else:
                fn = next((f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == member), None)
                args = set() if fn is None else {a.arg for a in fn.args.args + fn.args.kwonlyargs}
                found = {member: fn is not None, **{n: n in args for n in names}}
        rows.append((path, cls_name or "", member, found))
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--wheel", default="")
    p.add_argument("--installed", action="store_true", help="check the installed vllm package instead of a wheel")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = a.wheel
        if a.installed:
            import importlib.util
            wheel = str(Path(importlib.util.find_spec("vllm").origin).parents[1])   # the directory holding vllm/
        elif not wheel:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, f"vllm=={VERSION}"],
                           check=True)
            wheel = str(next(Path(tmp).glob("vllm-*.whl")))
        rows = check(wheel)
    print(f"{wheel if a.installed else Path(wheel).name}\n| file | class | member | names used: found |\n|---|---|---|---|")
    missing = 0
    for path, cls, member, found in rows:
        missing += sum(not ok for ok in found.values())
        print(f"| {path} | {cls} | {member} | " + ", ".join(f"{k} {'yes' if ok else 'MISSING'}" for k, ok in found.items())
              + " |")
    print("all names found" if not missing else f"{missing} names MISSING")
    sys.exit(1 if missing else 0)


if __name__ == "__main__":
    main()

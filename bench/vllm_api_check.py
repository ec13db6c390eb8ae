"""Check, against vLLM's own source, that every vLLM class, method, keyword argument and output attribute this
project calls exists under that name. The wheel is downloaded (no install, no import) and read with `ast`.

    python bench/vllm_api_check.py                       # pip download --no-deps vllm==0.33.0, then check
    python bench/vllm_api_check.py --wheel path/to/vllm-*.whl

USES below lists what eval/run.py's VLLMBackend and scope.py's VLLMRollouts call (a test keeps the list in step
with the code). Not part of CI
(the wheel is ~340 MB); its output is recorded in the README.
"""
import argparse
import ast
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VERSION = "0.33.0"
# (file in the wheel, class, member, keyword arguments or attributes used)
USES = [
    ("vllm/__init__.py", None, "exports", ["LLM", "SamplingParams"]),
    ("vllm/entrypoints/llm.py", "LLM", "__init__", ["model", "dtype", "seed", "gpu_memory_utilization"]),
    ("vllm/engine/arg_utils.py", "EngineArgs", "fields", ["max_model_len", "distributed_executor_backend",
                                                          "enable_sleep_mode", "logprobs_mode"]),  # LLM(**kwargs)
    ("vllm/config/parallel.py", None, "exports", ["external_launcher"]),            # a distributed_executor_backend
    ("vllm/config/model.py", None, "exports", ["raw_logprobs", "processed_logprobs"]),   # LogprobsMode values
    ("vllm/inputs/llm.py", "TokensPrompt", "fields", ["prompt_token_ids"]),
    ("vllm/entrypoints/llm.py", "LLM", "generate", ["prompts", "sampling_params", "use_tqdm"]),
    ("vllm/entrypoints/llm.py", "LLM", "get_tokenizer", []),
    ("vllm/entrypoints/llm.py", "LLM", "sleep", ["level"]),
    ("vllm/entrypoints/llm.py", "LLM", "wake_up", ["tags"]),
    ("vllm/entrypoints/llm.py", "LLM", "apply_model", ["func"]),
    ("vllm/entrypoints/llm.py", "LLM", "reset_prefix_cache", []),
    ("vllm/v1/worker/worker_base.py", "WorkerBase", "apply_model", ["fn"]),         # runs fn(model) in the worker
    ("vllm/model_executor/models/qwen2.py", "Qwen2ForCausalLM", "load_weights", ["weights"]),
    ("vllm/sampling_params.py", "SamplingParams", "fields", ["n", "temperature", "top_p", "top_k", "max_tokens", "seed",
                                                             "logprobs", "stop_token_ids", "detokenize"]),
    ("vllm/outputs.py", "RequestOutput", "attributes", ["outputs"]),
    ("vllm/outputs.py", "CompletionOutput", "attributes", ["text", "finish_reason", "token_ids", "logprobs"]),
    ("vllm/logprobs.py", "Logprob", "attributes", ["logprob"]),
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


def check(wheel):
    z = zipfile.ZipFile(wheel)
    rows = []
    for path, cls_name, member, names in USES:
        tree = ast.parse(z.read(path).decode())
        if cls_name is None:                                   # names the package exports
            text = z.read(path).decode()
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
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = a.wheel
        if not wheel:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, f"vllm=={VERSION}"],
                           check=True)
            wheel = str(next(Path(tmp).glob("vllm-*.whl")))
        rows = check(wheel)
    print(f"{Path(wheel).name}\n| file | class | member | names used: found |\n|---|---|---|---|")
    missing = 0
    for path, cls, member, found in rows:
        missing += sum(not ok for ok in found.values())
        print(f"| {path} | {cls} | {member} | " + ", ".join(f"{k} {'yes' if ok else 'MISSING'}" for k, ok in found.items())
              + " |")
    print("all names found" if not missing else f"{missing} names MISSING")
    sys.exit(1 if missing else 0)


if __name__ == "__main__":
    main()

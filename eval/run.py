"""Evaluate a model on the benchmarks: Avg@k and Pass@k, per-sample JSONL written as it goes, resumable.

    python -m eval --model PATH_OR_HF_ID --benchmarks math500,aime24 --n 32 --data-dir ../shared/benchmarks
    python -m eval --preset tiny --model .cache/scope/tiny-<hash>/student        # the embedded default
"""

import dataclasses
import hashlib
import importlib.metadata
import json
import sys
from pathlib import Path

import cli
import loading
import ranks
import scope
import verifier
import vllm_engine
from eval import benchmarks, extract, metrics

PAPER_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclasses.dataclass
class EvalArgs:
    model: str = ""
    """model to evaluate: local path or Hugging Face id"""
    preset: str = "paper"
    """paper: the paper's sampling (docs/method.md) (n 32, T 0.6, top-p 0.95, top-k 20, 32768 tokens); tiny: small
    values"""
    benchmarks: str = ""
    """comma-separated names (math500, aime24, aime25, amc23, minerva, olympiadbench, tiny); empty = the preset's"""
    n: int = 0
    """samples per problem (0: the preset's)"""
    temperature: float = -1.0
    """sampling temperature (negative: the preset's)"""
    top_p: float = -1.0
    """nucleus sampling (negative: the preset's)"""
    top_k: int = -1
    """top-k, 0 = off (negative: the preset's)"""
    max_tokens: int = 0
    """max new tokens per sample (0: the preset's)"""
    instruction: str = "preset"
    """text after each problem in the prompt ("preset": the paper's instruction, or none for tiny)"""
    backend: str = "hf"
    """hf (transformers generate) or vllm (a vLLM engine in this process; GPU, or vLLM's CPU build)"""
    vllm_memory: float = 0.9
    """vllm backend: the fraction of the GPU its weights and KV cache may take (gpu_memory_utilization)"""
    data_dir: str = ""
    """directory of <benchmark>.jsonl copies (default: $SCOPE_DATA_DIR)"""
    hub: bool = False
    """load benchmarks missing locally from the Hugging Face hub (needs internet and `datasets`)"""
    limit: int = 0
    """only the first N problems of each benchmark (0: all)"""
    batch_problems: int = 8
    """problems per generation call (hf backend; vllm takes a whole benchmark per call)"""
    out_dir: str = "results/eval"
    """where <benchmark>.samples.jsonl and results.json go; a re-run skips finished problems"""
    seed: int = 0
    """sampling seed (every sample's randomness is a function of seed, benchmark, problem, sample index)"""
    dtype: str = "float32"
    """float32 | bfloat16"""
    dist_timeout: float = 3600.0
    """torchrun: seconds a collective waits for the slowest rank (vllm engines are built collectively)"""
    extraction: str = ""
    """lenient: the final answer as community harnesses find it (last box, else "answer is ...", last math span,
    last number; eval/extract.py); boxed: the last box only, as training rewards it (empty: the preset's,
    lenient for paper, boxed for tiny)"""


PRESETS = {
    "paper": dict(n=32, temperature=0.6, top_p=0.95, top_k=20, max_tokens=32768, instruction=PAPER_INSTRUCTION,
                  benchmarks=",".join(benchmarks.PAPER_BENCHMARKS), dtype="bfloat16", extraction="lenient"),
    "tiny": dict(n=4, temperature=1.0, top_p=1.0, top_k=0, max_tokens=64, instruction="", benchmarks=benchmarks.TINY,
                 extraction="boxed"),
}


def resolve(args):
    """Fill every field left at its 'use the preset' value from the preset."""
    if args.preset not in PRESETS:
        raise ValueError(f"--preset must be one of {list(PRESETS)}, got {args.preset!r}")
    unset = {"n": 0, "temperature": -1.0, "top_p": -1.0, "top_k": -1, "max_tokens": 0, "instruction": "preset",
             "benchmarks": "", "dtype": "float32", "extraction": ""}
    filled = {k: v for k, v in PRESETS[args.preset].items() if getattr(args, k) == unset[k]}
    out = dataclasses.replace(args, **filled)
    if out.extraction not in ("lenient", "boxed"):
        raise ValueError(f"--extraction must be lenient or boxed, got {out.extraction!r}")
    if out.backend not in ("hf", "vllm"):
        raise ValueError(f"--backend must be hf or vllm, got {out.backend!r}")
    return out


def sample_seed(seed, bench, problem_id, j):
    return scope.row_seeds(seed, bench, [(problem_id, j)])[0]


class HFBackend:
    """transformers generate; every sample's noise is seeded by (seed, benchmark, problem, index)."""

    def __init__(self, args):
        self.args = args
        self.tokenizer = loading.load_tokenizer(args.model, "model")
        self.model = loading.load_model(args.model, "model", args.dtype, _device())

    def __call__(self, bench, rows, n):
        a = self.args
        prompts = [scope.prompt_text(self.tokenizer, r["problem"], a.instruction) for r in rows]
        seeds = [sample_seed(a.seed, bench, r["id"], j) for r in rows for j in range(n)]
        b = scope.generate(self.model, self.tokenizer, prompts, n, a.max_tokens, a.temperature, a.top_p, a.top_k, seeds)
        texts = scope.decode_responses(self.tokenizer, b)
        return [[(texts[i * n + j], bool(b["truncated"][i * n + j])) for j in range(n)] for i in range(len(rows))]


class VLLMBackend:
    """vLLM's LLM.generate with SamplingParams(n, seed) per problem (imported only here; the engine is
    vllm_engine.get_engine, one per process, inside it: external_launcher). Prompts go in as token ids from the HF
    tokenizer, exactly as the hf backend makes them (given a string, vLLM would add special tokens: a second BOS with
    R1-Distill's add_bos_token), and the sampled ids are decoded by that tokenizer too; vLLM loads none
    (skip_tokenizer_init). max_model_len = the longest prompt + max_tokens. Under torchrun every rank runs its own
    engine on its own device, on its shard."""

    def __init__(self, args, rows, world=1):
        from transformers import AutoConfig
        vllm_engine.import_vllm()                                           # a clear error first when vllm is missing
        self.tokenizer = loading.load_tokenizer(args.model, "model")
        longest = max(len(prompt_ids(self.tokenizer, r, args.instruction)) for r in rows)   # every prompt it will see
        limit = AutoConfig.from_pretrained(args.model).max_position_embeddings
        if longest + args.max_tokens > limit:
            raise SystemExit(f"the longest prompt ({longest} tokens) + --max-tokens {args.max_tokens} exceed "
                             f"{args.model}'s {limit} positions")
        self.args = args
        vllm_engine.get_engine(args.model, longest + args.max_tokens, args.seed, args.vllm_memory, dtype=args.dtype)

    def __call__(self, bench, rows, n):
        from vllm import SamplingParams
        a, tok = self.args, self.tokenizer
        prompts = [{"prompt_token_ids": prompt_ids(tok, r, a.instruction)} for r in rows]   # TokensPrompt
        params = [SamplingParams(n=n, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k or -1,
                                 max_tokens=a.max_tokens, seed=sample_seed(a.seed, bench, r["id"], 0) % 2**31,
                                 stop_token_ids=[tok.eos_token_id], detokenize=False) for r in rows]
        # no reference kept: close_engine frees it
        outs = vllm_engine.engine().generate(prompts, params, use_tqdm=False)
        return [[(tok.decode(c.token_ids, skip_special_tokens=True), c.finish_reason == "length") for c in o.outputs]
                for o in outs]


def prompt_ids(tokenizer, row, instruction):
    return tokenizer(scope.prompt_text(tokenizer, row["problem"], instruction), add_special_tokens=False)["input_ids"]


def _device():
    """This rank's GPU (LOCAL_RANK under torchrun), else the CPU."""
    import os

    import torch
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"


def read_samples(path):
    """Finished samples; a torn last line (a crash mid-write) is ignored and rewritten later."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def evaluate(args, generator=None, progress=True, rank=0, world=1):
    """Run (or resume) the evaluation; returns the results dict also written to out_dir/results.json.
    generator(bench, rows, n) -> per row a list of n (response text, truncated); default: the chosen backend.
    rank/world: under torchrun every rank samples problems rank, rank + world, ... into its own shard file, waits for
    the other shards by reading their files (no collective, so no NCCL timeout however uneven the shards are), and
    rank 0 merges them; the other ranks return None."""
    from tqdm import tqdm
    args = resolve(args)
    names = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {name: benchmarks.load(name, args.data_dir or None, args.hub, args.limit or None) for name in names}

    def shard_path(name, r):
        return out / (f"{name}.samples.jsonl" if world == 1 else f"{name}.samples.rank{r}of{world}.jsonl")

    def backend():
        if args.backend == "hf":
            return HFBackend(args)
        return VLLMBackend(args, [r for rs in data.values() for r in rs], world)

    if generator is None and args.backend == "vllm" and world > 1:   # building engines is collective: every rank,
        generator = backend()                                         # even one with nothing to do
    for name, rows in data.items():
        path, mine = shard_path(name, rank), rows[rank::world]
        samples = complete_samples(path, args.n)
        path.write_text("".join(json.dumps(s) + "\n" for s in samples))   # drop partial problems
        done = {s["problem_id"] for s in samples}
        todo = [r for r in mine if r["id"] not in done]
        if todo and generator is None:
            generator = backend()
        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=name, disable=not progress)
        with path.open("a") as f:
            step = args.batch_problems if args.backend == "hf" else max(len(todo), 1)   # vllm: a benchmark per call
            for i in range(0, len(todo), step):
                chunk = todo[i:i + step]
                for r, res in zip(chunk, generator(name, chunk, args.n)):
                    for j, (text, truncated) in enumerate(res):
                        rec = {"problem_id": r["id"], "sample": j, "response": text,
                               "extracted": verifier.extract_boxed(text),
                               "answer": extract.evaluation_answer(text) if args.extraction == "lenient" else None,
                               "correct": bool(extract.verify(text, r["answer"], truncated, args.extraction)),
                               "truncated": truncated}
                        f.write(json.dumps(rec) + "\n")
                f.flush()
                bar.update(len(chunk))
        bar.close()
    if rank != 0:
        return None
    per_benchmark = {}
    for name, rows in data.items():
        if world > 1:                                                # wait for every shard, then merge
            wait_for(lambda: all(len({s["problem_id"] for s in complete_samples(shard_path(name, r), args.n)})
                                 == len(rows[r::world]) for r in range(world)), f"the other ranks' {name} shards")
            merged = [s for r in range(world) for s in complete_samples(shard_path(name, r), args.n)]
            (out / f"{name}.samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in merged))
        samples = read_samples(out / f"{name}.samples.jsonl")
        order = {r["id"]: i for i, r in enumerate(rows)}
        samples.sort(key=lambda s: (order[s["problem_id"]], s["sample"]))
        per_benchmark[name] = metrics.summarize(samples, args.n)
    results = {"benchmarks": per_benchmark, "macro_average": metrics.macro_average(per_benchmark),
               "config": dataclasses.asdict(args), "model": model_identity(args.model),
               "versions": versions(), "seed": args.seed, "ranks": world}
    (out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    return results


def complete_samples(path, n):
    """The samples of the problems that have all n of them in the file."""
    samples = read_samples(path)
    count = {}
    for s in samples:
        count[s["problem_id"]] = count.get(s["problem_id"], 0) + 1
    return [s for s in samples if count[s["problem_id"]] == n]


def wait_for(predicate, what, poll_s=2.0):
    import time
    t0, said = time.time(), 0.0
    while not predicate():
        if time.time() - said > 60:
            print(f"waiting for {what} ({time.time() - t0:.0f}s)", flush=True)
            said = time.time()
        time.sleep(poll_s)


def model_identity(name):
    """The model id plus its revision: a hub commit when cached from the hub, else a hash of the local weights."""
    p = Path(name)
    if p.exists():
        h = hashlib.sha256()
        for f in sorted(p.glob("*.safetensors")):
            h.update(f.read_bytes())
        return {"id": str(name), "revision": "sha256:" + h.hexdigest()[:16]}
    return {"id": name, "revision": "hub (resolved by transformers at load time)"}


def versions():
    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "tokenizers", "sympy", "matplotlib", "vllm"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def table(results):
    """A markdown table of Avg@n / Pass@n per benchmark."""
    n = results["config"]["n"]
    lines = [f"| benchmark | avg@{n} | pass@{n} | pass@{n} (bootstrap, official) | truncated | no box |",
             "|---|---|---|---|---|---|"]
    rows = list(results["benchmarks"].items()) + [("macro average", results["macro_average"])]
    for name, m in rows:
        lines.append(f"| {name} | {100 * m[f'avg@{n}']:.1f} | {100 * m[f'pass@{n}']:.1f} | "
                     f"{100 * m[f'pass@{n}_bootstrap']:.1f} | {100 * m['truncated_frac']:.1f}% | "
                     f"{100 * m['no_box_frac']:.1f}% |")
    return "\n".join(lines)


def main(argv=None):
    p, given = cli.dataclass_cli(EvalArgs, argv, "Avg@k / Pass@k on the math benchmarks")
    args = EvalArgs(**given)
    if not args.model:
        p.error("--model is required")
    try:
        resolve(args)
    except ValueError as e:                                           # a usage error, not a traceback
        p.error(str(e))
    import os
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:                                  # torchrun: one engine per GPU; the vllm backend joins this group
        import torch.distributed as dist
        ranks.init_group(args.dist_timeout)
    try:
        results = evaluate(args, rank=rank, world=world)
    except benchmarks.DataError as e:                                 # names the file, line, field: no traceback
        raise SystemExit(f"error: {e}") from None
    finally:                                       # also after an error: woken and released, the group kept
        vllm_engine.close_engine()
    if rank == 0:
        print(table(results))
        print(f"results: {Path(args.out_dir) / 'results.json'}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

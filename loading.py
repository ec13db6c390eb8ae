"""Loading for scope.py's loop: the models (student, teacher, GRPO reference) and the training problems, each with a
clear error naming what could not be read. Engineering beside the method (docs/training.md).
"""

import contextlib
import copy
import json
from pathlib import Path

import torch

from checkpoints import find_checkpoint


def load_tokenizer(name, what):
    """The tokenizer of a model directory or hub id. One saved as a generic tokenizer (the tiny one) loads as one:
    transformers 5's AutoTokenizer would pick the class of config.json's model_type (Qwen2Tokenizer), whose byte-level
    pipeline drops the tiny tokenizer's spaces. what: "student" or "teacher", for the messages."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    cfg = Path(name) / "tokenizer_config.json"
    generic = cfg.exists() and json.loads(cfg.read_text()).get("tokenizer_class") in ("TokenizersBackend",
                                                                                     "PreTrainedTokenizerFast")
    with _reachable(name, what):
        tok = (PreTrainedTokenizerFast if generic else AutoTokenizer).from_pretrained(name)
    if not tok.chat_template:                                         # prompt_text builds every prompt with it
        raise SystemExit(f"the {what} tokenizer {name!r} has no chat template: prompts are the problem in the model's "
                         "chat template (docs/method.md); save one with the tokenizer")
    if tok.pad_token is None:                                         # common for base models; the masks, not the
        tok.pad_token = tok.eos_token                                 # pad id, mark what is real
    return tok


def load_model(name, what, dtype="float32", device="cpu"):
    """A causal LM in `dtype` on `device`, in eval mode."""
    from transformers import AutoModelForCausalLM
    with _reachable(name, what):
        return AutoModelForCausalLM.from_pretrained(name, dtype=getattr(torch, dtype)).to(device).eval()


@contextlib.contextmanager
def _reachable(name, what):
    try:
        yield
    except OSError as e:
        raise SystemExit(f"cannot load the {what} model {name!r}: {e}\nOffline? Download it elsewhere and pass a "
                         f"local path with --{what}.") from None


def load_models(args, rt, student_name, teacher_name, ckpt, teacher=True, reference=False):
    """(tokenizer, student, teacher or None, GRPO reference or None). The student loads in fp32 (from the checkpoint
    when resuming), the teacher and reference in the compute dtype; the loop shards the student under torchrun."""
    tokenizer = load_tokenizer(student_name, "student")
    student = load_model(str(ckpt) if ckpt else student_name, "student", "float32", rt.device)
    teacher = load_model(teacher_name, "teacher", args.dtype, rt.device) if teacher else None
    if teacher is not None and load_tokenizer(teacher_name, "teacher").get_vocab() != tokenizer.get_vocab():
        raise SystemExit(f"student {student_name} and teacher {teacher_name} do not share a tokenizer: the "
                         "teacher must score the student's own token ids")
    ref = None
    if reference:                                                     # the reference is the initial policy
        ref = load_model(student_name, "student", args.dtype, rt.device) if ckpt else copy.deepcopy(student).to(
            getattr(torch, args.dtype)).eval()
    if args.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    return tokenizer, student, teacher, ref


def _problem(f, line, i=None):
    """{problem, answer} of one .jsonl line, or a message naming the file and line."""
    try:
        row = json.loads(line)
    except ValueError as e:
        raise SystemExit(f"{f}:{i}: not a JSON object ({e})") from None
    bad = [k for k in ("problem", "answer") if not isinstance(row, dict) or not isinstance(row.get(k), str)]
    if bad:
        raise SystemExit(f"{f}:{i}: field {bad[0]!r} is missing or not a string")
    return {"problem": row["problem"], "answer": row["answer"]}


class JsonlProblems:
    """Training problems in .jsonl files, read on demand: one pass checks every line and keeps its (file, offset); a row
    is parsed when a step uses it. No rank holds other columns (DeepMath's R1 solutions: 5 GB) or other ranks' rows."""

    def __init__(self, files):
        self.index, self.sizes = [], []                               # (file, offset), the problem's UTF-8 bytes
        for f in files:
            with open(f, "rb") as fh:
                for i, line in enumerate(iter(fh.readline, b""), 1):
                    if line.strip():
                        self.index.append((f, fh.tell() - len(line)))
                        self.sizes.append(len(_problem(f, line, i)["problem"].encode()))
        if not self.index:
            raise SystemExit(f"--data: no problems in {', '.join(map(str, files))} (empty)")

    def problem_bytes(self):
        return self.sizes

    def __len__(self):
        return len(self.index)

    def __getitem__(self, k):
        f, offset = self.index[k]
        with open(f, "rb") as fh:
            fh.seek(offset)
            return _problem(f, fh.readline())


def load_problems(data):
    """Training problems from a .jsonl file, a directory of .jsonl files (fields problem, answer), or a Hugging Face
    dataset id (DeepMath's question, final_answer, or problem, answer), read only as a step needs them."""
    path = Path(data)
    if path.is_dir() or path.suffix == ".jsonl":
        files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
        if not files or not all(f.is_file() for f in files):
            what = "no .jsonl file in this directory" if path.is_dir() else "no such file"
            raise SystemExit(f"--data {data}: {what}")
        return JsonlProblems(files)
    if path.exists():
        raise SystemExit(f"--data {data}: expected a .jsonl file or a directory of them")
    try:
        import datasets
        for cols in (("question", "final_answer"), ("problem", "answer")):   # parquet: only these columns are read
            with contextlib.suppress(ValueError, KeyError):
                ds = datasets.load_dataset(data, split="train", columns=list(cols))
                break
        else:
            raise ValueError("it has neither question/final_answer nor problem/answer columns")
    except Exception as e:  # ImportError, no network, other columns
        raise SystemExit(f"cannot load training data {data!r} ({type(e).__name__}: {e}). Offline? Pass a local "
                         f"JSONL with 'problem' and 'answer' fields, e.g. --data ../shared/benchmarks/"
                         f"deepmath_train_sample.jsonl") from None
    ds = ds.rename_columns(dict(zip(cols, ("problem", "answer"))))
    return ds.cast_column("answer", datasets.Value("string"))         # memory-mapped Arrow: rows read on demand


class Subset:
    """rows[keep[k]] as row k: the training problems that are left after drop_long_prompts, in their order."""

    def __init__(self, rows, keep):
        self.rows, self.keep = rows, keep

    def __len__(self):
        return len(self.keep)

    def __getitem__(self, k):
        return self.rows[self.keep[k]]


def drop_long_prompts(rows, tokenizer, prompt_of, limit, say):
    """Leave out, and count, the training problems whose prompt has more than `limit` tokens (as verl's
    filter_overlong_prompts does at load), instead of stopping the run at the step that draws one.
    prompt_of(problem): the prompt's text. Only problems long enough to come near the limit are tokenized: a
    prompt has at most (its template's tokens + the problem's UTF-8 bytes + 8) tokens, since a token covers at
    least one byte of the text. -> rows itself when nothing is left out, else a Subset."""
    def prompt_tokens(problem):
        return len(tokenizer(prompt_of(problem), add_special_tokens=False)["input_ids"])

    sizes = (rows.problem_bytes() if hasattr(rows, "problem_bytes") else
             [len(p.encode()) for p in rows["problem"]] if hasattr(rows, "column_names") else
             [len(r["problem"].encode()) for r in rows])
    fixed = prompt_tokens("")
    keep = [k for k, n in enumerate(sizes) if fixed + n + 8 <= limit or prompt_tokens(rows[k]["problem"]) <= limit]
    if len(keep) == len(sizes):
        return rows
    say(f"--max-prompt-tokens {limit}: left out {len(sizes) - len(keep)} of {len(sizes)} training problems whose "
        "prompt is longer")
    if not keep:
        raise SystemExit(f"--max-prompt-tokens {limit}: every training problem's prompt is longer")
    return Subset(rows, keep)


def step_prompts(step, n_rows, per_step, seed):
    """Global prompt indices of a step: epoch-wise permutations of the data, so step s is known without state."""
    out = []
    for j in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(j, n_rows)
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        out.append(torch.randperm(n_rows, generator=gen, device="cpu")[pos].item())
    return out


def run_inputs(args, rt, out, say):
    """What the run reads, checked before anything is built or written (bad input stops in seconds): the checkpoint
    to resume (or None), then the problems; the embedded default (tiny_testbed.py) fills in what was not named.
    -> (checkpoint, student, teacher, training problems, test problems or None)."""
    ckpt = find_checkpoint(args, out, rt.world)
    rows, test_rows = load_problems(args.data) if args.data else None, None
    student_name, teacher_name = args.student, args.teacher
    if not (args.student and args.teacher and args.data):
        import tiny_testbed
        student_name, teacher_name, rows, test_rows = tiny_testbed.embedded_default(args, rows, say)
    if args.eval_every and not test_rows:
        say("eval_every: periodic evaluation runs on the tiny task only; evaluate checkpoints with `python -m eval`")
    return ckpt, student_name, teacher_name, rows, test_rows

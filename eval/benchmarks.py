"""The benchmark registry and loaders. Local JSONL copies (fields `id`, `problem`, `answer`) are read from
--data-dir or $SCOPE_DATA_DIR; a user with internet may load the Hugging Face copies through `datasets`."""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import tiny_testbed


@dataclass(frozen=True)
class Benchmark:
    name: str
    size: int                 # expected number of problems
    file: str                 # local JSONL file name
    hf_id: str                # a Hugging Face dataset a user with internet can load with `datasets`
    hf_split: str
    hf_problem: str           # field mapping of that dataset
    hf_answer: str
    source: str               # the well-known source of the local copy (see ../shared/benchmarks/SOURCES.md)


BENCHMARKS = {b.name: b for b in [
    Benchmark("math500", 500, "math500.jsonl", "HuggingFaceH4/MATH-500", "test", "problem", "answer",
              "openai/prm800k prm800k/math_splits/test.jsonl (MATH500 split)"),
    Benchmark("aime24", 30, "aime24.jsonl", "HuggingFaceH4/aime_2024", "train", "problem", "answer",
              "QwenLM/Qwen2.5-Math evaluation/data/aime24/test.jsonl"),
    Benchmark("aime25", 30, "aime25.jsonl", "math-ai/aime25", "test", "problem", "answer",
              "QwenLM/Qwen2.5-Math evaluation/data/aime25/test.jsonl (PR #65)"),
    Benchmark("amc23", 40, "amc23.jsonl", "math-ai/amc23", "test", "question", "answer",
              "QwenLM/Qwen2.5-Math evaluation/data/amc23/test.jsonl"),
    Benchmark("minerva", 272, "minerva.jsonl", "math-ai/minervamath", "test", "question", "answer",
              "QwenLM/Qwen2.5-Math evaluation/data/minerva_math/test.jsonl (answer = boxed part of solution)"),
    Benchmark("olympiadbench", 675, "olympiadbench.jsonl", "math-ai/olympiadbench", "test", "question", "final_answer",
              "QwenLM/Qwen2.5-Math evaluation/data/olympiadbench/test.jsonl (answer = final_answer[0], $ removed)"),
]}
PAPER_BENCHMARKS = list(BENCHMARKS)
class DataError(ValueError):
    """A benchmark file or name that cannot be used: the message names the file, line and field."""


class MissingData(DataError, FileNotFoundError):
    """No copy of a benchmark where it was looked for; the message says how to provide one."""


TINY = "tiny"                 # the embedded default's test split (tiny_testbed.tiny_task), a seventh entry
TINY_SIZE = 1024               # the tiny test split: 256 problems per level (issue #12 statistics)


def data_dir(explicit=None):
    d = explicit or os.environ.get("SCOPE_DATA_DIR")
    return Path(d) if d else None


def load(name, directory=None, use_hub=False, limit=None):
    """Problems of one benchmark as dicts with `id`, `problem`, `answer` (and `level` for tiny)."""
    if name == TINY or name.startswith(TINY + "-"):                # tiny, or one level: tiny-add3, tiny-frac, ...
        rows = tiny_testbed.tiny_task("test", TINY_SIZE, seed=0)
        level = name[len(TINY) + 1:]
        if level and level not in tiny_testbed.TINY_LEVELS:
            raise DataError(f"unknown tiny level {level!r}; known: {tiny_testbed.TINY_LEVELS}")
        rows = [r for r in rows if r["level"] == level] if level else rows
        return rows[:limit] if limit else rows
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; known: {', '.join([*BENCHMARKS, TINY])}")
    b = BENCHMARKS[name]
    directory = data_dir(directory)
    if directory is not None and (directory / b.file).exists():
        rows = read_jsonl(directory / b.file)
    elif use_hub:
        rows = load_hub(b)
    else:
        where = f"{directory / b.file} does not exist" if directory else "no --data-dir / SCOPE_DATA_DIR is set"
        raise MissingData(
            f"benchmark {name}: {where}. Put a JSONL copy (fields id, problem, answer; {b.size} rows) there, "
            f"e.g. --data-dir ../shared/benchmarks, or pass --hub to load {b.hf_id} with the `datasets` package "
            f"(needs internet). Source of the standard copy: {b.source}.")
    if len(rows) != b.size:
        raise DataError(f"{directory / b.file if directory else b.hf_id}: expected {b.size} problems for {name}, "
                         f"found {len(rows)}")
    return rows[:limit] if limit else rows


def read_jsonl(path):
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e})") from None
            for field in ("id", "problem", "answer"):
                if field not in row or not isinstance(row[field], (str, int)):
                    raise DataError(f"{path}:{i}: field {field!r} is missing or not a string")
            rows.append(dict(row, id=str(row["id"]), answer=str(row["answer"])))
    return rows


def load_hub(b):
    try:
        import datasets
    except ImportError:
        raise SystemExit(f"loading {b.hf_id} needs the `datasets` package (pip install datasets), or use a local "
                         f"copy with --data-dir") from None
    ds = datasets.load_dataset(b.hf_id, split=b.hf_split)
    rows = []
    for i, r in enumerate(ds):
        answer = r[b.hf_answer]
        answer = answer[0] if isinstance(answer, list) else answer
        rows.append({"id": str(r.get("id", i)), "problem": r[b.hf_problem],
                     "answer": str(answer).replace("$", "").strip()})
    return rows

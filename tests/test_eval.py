"""eval/: metrics against brute force, loaders on the real files, oracle runs through the whole pipeline,
resume, and an end-to-end evaluation of a tiny model."""

import itertools
import json
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SHARED_BENCHMARKS
from eval import benchmarks, metrics
from eval.run import EvalArgs, evaluate, main, table


# ---------------------------------------------------------------------------- metrics
@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.integers(1, 9).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_equals_brute_force_over_k_subsets(nck):
    n, c, k = nck
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    brute = sum(max(samples[i] for i in s) for s in subsets) / len(subsets)
    assert math.isclose(metrics.pass_at_k([c], n, k), brute, abs_tol=1e-12)


@given(st.lists(st.integers(0, 8), min_size=1, max_size=20))
def test_pass_at_n_and_avg(counts):
    n = 8
    assert metrics.pass_at_k(counts, n, n) == sum(c > 0 for c in counts) / len(counts)   # 1 iff c > 0
    assert math.isclose(metrics.avg_at_k(counts, n), metrics.pass_at_k(counts, n, 1))    # Avg@k = Pass@1


def test_bootstrap_variant_matches_its_definition_in_expectation():
    # one problem, c of n correct: the expected max of k draws with replacement is 1 - (1 - c/n)^k
    for n, c, k in [(32, 1, 32), (32, 2, 32), (32, 4, 32), (8, 3, 4), (16, 0, 16), (16, 16, 8)]:
        scores = [1] * c + [0] * (n - c)
        got = metrics.bootstrap_pass_at_k([scores], k, n_bootstrap=4000, seed=1)
        assert abs(got - (1 - (1 - c / n) ** k)) < 0.03, (n, c, k, got)
    # and it is biased low against the unbiased estimator: 1 correct of 32 is 1.0 unbiased, about 0.64 bootstrapped
    assert metrics.pass_at_k([1], 32, 32) == 1.0
    assert metrics.bootstrap_pass_at_k([[1] + [0] * 31], 32) < 0.7


def test_summarize_and_macro_average():
    samples = [{"problem_id": p, "sample": j, "correct": (p == "a") or j == 0, "truncated": j == 3,
                "extracted": None if j == 2 else "1"} for p in "ab" for j in range(4)]
    m = metrics.summarize(samples, 4)
    assert m["avg@4"] == (4 + 1) / 8 and m["pass@4"] == 1.0 and m["pass@1"] == m["avg@4"]
    assert m["truncated_frac"] == 0.25 and m["no_box_frac"] == 0.25 and set(m) >= {"pass@2", "pass@4_bootstrap"}
    avg = metrics.macro_average({"x": m, "y": dict(m, **{"avg@4": 0.0})})
    assert avg["avg@4"] == m["avg@4"] / 2
    with pytest.raises(ValueError):
        metrics.summarize(samples[:-1], 4)


# ---------------------------------------------------------------------------- loaders
def need_shared():
    if not SHARED_BENCHMARKS.exists():
        pytest.skip(f"{SHARED_BENCHMARKS} is absent (the benchmark copies live in ../shared/benchmarks)")


@pytest.mark.parametrize("name", benchmarks.PAPER_BENCHMARKS)
def test_loaders_read_the_real_files(name):
    need_shared()
    rows = benchmarks.load(name, SHARED_BENCHMARKS)
    assert len(rows) == benchmarks.BENCHMARKS[name].size
    assert len({r["id"] for r in rows}) == len(rows)
    assert all(r["problem"] and r["answer"] for r in rows)


def test_loader_errors_name_the_file_and_field(tmp_path, monkeypatch):
    monkeypatch.delenv("SCOPE_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="data-dir"):
        benchmarks.load("aime24")                                  # offline, no copy: says how to provide one
    with pytest.raises(FileNotFoundError, match="aime24.jsonl"):
        benchmarks.load("aime24", tmp_path)
    (tmp_path / "aime24.jsonl").write_text(json.dumps({"id": "1", "problem": "p", "answer": "3"}) + "\n")
    with pytest.raises(ValueError, match="expected 30"):
        benchmarks.load("aime24", tmp_path)
    (tmp_path / "aime24.jsonl").write_text(json.dumps({"id": "1", "problem": "p"}) + "\n")
    with pytest.raises(ValueError, match="aime24.jsonl:1: field 'answer'"):
        benchmarks.load("aime24", tmp_path)
    with pytest.raises(ValueError, match="unknown benchmark"):
        benchmarks.load("gsm8k", tmp_path)


# ---------------------------------------------------------------------------- oracle runs on the real files
def oracle(data, shift=0):
    """A stand-in generator that answers \\boxed{gold} (shift=0) or another problem's gold (shift=1)."""
    def generate(bench, rows, n):
        all_rows = data[bench]
        index = {r["id"]: i for i, r in enumerate(all_rows)}
        out = []
        for r in rows:
            gold = all_rows[(index[r["id"]] + shift) % len(all_rows)]["answer"]
            out.append([(f"Some reasoning. The answer is \\boxed{{{gold}}}.", False)] * n)
        return out
    return generate


def test_oracle_runs_through_the_whole_pipeline(tmp_path):
    need_shared()
    names = benchmarks.PAPER_BENCHMARKS
    data = {b: benchmarks.load(b, SHARED_BENCHMARKS) for b in names}
    args = EvalArgs(model="oracle", benchmarks=",".join(names), n=2, data_dir=str(SHARED_BENCHMARKS),
                    out_dir=str(tmp_path / "right"), batch_problems=64)
    res = evaluate(args, oracle(data), progress=False)
    for b in names:
        assert res["benchmarks"][b]["avg@2"] == 1.0 and res["benchmarks"][b]["pass@2"] == 1.0, b
    wrong = evaluate(EvalArgs(**{**vars(args), "out_dir": str(tmp_path / "wrong")}), oracle(data, shift=1),
                     progress=False)
    for b in names:
        assert wrong["benchmarks"][b]["avg@2"] < 0.03, (b, wrong["benchmarks"][b])   # near 0 (repeated golds match)
    assert "| macro average |" in table(res)


# ---------------------------------------------------------------------------- resume
class Crash(Exception):
    pass


class StandIn:
    """Deterministic random answers per problem; raises Crash on call number `fail_at` (a killed run)."""

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, bench, rows, n):
        self.calls += 1
        if self.calls == self.fail_at:
            raise Crash()
        out = []
        for r in rows:
            rng = random.Random(r["id"])
            out.append([(f"\\boxed{{{r['answer'] if rng.random() < 0.5 else 'x'}}}", rng.random() < 0.1)
                        for _ in range(n)])
        return out


def test_killed_evaluation_resumes_to_the_same_results(tmp_path):
    base = dict(model="stand-in", preset="tiny", benchmarks="tiny", n=4, limit=40, batch_problems=8)
    whole = evaluate(EvalArgs(**base, out_dir=str(tmp_path / "whole")), StandIn(), progress=False)
    killed = EvalArgs(**base, out_dir=str(tmp_path / "killed"))
    with pytest.raises(Crash):
        evaluate(killed, StandIn(fail_at=3), progress=False)
    samples = tmp_path / "killed" / "tiny.samples.jsonl"
    assert len(samples.read_text().splitlines()) == 2 * 8 * 4    # two batches were written before the crash
    with samples.open("a") as f:
        f.write('{"problem_id": "tiny-test-3')                   # a torn last line, as after SIGKILL mid-write
    again = evaluate(killed, StandIn(), progress=False)
    strip = lambda p: json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != "config"})  # noqa: E731
    assert strip(tmp_path / "whole" / "results.json") == strip(tmp_path / "killed" / "results.json")
    assert again["benchmarks"] == whole["benchmarks"] and 0 < whole["benchmarks"]["tiny"]["avg@4"] < 1


def test_ranks_evaluate_shards_and_rank0_merges_to_the_one_process_results(tmp_path):
    """Under torchrun each rank samples its own shard of the problems into its own file; rank 0 waits on the files
    (no collective) and merges. The merged results equal a one-process evaluation."""
    base = dict(model="stand-in", preset="tiny", benchmarks="tiny-add3,tiny-frac", n=4, limit=20, batch_problems=3)
    one = evaluate(EvalArgs(**base, out_dir=str(tmp_path / "one")), StandIn(), progress=False)
    sharded = EvalArgs(**base, out_dir=str(tmp_path / "three"))
    assert evaluate(sharded, StandIn(), progress=False, rank=2, world=3) is None    # non-zero ranks return None
    assert evaluate(sharded, StandIn(), progress=False, rank=1, world=3) is None
    merged = evaluate(sharded, StandIn(), progress=False, rank=0, world=3)
    assert merged["benchmarks"] == one["benchmarks"] and merged["ranks"] == 3
    assert len((tmp_path / "three" / "tiny-add3.samples.rank1of3.jsonl").read_text().splitlines()) == 7 * 4


# ---------------------------------------------------------------------------- end to end, a real tiny model
def test_end_to_end_tiny_model(micro_models, tmp_path, capsys):
    student, _ = micro_models
    main(["--model", student, "--preset", "tiny", "--limit", "8", "--n", "2", "--out-dir", str(tmp_path)])
    res = json.loads((tmp_path / "results.json").read_text())
    m = res["benchmarks"]["tiny"]
    assert m["problems"] == 8 and 0.0 <= m["avg@2"] <= m["pass@2"] <= 1.0
    assert res["model"]["revision"].startswith("sha256:") and "torch" in res["versions"]
    lines = (tmp_path / "tiny.samples.jsonl").read_text().splitlines()
    assert len(lines) == 16 and {"problem_id", "sample", "response", "extracted", "correct", "truncated"} <= set(
        json.loads(lines[0]))
    assert "| tiny |" in capsys.readouterr().out


def test_vllm_backend_missing_is_a_clear_error(tmp_path, no_vllm):
    args = EvalArgs(model="some/model", preset="tiny", backend="vllm", limit=2, n=2, out_dir=str(tmp_path))
    with pytest.raises(SystemExit, match="the vllm engine needs vllm"):
        evaluate(args, progress=False)

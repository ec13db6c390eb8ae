"""The math-answer verifier: labelled cases, hostile inputs, time bound, and oracles on the real benchmarks."""

import json
import os
import re
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import verifier
from conftest import SHARED_BENCHMARKS
from eval import extract
from verifier_cases import CASES

BOUND_S = 1.0


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


# ---------------------------------------------------------------------------- labelled cases
def test_enough_cases_in_every_category():
    assert len(CASES) >= 200
    cats = {c for c, *_ in CASES}
    for cat in cats:
        labels = {e for c, _, _, e in CASES if c == cat}
        assert labels == {True, False} or cat == "misc", f"category {cat} needs equal and not-equal cases"


@pytest.mark.parametrize("category,pred,gold,expected", CASES, ids=[f"{c}-{i}" for i, (c, *_) in enumerate(CASES)])
def test_labelled_case(category, pred, gold, expected):
    got, seconds = timed(verifier.is_equiv, pred, gold)
    assert got is expected
    assert seconds < BOUND_S


# ---------------------------------------------------------------------------- extraction and reward
@pytest.mark.parametrize("text,expected", [
    ("so the answer is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("\\boxed{a{b{c}}d}", "a{b{c}}d"),
    ("\\boxed 5 is it", "5"),
    ("$\\boxed 5$", "5"),
    ("\\fbox{7}", "7"),
    ("\\boxed{}", ""),
    ("no box here", None),
    ("\\boxed{unbalanced", None),
    ("\\boxed{1} and a broken \\boxed{2", None),
    ("\\boxedx{3}", None),
])
def test_extract_boxed(text, expected):
    assert verifier.extract_boxed(text) == expected


def test_reward_rules():
    assert verifier.reward("... \\boxed{\\frac12}", "0.5") == 1.0
    assert verifier.reward("... \\boxed{\\frac12}", "0.5", truncated=True) == 0.0    # cut at the length limit
    assert verifier.reward("the answer is 0.5", "0.5") == 0.0                        # no box
    assert verifier.reward("\\boxed{}", "0.5") == 0.0                                # empty box
    assert verifier.reward("\\boxed{ }", "0.5") == 0.0
    assert verifier.reward("\\boxed{0.5} no wait \\boxed{0.6}", "0.5") == 0.0        # the LAST box counts


# ---------------------------------------------------------------------------- hostile inputs
HOSTILE = [
    "9^{9^{9^{9}}}",
    "10^{10^{100}}",
    "1000!",
    "(10^{100})!",
    "2^{2^{2^{2^{2^{2}}}}}",
    "{" * 5000 + "1" + "}" * 5000,
    "(" * 5000 + "1" + ")" * 5000,
    "x" * 1_000_000,
    "1" * 1_000_000,
    "__import__('os').system('touch /tmp/scope_pwned')",
    "exec(\"open('/tmp/scope_pwned','w')\")",
    "lambda: __import__('os')",
    "\x00\x00\x001",
    "1\x00",
    "{{{{{",
    "}}}}",
    "\\frac{1}{",
    "\\sqrt[",
    "\\boxed{1}\\boxed{2}",
    "",
    "\\begin{pmatrix}" + "1&" * 5000 + "1\\end{pmatrix}",
    "1," * 100000,
    "e^{e^{e^{e^{e^{10}}}}}",
    "\\sin(10^{1000})",
    "10^{-10^{100}}",
    "\\frac{1}{0}",
    "0^{-1}",
]


@pytest.mark.parametrize("text", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_inputs_are_refused_fast_and_harmless(text):
    if os.path.exists("/tmp/scope_pwned"):
        os.remove("/tmp/scope_pwned")
    for pred, gold in ((text, "5"), ("5", text), (text, text[:100] + "+1")):
        got, seconds = timed(verifier.is_equiv, pred, gold)
        assert got is False or pred == gold
        assert seconds < BOUND_S, f"{seconds:.2f}s"
    _, seconds = timed(verifier.reward, "\\boxed{" + text + "}", "5")
    assert seconds < BOUND_S
    assert not os.path.exists("/tmp/scope_pwned")


def test_time_bound_holds_in_a_worker_thread():
    results = []

    def work():
        for text in HOSTILE[:6] + ["\\sin^2 x + \\cos^2 x"]:
            results.append(timed(verifier.is_equiv, text, "1"))

    t = threading.Thread(target=work)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive() and len(results) == 7
    assert all(seconds < BOUND_S for _, seconds in results)
    assert results[-1][0] is True                                  # the thread still verifies correctly


LATEX_ALPHABET = list("0123456789+-*/^_{}()[]|,.=<> xyabe!") + [
    "\\frac", "\\sqrt", "\\pi", "\\cdot", "\\left(", "\\right)", "\\{", "\\}", "\\cup", "\\infty", "\\sin",
    "\\log", "\\text{", "\\boxed{", "\\begin{pmatrix}", "\\end{pmatrix}", "&", "\\\\", "\\%", "\\$", "^{\\circ}"]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text(max_size=60) | st.lists(st.sampled_from(LATEX_ALPHABET), max_size=40).map("".join),
       st.sampled_from(["1", "\\frac{1}{2}", "(1,2)", "x+1", "\\{1,2\\}", "[0,1)", "x>2"]))
def test_fuzz_never_crashes_and_stays_bounded(text, gold):
    got, seconds = timed(verifier.is_equiv, text, gold)
    assert isinstance(got, bool) and seconds < BOUND_S
    got, seconds = timed(verifier.reward, text, gold)
    assert got in (0.0, 1.0) and seconds < BOUND_S


# ---------------------------------------------------------------------------- oracles on the real benchmarks
BENCHMARKS = ["math500", "aime24", "aime25", "amc23", "minerva", "olympiadbench"]


def load(name):
    path = SHARED_BENCHMARKS / f"{name}.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is absent (the benchmark copies live in ../shared/benchmarks)")
    return [json.loads(line) for line in path.open()]


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_gold_matches_itself_and_its_boxed_form(name):
    for row in load(name):
        gold = row["answer"]
        assert verifier.is_equiv(gold, gold), row["id"]
        assert verifier.reward(f"Reasoning... so the final answer is \\boxed{{{gold}}}.", gold) == 1.0, row["id"]


def test_math500_solutions_verify_against_gold():
    rows = load("math500")
    ok = [verifier.reward(r["solution"], r["answer"]) == 1.0 for r in rows]
    rate = sum(ok) / len(rows)
    print(f"MATH500 reference solutions verified: {sum(ok)}/{len(rows)} = {rate:.3f}")
    assert rate >= 0.99, [r["id"] for r, k in zip(rows, ok) if not k]


@pytest.mark.parametrize("name", BENCHMARKS)
def test_another_problems_gold_is_rejected(name):
    rows = load(name)
    pairs = [(rows[i]["answer"], rows[(i + 1) % len(rows)]["answer"]) for i in range(len(rows))]
    # identical golds are right to match
    pairs = [(p, g) for p, g in pairs if p.replace(" ", "") != g.replace(" ", "")]
    accepted = [(p, g) for p, g in pairs if verifier.is_equiv(p, g)]
    print(f"{name}: {len(accepted)}/{len(pairs)} shifted pairs accepted")
    assert len(accepted) <= 0.01 * len(pairs), accepted


# ---------------------------------------------------------------------------- the independent corpus (issue #10)
CORPUS = [json.loads(line) for line in (Path(__file__).parent / "verifier_corpus.jsonl").read_text().splitlines()]


def test_corpus_cases_name_their_source_and_any_policy_difference():
    """tests/verifier_corpus.jsonl holds cases from public verifiers' own test suites (bench/build_verifier_corpus.py):
    each names its repository, commit and file; where the project's label differs from the upstream one it says why."""
    repos = {c["source"].split("@")[0] for c in CORPUS}
    assert len(repos) >= 8 and len(CORPUS) >= 600
    for c in CORPUS:
        assert isinstance(c["gold"], str) and isinstance(c["pred"], str) and isinstance(c["upstream"], bool)
        assert re.fullmatch(r"[\w.-]+/[\w.-]+@\w+:\S+::.+", c["source"]), c["source"]
        if c.get("label", c["upstream"]) != c["upstream"]:
            assert len(c.get("reason", "")) > 20, c


def test_corpus_scores_stay_at_their_measured_level():
    """REGRESSION CHECK, not an independent estimate: the verifier was extended while looking at this corpus's
    misses (docs/verifier.md). Balanced accuracy >= 92% and false accepts <= 2% on the project's labels."""
    got = [extract.verify(c["pred"], c["gold"]) == 1.0 for c in CORPUS]
    label = [c.get("label", c["upstream"]) for c in CORPUS]
    pos = [g for g, lab in zip(got, label) if lab]
    neg = [g for g, lab in zip(got, label) if not lab]
    recall, false_accept = sum(pos) / len(pos), sum(neg) / len(neg)
    assert (recall + 1 - false_accept) / 2 >= 0.92 and false_accept <= 0.02, (recall, false_accept)


@pytest.mark.parametrize("text,expected", [
    ("so \\boxed{3} and later \\boxed{5}.", "5"),                               # 1. the last box
    ("x^2+2x+1", "x^2+2x+1"),                                                  # 2. a bare answer is itself
    ("We add them. The final answer is $28\\%$. I hope it is correct.", "28\\%"),  # 3. after "answer is"
    ("Thus the largest value we found. Final Answer: The largest $n$ is 34.", "34"),
    ("Answer \\[ \n 9 \n \\]", "9"),
    ("Adding gives the result $x = 7$ and we stop here with that", "x = 7"),   # 4. the last math span
    ("First we compute things, getting 10 then finally 30 apples", "30"),      # 5. the last number
    ("Answer $ \n 9 \n $ and nothing else appears here", None),               # inline math does not span lines
    ("no digits or math appear anywhere in this sentence", None),
    ("So 6+15=21.\n#### 21\n\nHope this helps with your 2 questions.", "21"),   # a dataset's answer marker
    ("48+24=72 clips in all.\nA: 72\n\nQ: How many are left after 5 are sold?", "72"),
    ("We compute the sum.\n\n# Answer\n\n21\n\n# Explanation\nWe had 5 apples.", "21"),
    ("Checking again, the answer is indeed 6.", "6"),                             # fillers after the cue
    ("**Final Answer**\n\n42", "42"),
    ("Therefore, the degree of $f(x)$ is 3.", "3"),                               # a closing "... is X."
    ("so the number is 10 which is 1,000.99m²", "1,000.99"),                      # X must be math characters
    ("The value is therefore $" + "\\sqrt{42+" * 1000 + "1" + "}" * 1000 + "$", None),   # the tail starts in math
])
def test_evaluation_answer_order(text, expected):
    assert extract.evaluation_answer(text) == expected


def test_training_reward_is_boxed_only_and_evaluation_is_lenient():
    unboxed = "We compute carefully and conclude. The answer is 5."
    assert verifier.reward(unboxed, "5") == 0.0                                   # training: a box is required
    assert extract.verify(unboxed, "5") == 1.0                          # evaluation: found as harnesses do
    assert extract.verify(unboxed, "5", extraction="boxed") == 0.0
    assert verifier.reward("Solutions: \\boxed{1} and \\boxed{2}", "1, 2") == 1.0  # boxes side by side: one list
    assert verifier.reward("We get \\boxed{1}, which fails; so it is \\boxed{2}", "1, 2") == 0.0   # prose between
    assert verifier.reward("\\boxed{2}", "$\\boxed{1} and \\boxed{2}$") == 0.0    # a gold list needs every item
    assert verifier.reward("so \\boxed{5}", "5", truncated=True) == 0.0


@pytest.mark.parametrize("pred,gold,expected", [
    ("(3,2)", "(p,q)=(3,2)", True), ("4, 5", "AB=4,CD=5", True), ("[0,7)", "x \\in [0,7)", True),
    ("(-\\infty, 3]", "x \\le 3", True), ("(-\\infty, 3)", "x \\le 3", False), ("[-2,7]", "-2 \\le x \\le 7", True),
    ("y=-\\frac{1}{2}x+\\frac{3}{4}", "2x+4y-3=0", True), ("y=-\\frac{1}{2}x+1", "2x+4y-3=0", False),
    ("0.0833", "\\frac{1}{12}", True), ("0.0834", "\\frac{1}{12}", False), ("3.1416", "3.14159", True),
    ("10\\%", "0.1", True), ("10\\%", "10", True), ("10\\%", "0.01", False),
    ("11,\\!111,\\!100", "11111100", True), ("32, 349", "32349", False), ("1,22", "1.22", False),
    ("x = 5+5+1 = 11", "11", True), ("\\frac{\\sqrt{3}}{3} \\approx 0.577", "\\frac{\\sqrt{3}}{3}", True),
    ("\\left[\\begin{array}{cc}1 & 2 \\\\3 & 4\\end{array}\\right]", "\\begin{pmatrix}1 & 2 \\\\3 & 4\\end{pmatrix}", True),
    ("6 \\text{ and } 8", "6, 8", True), ("(7,11) or (11,7)", "(11,7),(7,11)", True),
    ("(0;-2;6)", "(0,-2,6)", True), ("\\cfrac{1}{3}", "1/3", True), ("185\\", "185", True),
])
def test_policy_classes(pred, gold, expected):
    """The equivalence classes of issue #10, one or two cases each (written here: a regression check)."""
    assert verifier.is_equiv(pred, gold) is expected


def test_evaluation_answer_is_bounded_on_hostile_text():
    for text in ("$" * 200_000, "answer is " * 50_000, "\\boxed{" * 100_000, "1," * 300_000, "\\(" * 100_000):
        t0 = time.monotonic()
        extract.verify(text, "1")
        verifier.official_reward(text + "\\boxed{" + text + "}", "1")     # the released grader: string work only
        assert time.monotonic() - t0 < 2.0


@pytest.mark.parametrize("response,gold,want", [
    # the MATH string match after its normalisation
    ("so \\boxed{\\frac12}", "1/2", 1.0), ("so \\boxed{0.5}", "\\frac{1}{2}", 1.0), ("so \\boxed{x = 5}", "5", 1.0),
    ("so \\boxed{2/4}", "1/2", 0.0),                     # no equivalence beyond strings
    ("The answer is 5", "5", 0.0),                        # boxed only
    ("so \\boxed{10\\%}", "10", 1.0),                     # an escaped percent goes ...
    # ... the four cases where the released grader decides otherwise than the default one (issue #33):
    ("The answer is \\boxed{10%}.", "10", 0.0),           # a bare % stays: "10%" is not "10"
    ("so \\boxed{10}", "10%", 0.0),
    ("\\fbox{42}", "42", 0.0),                             # an \\fbox as the last box: not a \\boxed{}, an error, 0
    ("The answer is \\boxed{\\fbox{42}}.", "42", 0.0),     # inside the box it stays in the string
    ("\\framebox{100}", "100", 0.0),                       # no box at all
    ("\\boxed{185\\}", "185\\", 1.0),                     # a trailing backslash: "\\}" closes the box there
    ("\\boxed{}", "", 1.0),                                # an empty box against an empty gold
    ("\\boxed 7$ and more", "7", 1.0),                     # "\\boxed " with a space: up to the next "$"
    ("\\boxed{\\frac{1}{2}} but \\boxed{3", "3", 0.0),       # an unclosed last box: none
])
def test_the_official_grader_decides_as_the_released_one(response, gold, want):
    """--grader official is the released code's training grader (verl/utils/reward_score/math.compute_score of
    machine981/SCOPE @085fdc2), rule for rule: the cases above are decided as that code decides them (each worked out
    from its rules; all 3,145 (response, gold) pairs built from tests/verifier_corpus.jsonl agreed with it when it was
    run beside this one, 2026-12-07). The default grader stays as it is."""
    assert verifier.official_reward(response, gold) == want


def test_the_official_grader_has_no_truncation_rule():
    """A cut-off response whose last box matches scores 1 under the released grader; 0 under the default one."""
    assert verifier.official_reward("so \\boxed{5} and then", "5", truncated=True) == 1.0
    assert verifier.reward("so \\boxed{5} and then", "5", truncated=True) == 0.0
    assert verifier.reward("so \\boxed{10%}", "10") == 1.0 and verifier.is_equiv("2/4", "1/2")   # default unchanged

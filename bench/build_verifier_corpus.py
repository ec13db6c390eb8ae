"""Build tests/verifier_corpus.jsonl: labelled (gold, response) cases taken from public verifiers' own test suites,
so the verifier can be measured on material nobody here wrote (issue #10). Facts only carry over (the strings and
the upstream labels); no upstream code does.

    python bench/build_verifier_corpus.py --mirror /work/.mirror      # repositories fetched as <owner>+<name>/repo

Parametrized pytest suites are read with `ast` (literals only, never executed). Small suites whose cases sit in
assertions were transcribed by hand below (TRANSCRIBED), each with its repository, commit and file. A case's
`upstream` is the label its suite asserts; `label` is this project's policy, and where it differs `reason` says why.
Pairs that several suites share are kept once (`also_in` lists the others). Multiple-choice letter tests and tests of
helpers other than an answer check are left out (they are not math-answer equivalence).
"""
import argparse
import ast
import json
import subprocess
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "tests" / "verifier_corpus.jsonl"

# (repo, file, {test function: how to read its cases}); "gpe": argnames gold, pred, expected
AST_SUITES = [
    ("huggingface/Math-Verify", "tests/test_all.py"), ("huggingface/Math-Verify", "tests/test_boxed.py"),
    ("huggingface/Math-Verify", "tests/test_numina_cases.py"), ("huggingface/Math-Verify", "tests/test_open_thoughts.py"),
    ("huggingface/Math-Verify", "tests/test_strict.py"), ("huggingface/Math-Verify", "tests/test_yujianll.py"),
    ("huggingface/lighteval", "tests/unit/metrics/test_extractive_match.py"),
    ("NVIDIA/NeMo-Skills", "tests/test_math_equal.py"),
]
SKIP_TESTS = {"test_extraction_abc", "test_multilingual_extraction_abc", "test_string_extraction"}   # letters

# Cases asserted inline in small suites, transcribed: (gold, response, upstream label, test name).
TRANSCRIBED = {
    ("Ascend/MindSpeed-RL", "tests/ut/utils/test_grader.py", "TestGrader.test_math_equal"): [
        ("x+2n+1", "x+1", False), ("x+1", "x+1", True), ("x+2", "x+1", False), ("1", "1.0", True),
        ("1", "1.0001", True), ("1", "1.1", False)],
    ("volcengine/verl", "tests/utils/reward_score/test_numeric_canonicalization_on_cpu.py", "test_is_equiv_boxed"): [
        ("033", "33", True), ("+033", "33", True), ("-0", "0", True), ("000", "0", True)],
    ("groq/openbench", "tests/test_robust_scorers.py", "TestBoxedExtraction"): [
        ("42", r"\boxed{42}", True), ("-3", r"The answer is \boxed{-3}", True), ("3.14159", r"\boxed{3.14159}", True),
        ("100", r"\framebox{100}", True), ("0", r"Answer: \framebox{0}", True), ("42", r"\fbox{42}", True),
        ("-10", r"The answer is \fbox{-10}", True), ("3", r"First \boxed{1} then \boxed{2} finally \boxed{3}", True),
        ("1", r"First \boxed{1} then \boxed{2} finally \boxed{3}", False), ("42", "The answer is 42", True),
        ("30", "First 10 then 20 finally 30", True), ("-5", "Negative: -5", True), ("3.14", "Decimal: 3.14", True),
        ("42", r"\boxed{42}", True), ("123", "The answer is 123", True), ("42", r"\boxed{41}", False)],
    ("cklxx/slime", "tests/test_math_reward_utils.py", "test_deepscaler_reward_fallback_without_markers"): [
        ("42", "Answer: \\boxed{42}", True)],
}
# Suites added after the verifier was extended on the ones above: measured before any change made for them
# (README, verifier policy: "held out").
HELD_OUT = {
    ("modelscope/Trinity-RFT", "tests/utils/eval_utils_test.py", "TestComputeScore"): [
        ("The correct result is \\boxed{42}", "The final answer is \\boxed{42}", True),
        ("The answer is \\boxed{42}", "The answer is \\boxed{42}", True),
        ("100", "Let's see, the result is \\boxed{100}", True),
        ("The answer is \\boxed{1}", "I think the answer is \\boxed{-1}", False),
        ("orange", "The answer is \\boxed{apple}", False),
        ("The answer is \\boxed{42}", "The answer is 42, but I'm not boxing it.", False),
        ("42", "The answer is 42, but I'm not boxing it.", False),
        ("\\boxed{10}", "", False), ("", "The answer is \\boxed{}", True), ("", "The answer is \\boxed{1}", False),
        ("\\boxed{B}", "First I thought it was \\boxed{A}, but then I realized it is \\boxed{B}", True),
        ("\\boxed{A}", "First I thought it was \\boxed{A}, but then I realized it is \\boxed{B}", False)],
    ("modelscope/Trinity-RFT", "tests/utils/eval_utils_test.py", "TestMathEvalUtils"): [
        ("42", "The answer is \\boxed{42}", True), ("\\frac{1}{2}", "The result is \\boxed{\\frac{1}{2}}", True),
        ("100", "Therefore, the final answer is 100.", True), ("3.14", "My final answer is: 3.14", True),
        ("x^2", "所以，答案是x^2", True), ("20", "The cost is 10 dollars and the profit is 20 dollars.", True),
        ("2000", "There are 1,000 apples and 2,000 oranges.", True), ("0.75", "The probability is 0.75.", True),
        ("1000", "The result is 1,000.", True), ("-50", "The answer is -50.", True), ("x=5", "The solution is 5", True),
        ("43", "The answer is \\boxed{42}", False), ("x-1", "The answer is \\boxed{x+1}", False),
        ("\\begin{pmatrix}1&0\\\\0&1\\end{pmatrix}",
         "The matrix is \\boxed{\\begin{pmatrix}1 & 1 \\\\ 0 & 1\\end{pmatrix}}", False),
        ("50", "The speed is 50 km/h", True)],
    ("modelscope/Trinity-RFT", "tests/utils/eval_utils_test.py", "TestEvalUtils"): [
        ("123", "  123  ", True), ("50", "50%", True), ("50", "$50", True), ("world", "hello", False),
        ("1234", "123", False)],
    ("huggingface/open-r1", "tests/test_rewards.py", "TestRewards.test_accuracy_reward_*"): [
        ("\\frac{63}{400}", "\\boxed{\\frac{63}{400}}", True), ("\\frac{63}{400}", "\\boxed{\\frac{64}{400}}", False),
        ("6", "\\boxed{3}", False)],
}
COMMITS = {"Ascend/MindSpeed-RL": "", "volcengine/verl": "d69068d2a32b985e759049da6f801a039b94b31b",
           "groq/openbench": "", "cklxx/slime": "5827e3c13dd861118dc188a94a0dcad9335bcbc2",
           "modelscope/Trinity-RFT": "8e2776b90bdad23156e6077515db7bfa28211d2a",
           "huggingface/open-r1": "1416fa0cf21595d2083b399a2a0bbddd7f6e9563"}


# Where the project's policy (README, "verifier policy") labels a case differently from its suite: (gold, pred) ->
# (project label, reason).
COMMA = "a comma separates list items or thousands (the MATH convention); a decimal comma is not read as a point"
ORDER = ("a bare comma list of answers (e.g. all solutions) is compared as an unordered multiset; the MATH string "
         "grader is order-sensitive by construction")
IRRATIONAL = ("a decimal stands for an irrational value only when it agrees to 1e-6 relative (3.14159265 for pi); "
              "the rounding rule (0.0833 for 1/12) is for rational values")
POLICY = {
    ("1000.99", "1000,99"): (False, COMMA), ("1,22", "1.22"): (False, COMMA), ("0,111", "0.111"): (False, COMMA),
    ("2.74", "Soucis : 2,74 $ a.."): (False, COMMA),
    ("10, 4, -2", "4, 10, -2"): (True, ORDER), ("0.1, 4, 2", "4, .1, 2"): (True, ORDER),
    ("$(1,3)$", "${1,3}$"): (False, "a set {1, 3} is not the ordered pair or interval (1, 3)"),
    ("1", "1.0001"): (False, "1.0001 is not 1: a decimal equals an exact value only when it is that value rounded to "
                             "its own digits (NeMo-Skills' 5 vs 5.001 is judged the same way)"),
    ("$(\\begin{pmatrix}\\frac{1}{3}\\\\ \\frac{1}{5} \\end{pmatrix})$", "$\\begin{pmatrix}0.33\\\\0.2 \\end{pmatrix}$"):
        (False, "the suite passes precision=2; the project's rounding rule needs 3 significant digits (0.33 for 1/3 "
                "is refused)"),
    ("x + \\sqrt2I", "x + 1.414I"): (False, IRRATIONAL), ("\\frac13, \\sqrt3, \\pi", "1/3, 1.732, 3.1416"): (False, IRRATIONAL),
    ("40\\pi", "125.663"): (False, IRRATIONAL + "; 125.663 is not even 40 pi rounded (125.664)"),
    ("\\begin{cases} a+b=\\frac12 \\\\ a-b=\\sqrt3 \\end{cases}", "\\begin{cases} a+b=0.5\\\\ a-b=1.732\\end{cases}"):
        (False, IRRATIONAL),
    ("", "The answer is \\boxed{}"): (False, "an empty box is no answer, whatever the gold"),
}

def git(mirror, repo, *args):
    return subprocess.run(["git", "-C", str(mirror / repo.replace("/", "+") / "repo"), *args], capture_output=True,
                          text=True, check=True).stdout


def literal(node):
    try:
        v = ast.literal_eval(node)
    except ValueError:
        return None
    return v


def suite_cases(src, repo):
    """(test name, gold, pred, label, options) from every parametrize list of literal tuples."""
    for fn in ast.walk(ast.parse(src)):
        if not isinstance(fn, ast.FunctionDef) or fn.name in SKIP_TESTS:
            continue
        for d in fn.decorator_list:
            if not (isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "parametrize"):
                continue
            names = [n.strip() for n in literal(d.args[0]).split(",")]
            for elt in d.args[1].elts:
                row = literal(elt)
                if row is None:                                   # not a literal (e.g. 5 / 2): left out
                    continue
                if names == ["output_pair"]:                      # NeMo-Skills: both orders are asserted
                    label = fn.name == "test_correct_examples"
                    if None in row:
                        continue
                    yield fn.name, str(row[1]), str(row[0]), label, {}
                    yield fn.name, str(row[0]), str(row[1]), label, {}
                    continue
                rec = dict(zip(names, row))
                label = rec.get("expected", rec.get("result"))
                options = {k: str(v) for k, v in rec.items() if k not in ("gold", "pred", "expected", "result")}
                for call in ast.walk(fn):                          # non-default options the test passes
                    if isinstance(call, ast.Call):
                        for k in call.keywords:
                            if k.arg in ("precision", "strict", "allow_set_relation_comp") and literal(k.value) is not None:
                                options[k.arg] = str(literal(k.value))
                yield fn.name, str(rec["gold"]), str(rec["pred"]), bool(label), options


def unittest_cases(src):
    """unittest methods that set test_in / test_out, then assertTrue / assertFalse an equivalence call on them
    (several pairs per method in order)."""
    for fn in ast.walk(ast.parse(src)):
        if isinstance(fn, ast.FunctionDef) and fn.name.startswith("test_"):
            v = {}
            for stmt in fn.body:
                if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name):
                    v[stmt.targets[0].id] = literal(stmt.value)
                call = stmt.value if isinstance(stmt, ast.Expr) else None
                if isinstance(call, ast.Call) and getattr(call.func, "attr", "") in ("assertTrue", "assertFalse"):
                    yield fn.name, v["test_in"], v["test_out"], call.func.attr == "assertTrue"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mirror", default="/work/.mirror")
    a = p.parse_args()
    mirror = Path(a.mirror)
    cases, seen = [], {}

    def add(gold, pred, label, source, options=None, held_out=False):
        key = (gold, pred)
        if key in seen:
            seen[key].setdefault("also_in", []).append(source)
            return
        rec = {"gold": gold, "pred": pred, "upstream": label, "source": source, "split": "held-out" if held_out else "dev"}
        if options:
            rec["options"] = options
        seen[key] = rec
        cases.append(rec)

    for repo, path in AST_SUITES:
        commit = git(mirror, repo, "rev-parse", "HEAD").strip()
        for test, gold, pred, label, options in suite_cases(git(mirror, repo, "show", f"HEAD:{path}"), repo):
            add(gold, pred, label, f"{repo}@{commit[:12]}:{path}::{test}", options)
    for repo, path, held_out in (("hendrycks/math", "modeling/math_equivalence_test.py", False),
                                 ("MARIO-Math-Reasoning/MARIO_EVAL", "math_evaluation/tests/test_is_equiv.py", True)):
        commit = git(mirror, repo, "rev-parse", "HEAD").strip()
        for test, gold, pred, label in unittest_cases(git(mirror, repo, "show", f"HEAD:{path}")):
            add(gold, pred, label, f"{repo}@{commit[:12]}:{path}::{test}", held_out=held_out)
    for table, held_out in ((TRANSCRIBED, False), (HELD_OUT, True)):
        for (repo, path, test), rows in table.items():
            for gold, pred, label in rows:
                add(gold, pred, label, f"{repo}@{COMMITS[repo][:12] or 'unpinned'}:{path}::{test} (transcribed)",
                    held_out=held_out)
    for c in cases:
        if (c["gold"], c["pred"]) in POLICY:
            c["label"], c["reason"] = POLICY[(c["gold"], c["pred"])]
    missing = set(POLICY) - {(c["gold"], c["pred"]) for c in cases}
    assert not missing, f"POLICY names cases the suites no longer have: {missing}"
    OUT.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in cases))
    repos = {c["source"].split("@")[0] for c in cases}
    print(f"{len(cases)} cases ({sum(c['upstream'] for c in cases)} equal, {sum(not c['upstream'] for c in cases)} "
          f"not) from {len(repos)} repositories -> {OUT}")


if __name__ == "__main__":
    main()

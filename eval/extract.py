"""Evaluation's answer extraction (README, "verifier policy"): finding the final answer of a response that may not
box it, the way community evaluation harnesses do. The equality test itself is verifier.is_equiv, the same one the
training reward uses; training reads only the last box (verifier.reward).
"""
import re

import verifier

_ANSWER_RE = re.compile(r"(?:answer|答案)\s*(?:is|是|:|：|=)?\s*[:：]?\s*", re.I)
_MATH_RE = re.compile(r"\$\$(.+?)\$\$|\\\[(.+?)\\\]|\\\(([^\n]+?)\\\)|(?<![\\$])\$([^$\n]+?)(?<!\\)\$", re.S)
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _span(m):
    return next(g for g in m.groups() if g is not None).strip()


def _has_prose(text):
    """A word of 4+ letters outside LaTeX commands and their {arguments}: sentences, not a bare answer."""
    text = re.sub(r"\\[a-zA-Z]+(?:\s*\{[^{}]*\})?", "", text)
    return bool(re.search(r"(?<!\\)\b[a-zA-Z]{4,}\b|[\u3040-\u30ff\u4e00-\u9fff]", text))   # or CJK text


def evaluation_answer(text):
    """The final answer of a response, found the way community evaluation harnesses do (README: verifier policy):
    1. the last \\boxed{} / \\fbox{} / \\framebox{};  2. a short response with no prose is the answer itself;
    3. the first sentence after the last "answer is" / "answer:" (its closing math span, or what follows its last
    " is ");  4. the last display or inline math span;  5. the last number. Training does not use this: its reward
    needs a box (`verifier.reward`). -> str or None."""
    if not isinstance(text, str):
        return None
    boxed = verifier.extract_boxed(text)
    if boxed is not None:
        return boxed
    bare = text.strip().strip("$").strip()
    if len(bare) <= verifier.MAX_ANSWER_CHARS and not _has_prose(bare):
        return bare                                               # "x^2+2x+1", "\frac{1}{2}", "1 000"
    tail = text[-4 * verifier.MAX_ANSWER_CHARS:]                     # the answer sits at the end; bounds the regexes
    cue = None
    for cue in _ANSWER_RE.finditer(tail):
        pass
    if cue is not None:
        first = _MATH_RE.match(tail[cue.end():].lstrip())
        if first:
            return _span(first)                                   # "Answer \\[ 9 \\]"
        line = re.split(r"\n|\.\s|\.$", tail[cue.end():].strip(), maxsplit=1)[0].strip()
        spans = list(_MATH_RE.finditer(line))
        if spans and not line[spans[-1].end():].strip(" .,;:"):
            return _span(spans[-1])                               # "The final answer is $28\%$"
        if " is " in line:
            return line.rsplit(" is ", 1)[1].strip(" .$")         # "The largest $n$ is 34"
        if spans:
            return _span(spans[-1])
        if line and not re.search(r"\w", line):
            return None                                           # a cue followed by nothing readable
        if line and len(line) < 80:
            return line
    spans = list(_MATH_RE.finditer(tail))
    if spans:
        return _span(spans[-1])
    numbers = _NUMBER_RE.findall(tail)
    return numbers[-1] if numbers else None


def gold_answer(gold):
    """A gold answer as stored: its boxes (several, side by side: one list) or its $...$ / \\( \\) / \\[ \\] removed."""
    gold = gold.strip()
    boxes = verifier.box_list(gold)
    if boxes:
        return ", ".join(boxes)
    if _has_prose(gold) and len(gold) > 200:                      # a worked solution, not an answer
        return evaluation_answer(gold) or gold
    return re.sub(r"\$|\\\(|\\\)|\\\[|\\\]", " ", gold).strip()


def verify(response, gold, truncated=False, extraction="lenient"):
    """1.0 if the response's final answer equals the gold answer. extraction: lenient (evaluation_answer) or boxed
    (the last box, as training reads it); the gold loses its box(es) or math delimiters first (gold_answer)."""
    if not isinstance(gold, str):
        return 0.0
    extract = evaluation_answer if extraction == "lenient" else verifier.extract_boxed
    return verifier.verify_response(response, gold_answer(gold), truncated, extract)

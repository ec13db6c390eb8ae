"""Evaluation's answer extraction (docs/verifier.md): finding the final answer of a response that may not
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


_MARKER_RE = re.compile(r"^[ \t]*(?:####\s*(?P<gsm>\S.*)|A:[ \t]*(?P<qa>\S.*)|#+[ \t]*Answer[ \t]*:?[ \t]*$)",
                        re.M | re.I)
_FILLER_RE = re.compile(r"^(?:\**\s*)(?:(?:indeed|simply|just|exactly|actually|clearly|therefore|thus|then|precisely|"
                        r"given by|equal to|equals|now|still|also)\b[\s,:]*)+", re.I)


def _inside_math(prefix):
    """Whether text after prefix starts inside a math span: an odd number of unescaped $, or an open \\[ or \\(."""
    dollars = len(re.findall(r"(?<!\\)\$", prefix))
    return dollars % 2 == 1 or prefix.count("\\[") > prefix.count("\\]") or prefix.count("\\(") > prefix.count("\\)")


def _after_cue(rest):
    """(found, answer) from the text after "answer is" / "answer:"; found False: the cue says nothing, read on."""
    rest = rest.lstrip(" \t*:：#\n")                               # "**Final Answer**\n\n42", "answer: 5"
    first = _MATH_RE.match(rest)
    if first:
        return True, _span(first)                                 # "Answer \\[ 9 \\]"
    line = re.split(r"\n|\.\s|\.$", rest.strip(), maxsplit=1)[0].strip()
    line = _FILLER_RE.sub("", line).strip()                       # "the answer is indeed 6"
    spans = list(_MATH_RE.finditer(line))
    if spans and not line[spans[-1].end():].strip(" .,;:"):
        return True, _span(spans[-1])                             # "The final answer is $28\\%$"
    if " is " in line:
        return True, line.rsplit(" is ", 1)[1].strip(" .$")       # "The largest $n$ is 34"
    if spans:
        return True, _span(spans[-1])
    if line and not re.search(r"\w", line):
        return True, None                                         # a cue followed by nothing readable
    return (True, line) if line and len(line) < 80 else (False, None)


def evaluation_answer(text):
    """The final answer of a response, found the way community evaluation harnesses do (docs/verifier.md):
    1. the last \\boxed{} / \\fbox{} / \\framebox{};  2. a short response with no prose is the answer itself;
    3. a dataset's answer marker: GSM8K's "#### 21" or "A: 21" line, PRM800K's "# Answer" line (the next line);
    4. the first sentence after the last "answer is" / "answer:" (its closing math span, or what follows its last
    " is ", fillers such as "indeed" dropped);  5. a closing sentence "... is X." with a short, prose-free X;
    6. the last display or inline math span;  7. the last number. 5-7 read the response's tail; when that tail
    starts inside a math span (an answer longer than the tail), they find nothing rather than a piece of it.
    Training does not use this: its reward needs a box (`verifier.reward`). -> str or None."""
    if not isinstance(text, str):
        return None
    boxed = verifier.extract_boxed(text)
    if boxed is not None:
        return boxed
    bare = text.strip().strip("$").strip()
    if len(bare) <= verifier.MAX_ANSWER_CHARS and not _has_prose(bare):
        return bare                                               # "x^2+2x+1", "\\frac{1}{2}", "1 000"
    start = max(0, len(text) - 4 * verifier.MAX_ANSWER_CHARS)     # the answer sits at the end; bounds the regexes
    tail = text[start:]
    markers = list(_MARKER_RE.finditer(tail))
    if markers:
        m = markers[-1]
        after = next((x.strip() for x in tail[m.end():].splitlines() if x.strip()), "")
        found = m.group("gsm") or m.group("qa") or after
        found = found.strip().strip("$").strip().rstrip(".").strip()
        if found:
            return found
    cue = None
    for cue in _ANSWER_RE.finditer(tail):
        pass
    if cue is not None:
        found, answer = _after_cue(tail[cue.end():])
        if found:
            return answer
    if _inside_math(text[:start]):                                # the tail begins inside a long expression:
        close = re.search(r"(?<!\\)\$|\\\]|\\\)", tail)           # read only what follows it
        tail = tail[close.end():] if close else ""
    last = re.split(r"(?<=[.!?])\s+|\n+", tail.strip())[-1] if tail.strip() else ""
    if " is " in last:                                            # "Therefore, the degree of $f(x)$ is 3."
        x = last.rsplit(" is ", 1)[1].strip().rstrip(".").strip()
        spans = list(_MATH_RE.finditer(x))
        x = _span(spans[0]) if len(spans) == 1 and spans[0].span() == (0, len(x)) else x
        if x and len(x) <= 40 and re.fullmatch(r"[\w\s.,+\-*/^()\[\]{}=\\%:]+", x, re.A) and not _has_prose(x):
            return x                                              # math characters only: not "1,000.99€" or "m²"
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

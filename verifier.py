"""Verifying answers: the reward R_i in {0, 1} of SCOPE (spec section 1); scope.py imports it.

    reward(response, gold, truncated)   1.0 when the last \\boxed{} of the response equals gold and the response was
                                        not cut at the length limit (training; evaluation's lenient extraction of
                                        unboxed answers is eval/extract.py, which calls verify_response)
    is_equiv(pred, gold)                are two LaTeX answers equal: normalise, then compare as strings, as structures
                                        (tuples, sets, intervals, matrices, relations) and as exact sympy values
    official_reward(response, gold, truncated)   the released code's grader (exact string match after the MATH
                                        normalisation), the option --grader official

What counts as equal (decimals, percent, units, "x = 5" against 5, lists of boxes) is a policy, written in
docs/verifier.md ("verifier policy") and the same in training and evaluation. Replacing this module with another
verifier (math-verify, a benchmark's own grader) changes nothing else in scope.py: the loop only calls reward /
official_reward.
"""

import math
import random
import re
import time

import sympy

# The verifier never executes model output: no eval, no sympify/parse_expr on text. A small recursive-descent
# parser below builds sympy objects itself, from a fixed grammar, and refuses (-> not equal) anything too big
# before sympy sees it. Every call is bounded by those caps plus a cooperative 1 s deadline (no signals,
# so it works in worker threads).

MAX_ANSWER_CHARS = 1000       # longer answers are refused
MAX_NESTING = 50              # braces / brackets / parentheses / parser recursion
MAX_NODES = 400               # parser nodes per expression
MAX_NUMBER_DIGITS = 100       # digits of a literal number
MAX_RESULT_DIGITS = 2000      # a numeric power b^e may have at most this many digits (2^{1009} passes)
MAX_FACTORIAL = 300
MAX_ITEMS = 64                # elements of a tuple / set / list / matrix
REL_TOL, ABS_TOL = 1e-6, 1e-9  # numeric equality when either side is irrational; rationals compare exactly
VERIFY_SECONDS = 1.0


class _Refuse(Exception):
    """Input too big, too deep, or outside the grammar: the answer is judged not equal."""


_BOX_RE = re.compile(r"\\(?:boxed|fbox|framebox)(?![a-zA-Z])")


def extract_boxed(text):
    """Content of the LAST \\boxed{...} / \\fbox{...} (nested braces; also `\\boxed 5`); None when there is none."""
    if not isinstance(text, str):
        return None
    last = None
    for last in _BOX_RE.finditer(text):
        pass
    return None if last is None else _box_content(text, last.end())


def _box_content(text, i):
    """The braced (or bare `\\boxed 5`) argument starting at text[i]; None when unbalanced."""
    if text.startswith("{", i):
        depth, j = 0, i
        while j < len(text):
            c = text[j]
            if c == "\\":
                j += 2                                            # \{ and \} are content, not grouping
                continue
            depth += (c == "{") - (c == "}")
            if depth == 0:
                return text[i + 1:j]
            j += 1
        return None                                               # unbalanced: no answer
    m = re.match(r"\s+([^\s$]+)", text[i:])                       # \boxed 5
    return m.group(1) if m else None


_UNICODE = str.maketrans({"π": "\\pi ", "√": "\\sqrt", "≤": "<=", "≥": ">=", "≠": "!=", "−": "-", "×": "\\times ",
                          "·": "\\cdot ", "∞": "\\infty ", "½": "(1/2)", "⅓": "(1/3)", "⅔": "(2/3)", "¼": "(1/4)",
                          "¾": "(3/4)", "±": "\\pm ", "∓": "\\mp "})
_TEXT_CMDS = r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mathbf|mathit|mbox|operatorname|boldsymbol)"


def _normalize(s):
    """Strip LaTeX decoration that does not change the answer. Returns (answer, unit or None)."""
    s = s.replace("\n", " ").strip()
    s = s.translate(_UNICODE)                                     # π, √, ≤, ½, −, ... as LaTeX
    s = re.sub(r"(?<![\\a-zA-Z])(sqrt|sin|cos|tan|cot|sec|csc|exp|ln|log|arcsin|arccos|arctan)\s*(?=\()", r"\\\1", s)
    s = re.sub(r"(?<![\\a-zA-Z])pi(?![a-zA-Z])", r"\\pi ", s)       # plain syntax: sqrt(3), 2*pi
    s = re.sub(r"\\(?:displaystyle|textstyle|limits)", "", s)
    s = re.sub(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big|bigg|Bigg)(?![a-zA-Z])\.?", "", s)
    s = re.sub(r",\\!\s*", ",", s)                                  # 11,\!111 (thousands)
    s = re.sub(r"\\\\(?=(?:[dt]?frac|sqrt|pi|cdot|times)(?![a-zA-Z]))", r"\\", s)  # \\frac typed for \frac
    s = re.sub(r"(?<!\\)\\[!,;:> ]|\\quad|\\qquad|~", " ", s)     # thin spaces (1\,000 -> 1 000)
    s = s.replace("{,}", ",").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\cfrac", "\\frac")
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|°|\\degree|\\circ", "", s)   # degrees
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "%").replace("%", "")  # currency; percent dropped
    s = re.sub(r"\\(?:le|leq|leqslant)(?![a-zA-Z])", "<=", s)
    s = re.sub(r"\\(?:ge|geq|geqslant)(?![a-zA-Z])", ">=", s)
    s = re.sub(r"\\(?:ne|neq)(?![a-zA-Z])", "!=", s).replace("\\lt", "<").replace("\\gt", ">")
    s = s.strip().rstrip(".\\").strip()
    unit = None                                                   # trailing unit: "10 cm", "5\text{ inches}"
    cjk = re.fullmatch(r"(.*?\d)\s*([\u4e00-\u9fff]{1,4})", s)     # 40厘米
    if cjk:
        s, unit = cjk.groups()
    m = re.match(r"^(.*?[\d}).])\s*(?:" + _TEXT_CMDS + r"\s*\{\s*([a-zA-Z][a-zA-Z ]*(?:/\s*[a-zA-Z]+)?)\}|"
                 r"\s([a-zA-Z]{2,}(?:\s+[a-zA-Z]+)*(?:/[a-zA-Z]+)?))(\^\{?[23]\}?)?\s*$", s)   # kcal/day, km/h
    number_part = re.sub(r"\\[a-zA-Z]+", "", m.group(1)) if m else ""   # letters only inside \frac, \sqrt, ...
    if m and re.search(r"\d", number_part) and not re.search(r"[a-zA-Z=<>]", number_part):
        s, unit = m.group(1).strip(), " ".join((m.group(2) or m.group(3)).split()) + (m.group(4) or "")
    s = re.sub(_TEXT_CMDS + r"\s*\{([^{}]*)\}", r"\1", s).strip()   # unwrap \text{...}
    s = re.sub(r"\s+", " ", s)
    s = re.sub(r"(?<=[\w)\]}])\s*,?\s+(?:and|or)\s+(?=[-\w(\[{\\])|(?<=[)\]])\s*or\s*(?=[(\[])", ", ", s)  # 6 and 8
    s = re.sub(r"^(-?\d+)\s+(\d+)/(\d+)$", r"\1+\2/\3", s) if not s.startswith("-") else s   # mixed number 1 1/2
    s = re.sub(r"(?<=\d)_\{(\d+)\}", r"_\1", s)                      # base subscripts: 4210_{7}
    if re.fullmatch(r"-?\d{1,3}(?:[ ,]\d{3})+(?:\.\d+)?", s):        # thousands separators 1,000 / 1 000
        s = re.sub(r"[ ,]", "", s)
    if ";" in s and ";" not in _mask_brackets(s):                 # (0;-2;6): semicolons inside tuples
        s = s.replace(";", ",")
    return s.lstrip("+").strip(), unit


def _split_top(s, seps):
    """Split s at separators (strings) that sit outside every bracket pair."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        if s.startswith("\\{", i) or s.startswith("\\}", i):
            depth += 1 if s[i + 1] == "{" else -1
            i += 2
            continue
        c = s[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            for sep in seps:
                if s.startswith(sep, i) and not (sep[-1].isalpha() and s[i + len(sep):i + len(sep) + 1].isalpha()):
                    parts.append(s[start:i])
                    i += len(sep)
                    start = i
                    break
            else:
                i += 1
            continue
        if depth > MAX_NESTING:
            raise _Refuse("nesting")
        i += 1
    parts.append(s[start:])
    return [p.strip() for p in parts]


# ---- the restricted LaTeX -> sympy translator ----
_TOKEN_RE = re.compile(r"\s*(?:(\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)"   # a number
                       r"|(\\[a-zA-Z]+|\\[{}|])"                               # a command
                       r"|([a-zA-Z])"                                               # a letter
                       r"|(<=|>=|!=|\*\*|[-+*/^_()\[\]{}!|,=<>']))")             # an operator
_FUNCS = {"sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "cot": sympy.cot, "sec": sympy.sec,
          "csc": sympy.csc, "arcsin": sympy.asin, "arccos": sympy.acos, "arctan": sympy.atan, "sinh": sympy.sinh,
          "cosh": sympy.cosh, "tanh": sympy.tanh, "exp": sympy.exp, "ln": sympy.log, "log": sympy.log}
_GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta", "iota",
          "kappa", "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "upsilon", "phi", "varphi", "chi", "psi",
          "omega", "Gamma", "Delta", "Theta", "Lambda", "Xi", "Sigma", "Phi", "Psi", "Omega"}


def _tokenize(s):
    tokens, pos = [], 0
    s = s.rstrip()
    while pos < len(s):
        m = _TOKEN_RE.match(s, pos)
        if not m or m.end() == pos:
            raise _Refuse(f"unknown character {s[pos]!r}")
        num, cmd, letter, op = m.groups()
        tokens.append(("num", num) if num else ("cmd", cmd[1:]) if cmd else ("id", letter) if letter else ("op", op))
        pos = m.end()
    return tokens


class _Parser:
    """expr := term (+|- term)* ; term := unary ((*|/|\\cdot|\\times|implicit) unary)* ; unary := (+|-) unary | power ;
    power := postfix (^ unary)? ; postfix := atom (!)* ; atom := number | letter[_sub] | \\pi | \\infty | greek | (expr)
    | {expr} | |expr| | \\frac | \\sqrt | \\binom | func. Conventions: e is Euler's number, i the imaginary unit, `2e5`
    scientific notation, `3\\frac{1}{2}` (an integer then a numeric \\frac) the mixed number 3 + 1/2, juxtaposition
    multiplies."""

    def __init__(self, text, deadline):
        self.toks, self.i, self.depth, self.nodes, self.deadline = _tokenize(text), 0, 0, 0, deadline

    def peek(self, k=0):
        return self.toks[self.i + k] if self.i + k < len(self.toks) else (None, None)

    def take(self, kind=None, value=None):
        tok = self.peek()
        if tok[0] is None or (kind and tok[0] != kind) or (value is not None and tok[1] != value):
            raise _Refuse(f"expected {value or kind}, got {tok[1]!r}")
        self.i += 1
        return tok

    def parse(self):
        out = self.expr()
        if self.i != len(self.toks):
            raise _Refuse(f"unexpected {self.peek()[1]!r}")
        return out

    def enter(self):
        self.depth += 1
        self.nodes += 1
        if self.depth > MAX_NESTING or self.nodes > MAX_NODES:
            raise _Refuse("expression too deep or too large")
        if time.monotonic() > self.deadline:
            raise _Refuse("time")

    def expr(self, closer=None):
        self.enter()
        out = self.term(closer)
        while self.peek() in (("op", "+"), ("op", "-")):
            op = self.take()[1]
            rhs = self.term(closer)
            out = out + rhs if op == "+" else out - rhs
        self.depth -= 1
        return out

    def term(self, closer):
        out = self.unary(closer)
        while True:
            kind, val = self.peek()
            if (kind, val) in (("op", "*"), ("op", "/"), ("cmd", "cdot"), ("cmd", "times"), ("cmd", "div")):
                self.take()
                rhs = self.unary(closer)
                out = out / rhs if val in ("/", "div") else out * rhs
            elif self.starts_atom(closer):
                out = out * self.power(closer)                    # implicit multiplication
            else:
                return out

    def starts_atom(self, closer):
        kind, val = self.peek()
        if kind in ("num", "id"):
            return True
        if kind == "cmd":
            return val not in ("cdot", "times", "div", "cup", "cap", "pm", "mp", "}", "to")
        return kind == "op" and val in ("(", "{", "[") or (val == "|" and closer != "|")

    def unary(self, closer):
        if self.peek() in (("op", "-"), ("op", "+")):
            sign = self.take()[1]
            self.enter()
            out = self.unary(closer)
            self.depth -= 1
            return -out if sign == "-" else out
        return self.power(closer)

    def power(self, closer):
        base = self.postfix(closer)
        if self.peek() in (("op", "^"), ("op", "**")):
            self.take()
            self.enter()
            exp = self.arg_or_unary()
            self.depth -= 1
            return _pow(base, exp)
        return base

    def arg_or_unary(self):
        """An exponent: {expr}, or a single character (x^23 is x^2 * 3 in LaTeX), or a signed atom."""
        if self.peek() == ("op", "{"):
            return self.arg()
        if self.peek()[0] == "num":
            return self.arg()
        return self.unary(None) if self.peek() in (("op", "-"), ("op", "+")) else self.postfix(None)

    def postfix(self, closer):
        out = self.atom(closer)
        while self.peek() == ("op", "!"):
            self.take()
            out = _factorial(out)
        return out

    def arg(self):
        """A TeX macro argument: {expr} or one character (\\frac12, \\sqrt2)."""
        kind, val = self.peek()
        if (kind, val) == ("op", "{"):
            self.take()
            out = self.expr("}")
            self.take("op", "}")
            return out
        if kind == "num" and len(val) > 1:                        # split "12" into "1" and "2"
            self.toks[self.i] = ("num", val[1:])
            return _number(val[0])
        if kind in ("num", "id"):
            self.take()
            return _number(val) if kind == "num" else _symbol(val)
        return self.atom(None)

    def atom(self, closer):
        self.enter()
        kind, val = self.take()
        if kind == "num":
            out = _number(val)
            if self.peek() == ("cmd", "frac") and "." not in val:  # mixed number 3\frac{1}{2}
                self.take()
                num, den = self.arg(), self.arg()
                if not (num.is_Integer and den.is_Integer):
                    raise _Refuse("mixed number needs integer fraction")
                out = out + num / den
        elif kind == "id":
            out = _symbol(val)
            if self.peek() == ("op", "_"):                        # x_1, a_{n}
                self.take()
                sub = self.take()[1] if self.peek() != ("op", "{") else self.braced_text()
                out = sympy.Symbol(f"{val}_{sub}")
        elif (kind, val) in (("op", "("), ("op", "["), ("op", "{")):
            close = {"(": ")", "[": "]", "{": "}"}[val]
            out = self.expr(close)
            self.take("op", close)
        elif (kind, val) == ("op", "|") or val in ("lvert", "vert", "|"):
            out = sympy.Abs(self.expr("|"))
            nk, nv = self.take()
            if nv not in ("|", "rvert", "vert"):
                raise _Refuse("unclosed |")
        elif kind == "cmd" and val == "frac":
            num, den = self.arg(), self.arg()
            out = num / den
        elif kind == "cmd" and val == "sqrt":
            index = None
            if self.peek() == ("op", "["):
                self.take()
                index = self.expr("]")
                self.take("op", "]")
            radicand = self.arg()
            out = sympy.sqrt(radicand) if index is None else _pow(radicand, 1 / index)
        elif kind == "cmd" and val in ("binom", "dbinom", "tbinom"):
            n, k = self.arg(), self.arg()
            if not (n.is_Integer and k.is_Integer and 0 <= n <= MAX_FACTORIAL):
                raise _Refuse("binom")
            out = sympy.binomial(n, k)
        elif kind == "cmd" and val in _FUNCS:
            power = None
            base = None
            if val == "log" and self.peek() == ("op", "_"):
                self.take()
                base = self.arg()
            if self.peek() == ("op", "^"):                        # \sin^2 x
                self.take()
                power = self.arg()
            arg = self.power(None)
            out = _FUNCS[val](arg) if base is None else sympy.log(arg, base)
            if power is not None:
                out = _pow(out, power)
        elif kind == "cmd" and val == "pi":
            out = sympy.pi
        elif kind == "cmd" and val == "infty":
            out = sympy.oo
        elif kind == "cmd" and val in _GREEK:
            out = sympy.Symbol(val)
        else:
            raise _Refuse(f"unsupported {val!r}")
        self.depth -= 1
        return out

    def braced_text(self):
        self.take("op", "{")
        parts = []
        while self.peek() != ("op", "}"):
            parts.append(self.take()[1])
            if len(parts) > 10:
                raise _Refuse("subscript")
        self.take("op", "}")
        return "".join(parts)


def _number(text):
    if len(re.sub(r"\D", "", text)) > MAX_NUMBER_DIGITS:
        raise _Refuse("number too long")
    mant, _, exp = text.lower().partition("e")
    if exp and abs(int(exp)) > 400:
        raise _Refuse("exponent too large")
    out = sympy.Rational(mant if not mant.startswith(".") else "0" + mant)   # exact: 0.5 == 1/2
    return out * sympy.Integer(10) ** int(exp) if exp else out


def _symbol(letter):
    return {"e": sympy.E, "i": sympy.I}.get(letter) or sympy.Symbol(letter)


def _pow(base, exp):
    """base^exp, refused when the result could have more than MAX_RESULT_DIGITS digits."""
    if exp.is_number and exp.is_real and exp.is_finite:
        mag = abs(float(sympy.N(exp, 15))) if exp.is_comparable else 0.0
        if base.is_number and base.is_comparable:
            b = abs(float(sympy.N(base, 15))) if abs(base) < 10**MAX_RESULT_DIGITS else float("inf")
            if mag * math.log10(max(b, 10.0)) > MAX_RESULT_DIGITS:
                raise _Refuse("power too large")
        elif mag > MAX_RESULT_DIGITS:
            raise _Refuse("power too large")
    elif not exp.is_number and base.is_number and base.is_comparable and abs(base) > 10**6:
        raise _Refuse("symbolic power of a huge base")
    return sympy.Pow(base, exp)


def _factorial(x):
    if not (x.is_Integer and 0 <= x <= MAX_FACTORIAL):
        raise _Refuse("factorial")
    return sympy.factorial(x)


def _to_sympy(text, deadline):
    if len(text) > MAX_ANSWER_CHARS:
        raise _Refuse("too long")
    return _Parser(text, deadline).parse()


# ---- comparison ladder ----
def _numeric(x):
    """x as a Python complex, or None (not a finite number)."""
    try:
        v = complex(sympy.N(x, 30))
    except (TypeError, ValueError, OverflowError):
        return None
    return v if math.isfinite(v.real) and math.isfinite(v.imag) else None


def _close(a, b):
    return abs(a - b) <= max(ABS_TOL, REL_TOL * max(abs(a), abs(b)))


def _decimal(q):
    """(decimal places, significant digits) when the rational q is a terminating decimal, else None."""
    den, twos, fives = int(q.q), 0, 0
    while den % 2 == 0:
        den, twos = den // 2, twos + 1
    while den % 5 == 0:
        den, fives = den // 5, fives + 1
    if den != 1:
        return None
    k = max(twos, fives)
    return k, len(str(abs(int(q * 10**k))).lstrip("0"))


def _rounded(d, x):
    """d is x rounded to d's own decimal places (0.0833 for 1/12, 3.1416 for 3.14159), with at least 3 significant
    digits (4 when x is itself a terminating decimal: 12.5 is not 12.54)."""
    dd, dx = _decimal(d), _decimal(x)
    if dd is None or dd[0] == 0 or (dx is not None and dx[0] <= dd[0]):
        return False
    return dd[1] >= (4 if dx else 3) and abs(x - d) * 2 * 10**dd[0] <= 1


def _expr_equal(a, b):
    """Exact for rationals; REL_TOL for other numbers; random points for expressions in variables."""
    if a.has(sympy.zoo, sympy.nan) or b.has(sympy.zoo, sympy.nan):
        return False                                              # 1/0 is no answer
    if a == b:
        return True
    if a.is_Rational and b.is_Rational:
        return _rounded(a, b) or _rounded(b, a)
    if a.has(sympy.oo) or b.has(sympy.oo):
        return False
    free = a.free_symbols | b.free_symbols                        # sin^2 x + cos^2 x == 1 is allowed
    rng = random.Random(0)
    points = [{}] if not free else [{x: sympy.Rational(rng.randint(3, 29), 7) for x in free} for _ in range(4)]
    for point in points:
        va, vb = _numeric(a.subs(point)), _numeric(b.subs(point))
        if va is None or vb is None or not _close(va, vb):
            return False
    return True


def _scaled(a, b):
    """a = c * b for one nonzero constant c (the equations a = 0 and b = 0 are the same: 2x + 4y - 3 = 0 and
    y = -x/2 + 3/4), checked at random points."""
    free = a.free_symbols | b.free_symbols
    if not free:
        return False
    rng, ratio = random.Random(1), None
    for _ in range(4):
        point = {x: sympy.Rational(rng.randint(3, 29), 7) for x in free}
        va, vb = _numeric(a.subs(point)), _numeric(b.subs(point))
        if va is None or vb is None or abs(vb) < ABS_TOL:
            return False
        ratio = ratio if ratio is not None else va / vb
        if abs(ratio) < ABS_TOL or not _close(va / vb, ratio):
            return False
    return True


_REL_OPS = ("<=", ">=", "!=", "<", ">", "=")


def _structure(s, deadline):
    """Parse a normalised answer into a comparable structure (tuples tagged by kind)."""
    if s.count("{") > MAX_NESTING * 4 or len(s) > MAX_ANSWER_CHARS:
        raise _Refuse("too big")
    choice = re.fullmatch(r"\(?([A-E])\)?", s)
    if choice:
        return ("choice", choice.group(1))
    s = re.sub(r"^[(\[]\s*(\\begin\{(\w+)\}.*\\end\{\2\})\s*[)\]]$", r"\1", s, flags=re.S)   # [ matrix ]
    s = re.sub(r"^\\begin\{array\}\{[lcr|]*\}(.*)\\end\{array\}$", r"\\begin{matrix}\1\\end{matrix}", s, flags=re.S)
    m = re.fullmatch(r"\\begin\{([pbvB]?matrix)\}(.*)\\end\{\1\}", s, re.S)
    if m:
        rows = [r for r in re.split(r"\\\\", m.group(2)) if r.strip()]
        cells = [[_to_sympy(c.strip(), deadline) for c in r.split("&")] for r in rows]
        if sum(map(len, cells)) > MAX_ITEMS:
            raise _Refuse("matrix too big")
        return ("matrix", cells)
    pieces = _split_top(s, ["\\cup"])
    if len(pieces) > 1:
        return ("union", [_structure(p, deadline) for p in pieces])
    items = _split_top(s, [","])
    if len(items) > MAX_ITEMS:
        raise _Refuse("too many items")
    if s.startswith("\\{") and s.endswith("\\}") and len(_split_top(s[2:-2], [","])) >= 1 and _balanced(s[2:-2]):
        return ("set", [_structure(x, deadline) for x in _split_top(s[2:-2], [","]) if x])
    if len(items) > 1:
        return ("set", [_structure(x, deadline) for x in items])     # bare comma list: unordered
    if s[:1] in "([" and s[-1:] in ")]" and _balanced(s[1:-1]):
        inner = _split_top(s[1:-1], [","])
        if len(inner) > 1:                                         # tuple / point / interval: ordered
            return ("seq", s[0] + s[-1], [_structure(x, deadline) for x in inner])
    if s.startswith("{") and s.endswith("}") and _balanced(s[1:-1]):
        return _structure(s[1:-1].strip(), deadline)
    rel = _split_top(s, _REL_OPS)
    if len(rel) > 1:
        ops = re.findall(r"<=|>=|!=|<|>|=", _mask_brackets(s))
        exprs = [_to_sympy(x, deadline) for x in rel]
        if len(ops) != len(exprs) - 1:
            raise _Refuse("relation")
        if any(o in (">", ">=") for o in ops):                     # a > b  ->  b < a
            exprs, ops = exprs[::-1], [{">": "<", ">=": "<="}.get(o, o) for o in ops[::-1]]
        return ("rel", tuple(ops), exprs)
    return ("expr", _to_sympy(s, deadline))


def _balanced(s):
    depth = 0
    for c in s:
        depth += (c in "([{") - (c in ")]}")
        if depth < 0:
            return False
    return depth == 0


def _mask_brackets(s):
    """s with everything inside brackets blanked, so operators found are top-level."""
    out, depth = [], 0
    for c in s:
        depth -= c in ")]}"
        out.append(c if depth == 0 else " ")
        depth += c in "([{"
    return "".join(out)


def _struct_equal(a, b, deadline):
    if time.monotonic() > deadline:
        raise _Refuse("time")
    if {a[0], b[0]} == {"matrix", "seq"}:                        # a column or row vector written as a list
        m, q = (a, b) if a[0] == "matrix" else (b, a)
        cells = [c for row in m[1] for c in row]
        return (len(m[1]) == 1 or all(len(r) == 1 for r in m[1])) and len(cells) == len(q[2]) and all(
            y[0] == "expr" and _expr_equal(x, y[1]) for x, y in zip(cells, q[2]))
    if a[0] != b[0]:
        return False
    kind = a[0]
    if kind == "choice":
        return a[1] == b[1]
    if kind == "expr":
        return _expr_equal(a[1], b[1])
    if kind == "seq":
        return (a[1] == b[1] and len(a[2]) == len(b[2])
                and all(_struct_equal(x, y, deadline) for x, y in zip(a[2], b[2])))
    if kind == "matrix":
        return [len(r) for r in a[1]] == [len(r) for r in b[1]] and all(
            _expr_equal(x, y) for ra, rb in zip(a[1], b[1]) for x, y in zip(ra, rb))
    if kind in ("set", "union"):                                   # multiset: match each item once
        rest = list(b[1])
        for x in a[1]:
            j = next((j for j, y in enumerate(rest) if _struct_equal(x, y, deadline)), None)
            if j is None:
                return False
            rest.pop(j)
        return not rest
    if kind == "rel":
        (ops_a, ea), (ops_b, eb) = a[1:], b[1:]
        if ops_a != ops_b or len(ea) != len(eb):
            return False
        if len(ea) == 2:                                           # compare rhs - lhs (x > 2  ==  x - 2 > 0)
            da, db = ea[1] - ea[0], eb[1] - eb[0]
            return _expr_equal(da, db) or (ops_a[0] in ("=", "!=") and (_expr_equal(da, -db) or _scaled(da, db)))
        return all(_expr_equal(x, y) for x, y in zip(ea, eb))
    return False


def is_equiv(pred, gold):
    """True when the predicted answer equals the gold answer (both LaTeX strings, no \\boxed)."""
    deadline = time.monotonic() + VERIFY_SECONDS
    try:
        return _is_equiv(pred, gold, deadline)
    except (_Refuse, RecursionError, ValueError, TypeError, ZeroDivisionError, OverflowError, MemoryError,
            AttributeError, IndexError, KeyError, sympy.SympifyError, NotImplementedError):
        return False


def _is_equiv(pred, gold, deadline):
    if not isinstance(pred, str) or not isinstance(gold, str):
        return False
    if len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS or "\x00" in pred + gold:
        return False
    pred, gold = (_PERCENT_WORD.sub("%", x) for x in (pred, gold))     # 33.5 percent = 33.5%
    (p, p_unit), (g, g_unit) = _normalize(pred), _normalize(gold)
    if p_unit and g_unit and p_unit.lower() != g_unit.lower():
        return False                                               # 10 cm vs 10 m
    if not p or not g:
        return False
    if g_unit is None and p_unit is not None and not re.search(r"\d", p):
        p = f"{p} {p_unit}"                                        # "Tuesday" is an answer, not a unit
    if re.fullmatch(r"[a-zA-Z ]{3,}", p) and p.lower() == g.lower():
        return True                                                # words: case-insensitive
    yes = re.fullmatch(r"(?i)(?:yes|no)\s*[,;:.]\s*(\S.*)", p)      # "\text{Yes, } n=4" against 4
    if yes and not re.match(r"(?i)(?:yes|no)\b", g):
        p = yes.group(1)
    p, g = _value_of(p), _value_of(g)
    p, g = (re.sub(r"^[^=<>]*?\\in\s*", "", x) if _is_name(x.split("\\in")[0]) else x for x in (p, g))  # x \in S
    if not re.search(r"[=<>]|\\in\b", g):                          # gold is a bare value: drop "x = " in pred
        p = _drop_names(p)
        sides = _split_top(p, ["="])
        if len(sides) == 2 and _computed(*sides, deadline):        # a computation and its value: \sqrt{4} = 2
            p = sides[1]
    if not re.search(r"[=<>]|\\in\b", p):                          # pred is a bare value, gold "M = value"
        g = _drop_names(g)
    p, g = _plus_minus(p, g), _plus_minus(g, p)                     # a \pm b against the two values
    if p.replace(" ", "") == g.replace(" ", ""):
        return True
    sp, sg = _structure(p.strip(), deadline), _structure(g.strip(), deadline)
    if sp[0] in ("seq", "union") and sg[0] == "rel":               # x <= 3  vs  (-\infty, 3]
        sg = _interval(sg, deadline) or sg
    if sg[0] in ("seq", "union") and sp[0] == "rel":
        sp = _interval(sp, deadline) or sp
    if _struct_equal(sp, sg, deadline):
        return True
    if "%" in pred and "%" not in gold and sp[0] == "expr":        # 10% is 10 (above) and also 0.1
        return _struct_equal(("expr", sp[1] / 100), sg, deadline)
    if "%" in gold and "%" not in pred and sg[0] == "expr":
        return _struct_equal(sp, ("expr", sg[1] / 100), deadline)
    return False


_PERCENT_WORD = re.compile(r"\s*(?:\\text\{\s*)?(?:percentage|percent|pct)\s*\}?\s*$")


def _plus_minus(s, other):
    """'a \\pm b' as the list 'a + b, a - b' (\\mp: '-' first) when the other side is a list without one."""
    signs = re.findall(r"\\(pm|mp)(?![a-zA-Z])", s)
    if len(signs) != 1 or re.search(r"\\(?:pm|mp)(?![a-zA-Z])", other) or "," not in _mask_brackets(other):
        return s
    first, second = ("+", "-") if signs[0] == "pm" else ("-", "+")
    return ", ".join(re.sub(r"\\(?:pm|mp)(?![a-zA-Z])", sign, s) for sign in (first, second))


def _computed(lhs, rhs, deadline):
    """lhs = rhs states a value: both sides are numbers (no variables) and they are equal (\\binom{5}{2} = 10)."""
    try:
        a, b = _to_sympy(_normalize(lhs)[0], deadline), _to_sympy(_normalize(rhs)[0], deadline)
        return not a.free_symbols and not b.free_symbols and _expr_equal(a, b)
    except (_Refuse, ValueError, TypeError, ZeroDivisionError, OverflowError, AttributeError, sympy.SympifyError):
        return False


def _is_name(s):
    """A name, not a value: letters (with subscripts, |AB|, ratios A:B, f(x), tuples of names), no digits or
    arithmetic outside subscripts."""
    core = re.sub(r"_\{[^{}]*\}|_\w|\\(?:frac|text|mathrm|overline|angle)", "", s)
    return bool(re.search(r"[a-zA-Z]", core)) and not re.search(r"[\d+\-*^=<>]", core)


def _value_of(s):
    """The value an answer states: the last member of a chain a = b = c; an approximation dropped (x = 1/3 \\approx
    0.33 -> x = 1/3; y \\approx 11 -> y = 11; \\frac{\\sqrt3}{3} \\approx 0.577 -> \\frac{\\sqrt3}{3})."""
    if "\\approx" in s:
        left, right = s.split("\\approx", 1)
        s = left if "=" in left or not _is_name(left.strip()) else f"{left}={right}"
    eq = _split_top(s, ["="])
    if len(eq) > 2 and not re.search(r"[<>,;]", _mask_brackets(s)):
        s = eq[0] + "=" + eq[-1] if _is_name(eq[0]) else eq[-1]
    return s.strip()


def _drop_names(s):
    """'x = 5' -> '5', '(p,q) = (3,2)' -> '(3,2)', 'x \\in [0,7)' -> '[0,7)', item by item in a list."""
    items = _split_top(s, [",", ";"]) if not (s[:1] in "([{" and _balanced(s[1:-1])) else [s]
    out = []
    for item in items:
        parts, eq = _split_top(item, ["=", "\\in"]), _split_top(item, ["="])
        if len(eq) == 2 and eq[0] and _is_name(eq[1]) and not _is_name(eq[0]):
            parts = eq[::-1]                                       # 2 = x, the value on the left
        out.append(parts[1] if len(parts) == 2 and _is_name(parts[0]) and parts[1] else item)
    return ", ".join(out) if len(out) > 1 else out[0]


def _interval(rel, deadline):
    """A one-variable inequality as an interval structure: a < x <= b -> (a, b]; x <= 3 -> (-oo, 3]. Else None."""
    _, ops, exprs = rel
    if not all(o in ("<", "<=") for o in ops) or not 2 <= len(exprs) <= 3:
        return None
    free = [i for i, e in enumerate(exprs) if e.free_symbols]
    if len(free) != 1 or (len(exprs) == 3 and free != [1]):
        return None
    if len(exprs) == 2:                                            # x < b  or  a < x
        lo, hi = (-sympy.oo, exprs[1]) if free == [0] else (exprs[0], sympy.oo)
        left = "(" if free == [0] or ops[0] == "<" else "["
        right = ")" if free == [1] or ops[0] == "<" else "]"
    else:
        lo, hi = exprs[0], exprs[2]
        left, right = ("(" if ops[0] == "<" else "["), (")" if ops[1] == "<" else "]")
    return ("seq", left + right, [("expr", lo), ("expr", hi)])


_LIST_GLUE_RE = re.compile(r"(?:[\s,;$.]|\\quad|\\qquad|\\[()\[\]]|\\text\{\s*(?:and|or)\s*\}|\band\b|\bor\b)*")


def box_list(text):
    """The boxes of text read as one list: the last run of boxes joined only by commas, "and", "or", spacing or
    math delimiters (prose between two boxes ends the run). -> list of contents (empty: no box)."""
    run, prev_end = [], None
    for m in _BOX_RE.finditer(text):
        content = _box_content(text, m.end())
        if content is None:
            return []
        glue = text[prev_end:m.start()] if prev_end is not None else ""
        run = run + [content] if prev_end is not None and _LIST_GLUE_RE.fullmatch(glue) else [content]
        prev_end = m.end() + len(content) + 2 if text.startswith("{", m.end()) else m.end() + len(content) + 1
    return run


def verify_response(response, gold, truncated=False, extract=None):
    """1.0 if the response's final answer, extract(response) (default: the last box, as training reads it), equals
    gold. Several boxes: the last one, or, when the gold is a list of k items, the last k boxes read as that list.
    A response cut at the length limit scores 0. (Evaluation's lenient extraction: eval/extract.py.)"""
    if truncated or not isinstance(response, str) or not isinstance(gold, str):
        return 0.0
    answer = (extract or extract_boxed)(response)
    if answer is None or not answer.strip():
        return 0.0
    if is_equiv(answer, gold):
        return 1.0
    g = _normalize(gold)[0] if len(gold) <= MAX_ANSWER_CHARS else ""
    g = g[2:-2] if g.startswith("\\{") and g.endswith("\\}") else g[1:-1] if g[:1] == "{" and g[-1:] == "}" else g
    k = len(_split_top(g, [",", ";"]))
    boxes = box_list(response[-4 * MAX_ANSWER_CHARS:])
    return float(1 < k <= len(boxes) and is_equiv(", ".join(boxes[-k:]), gold))


def reward(response, gold, truncated=False):
    """Training reward (spec section 1): 1.0 if the last \\boxed answer equals gold, else 0.0. A response cut
    at the length limit, with no box, or with an empty box scores 0 (boxed-only: docs/verifier.md)."""
    return verify_response(response, gold, truncated)


# ---------------------------------------------------------------------------------------------------------------
# The released code's training grader (--grader official): the MATH benchmark's string match (Hendrycks et al. 2021)
# as the released fork's verl/utils/reward_score/math.py runs it, rule for rule, written here from its behaviour.
# ---------------------------------------------------------------------------------------------------------------
def _released_last_box(s):
    """The released last box: with "\\boxed " (a space) anywhere, what follows its last occurrence up to a "$";
    else the last "\\boxed" (without one, the last "\\fbox") through its balanced braces (an escaped "\\}" counts
    as a brace); else None."""
    if "\\boxed " in s:
        return "\\boxed " + s.split("\\boxed ")[-1].split("$")[0]
    start = s.rfind("\\boxed")
    start = s.rfind("\\fbox") if start < 0 else start
    if start < 0:
        return None
    depth = 0
    for i in range(start, len(s)):
        depth += (s[i] == "{") - (s[i] == "}")
        if s[i] == "}" and depth == 0:
            return s[start:i + 1]
    return None


def _released_unbox(box):
    """The box's content; anything else than "\\boxed x" or "\\boxed{...}" (an \\fbox) is an error: scores 0."""
    if "\\boxed " in box:
        if not box.startswith("\\boxed "):
            raise ValueError(box)
        return box[len("\\boxed "):]
    if not (box.startswith("\\boxed{") and box.endswith("}")):
        raise ValueError(box)
    return box[len("\\boxed{"):-1]


def _released_fracs(s):
    """\\frac12 -> \\frac{1}{2}, \\frac1{2} -> \\frac{1}{2}; a \\frac with nothing after it is an error."""
    parts = s.split("\\frac")
    out = parts[0]
    for p in parts[1:]:
        out += "\\frac"
        if p[0] == "{":
            out += p
        elif len(p) < 2:
            return s
        elif p[1] != "{":
            out += "{" + p[0] + "}{" + p[1] + "}" + p[2:]
        else:
            out += "{" + p[0] + "}" + p[1] + p[2:]
    return out


def _released_sqrt(s):
    """\\sqrt3 -> \\sqrt{3}; a \\sqrt with nothing after it is an error."""
    if "\\sqrt" not in s:
        return s
    parts = s.split("\\sqrt")
    return parts[0] + "".join("\\sqrt" + p if p[0] == "{" else "\\sqrt{" + p[0] + "}" + p[1:] for p in parts[1:])


def _released_a_slash_b(s):
    parts = s.split("/")
    if len(parts) != 2 or not all(re.fullmatch(r"[-+]?\d+", x.strip()) for x in parts):
        return s
    a, b = int(parts[0]), int(parts[1])
    return f"\\frac{{{a}}}{{{b}}}" if s == f"{a}/{b}" else s


def released_normalize(s):
    """The released strip_string: no line breaks, \\!, doubled backslashes, \\left/\\right, degrees, \\$, one unit
    after "\\text{ " (two are an error), \\% (a bare % stays); " ." / "{." / a leading "." get a 0; a short "x ="
    prefix goes; \\sqrt3, spaces, \\frac12, 0.5 -> \\frac{1}{2}, a/b -> \\frac{a}{b}."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\").replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "").replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "")
    if "\\text{ " in s:
        parts = s.split("\\text{ ")
        if len(parts) != 2:
            raise ValueError(s)
        s = parts[0]
    s = s.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    s = "0" + s if s[0] == "." else s
    if len(s.split("=")) == 2 and len(s.split("=")[0]) <= 2:
        s = s.split("=")[1]
    s = _released_fracs(_released_sqrt(s).replace(" ", ""))
    s = "\\frac{1}{2}" if s == "0.5" else s
    return _released_a_slash_b(s)


def official_reward(response, gold, truncated=False):
    """The released code's training grader (--grader official): 1.0 when the last box's content, normalised by
    released_normalize, is the same string as the normalised gold; when normalising raises, the raw strings are
    compared; any other error scores 0. No symbolic equivalence (2/4 != 1/2), and no truncation rule: a cut-off
    response whose last box matches scores 1 (`truncated` is taken and ignored, as the released code has no such
    input). It reads strings only and runs in time linear in the response."""
    try:
        box = _released_last_box(response)
        if box is None:
            return 0.0
        answer = _released_unbox(box)
        try:
            return float(released_normalize(answer) == released_normalize(gold))
        except (ValueError, IndexError):
            return float(answer == gold)
    except ValueError:
        return 0.0

"""The command line of every entry point (scope.py, python -m eval, reproduce.py): one flag per field of a config
dataclass, its docstring as the help, in both spellings (--out-dir, the one --help shows, and --out_dir)."""
import dataclasses


def field_docs(cls):
    """{field: the docstring written under it}, read from the class source (so --help is the dataclass)."""
    import ast
    import inspect
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {a.target.id: " ".join(b.value.value.split()) for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}


def dataclass_cli(cls, argv=None, description=""):
    """argparse from a config dataclass: one flag per field, its docstring as help, in both spellings (--out-dir, the
    one --help shows, and --out_dir). A bool flag alone means true (`--resume`), or takes true/false. No abbreviations.
    Returns (parser, the fields given on the command line)."""
    import argparse

    def boolean(v):
        if v.lower() not in ("1", "true", "yes", "0", "false", "no"):
            raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")
        return v.lower() in ("1", "true", "yes")

    docs = field_docs(cls)
    p = argparse.ArgumentParser(description=description, allow_abbrev=False)
    for f in dataclasses.fields(cls):
        kw = dict(dest=f.name, default=None, type={bool: boolean, int: int, float: float}.get(f.type, str),
                  **(dict(nargs="?", const=True) if f.type is bool else {}))
        help_ = f"{docs.get(f.name, '')} (default: {f.default!r})".replace("%", "%%")   # argparse formats help with %
        p.add_argument("--" + f.name.replace("_", "-"), help=help_, **kw)
        if "_" in f.name:
            p.add_argument("--" + f.name, help=argparse.SUPPRESS, **kw)
    return p, {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}

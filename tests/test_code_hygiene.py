"""The d2c package never evaluates text from files and never swallows errors silently.

Why: cfgs, prototxts, param_str and label files come from users; `eval`/`exec`, pickle or an
import of a module named in a file would run their contents. A bare `except:` or an
`except Exception: pass` turns a bug or a bad input into silently wrong numbers, which is the
one failure a parity tool cannot afford. The checks walk the syntax tree (not a text grep) so
comments, strings and methods such as `net.eval` do not count.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "d2c"
SOURCES = sorted(PACKAGE.rglob("*.py"))

FORBIDDEN_CALLS = {"eval", "exec", "compile", "execfile"}
FORBIDDEN_ATTRIBUTE_CALLS = {("pickle", "load"), ("pickle", "loads"), ("cPickle", "load"), ("marshal", "loads"),
                             ("yaml", "load"), ("yaml", "unsafe_load"), ("shelve", "open")}
BROAD = {"Exception", "BaseException"}
# Dynamic imports are fine only where the module names are constants of the package itself.
DYNAMIC_IMPORT_ALLOWED = {"cli.py": "LAZY_COMMANDS, a constant list of d2c submodules",
                          "layers/__init__.py": "pkgutil over d2c.layers itself",
                          "child.py": "the factory of a child process, a constant \"d2c.module:name\" in d2c"}
# pickle is fine only where both ends are d2c itself, never a file.
PICKLE_ALLOWED = {"child.py": "the private pipe between a d2c process and its own child"}
# Finalizers must not raise (Python prints and ignores it anyway), so swallowing there is the idiom.
SWALLOW_ALLOWED_IN = {"__del__"}


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _is_broad(handler: ast.ExceptHandler) -> bool:
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(_name(t) in BROAD for t in types)


def _does_nothing(body: list[ast.stmt]) -> bool:
    """pass, `...`, continue, break or a bare return: the error vanishes."""
    for stmt in body:
        if isinstance(stmt, (ast.Pass, ast.Continue, ast.Break)):
            continue
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # `...` or a docstring-like string
        if isinstance(stmt, ast.Return) and (stmt.value is None or isinstance(stmt.value, ast.Constant)):
            continue
        return False
    return True


def problems_in(source: str, name: str) -> list[str]:
    """Every hygiene problem in one module, as `name:line: what`."""
    tree = ast.parse(source, name)
    found: list[str] = []
    in_finalizer = {id(inner) for fn in ast.walk(tree)
                    if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.name in SWALLOW_ALLOWED_IN
                    for inner in ast.walk(fn)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in FORBIDDEN_CALLS:
                found.append(f"{name}:{node.lineno}: {func.id}() call")
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) \
                    and (func.value.id, func.attr) in FORBIDDEN_ATTRIBUTE_CALLS \
                    and not (func.value.id == "pickle" and name in PICKLE_ALLOWED):
                found.append(f"{name}:{node.lineno}: {func.value.id}.{func.attr}() runs code from data")
            if isinstance(func, ast.Attribute) and func.attr == "suppress" \
                    and any(_name(a) in BROAD for a in node.args) and id(node) not in in_finalizer:
                found.append(f"{name}:{node.lineno}: suppress() of a broad exception")
            for kw in node.keywords:
                if kw.arg == "allow_pickle" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    found.append(f"{name}:{node.lineno}: allow_pickle lets numpy unpickle code from a file")
            if _name(func) in ("__import__", "import_module") and name not in DYNAMIC_IMPORT_ALLOWED:
                found.append(f"{name}:{node.lineno}: dynamic import ({_name(func)})")
        if isinstance(node, ast.ExceptHandler):
            if node.type is None:
                found.append(f"{name}:{node.lineno}: bare except:")
            elif _is_broad(node) and _does_nothing(node.body) and id(node) not in in_finalizer:
                found.append(f"{name}:{node.lineno}: broad except that swallows the error")
    return found


def test_the_package_has_sources() -> None:
    assert len(SOURCES) > 20 and PACKAGE / "cli.py" in SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_is_clean(path: Path) -> None:
    name = str(path.relative_to(PACKAGE))
    assert problems_in(path.read_text(encoding="utf-8"), name) == []


@pytest.mark.parametrize("snippet, fragment", [
    ("x = eval(text)", "eval() call"),
    ("exec(open(p).read())", "exec() call"),
    ("code = compile(s, 'f', 'exec')", "compile() call"),
    ("try:\n    f()\nexcept:\n    raise\n", "bare except"),
    ("try:\n    f()\nexcept Exception:\n    pass\n", "swallows"),
    ("try:\n    f()\nexcept (ValueError, BaseException):\n    ...\n", "swallows"),
    ("for a in b:\n    try:\n        f()\n    except Exception as e:\n        continue\n", "swallows"),
    ("def g():\n    try:\n        f()\n    except Exception:\n        return None\n", "swallows"),
    ("import contextlib\nwith contextlib.suppress(Exception):\n    f()\n", "suppress()"),
    ("import pickle\nx = pickle.load(fh)", "pickle.load()"),
    ("import numpy as np\nx = np.load(p, allow_pickle=True)", "allow_pickle"),
    ("import importlib\nm = importlib.import_module(param['module'])", "dynamic import"),
])
def test_the_checker_catches_each_pattern(snippet: str, fragment: str) -> None:
    found = problems_in(snippet, "snippet.py")
    assert len(found) == 1 and fragment in found[0], found


@pytest.mark.parametrize("snippet", [
    "net.eval()",                                   # a method, not the builtin
    "s = 'do not eval(this)'  # nor exec(that)",
    "try:\n    f()\nexcept ValueError:\n    pass\n",  # narrow and deliberate
    "try:\n    f()\nexcept Exception as exc:\n    raise Wrapped(str(exc)) from exc\n",
    "try:\n    f()\nexcept Exception:\n    log(); raise\n",
    "import contextlib\nwith contextlib.suppress(FileNotFoundError):\n    f()\n",
    "import numpy as np\nx = np.load(p, allow_pickle=False)",
    "class A:\n    def __del__(self):\n        with contextlib.suppress(Exception):\n            self.close()\n",
])
def test_the_checker_accepts_safe_code(snippet: str) -> None:
    assert problems_in(snippet, "snippet.py") == []

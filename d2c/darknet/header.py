"""A small C declaration parser that turns Darknet's shipped `darknet.h` into ctypes classes.

Why: the ctypes binding must use exactly the struct layout of the library that is installed.
`struct layer` has ~250 members and its layout depends on which `#ifdef GPU/CUDNN` blocks
were compiled in; hand-copied offsets would silently drift from the header. Parsing the header
that ships with the library at runtime keeps the two in step, and a test compares the parsed
offsets with values the library itself writes.

Scope (what darknet.h needs, nothing more): comments, `#ifdef/#ifndef/#if 0|1|defined/#else/
#endif/#define/#undef/#include`, `typedef enum {..} NAME;`, `typedef struct [tag] {..} NAME;`,
`struct tag {..};`, forward declarations and `typedef struct tag NAME;`, members with
multi-declarators (`int h,w,c;`), pointers, fixed arrays, function pointers (as `c_void_p`),
nested structs by value (`matrix X;`), enums (as `c_int`), `size_t`, and `unsigned`/`long`
combinations. Function prototypes and `extern` variables are skipped.
"""
from __future__ import annotations

import ctypes
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from d2c.errors import EngineError

# The structs the runtime binding needs; `load_header` checks they were all found.
REQUIRED_STRUCTS = ("layer", "network", "update_args", "image", "box", "detection", "matrix", "data")

# Builtin C type spellings (after sorting away `signed`/`int` noise) -> ctypes type.
_BUILTIN_TYPES: dict[str, type] = {
    "char": ctypes.c_char, "signed char": ctypes.c_byte, "unsigned char": ctypes.c_ubyte,
    "short": ctypes.c_short, "unsigned short": ctypes.c_ushort,
    "int": ctypes.c_int, "unsigned": ctypes.c_uint,
    "long": ctypes.c_long, "unsigned long": ctypes.c_ulong,
    "long long": ctypes.c_longlong, "unsigned long long": ctypes.c_ulonglong,
    "float": ctypes.c_float, "double": ctypes.c_double, "long double": ctypes.c_longdouble,
    "_Bool": ctypes.c_bool, "bool": ctypes.c_bool,
    "size_t": ctypes.c_size_t, "ssize_t": ctypes.c_ssize_t,
    "int8_t": ctypes.c_int8, "uint8_t": ctypes.c_uint8, "int16_t": ctypes.c_int16,
    "uint16_t": ctypes.c_uint16, "int32_t": ctypes.c_int32, "uint32_t": ctypes.c_uint32,
    "int64_t": ctypes.c_int64, "uint64_t": ctypes.c_uint64,
    "pthread_t": ctypes.c_ulong, "clock_t": ctypes.c_long, "time_t": ctypes.c_long,
}
_QUALIFIERS = frozenset({"const", "volatile", "restrict", "__restrict", "register", "static", "extern", "inline"})
_TOKEN_RE = re.compile(r"\s*(?:([A-Za-z_]\w*)|(0[xX][0-9a-fA-F]+|\d+)[uUlL]*|(.))", re.S)


class HeaderError(EngineError):
    """darknet.h contains something this small parser does not understand."""


@dataclass(frozen=True)
class _Tok:
    text: str
    line: int


class _Void:
    """Marker for `void` (only meaningful behind a pointer)."""


class _Opaque:
    """A named type we know only by name (e.g. FILE); usable behind a pointer."""

    def __init__(self, name: str) -> None:
        self.name = name


@dataclass
class CHeader:
    """What was learned from the header: ctypes struct classes and enum values."""

    path: Path
    defines: frozenset[str]
    structs: dict[str, type] = field(default_factory=dict)      # typedef name or `struct tag`
    enums: dict[str, dict[str, int]] = field(default_factory=dict)
    constants: dict[str, int] = field(default_factory=dict)     # every enumerator and #define int

    def struct(self, name: str) -> type:
        """The ctypes class for a typedef name (`layer`) or tag (`struct layer`)."""
        cls = self.structs.get(name) or self.structs.get(f"struct {name}")
        if cls is None:
            raise HeaderError(f"{self.path}: no complete struct named '{name}'")
        return cls

    def enum(self, name: str) -> dict[str, int]:
        """Enumerator name -> value for an enum typedef such as LAYER_TYPE."""
        if name not in self.enums:
            raise HeaderError(f"{self.path}: no enum named '{name}'")
        return self.enums[name]

    def enum_name(self, enum: str, value: int) -> str:
        """The enumerator spelling for a value (e.g. 0 -> 'CONVOLUTIONAL'), or the number."""
        for key, val in self.enum(enum).items():
            if val == value:
                return key
        return str(value)


def strip_comments(text: str) -> str:
    """Remove /* */ and // comments, keeping newlines so line numbers stay right."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == '"' or ch == "'":
            j = i + 1
            while j < n and text[j] != ch:
                j += 2 if text[j] == "\\" else 1
            out.append(text[i:j + 1])
            i = j + 1
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append("\n" * text.count("\n", i, j) or " ")
            i = j
        elif text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def preprocess(text: str, path: str, defines: Iterable[str] = ()) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """Apply the conditional directives; return the active (line number, text) lines.

    Only macros in `defines` (plus those #defined by the header itself) count as defined, so
    `#ifdef GPU` and `#ifdef CUDNN` blocks are dropped for the CPU build. Integer #defines are
    also returned because enum values or array sizes may use them.
    """
    defined: dict[str, str] = {name: "1" for name in defines}
    stack: list[tuple[bool, bool]] = []   # (this block active, some branch already taken)
    active = True
    lines: list[tuple[int, str]] = []
    raw_lines = text.replace("\\\n", "  ").split("\n")
    for number, line in enumerate(raw_lines, start=1):
        stripped = line.strip()
        if not stripped.startswith("#"):
            if active:
                lines.append((number, line))
            continue
        match = re.match(r"#\s*(\w+)\s*(.*)", stripped)
        if not match:
            continue
        directive, rest = match.group(1), match.group(2).strip()
        active_here = all(block for block, _ in stack)
        if directive in ("ifdef", "ifndef", "if"):
            if not active_here:
                cond = False  # never evaluate conditions inside a dropped block
            elif directive == "if":
                cond = _eval_if(rest, defined, path, number)
            elif not rest:
                raise HeaderError(f"{path}:{number}: #{directive} without a macro name")
            else:
                cond = (rest.split()[0] in defined) == (directive == "ifdef")
            stack.append((cond, cond or not active_here))
        elif directive in ("elif", "else"):
            if not stack:
                raise HeaderError(f"{path}:{number}: #{directive} without #if")
            _, taken = stack[-1]
            cond = (not taken) and (directive == "else" or _eval_if(rest, defined, path, number))
            stack[-1] = (cond, taken or cond)
        elif directive == "endif":
            if not stack:
                raise HeaderError(f"{path}:{number}: #endif without #if")
            stack.pop()
        elif active_here and directive == "define":
            parts = rest.split(None, 1)
            if parts:
                defined[parts[0]] = parts[1].strip() if len(parts) > 1 else ""
        elif active_here and directive == "undef":
            defined.pop(rest.split()[0] if rest else "", None)
        active = all(block for block, _ in stack)
    if stack:
        raise HeaderError(f"{path}: unterminated #if/#ifdef block")
    constants: dict[str, int] = {}
    for name, value in defined.items():
        if re.fullmatch(r"-?\d+", value or ""):
            constants[name] = int(value)
    return lines, constants


def _eval_if(expr: str, defined: dict[str, str], path: str, line: int) -> bool:
    """`#if` for the forms headers use around optional code: 0, 1, [!]defined(X), joined by && / ||."""
    def term(part: str) -> bool:
        part = part.strip()
        negate = False
        while part.startswith("!"):
            negate, part = not negate, part[1:].strip()
        match = re.fullmatch(r"defined\s*\(?\s*(\w+)\s*\)?", part)
        if match:
            value = match.group(1) in defined
        elif re.fullmatch(r"\d+", part):
            value = int(part) != 0
        else:
            raise HeaderError(f"{path}:{line}: unsupported #if expression '{expr}'")
        return value != negate
    if "&&" in expr and "||" in expr:
        raise HeaderError(f"{path}:{line}: unsupported #if expression '{expr}' (mixed && and ||)")
    if "||" in expr:
        return any(term(p) for p in expr.split("||"))
    return all(term(p) for p in expr.split("&&"))


def tokenize(lines: list[tuple[int, str]]) -> list[_Tok]:
    """Split active lines into identifiers, integers and single punctuation characters."""
    tokens: list[_Tok] = []
    for number, line in lines:
        pos = 0
        while pos < len(line):
            match = _TOKEN_RE.match(line, pos)
            if match is None or match.end() == pos:
                break
            pos = match.end()
            text = match.group(1) or match.group(2) or match.group(3)
            if text and not text.isspace():
                tokens.append(_Tok(text, number))
    return tokens


class _Parser:
    """Recursive-descent reader of the top-level declarations in a header."""

    def __init__(self, tokens: list[_Tok], header: CHeader) -> None:
        self.toks = tokens
        self.pos = 0
        self.h = header
        self.typedefs: dict[str, object] = {}     # name -> ctypes type, _Void, _Opaque or ("struct", tag)
        self.tags: dict[str, type] = {}           # "struct tag" -> complete class
        self.enum_tags: set[str] = set()
        self.anon = 0

    # --- token helpers -------------------------------------------------------------------
    def peek(self, offset: int = 0) -> str | None:
        i = self.pos + offset
        return self.toks[i].text if i < len(self.toks) else None

    def line(self) -> int:
        return self.toks[min(self.pos, len(self.toks) - 1)].line if self.toks else 0

    def error(self, message: str) -> HeaderError:
        return HeaderError(f"{self.h.path}:{self.line()}: {message}")

    def take(self, expected: str | None = None) -> str:
        if self.pos >= len(self.toks):
            raise self.error("unexpected end of header")
        text = self.toks[self.pos].text
        if expected is not None and text != expected:
            raise self.error(f"expected '{expected}', found '{text}'")
        self.pos += 1
        return text

    def skip_statement(self) -> None:
        """Skip a declaration we do not need (prototype, extern variable) up to its ';'."""
        depth = 0
        while self.pos < len(self.toks):
            text = self.take()
            if text in "({[" and len(text) == 1:
                depth += 1
            elif text in ")}]" and len(text) == 1:
                depth -= 1
                if depth == 0 and text == "}" and self.peek() != ";":
                    return  # a function body
            elif text == ";" and depth <= 0:
                return

    # --- top level -----------------------------------------------------------------------
    def parse(self) -> None:
        while self.pos < len(self.toks):
            text = self.peek()
            if text == ";":
                self.take()
            elif text == "typedef":
                self.take()
                self.parse_typedef()
            elif text in ("struct", "union") and self.peek(2) in ("{", ";"):
                kind = self.take()
                tag = self.take()
                if self.peek() == "{":
                    self.define_record(kind, tag)
                self.take(";")
            elif text == "enum" and (self.peek(1) == "{" or self.peek(2) == "{"):
                self.take()
                self.parse_enum_body(None)
                self.take(";")
            else:
                self.skip_statement()

    def parse_typedef(self) -> None:
        base = self.parse_specifiers()
        while True:
            name, ctype = self.parse_declarator(base, typedef=True)
            self.typedefs[name] = ctype
            if isinstance(ctype, type) and issubclass(ctype, (ctypes.Structure, ctypes.Union)):
                if ctype.__name__.startswith("anon_"):
                    ctype.__name__ = ctype.__qualname__ = name  # `typedef struct {..} tree;`
                self.h.structs[name] = ctype
            if isinstance(base, tuple) and base[0] == "enum" and ctype is ctypes.c_int:
                self.h.enums[name] = base[2]
            if self.peek() == ",":
                self.take()
                continue
            self.take(";")
            return

    # --- types ---------------------------------------------------------------------------
    def parse_specifiers(self) -> object:
        """Read a type specifier list; return a ctypes type, _Void, _Opaque or ('struct', tag)."""
        words: list[str] = []
        while True:
            text = self.peek()
            if text in _QUALIFIERS:
                self.take()
            elif text in ("struct", "union"):
                kind = self.take()
                tag = None
                if self.peek() not in ("{",):
                    tag = self.take()
                if self.peek() == "{":
                    return self.define_record(kind, tag)
                return (kind, tag)
            elif text == "enum":
                self.take()
                tag = self.take() if self.peek() != "{" else None
                if self.peek() == "{":
                    values = self.parse_enum_body(tag)
                    return ("enum", tag or f"<anon enum {id(values)}>", values)
                return ctypes.c_int
            elif text in ("signed", "unsigned", "short", "long", "int", "char", "float", "double", "void", "_Bool"):
                words.append(self.take())
            elif not words and text is not None and re.fullmatch(r"[A-Za-z_]\w*", text):
                self.take()
                return self.lookup_type(text)
            else:
                break
        if not words:
            raise self.error(f"expected a type, found '{self.peek()}'")
        return self.builtin(words)

    def builtin(self, words: list[str]) -> object:
        if words == ["void"]:
            return _Void
        unsigned = "unsigned" in words
        rest = [w for w in words if w not in ("signed", "unsigned")]
        if rest.count("long") and "int" in rest:
            rest.remove("int")
        if rest in (["short", "int"], ["int", "short"]):
            rest = ["short"]
        key = " ".join(rest) if rest else "int"
        if unsigned:
            key = "unsigned" if key == "int" else f"unsigned {key}"
        elif "signed" in words and key == "char":
            key = "signed char"
        ctype = _BUILTIN_TYPES.get(key)
        if ctype is None:
            raise self.error(f"unsupported builtin type '{' '.join(words)}'")
        return ctype

    def lookup_type(self, name: str) -> object:
        if name in self.typedefs:
            return self.typedefs[name]
        if name in _BUILTIN_TYPES:
            return _BUILTIN_TYPES[name]
        return _Opaque(name)

    def resolve(self, ctype: object) -> object:
        """Turn ('struct', tag) references into the class if it is complete by now."""
        if isinstance(ctype, tuple) and ctype[0] in ("struct", "union"):
            return self.tags.get(f"{ctype[0]} {ctype[1]}", ctype)
        if isinstance(ctype, tuple) and ctype[0] == "enum":
            return ctypes.c_int
        return ctype

    def parse_enum_body(self, tag: str | None) -> dict[str, int]:
        self.take("{")
        values: dict[str, int] = {}
        current = 0
        while self.peek() != "}":
            name = self.take()
            if self.peek() == "=":
                self.take()
                current = self.parse_int_expr(values)
            values[name] = current
            self.h.constants[name] = current
            current += 1
            if self.peek() == ",":
                self.take()
        self.take("}")
        if tag:
            self.h.enums[tag] = values
        return values

    def parse_int_expr(self, local: dict[str, int]) -> int:
        """Integer literal, optionally negated, or a known constant (enough for enum values)."""
        sign = 1
        if self.peek() == "-":
            self.take()
            sign = -1
        text = self.take()
        if re.fullmatch(r"0[xX][0-9a-fA-F]+", text):
            return sign * int(text, 16)
        if text.isdigit():
            return sign * int(text)
        if text in local:
            return sign * local[text]
        if text in self.h.constants:
            return sign * self.h.constants[text]
        raise self.error(f"cannot evaluate constant '{text}'")

    def parse_declarator(self, base: object, typedef: bool = False) -> tuple[str, object]:
        """`**name[3]` or `(*name)(args)`; return the name and its ctypes type."""
        stars = 0
        while self.peek() in ("*",) or self.peek() in _QUALIFIERS:
            if self.take() == "*":
                stars += 1
        if self.peek() == "(":
            # Function pointer: ( * name ) ( params ). Stored as an untyped pointer.
            self.take("(")
            while self.peek() == "*":
                self.take()
            name = self.take()
            self.take(")")
            self.skip_parens()
            return name, ctypes.c_void_p
        name = self.take()
        if not re.fullmatch(r"[A-Za-z_]\w*", name):
            raise self.error(f"expected a declarator name, found '{name}'")
        dims: list[int] = []
        while self.peek() == "[":
            self.take("[")
            dims.append(self.parse_int_expr({}))
            self.take("]")
        if self.peek() == ":":
            raise self.error(f"bit-field '{name}' is not supported")
        if self.peek() == "(":
            # A function declaration inside a typedef: not representable; keep as a pointer.
            self.skip_parens()
            return name, ctypes.c_void_p
        if typedef and stars == 0 and not dims:
            # `typedef struct layer layer;` may name a struct that is completed later.
            return name, self.resolve(base) if not (isinstance(base, tuple) and base[0] == "enum") else ctypes.c_int
        ctype = self.pointer_type(base, stars, name)
        for dim in reversed(dims):
            ctype = ctype * dim
        return name, ctype

    def skip_parens(self) -> None:
        depth = 0
        while True:
            text = self.take()
            if text == "(":
                depth += 1
            elif text == ")":
                depth -= 1
                if depth == 0:
                    return

    def pointer_type(self, base: object, stars: int, name: str) -> object:
        base = self.resolve(base)
        if stars == 0:
            if base is _Void or isinstance(base, (_Opaque, tuple)):
                what = base.name if isinstance(base, _Opaque) else base
                raise self.error(f"'{name}' has incomplete type {what!r} by value")
            return base
        # One level of pointer to something we can describe.
        if base is _Void or isinstance(base, (_Opaque, tuple)):
            ctype: object = ctypes.c_void_p
        else:
            ctype = ctypes.POINTER(base)
        for _ in range(stars - 1):
            ctype = ctypes.POINTER(ctype)
        return ctype

    def define_record(self, kind: str, tag: str | None) -> type:
        """Parse `{ members }` and build the ctypes class (registered under `struct tag`)."""
        self.take("{")
        fields: list[tuple[str, object]] = []
        while self.peek() != "}":
            if self.peek() == ";":
                self.take()
                continue
            base = self.parse_specifiers()
            while True:
                name, ctype = self.parse_declarator(base)
                fields.append((name, ctype))
                if self.peek() == ",":
                    self.take()
                    continue
                self.take(";")
                break
        self.take("}")
        if tag is None:
            self.anon += 1
        cls_name = tag or f"anon_{kind}_{self.anon}"
        parent = ctypes.Structure if kind == "struct" else ctypes.Union
        seen: set[str] = set()
        for name, _ in fields:
            if name in seen:
                raise self.error(f"duplicate member '{name}' in {kind} {cls_name}")
            seen.add(name)
        cls = type(cls_name, (parent,), {"_fields_": fields, "__doc__": f"ctypes view of C {kind} {cls_name}"})
        if tag:
            self.tags[f"{kind} {tag}"] = cls
            self.h.structs[f"{kind} {tag}"] = cls
        return cls


def parse_header(path: str | Path, defines: Iterable[str] = ()) -> CHeader:
    """Parse a C header into ctypes classes. `defines` lists macros to treat as defined."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise EngineError(f"{path}: cannot read Darknet header ({exc.strerror}); "
                          "install it with `sudo apt-get install darknet`") from exc
    defines = frozenset(defines)
    lines, constants = preprocess(strip_comments(text), str(path), defines)
    header = CHeader(path=path, defines=defines, constants=dict(constants))
    parser = _Parser(tokenize(lines), header)
    parser.parse()
    # A typedef that names a struct defined later (`typedef struct layer layer;`) resolves now.
    for name, ctype in parser.typedefs.items():
        resolved = parser.resolve(ctype)
        if isinstance(resolved, type) and issubclass(resolved, (ctypes.Structure, ctypes.Union)):
            header.structs[name] = resolved
    return header


@functools.lru_cache(maxsize=4)
def _cached(path: str, mtime_ns: int, defines: frozenset[str]) -> CHeader:
    return parse_header(path, defines)


def load_header(path: str | Path, defines: Iterable[str] = ()) -> CHeader:
    """Parse (cached per file version) and check every struct the runtime needs is present."""
    path = Path(path)
    try:
        mtime = path.stat().st_mtime_ns
    except OSError as exc:
        raise EngineError(f"{path}: Darknet header not found; install it with "
                          "`sudo apt-get install darknet` (it ships /usr/lib/darknet/include/darknet.h)") from exc
    header = _cached(str(path), mtime, frozenset(defines))
    missing = [name for name in REQUIRED_STRUCTS if name not in header.structs]
    if missing:
        raise HeaderError(f"{path}: structs {missing} not found; is this Darknet's darknet.h?")
    return header

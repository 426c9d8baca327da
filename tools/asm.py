"""Assemble vmlab's test guests with Keystone.

A guest is one source file in Intel syntax (LLVM MC dialect, as Keystone speaks
it) with NASM-style ``;`` comments, ``%include "file"`` and a header comment that
names its output format::

    ; vmlab-format: multiboot-aout      (required when built with build())
    ; vmlab-org: 0x100000               (load/link address; default per format)
    ; vmlab-entry: _start               (ELF entry label; default _start, else org)
    ; vmlab-cmdline: words...           (kernel command line to boot it with)
    ; vmlab-memory: SIZE                (guest RAM, as -m reads it; default 64M)
    ; vmlab-module: data/file args...   (a multiboot module, repeatable)
    ; vmlab-qemu-append: words...       (extra command line for QEMU runs only)
    ; vmlab-qemu-known-fail: text       (a FAIL line QEMU is known to cause by
                                         deviating from hardware; repeatable)

Formats: ``bootsector`` (16-bit at 0x7c00, padded to 510 bytes + 0x55 0xAA),
``multiboot-aout`` (flat image whose Multiboot v1 header sets flags bit 16),
``multiboot-elf`` (ELF32, one PT_LOAD at the org), ``elf64`` (ELF64, one PT_LOAD,
entered in long mode by vmlab's loader; QEMU cannot boot it).

Mixed 16/32/64-bit code lives in ONE source: Keystone honours ``.code16``,
``.code32`` and ``.code64`` (measured with keystone-engine 0.9.2), and labels are
visible across them, so no chunk scheme is needed.  Where Keystone mis-encodes,
the preprocessor rewrites the line before Keystone sees it or refuses it with a
clear error (every rewrite is checked with Capstone in
tests/guests/test_guests_qemu.py):

* Constants.  Keystone mis-parses symbolic constants in instruction operands
  (``K = 0x23``): ``mov ecx, -K`` and ``mov eax, 0 + K`` become memory loads,
  ``[ebx + K*2]`` loses the scale, ``[lab + K]`` the label, ``[ebx - K]`` the
  sign.  Literal numbers work, so every constant (``K = expr``, ``.equ``,
  ``.set``) is evaluated here and substituted by its value, and constant
  operands are folded to one literal.  Keystone's directives and its operands
  disagree on the precedence of ``<< >> | & ^`` against ``+ - * /``, so such
  mixes must be parenthesised (an error says so).
* ``push IMM``: Keystone picks the width from the spelling (``push 0x23`` pushes
  a dword in 16-bit code, ``push K`` or ``push label`` a word in 32-bit code) ->
  emitted as ``68 imm16`` (16-bit) or ``68 imm32`` (32/64-bit).
* ``ljmp SEL:OFF`` in 32-bit code gets a 0x66 prefix (ptr16:16, offset truncated
  to 16 bits) -> emitted as ``EA imm32 imm16``; in 16-bit code as
  ``66 EA imm32 imm16`` (``.word label`` is a Keystone "invalid fixup", and a
  32-bit offset is right whatever the target segment is).
* ``lgdt/lidt/sgdt/sidt`` in 32-bit code get a 0x66 prefix (24-bit base) ->
  emitted as ``0F 01 /n`` with a disp32 or a plain base register.
* In 64-bit code a memory operand that is a bare number is mis-encoded
  (``mov rcx, [0x1000]`` becomes ``[rip + 0x1000]``) while ``[symbol]`` is
  right -- if the symbol is defined after its use (defined before, Keystone
  folds it back into the bad encoding).  So a constant address becomes a
  symbol defined at the end of the source; one at or above 2 GiB cannot be a
  disp32 and is refused (use a register base, or movabs).
* Directives are whitelisted: ``.text`` segfaults Keystone, ``.fill`` with a
  label-relative count hangs it, ``.section``/``.include``/``.incbin``/``.end``
  silently emit nothing, ``.balign N, fill`` silently does not align.
* Keystone is never given an option: in 0.9.2 any ``ks_option`` call (even
  installing a symbol resolver) switches operands to radix 16 (``mov al, 13``
  -> ``mov al, 0x13``).  Errors are located by bisection instead.

Other traps that guest authors must know (not rewritten):
* In 16-bit code Keystone encodes near ``call``/``ret``/relaxed ``jmp``/``jcc``
  with a 0x66 prefix (32-bit return addresses).  Consistent, so it works below
  64 KiB, but costs bytes.  It also drops a scaled index in 16-bit code with
  32-bit addressing (``[ebx*4 + 8]``): avoid that form there.
* Alignment padding is made of 32-bit multi-byte NOPs: never fall through a
  ``.balign`` in ``.code16`` code.
* Numeric local labels (``1:``/``1b``) and ``\\@`` in macros are not supported:
  use unique names.  Macros must be defined before use.
* ``mov eax, label`` is an immediate (the address); ``mov eax, [label]`` a load.
  In 64-bit code labels are encoded as absolute disp32 or RIP-relative: right
  when the code runs at its link address below 2 GiB.
* Keystone accepts some malformed operands silently (``[ebx+`` -> ``[ebx]``).

Errors (Keystone failure, missing include, bad header, image too big...) raise
:class:`AsmError` carrying the file and line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import struct
import tempfile
from pathlib import Path

import keystone

#: Bump whenever a change of this module can change the bytes it produces: the
#: version is part of every build's cache key, so a stale build never runs.  (The
#: key also covers this file's own text, in case a bump is forgotten.)
ASM_VERSION = "3"

REPO = Path(__file__).resolve().parent.parent
GUESTS_DIR = REPO / "guests"
INCLUDE_DIR = GUESTS_DIR / "include"
BUILD_DIR = GUESTS_DIR / "build"

_KS_MODES = {16: keystone.KS_MODE_16, 32: keystone.KS_MODE_32, 64: keystone.KS_MODE_64}


@dataclasses.dataclass(frozen=True)
class Format:
    """An output format: the CPU mode the source starts in, default org, file suffix."""

    name: str
    mode: int
    org: int
    suffix: str


FORMATS = {
    f.name: f
    for f in (
        Format("bootsector", 16, 0x7C00, ".img"),
        Format("multiboot-aout", 32, 0x100000, ".bin"),
        Format("multiboot-elf", 32, 0x100000, ".elf"),
        Format("elf64", 64, 0x100000, ".elf"),
    )
}

MULTIBOOT_MAGIC = 0x1BADB002
MULTIBOOT_SEARCH = 8192  # Multiboot v1 §3.1.1: header within the first 8192 bytes
MB_FLAG_AOUT_KLUDGE = 1 << 16
ELF_DATA_OFFSET = 0x1000  # file offset of the PT_LOAD segment (page aligned)
BOOTSECTOR_CODE_MAX = 510


class AsmError(Exception):
    """A guest could not be assembled or packaged.

    ``file`` and ``line`` (1-based) say where, when known; ``str()`` starts with
    ``file:line:`` so the message is useful on its own.
    """

    def __init__(self, message: str, file: str | None = None, line: int | None = None):
        self.message = message
        self.file = file
        self.line = line
        where = ""
        if file is not None:
            where = f"{file}:{line}: " if line is not None else f"{file}: "
        super().__init__(where + message)


@dataclasses.dataclass(frozen=True)
class GuestHeader:
    """What a guest's header comment declares."""

    format: str | None
    org: int | None
    entry: str | None
    cmdline: str | None
    modules: tuple[str, ...]
    qemu_append: str | None = None
    qemu_known_fails: tuple[str, ...] = ()
    memory: str | None = None


@dataclasses.dataclass(frozen=True)
class Line:
    """One preprocessed line and where it came from."""

    text: str
    file: str
    lineno: int


@dataclasses.dataclass
class Preprocessed:
    """Result of :func:`preprocess`: lines ready for Keystone plus what was learnt."""

    lines: list[Line]
    labels: list[str]
    sources: list[tuple[str, str]]  # (path, text) of every file read, in order

    @property
    def text(self) -> str:
        return "\n".join(line.text for line in self.lines) + "\n"


# --------------------------------------------------------------------------
# Header
# --------------------------------------------------------------------------

_HEADER_RE = re.compile(r"^\s*;\s*vmlab-([a-z0-9-]+)\s*:\s*(.*?)\s*$")
_HEADER_KEYS = {"format", "org", "entry", "cmdline", "module", "qemu-append", "qemu-known-fail", "memory"}
_REPEATABLE = {"module", "qemu-known-fail"}


def parse_header(text: str, file: str = "<inline>") -> GuestHeader:
    """Read the ``; vmlab-KEY: value`` lines of the leading comment block."""
    fields: dict[str, str] = {}
    lists: dict[str, list[str]] = {key: [] for key in _REPEATABLE}
    for lineno, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped and not stripped.startswith(";"):
            break
        m = _HEADER_RE.match(raw)
        if not m:
            continue
        key, value = m.group(1), m.group(2)
        if key not in _HEADER_KEYS:
            raise AsmError(f"unknown header key 'vmlab-{key}'", file, lineno)
        if key in _REPEATABLE:
            lists[key].append(value)
        elif key in fields:
            raise AsmError(f"header key 'vmlab-{key}' given twice", file, lineno)
        else:
            fields[key] = value
        if key == "format" and value not in FORMATS:
            raise AsmError(f"unknown format {value!r} (one of {', '.join(FORMATS)})", file, lineno)
        if key == "org":
            try:
                int(value, 0)
            except ValueError:
                raise AsmError(f"bad org {value!r}", file, lineno) from None
    return GuestHeader(
        format=fields.get("format"),
        org=int(fields["org"], 0) if "org" in fields else None,
        entry=fields.get("entry"),
        cmdline=fields.get("cmdline"),
        modules=tuple(lists["module"]),
        qemu_append=fields.get("qemu-append"),
        qemu_known_fails=tuple(lists["qemu-known-fail"]),
        memory=fields.get("memory"),
    )


def read_header(path: str | os.PathLike) -> GuestHeader:
    """Header of the guest source at ``path``."""
    path = Path(path)
    return parse_header(_read(path, None, None), str(path))


# --------------------------------------------------------------------------
# Preprocessor
# --------------------------------------------------------------------------

_INCLUDE_RE = re.compile(r'^\s*%include\s+"([^"]+)"\s*$')
_CODE_RE = re.compile(r"^\.code(16|32|64)$", re.I)
_LABEL_RE = re.compile(r"^([A-Za-z_$][\w$.]*)\s*:(?!:)\s*")
_ASSIGN_RE = re.compile(r"^([A-Za-z_$][\w$.]*)\s*=(?!=)")
_IDENT_RE = re.compile(r"(?<![\w$.])([A-Za-z_$][\w$.]*)")
_LJMP_RE = re.compile(r"^ljmp\s+(?P<sel>[^\[\]:,]+?)\s*[:,]\s*(?P<off>[^\[\]:,]+?)$", re.I)
_DESC_TABLE_RE = re.compile(
    r"^(?P<op>lgdt|lidt|sgdt|sidt)\s+(?:(?:fword|tbyte|qword|dword|word)\s+ptr\s+)?"
    r"(?:ds\s*:\s*)?\[(?P<expr>[^\]]+)\]$",
    re.I,
)
_REG_RE = re.compile(
    r"\b(?:[re]?[abcd]x|[abcd][lh]|[re]?(?:si|di|bp|sp)|(?:si|di|bp|sp)l|r(?:[89]|1[0-5])[dwb]?|rip|eip)\b",
    re.I,
)
_PUSH_IMM_RE = re.compile(r"^push\s+(?P<op>[^\[\]]+?)\s*$", re.I)
_DESC_TABLE_REG = {"sgdt": 0, "sidt": 1, "lgdt": 2, "lidt": 3}
_MODRM_BASE = {"eax": 0, "ecx": 1, "edx": 2, "ebx": 3, "esi": 6, "edi": 7}

# Directives Keystone 0.9.2 was seen to handle correctly (see module docstring).
_DIRECTIVES = {
    ".code16", ".code32", ".code64",
    ".byte", ".word", ".short", ".long", ".int", ".quad",
    ".ascii", ".asciz", ".string",
    ".zero", ".fill", ".skip", ".space", ".org",
    ".balign", ".align", ".p2align",
    ".equ", ".set", ".macro", ".endm", ".rept", ".endr",
}
_COUNT_DIRECTIVES = {".zero", ".fill", ".skip", ".space"}
_ALIGN_DIRECTIVES = {".balign", ".align", ".p2align"}
_BLOCK_OPEN = {".macro", ".rept"}
_BLOCK_CLOSE = {".endm", ".endr"}


def _strip_comment(line: str) -> str:
    """Drop a ``;`` comment, respecting "strings" and 'c' character literals."""
    quote = None
    i = 0
    while i < len(line):
        c = line[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif c == ";":
            return line[:i].rstrip()
        i += 1
    return line.rstrip()


def _read(path: Path, file: str | None, lineno: int | None) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise AsmError(f"cannot read {path}: {exc.strerror}", file, lineno) from exc


def _resolve_include(name: str, including: Path | None, dirs: list[Path]) -> Path | None:
    candidates = []
    if including is not None:
        candidates.append(including.parent / name)
    candidates.extend(d / name for d in dirs)
    for cand in candidates:
        if cand.is_file():
            return cand
    return None


# --------------------------------------------------------------------------
# Constant expressions
#
# Keystone 0.9.2 mis-parses symbolic constants inside instruction operands
# (K = 0x23):  "mov ecx, -K" and "mov eax, 0 + K" become memory loads,
# "[ebx + K*2]" loses the scale, "[lab + K]" loses the label, "[ebx - K]" the
# sign, "push K" pushes a word.  Literal numbers are handled right, so the
# preprocessor substitutes every constant by its value and folds constant
# operands to one literal.  (Its directives and its Intel operands also disagree
# on operator precedence, so ambiguous mixes must be parenthesised.)
# --------------------------------------------------------------------------

_TOKEN_RE = re.compile(
    r"\s*(?:(?P<num>0[xX][0-9a-fA-F]+|0[bB][01]+|[0-9][0-9a-fA-F]*[hH](?![\w$])|\d+)"
    r"|(?P<chr>'(?:\\.|[^'\\])')|(?P<id>[A-Za-z_$][\w$.]*)|(?P<op><<|>>|[-+*/%|&^~()]))")
_ARITH = {"+", "-", "*", "/", "%"}
_SINGLE_FAMILIES = ({"<<", ">>"}, {"|"}, {"&"}, {"^"})
_CHAR_ESCAPES = {"n": 10, "r": 13, "t": 9, "0": 0, "\\": 92, "'": 39, '"': 34}


class _NotConstant(Exception):
    pass


class _AmbiguousExpr(Exception):
    pass


def _tokenize(expr: str) -> list[tuple[str, str]] | None:
    out, pos = [], 0
    expr = expr.rstrip()
    while pos < len(expr):
        m = _TOKEN_RE.match(expr, pos)
        if not m or m.end() == pos:
            return None
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def _number(text: str) -> int:
    low = text.lower()
    if low.startswith("0x"):
        return int(low, 16)
    if low.startswith("0b"):
        return int(low[2:], 2)
    if low.endswith("h"):
        return int(low[:-1], 16)
    if len(low) > 1 and low.startswith("0"):
        return int(low, 8)  # GNU as: a leading 0 means octal
    return int(low)


def _char(text: str) -> int:
    body = text[1:-1]
    if body.startswith("\\"):
        return _CHAR_ESCAPES.get(body[1], ord(body[1]))
    return ord(body)


def _apply(op: str, a: int, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op in ("/", "%"):
        if b == 0:
            raise _NotConstant
        q = abs(a) // abs(b) * (1 if (a >= 0) == (b >= 0) else -1)
        return q if op == "/" else a - q * b
    if op == "<<":
        return a << b
    if op == ">>":
        return a >> b
    return {"|": a | b, "&": a & b, "^": a ^ b}[op]


class _Evaluator:
    """Evaluate a token list; names must be known constants."""

    def __init__(self, tokens, constants):
        self.tokens, self.constants, self.pos = tokens, constants, 0

    def run(self) -> int:
        value = self.expr()
        if self.pos != len(self.tokens):
            raise _NotConstant
        return value

    def peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else (None, None)

    def primary(self) -> int:
        kind, text = self.peek()
        self.pos += 1
        if kind == "num":
            return _number(text)
        if kind == "chr":
            return _char(text)
        if kind == "id":
            if text not in self.constants:
                raise _NotConstant
            return self.constants[text]
        if kind == "op" and text == "(":
            value = self.expr()
            if self.peek() != ("op", ")"):
                raise _NotConstant
            self.pos += 1
            return value
        if kind == "op" and text in ("-", "+", "~"):
            value = self.primary()
            return {"-": -value, "+": value, "~": ~value}[text]
        raise _NotConstant

    def expr(self) -> int:
        values, ops = [self.primary()], []
        while True:
            kind, text = self.peek()
            if kind != "op" or text in ("(", ")", "~"):
                break
            self.pos += 1
            ops.append(text)
            values.append(self.primary())
        used = set(ops)
        if used and not (used <= _ARITH or any(used <= fam for fam in _SINGLE_FAMILIES)):
            raise _AmbiguousExpr
        # * / % before + - (the only precedence both of Keystone's parsers share).
        i = 0
        while i < len(ops):
            if ops[i] in ("*", "/", "%"):
                values[i:i + 2] = [_apply(ops[i], values[i], values[i + 1])]
                del ops[i]
            else:
                i += 1
        result = values[0]
        for op, value in zip(ops, values[1:]):
            result = _apply(op, result, value)
        return result


def _evaluate(expr: str, constants: dict[str, int]) -> int | None:
    """Value of ``expr`` if it only involves numbers and known constants."""
    tokens = _tokenize(expr)
    if not tokens:
        return None
    try:
        return _Evaluator(tokens, constants).run()
    except _NotConstant:
        return None


def _literal(value: int) -> str:
    return f"{value:#x}" if value >= 0 else f"(-{-value:#x})"


def _split_operands(text: str) -> list[str]:
    """Split at commas outside brackets, parentheses and quotes."""
    parts, depth, quote, start = [], 0, None, 0
    i = 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif c in "[(":
            depth += 1
        elif c in "])":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
        i += 1
    parts.append(text[start:].strip())
    return parts


_PREFIXES = {"rep", "repe", "repz", "repne", "repnz", "lock"}
_SIZE_WORDS = {"byte", "word", "dword", "qword", "fword", "tbyte", "xmmword", "ptr", "offset"}


class _Preprocessor:
    def __init__(self, mode: int, include_dirs: list[Path]):
        self.mode = mode
        self.include_dirs = include_dirs
        self.lines: list[Line] = []
        self.labels: list[str] = []
        self.constants: dict[str, int] = {}
        self.abs_symbols: set[int] = set()
        self.sources: list[tuple[str, str]] = []
        self.depth = 0  # .macro/.rept nesting

    def run(self, text: str, file: str, path: Path | None, stack: tuple[str, ...] = ()) -> None:
        if len(stack) > 16:
            raise AsmError("%include nested too deeply: " + " -> ".join(stack), file)
        self.sources.append((file, text))
        for lineno, raw in enumerate(text.splitlines(), 1):
            inc = _INCLUDE_RE.match(raw)
            if inc:
                target = _resolve_include(inc.group(1), path, self.include_dirs)
                if target is None:
                    raise AsmError(f'include file "{inc.group(1)}" not found', file, lineno)
                key = str(target.resolve())
                if key in stack:
                    raise AsmError(f'recursive %include of "{inc.group(1)}"', file, lineno)
                saved_mode = self.mode
                self.run(_read(target, file, lineno), str(target), target, stack + (key,))
                if self.mode != saved_mode:
                    # An included file cannot change the mode of its includer.
                    self.mode = saved_mode
                    self.lines.append(Line(f".code{saved_mode}", file, lineno))
                continue
            if raw.lstrip().startswith("%"):
                raise AsmError(f"unknown preprocessor directive: {raw.strip()}", file, lineno)
            self._statement(_strip_comment(raw).strip(), file, lineno)

    def _statement(self, stmt: str, file: str, lineno: int) -> None:
        # Peel leading labels ("a: b: insn").
        while True:
            m = _LABEL_RE.match(stmt)
            if not m:
                break
            if self.depth == 0:
                self.labels.append(m.group(1))
            self.lines.append(Line(m.group(1) + ":", file, lineno))
            stmt = stmt[m.end():]
        if not stmt:
            return
        m = _ASSIGN_RE.match(stmt)
        if m:
            stmt = self._assign(m.group(1), stmt[m.end():], file, lineno)
            self.lines.append(Line(stmt, file, lineno))
            return
        word = stmt.split(None, 1)[0].lower()
        if word.startswith("."):
            self._directive(word, stmt, file, lineno)
            return
        for text in self._rewrite(self._fold_instruction(stmt, file, lineno), file, lineno):
            self.lines.append(Line(text, file, lineno))

    def _eval(self, expr: str, file: str, lineno: int) -> int | None:
        try:
            return _evaluate(expr, self.constants)
        except _AmbiguousExpr:
            raise AsmError(
                f"parenthesise {expr.strip()!r}: Keystone's operands and directives give "
                f"<< >> | & ^ different precedences against + - * /", file, lineno) from None

    def _assign(self, name: str, expr: str, file: str, lineno: int) -> str:
        value = self._eval(expr, file, lineno)
        if value is None:
            self.constants.pop(name, None)
            return f"{name} = {self._substitute(expr, file, lineno)}"
        self.constants[name] = value
        return f"{name} = {_literal(value)}"

    def _substitute(self, text: str, file: str, lineno: int) -> str:
        """Fold ``text`` to a literal, or replace the constants inside it."""
        if '"' in text or "\\" in text:
            return text
        value = self._eval(text, file, lineno)
        if value is not None:
            return _literal(value)

        def repl(m):
            name = m.group(1)
            return _literal(self.constants[name]) if name in self.constants else name
        return _IDENT_RE.sub(repl, text)

    def _fold_operand(self, op: str, movabs: bool, file: str, lineno: int) -> str:
        """Substitute constants in one instruction operand and fold it."""
        lead = op.lower().split("[", 1)[0].split()
        if "[" not in op:
            if not op or op.lower() in _SIZE_WORDS or _REG_RE.fullmatch(op) or \
                    re.fullmatch(r"[cdefgs]s", op, re.I) or set(lead) & _SIZE_WORDS:
                return op
            return self._substitute(op, file, lineno)
        m = re.match(r"^(?P<pre>[^\[]*)\[(?P<body>[^\]]*)\](?P<post>.*)$", op)
        if not m:
            return op
        body = m.group("body")
        value = self._eval(body, file, lineno)
        if value is None:
            return f"{m.group('pre')}[{self._substitute(body, file, lineno)}]{m.group('post')}"
        if self.mode == 64 and not movabs:
            # Keystone encodes [number] RIP-relative or wrongly in 64-bit code but
            # [symbol] right, if the symbol is defined after its use (defined
            # before, Keystone folds it back): preprocess() appends the symbol.
            if not 0 <= value < 0x80000000:
                raise AsmError(
                    f"absolute address {value:#x} does not fit a sign-extended disp32 in "
                    f"64-bit code: put it in a register (or use movabs with al/ax/eax/rax)",
                    file, lineno)
            self.abs_symbols.add(value)
            return f"{m.group('pre')}[__vmlab_abs_{value:x}]{m.group('post')}"
        return f"{m.group('pre')}[{_literal(value)}]{m.group('post')}"

    def _fold_instruction(self, stmt: str, file: str, lineno: int) -> str:
        words = stmt.split(None, 1)
        head = [words[0]]
        rest = words[1] if len(words) > 1 else ""
        while head[-1].lower() in _PREFIXES and rest:
            nxt = rest.split(None, 1)
            head.append(nxt[0])
            rest = nxt[1] if len(nxt) > 1 else ""
        if not rest or "\\" in rest or head[-1].lower() == "ljmp":  # ljmp: _rewrite folds
            return stmt
        movabs = head[-1].lower() == "movabs"
        operands = [self._fold_operand(op, movabs, file, lineno) for op in _split_operands(rest)]
        return " ".join(head) + " " + ", ".join(operands)

    def _directive(self, word: str, stmt: str, file: str, lineno: int) -> None:
        if word not in _DIRECTIVES:
            raise AsmError(
                f"directive {word} is not supported (Keystone 0.9.2 crashes on or "
                f"silently drops several directives; see tools/asm.py)", file, lineno)
        args = stmt[len(word):].strip()
        m = _CODE_RE.match(stmt)
        if m:
            if self.depth:
                raise AsmError(f"{word} inside .macro/.rept is not supported", file, lineno)
            self.mode = int(m.group(1))
        elif word in _BLOCK_OPEN:
            self.depth += 1
            if word == ".rept":
                stmt = f".rept {self._substitute(args, file, lineno)}"
        elif word in _BLOCK_CLOSE:
            if self.depth == 0:
                raise AsmError(f"{word} without an open block", file, lineno)
            self.depth -= 1
        elif word in (".equ", ".set"):
            name, _, expr = args.partition(",")
            stmt = self._assign(name.strip(), expr, file, lineno)
        elif word in _ALIGN_DIRECTIVES:
            if "," in args:
                raise AsmError(
                    f"{word} with a fill value is not supported (Keystone 0.9.2 then does "
                    f"not align at all); use '{word} N'", file, lineno)
            stmt = f"{word} {self._substitute(args, file, lineno)}"
        elif word in _COUNT_DIRECTIVES:
            parts = _split_operands(args)
            if self._eval(parts[0], file, lineno) is None:
                raise AsmError(
                    f"{word} count must be a constant (Keystone 0.9.2 hangs or emits "
                    f"nothing for a label-relative count); use .org LABEL + N", file, lineno)
            stmt = f"{word} " + ", ".join(self._substitute(p, file, lineno) for p in parts)
        elif word in (".byte", ".word", ".short", ".long", ".int", ".quad", ".org"):
            stmt = f"{word} " + ", ".join(
                self._substitute(p, file, lineno) for p in _split_operands(args))
        self.lines.append(Line(stmt, file, lineno))

    def _rewrite(self, stmt: str, file: str, lineno: int) -> list[str]:
        """Replace what Keystone mis-encodes by explicit bytes (module docstring)."""
        m = _LJMP_RE.match(stmt)
        if m:
            sel = self._substitute(m.group("sel").strip(), file, lineno)
            off = self._substitute(m.group("off").strip(), file, lineno)
            if self.mode == 64:
                raise AsmError("no direct far jump in 64-bit mode (use retfq or iretq)", file, lineno)
            prefix = ".byte 0x66, 0xea" if self.mode == 16 else ".byte 0xea"
            return [prefix, f".long {off}", f".word {sel}"]
        m = _PUSH_IMM_RE.match(stmt)
        if m and not _REG_RE.fullmatch(m.group("op")) and \
                not re.fullmatch(r"[cdefgs]s", m.group("op"), re.I):
            # Keystone picks the push width from the operand's spelling.
            if self.mode == 16:
                return [".byte 0x68", f".word {m.group('op')}"]
            return [".byte 0x68", f".long {m.group('op')}"]
        m = _DESC_TABLE_RE.match(stmt)
        if m and self.mode == 32:
            reg = _DESC_TABLE_REG[m.group("op").lower()]
            expr = m.group("expr").strip()
            if expr.lower() in _MODRM_BASE:
                return [f".byte 0x0f, 0x01, {(reg << 3) | _MODRM_BASE[expr.lower()]:#04x}"]
            if _REG_RE.search(expr):
                raise AsmError(
                    f"{m.group('op')} in 32-bit code takes [label] or [eax|ebx|ecx|edx|esi|edi] "
                    f"here (Keystone would add a 0x66 prefix)", file, lineno)
            return [f".byte 0x0f, 0x01, {(reg << 3) | 0b101:#04x}", f".long {expr}"]
        return [stmt]


def preprocess(text: str, mode: int, file: str = "<inline>", *,
               path: Path | None = None, include_dirs: list[Path] | None = None) -> Preprocessed:
    """Expand includes, strip comments and rewrite what Keystone gets wrong.

    ``mode`` (16, 32 or 64) is the mode the text starts in; the output starts with
    the matching ``.codeNN``.
    """
    if mode not in _KS_MODES:
        raise AsmError(f"mode must be 16, 32 or 64, not {mode!r}", file)
    dirs = list(include_dirs) if include_dirs is not None else [INCLUDE_DIR]
    pp = _Preprocessor(mode, dirs)
    pp.lines.append(Line(f".code{mode}", file, 0))
    pp.run(text, file, path)
    if pp.depth:
        raise AsmError("unterminated .macro/.rept block at end of file", file)
    for value in sorted(pp.abs_symbols):
        pp.lines.append(Line(f"__vmlab_abs_{value:x} = {value:#x}", file, 0))
    return Preprocessed(pp.lines, pp.labels, pp.sources)


# --------------------------------------------------------------------------
# Keystone
# --------------------------------------------------------------------------

@contextlib.contextmanager
def _captured_stderr():
    """Capture what LLVM prints on fd 2 (some directive errors only go there)."""
    buf: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        try:
            os.dup2(tmp.fileno(), 2)
            yield buf
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            buf.append(tmp.read().decode("utf-8", "replace"))


def _ks_run(text: str, mode: int, base: int) -> tuple[bytes | None, str | None]:
    """Assemble; return (bytes, None) or (None, error message).

    No Keystone option is ever set: in keystone-engine 0.9.2 any ks_option call
    (even installing a symbol resolver) switches immediate operands to radix 16,
    so ``mov al, 13`` would assemble as ``mov al, 0x13``.
    """
    ks = keystone.Ks(keystone.KS_ARCH_X86, _KS_MODES[mode])
    with _captured_stderr() as err:
        try:
            encoding, _ = ks.asm(text, base)
            failure = None
        except keystone.KsError as exc:
            encoding, failure = None, str(exc)
    diag = err[0].strip()
    if diag:
        return None, diag.splitlines()[0].removeprefix("error: ")
    if failure is not None:
        return None, failure
    return bytes(encoding or b""), None


def _defines(text: str) -> str | None:
    """Name a preprocessed line defines (label, NAME = x, .equ/.set), if any."""
    if text.endswith(":") and _LABEL_RE.match(text):
        return text[:-1]
    m = _ASSIGN_RE.match(text)
    if m:
        return m.group(1)
    m = re.match(r"^\.(?:equ|set)\s+([A-Za-z_$][\w$.]*)\s*,", text, re.I)
    return m.group(1) if m else None


def _locate(pre: Preprocessed, mode: int, base: int, message: str) -> AsmError:
    """Find the line behind a Keystone error (Keystone reports no line numbers).

    Bisect for the shortest failing prefix, cut only outside .macro/.rept
    blocks; each prefix is followed by ``NAME = 0`` for every symbol the whole
    source defines further down, so forward references do not fail but a truly
    undefined symbol does.
    """
    lines = pre.lines
    defined_at = [_defines(ln.text) for ln in lines]
    known = {name for name in defined_at if name}
    cuts, depth = [], 0
    for i, ln in enumerate(lines):
        word = ln.text.split(None, 1)[0].lower() if ln.text else ""
        depth += word in _BLOCK_OPEN
        depth -= word in _BLOCK_CLOSE
        if depth == 0:
            cuts.append(i + 1)

    def fails(chosen: list[Line]) -> bool:
        have = {name for name in map(_defines, (x.text for x in chosen)) if name}
        pad = [f"{name} = 0" for name in sorted(known - have)]
        text = "\n".join([x.text for x in chosen] + pad) + "\n"
        return _ks_run(text, mode, base)[1] is not None

    lo, hi = 0, len(cuts) - 1
    if not fails(lines[: cuts[hi]]):
        return AsmError(message, lines[-1].file)
    while lo < hi:
        mid = (lo + hi) // 2
        if fails(lines[: cuts[mid]]):
            hi = mid
        else:
            lo = mid + 1
    k = cuts[lo]
    bad = lines[k - 1]
    if defined_at[k - 1]:
        # A fixup error shows up when the label gets defined: blame the first
        # line using it whose removal makes the error go away.
        pattern = re.compile(rf"(?<![\w$.]){re.escape(defined_at[k - 1])}(?![\w$])")
        for i in range(k - 1):
            if pattern.search(lines[i].text) and not fails(lines[:i] + lines[i + 1:k]):
                bad = lines[i]
                break
    if "SYMBOL_MISSING" in message:
        unknown = [n for n in _IDENT_RE.findall(bad.text.split(None, 1)[-1])
                   if n not in known and not _REG_RE.fullmatch(n)
                   and n.lower() not in ("ptr", "byte", "word", "dword", "qword", "fword", "tbyte", "offset")]
        if unknown:
            return AsmError(f"undefined symbol '{unknown[0]}': {bad.text}", bad.file, bad.lineno)
    hint = ""
    if "FIXUP_INVALID" in message and bad.text.lower().startswith("push"):
        hint = " (Keystone cannot push a label in 32-bit code: mov eax, label; push eax)"
    return AsmError(f"{message}: {bad.text}{hint}", bad.file, bad.lineno)


def _assemble_pre(pre: Preprocessed, mode: int, base: int) -> bytes:
    code, message = _ks_run(pre.text, mode, base)
    if message is not None:
        raise _locate(pre, mode, base, message)
    return code


def assemble(text: str, mode: int = 32, base: int = 0, *, file: str = "<inline>",
             include_dirs: list[Path] | None = None) -> bytes:
    """Assemble ``text`` starting in ``mode`` (16/32/64) at address ``base``.

    Same dialect as guest sources (``;`` comments, ``%include`` searched in
    ``include_dirs``, default ``guests/include``).  Raises :class:`AsmError`.
    """
    pre = preprocess(text, mode, file, include_dirs=include_dirs)
    return _assemble_pre(pre, mode, base)


def label_addresses(pre: Preprocessed, mode: int, base: int) -> dict[str, int]:
    """Address of every top-level label of a preprocessed source.

    Keystone has no symbol table API: append one ``.quad label`` per label after
    the code (earlier addresses do not move) and read them back.
    """
    if not pre.labels:
        return {}
    code = _assemble_pre(pre, mode, base)
    extra = [Line(".balign 8", "<labels>", 0)] + [
        Line(f".quad {name}", "<labels>", 0) for name in pre.labels]
    full = _assemble_pre(Preprocessed(pre.lines + extra, [], []), mode, base)
    start = len(full) - 8 * len(pre.labels)
    if full[: len(code)] != code or start < len(code):
        raise AsmError("label table did not line up with the code (Keystone changed output)")
    values = struct.unpack_from(f"<{len(pre.labels)}Q", full, start)
    return dict(zip(pre.labels, values))


# --------------------------------------------------------------------------
# Packaging
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MultibootHeader:
    """A Multiboot v1 header found in an image (Multiboot spec §3.1)."""

    offset: int
    flags: int
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0


def find_multiboot_header(data: bytes, limit: int = MULTIBOOT_SEARCH) -> MultibootHeader | None:
    """First valid Multiboot v1 header (magic, checksum) in ``data[:limit]``."""
    for off in range(0, min(len(data), limit) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, off)
        if magic == MULTIBOOT_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            if flags & MB_FLAG_AOUT_KLUDGE and off + 32 <= len(data):
                return MultibootHeader(off, flags, *struct.unpack_from("<5I", data, off + 12))
            return MultibootHeader(off, flags)
    return None


def _check_multiboot(image: bytes, fmt: str, org: int, file: str, limit: int) -> None:
    hdr = find_multiboot_header(image, limit)
    if hdr is None:
        raise AsmError(f"no valid Multiboot header in the first {limit} bytes of the image", file)
    aout = bool(hdr.flags & MB_FLAG_AOUT_KLUDGE)
    if fmt == "multiboot-elf" and aout:
        raise AsmError("multiboot-elf guest sets flags bit 16 (a.out kludge)", file)
    if fmt == "multiboot-aout":
        if not aout:
            raise AsmError("multiboot-aout guest must set flags bit 16 (a.out kludge)", file)
        end = org + len(image)
        problems = []
        if hdr.load_addr != org:
            problems.append(f"load_addr {hdr.load_addr:#x} != org {org:#x}")
        if hdr.header_addr - hdr.load_addr != hdr.offset:
            problems.append("header_addr does not match the header's place in the image")
        if hdr.load_end_addr and not org < hdr.load_end_addr <= end:
            problems.append(f"load_end_addr {hdr.load_end_addr:#x} outside the image")
        if hdr.bss_end_addr and hdr.bss_end_addr < max(hdr.load_end_addr, org):
            problems.append("bss_end_addr below load_end_addr")
        if not org <= hdr.entry_addr < end:
            problems.append(f"entry_addr {hdr.entry_addr:#x} outside the image")
        if problems:
            raise AsmError("bad Multiboot a.out kludge header: " + "; ".join(problems), file)


def elf_image(code: bytes, org: int, entry: int, bits: int) -> bytes:
    """A minimal executable ELF: header, one RWX PT_LOAD of ``code`` at ``org``.

    The segment sits at file offset 0x1000 (so offset and address agree modulo the
    page size); there are no section headers.
    """
    if bits == 32:
        ehdr = struct.pack(
            "<4sBBBBB7sHHIIIIIHHHHHH", b"\x7fELF", 1, 1, 1, 0, 0, b"\0" * 7,
            2, 3, 1, entry, 52, 0, 0, 52, 32, 1, 0, 0, 0)
        phdr = struct.pack("<IIIIIIII", 1, ELF_DATA_OFFSET, org, org, len(code), len(code), 7, 0x1000)
    else:
        ehdr = struct.pack(
            "<4sBBBBB7sHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, b"\0" * 7,
            2, 62, 1, entry, 64, 0, 0, 64, 56, 1, 0, 0, 0)
        phdr = struct.pack("<IIQQQQQQ", 1, 7, ELF_DATA_OFFSET, org, org, len(code), len(code), 0x1000)
    head = ehdr + phdr
    return head + b"\0" * (ELF_DATA_OFFSET - len(head)) + code


@dataclasses.dataclass(frozen=True)
class Guest:
    """Everything :func:`compile_guest` learnt about one guest."""

    source: Path
    header: GuestHeader
    org: int
    entry: int
    code: bytes  # the raw assembled bytes, loaded at org
    image: bytes  # the file to boot (bootsector/flat/ELF)
    labels: dict[str, int]
    digest: str


_TOOL_DIGEST = hashlib.sha256(Path(__file__).read_bytes()).digest()


def _digest(pre: Preprocessed, fmt: str, org: int) -> str:
    h = hashlib.sha256()
    h.update(f"vmlab-asm {ASM_VERSION} keystone {keystone.__version__} {fmt} {org:#x}\n".encode())
    h.update(_TOOL_DIGEST)
    for name, text in pre.sources:
        h.update(f"\0{Path(name).name}\0{len(text)}\0".encode())
        h.update(text.encode())
    return h.hexdigest()[:16]


def compile_guest(path: str | os.PathLike, include_dirs: list[Path] | None = None) -> Guest:
    """Assemble and package the guest at ``path`` (no caching, nothing written)."""
    path = Path(path)
    file = str(path)
    text = _read(path, None, None)
    header = parse_header(text, file)
    if header.format is None:
        raise AsmError("missing '; vmlab-format: ...' header line", file, 1)
    fmt = FORMATS[header.format]
    org = header.org if header.org is not None else fmt.org
    pre = preprocess(text, fmt.mode, file, path=path, include_dirs=include_dirs)
    code = _assemble_pre(pre, fmt.mode, org)
    labels = label_addresses(pre, fmt.mode, org)
    entry_label = header.entry or "_start"
    if entry_label in labels:
        entry = labels[entry_label]
    elif header.entry:
        raise AsmError(f"entry label '{header.entry}' is not defined", file)
    else:
        entry = org

    if fmt.name == "bootsector":
        if len(code) > BOOTSECTOR_CODE_MAX:
            raise AsmError(f"boot sector code is {len(code)} bytes, {BOOTSECTOR_CODE_MAX} max", file)
        image = code + b"\0" * (BOOTSECTOR_CODE_MAX - len(code)) + b"\x55\xaa"
    elif fmt.name == "multiboot-aout":
        _check_multiboot(code, fmt.name, org, file, MULTIBOOT_SEARCH)
        image = code
    elif fmt.name == "multiboot-elf":
        _check_multiboot(code, fmt.name, org, file, MULTIBOOT_SEARCH - ELF_DATA_OFFSET)
        image = elf_image(code, org, entry, 32)
    else:
        image = elf_image(code, org, entry, 64)
    return Guest(path, header, org, entry, code, image, labels, _digest(pre, fmt.name, org))


def build(path: str | os.PathLike, build_dir: str | os.PathLike | None = None) -> Path:
    """Build the guest at ``path``; return the bootable file.

    The file lives in ``guests/build/`` (or ``build_dir``) under
    ``<stem>-<hash><suffix>``, the hash covering the source, every included file,
    the format/org and :data:`ASM_VERSION`; an existing file with that name is
    reused as is.
    """
    path = Path(path)
    text = _read(path, None, None)
    header = parse_header(text, str(path))
    if header.format is None:
        raise AsmError("missing '; vmlab-format: ...' header line", str(path), 1)
    fmt = FORMATS[header.format]
    org = header.org if header.org is not None else fmt.org
    pre = preprocess(text, fmt.mode, str(path), path=path)
    out_dir = Path(build_dir) if build_dir is not None else BUILD_DIR
    out = out_dir / f"{path.stem}-{_digest(pre, fmt.name, org)}{fmt.suffix}"
    if out.is_file():
        return out
    guest = compile_guest(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{path.stem}-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(guest.image)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return out

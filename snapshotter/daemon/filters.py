"""containerd's filter syntax (`List` requests), parsed and matched as containerd 1.6 does.

A filter is a comma-separated list of selectors that must all match; `List` takes several filters and
returns what matches any of them. A selector is ``<fieldpath>[<op><value>]``:

    name==foo                                    equality
    parent!=""                                   inequality (also true when the field is absent)
    labels."containerd.io/snapshot.ref"==sha256:...   a quoted field-path part
    name~=^default/                              regular expression (searched, not anchored)
    labels.l                                     presence only
    kind==committed,labels.l==2                  AND of selectors

Field names are ``[A-Za-z0-9_-]+`` or quoted; values are unquoted runs up to ``,`` or whitespace, or
quoted with ``"..."``, ``/.../`` or ``|...|`` and Go escapes (``\\n``, ``\\x41``, ``\\u00e9``, ``\\101``,
the quote itself). The scanner and its quirks (a value may not start with ``.``, whitespace is allowed
around operators and after a comma but not before it) follow containerd's `filters` package, so a
filter containerd accepts is accepted here and vice versa; the one deliberate difference is that an
invalid regular expression is rejected when parsing (containerd silently matches nothing).

Regular expressions use Python's `re`, which agrees with Go's RE2 on the common syntax.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

#: Looks up a field path on the object being matched: (value, present).
Adaptor = Callable[[Sequence[str]], tuple[str, bool]]


class FilterError(ValueError):
    """A malformed filter; the message shows the filter and where it went wrong."""


# --- scanner --------------------------------------------------------------------------------------

_EOF = "EOF"
_QUOTED = "Quoted"
_VALUE = "Value"
_FIELD = "Field"
_SEPARATOR = "Separator"
_OPERATOR = "Operator"
_ILLEGAL = "Illegal"
_CHAR = "Char"  # any other single character, reported as unexpected

_QUOTES = '"/|'
_OPERATOR_CHARS = "=!~"


def _is_field_char(ch: str) -> bool:
    return ch in "-_" or ("a" <= ch <= "z") or ("A" <= ch <= "Z") or ("0" <= ch <= "9")


def _is_value_char(ch: str) -> bool:
    return ch != "," and not ch.isspace() and ch.isprintable()


class _Scanner:
    """Splits a filter into tokens; `value` mode (after an operator) reads free-form values."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0  # start of the last character read
        self.next_pos = 0  # where the next character starts
        self.value_mode = False

    def _next(self) -> str:
        if self.next_pos >= len(self.text):
            self.pos = self.next_pos
            return ""
        self.pos = self.next_pos
        ch = self.text[self.next_pos]
        self.next_pos += 1
        return ch

    def peek(self) -> str:
        """The next raw character ("" at the end), without consuming it."""
        return self.text[self.next_pos] if self.next_pos < len(self.text) else ""

    def scan(self) -> tuple[int, str, str]:
        """(position, token kind, token text) of the next token."""
        ch = self._next()
        while ch and ch.isspace():
            ch = self._next()
        start = self.pos
        if ch == "":
            return start, _EOF, ""
        if ch == "\0":
            return start, _ILLEGAL, ch
        if ch in _QUOTES:
            legal = self._scan_quoted(ch)
            return start, _QUOTED if legal else _ILLEGAL, self.text[start : self.next_pos]
        if ch in ",.":
            self.value_mode = False
            return start, _SEPARATOR, ch
        if ch in _OPERATOR_CHARS:
            while self.peek() and self.peek() in _OPERATOR_CHARS:
                self._next()
            self.value_mode = True
            return start, _OPERATOR, self.text[start : self.next_pos]
        if self.value_mode:
            if _is_value_char(ch):
                while self.peek() and _is_value_char(self.peek()):
                    self._next()
                self.value_mode = False
                return start, _VALUE, self.text[start : self.next_pos]
            return start, _CHAR, ch
        if _is_field_char(ch):
            while self.peek() and _is_field_char(self.peek()):
                self._next()
            return start, _FIELD, self.text[start : self.next_pos]
        return start, _CHAR, ch

    def _scan_quoted(self, quote: str) -> bool:
        """Consume a quoted literal up to its closing quote; False if it is not terminated or
        holds an illegal escape."""
        legal = True
        ch = self._next()
        while ch != quote:
            if ch == "" or ch == "\n":
                return False
            if ch == "\\":
                ch, ok = self._scan_escape(quote)
                legal = legal and ok
            else:
                ch = self._next()
        return legal

    def _scan_escape(self, quote: str) -> tuple[str, bool]:
        ch = self._next()
        if ch in ("a", "b", "f", "n", "r", "t", "v", "\\", quote) and ch:
            return self._next(), True
        if ch and ch in "01234567":
            return self._scan_digits(ch, 8, 3)
        if ch == "x":
            return self._scan_digits(self._next(), 16, 2)
        if ch == "u":
            return self._scan_digits(self._next(), 16, 4)
        if ch == "U":
            return self._scan_digits(self._next(), 16, 8)
        return ch, False

    def _scan_digits(self, ch: str, base: int, count: int) -> tuple[str, bool]:
        while count > 0 and ch and _digit_value(ch) < base:
            ch = self._next()
            count -= 1
        return ch, count == 0


def _digit_value(ch: str) -> int:
    if "0" <= ch <= "9":
        return ord(ch) - ord("0")
    if "a" <= ch <= "f":
        return ord(ch) - ord("a") + 10
    if "A" <= ch <= "F":
        return ord(ch) - ord("A") + 10
    return 16


# --- unquoting ------------------------------------------------------------------------------------

_SIMPLE_ESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92}


def unquote(literal: str) -> str:
    """The value of a quoted literal (``"..."``, ``/.../`` or ``|...|``) with Go escape sequences."""
    if len(literal) < 2 or literal[0] != literal[-1] or literal[0] not in _QUOTES:
        raise FilterError(f"not a quoted literal: {literal}")
    quote, body = literal[0], literal[1:-1]
    out = bytearray()
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == quote or ch == "\n":
            raise FilterError(f"unescaped {ch!r} inside {literal}")
        if ch != "\\":
            out += ch.encode("utf-8", "surrogateescape")
            i += 1
            continue
        if i + 1 >= len(body):
            raise FilterError(f"dangling backslash in {literal}")
        esc = body[i + 1]
        i += 2
        if esc in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[esc])
        elif esc == quote:
            out += esc.encode()
        elif esc in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[esc]
            digits = body[i : i + width]
            if len(digits) != width or any(_digit_value(d) >= 16 for d in digits):
                raise FilterError(f"bad \\{esc} escape in {literal}")
            code = int(digits, 16)
            i += width
            if esc == "x":
                out.append(code)
            elif code > 0x10FFFF:
                raise FilterError(f"escape \\{esc}{digits} is beyond Unicode in {literal}")
            else:
                out += chr(code).encode("utf-8", "surrogatepass")
        elif esc in "01234567":
            digits = body[i - 1 : i + 2]
            if len(digits) != 3 or any(not ("0" <= d <= "7") for d in digits) or int(digits, 8) > 255:
                raise FilterError(f"bad octal escape \\{digits} in {literal}")
            out.append(int(digits, 8))
            i += 2
        else:
            raise FilterError(f"unknown escape \\{esc} in {literal}")
    return out.decode("utf-8", "surrogateescape")


# --- filters --------------------------------------------------------------------------------------

PRESENT, EQUAL, NOT_EQUAL, MATCHES = "?", "==", "!=", "~="


@dataclass(frozen=True)
class Selector:
    """One ``<fieldpath><op><value>`` term."""

    fieldpath: tuple[str, ...]
    operator: str = PRESENT
    value: str = ""
    regex: re.Pattern[str] | None = None

    def match(self, adaptor: Adaptor) -> bool:
        value, present = adaptor(self.fieldpath)
        if self.operator == PRESENT:
            return present
        if self.operator == EQUAL:
            return present and value == self.value
        if self.operator == NOT_EQUAL:
            return value != self.value
        assert self.regex is not None
        return self.regex.search(value) is not None


@dataclass(frozen=True)
class Filter:
    """Selectors that must all match (one filter string)."""

    selectors: tuple[Selector, ...]

    def match(self, adaptor: Adaptor) -> bool:
        return all(s.match(adaptor) for s in self.selectors)

    def equalities(self) -> list[tuple[tuple[str, ...], str]]:
        """The (fieldpath, value) of its ``==`` selectors: candidates for an index lookup."""
        return [(s.fieldpath, s.value) for s in self.selectors if s.operator == EQUAL]


@dataclass(frozen=True)
class FilterSet:
    """Several filters, of which any may match (a `List` request's `filters`). Empty: all match."""

    filters: tuple[Filter, ...]

    def match(self, adaptor: Adaptor) -> bool:
        return not self.filters or any(f.match(adaptor) for f in self.filters)

    @property
    def matches_all(self) -> bool:
        return not self.filters


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.scanner = _Scanner(text)

    def error(self, pos: int, message: str) -> FilterError:
        if pos < len(self.text):
            where = f"[{self.text[:pos]} >|{self.text[pos]}|< {self.text[pos + 1 :]}]"
        else:
            where = f"[{self.text}]"
        return FilterError(f"invalid filter {self.text!r}: parse error at {where}: {message}")

    def parse(self) -> Filter:
        selectors = [self.selector()]
        while True:
            ch = self.scanner.peek()
            if ch == ",":
                self.scanner.scan()
                selectors.append(self.selector())
            elif ch == "":
                return Filter(tuple(selectors))
            else:
                raise self.error(self.scanner.next_pos, f"unexpected input: {ch!r}")

    def selector(self) -> Selector:
        fieldpath = self.fieldpath()
        if self.scanner.peek() in (",", ""):
            return Selector(fieldpath)
        pos, kind, text = self.scanner.scan()
        if kind != _OPERATOR:
            raise self.error(pos, 'expected an operator ("==", "!=" or "~=")')
        if text not in (EQUAL, NOT_EQUAL, MATCHES):
            raise self.error(pos, f"unsupported operator {text!r} (use ==, != or ~=)")
        value = self.value()
        regex = None
        if text == MATCHES:
            try:
                regex = re.compile(value)
            except re.error as e:
                raise self.error(pos, f"invalid regular expression {value!r}: {e}") from None
        return Selector(fieldpath, text, value, regex)

    def fieldpath(self) -> tuple[str, ...]:
        parts = [self.field()]
        while self.scanner.peek() == ".":
            self.scanner.scan()
            parts.append(self.field())
        return tuple(parts)

    def field(self) -> str:
        pos, kind, text = self.scanner.scan()
        if kind == _FIELD:
            return text
        if kind == _QUOTED:
            return self.unquote(pos, text)
        if kind == _EOF:
            raise self.error(pos, "unexpected end of filter: expected a field name or a quoted field")
        raise self.error(pos, "expected a field name or a quoted field")

    def value(self) -> str:
        pos, kind, text = self.scanner.scan()
        if kind in (_VALUE, _FIELD):
            return text
        if kind == _QUOTED:
            return self.unquote(pos, text)
        if kind == _EOF:
            raise self.error(pos, "unexpected end of filter: expected a value after the operator")
        raise self.error(pos, "expected a value or a quoted value")

    def unquote(self, pos: int, text: str) -> str:
        try:
            return unquote(text)
        except FilterError as e:
            raise self.error(pos, f"unquoting failed: {e}") from None


def parse(text: str) -> Filter | None:
    """One filter string; None for "" (which matches everything, as in containerd)."""
    if text == "":
        return None
    return _Parser(text).parse()


def parse_all(texts: Iterable[str]) -> FilterSet:
    """The filters of a `List` request. Raises FilterError for the first malformed one."""
    filters = []
    for text in texts:
        f = parse(text)
        if f is None:  # "" matches everything, so the whole set does
            return FilterSet(())
        filters.append(f)
    return FilterSet(tuple(filters))

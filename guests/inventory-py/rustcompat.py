"""What the Rust inventory guest's libraries print, reproduced in Python.

The Python port must be a drop-in replacement for `guests/inventory`: the
same state keys, the same published bytes and the same reject/retry
reasons. Python's own `json` module differs from serde_json 1.0.154 (the
version in guests/Cargo.lock, default features) in ways that reach those
outputs:

- reject reasons quote serde_json's error text, e.g. "payload is not JSON:
  expected `,` or `}` at line 1 column 12";
- serde_json accepts what Python rejects and the reverse (lone surrogate
  escapes, `NaN`, numbers beyond f64, duplicate keys, UTF-16 input);
- numbers are u64, i64 or f64 with serde_json's own conversion (`-0` is a
  float, integers past u64 become floats, decimals are not always
  correctly rounded), and an order id that is a number becomes the state
  key `order.<id>` through Rust's float formatting (zmij: `1e+20`,
  `0.00001`, not Python's `1e+20`/`1e-05`);
- `{:?}` of Rust strings and of wit-bindgen error variants.

So this module ports the parts of serde_json the inventory guest uses
(`from_slice::<Value>`, `from_slice::<RawOrder>` with its ignored fields,
`Number`'s `Display`, the compact serializer) line for line, and the few
std formatting rules it relies on. Nothing here is specific to inventory.
"""

import math
import re

__all__ = [
    "JsonError",
    "format_f64",
    "Number",
    "parse_value",
    "parse_struct",
    "to_json",
    "debug_str",
    "debug_variant",
    "trim",
    "parse_i64",
]

I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1
U64_MAX = (1 << 64) - 1
I32_MIN, I32_MAX = -(1 << 31), (1 << 31) - 1

# serde_json's whitespace (not Rust's `is_ascii_whitespace`: no form feed).
_WS = frozenset(b" \n\t\r")
_DIGITS = frozenset(b"0123456789")

_QUOTE, _BACKSLASH = 0x22, 0x5C
_LBRACKET, _RBRACKET, _LBRACE, _RBRACE = 0x5B, 0x5D, 0x7B, 0x7D
_COMMA, _COLON, _MINUS, _PLUS, _DOT = 0x2C, 0x3A, 0x2D, 0x2B, 0x2E
_LOWER_E, _UPPER_E, _LOWER_U = 0x65, 0x45, 0x75

# The run of string bytes that need no attention: up to a quote, a
# backslash or a control character (serde_json's `skip_to_escape(true)`).
_PLAIN = re.compile(rb'[^"\\\x00-\x1f]*')

_SIMPLE_ESCAPES = {
    _QUOTE: b'"',
    _BACKSLASH: b"\\",
    0x2F: b"/",
    0x62: b"\x08",
    0x66: b"\x0c",
    0x6E: b"\n",
    0x72: b"\r",
    0x74: b"\t",
}

# serde_json's table for `f64_from_parts`: 1e0 ..= 1e308, each the
# correctly rounded double, as Rust's literals are.
_POW10 = [float("1e%d" % i) for i in range(309)]


class JsonError(Exception):
    """A serde_json syntax error; `str()` is serde_json's `Display`."""

    def __init__(self, code, line, column):
        super().__init__(code, line, column)
        self.code, self.line, self.column = code, line, column

    def __str__(self):
        return f"{self.code} at line {self.line} column {self.column}"


class _Unpositioned(Exception):
    """A serde `de::Error::custom` error (no position yet): serde_json gives
    it the reader's position where it surfaces (`fix_position`)."""

    def __init__(self, code):
        super().__init__(code)
        self.code = code


class Number:
    """A serde_json `Number`: exactly one of u64, i64 (negative) or f64."""

    __slots__ = ("kind", "value")

    def __init__(self, kind, value):
        self.kind, self.value = kind, value

    def as_i64(self):
        if self.kind != "f64" and self.value <= I64_MAX:
            return self.value
        return None

    def __str__(self):
        if self.kind == "f64":
            return format_f64(self.value)
        return str(self.value)

    def __repr__(self):
        return f"Number({self.kind}, {self.value!r})"


def _wrap_i64(n):
    return ((n + (1 << 63)) & U64_MAX) - (1 << 63)


def _saturate_i32(n):
    return max(I32_MIN, min(I32_MAX, n))


class _Reader:
    """serde_json's `Deserializer<SliceRead>`: byte index, peek/next, and
    the two ways it positions an error."""

    __slots__ = ("s", "i", "n")

    def __init__(self, data):
        self.s, self.i, self.n = data, 0, len(data)

    # -- reading -----------------------------------------------------------

    def peek(self):
        return self.s[self.i] if self.i < self.n else None

    def peek_or_null(self):
        return self.s[self.i] if self.i < self.n else 0

    def next(self):
        if self.i < self.n:
            self.i += 1
            return self.s[self.i - 1]
        return None

    def whitespace(self):
        s, i, n = self.s, self.i, self.n
        while i < n and s[i] in _WS:
            i += 1
        self.i = i
        return s[i] if i < n else None

    # -- errors ------------------------------------------------------------

    def _position(self, index):
        start = self.s.rfind(b"\n", 0, index) + 1
        return 1 + self.s.count(b"\n", 0, start), index - start

    def error(self, code):
        """Caused by the byte `next()` returned."""
        return JsonError(code, *self._position(self.i))

    def peek_error(self, code):
        """Caused by the byte `peek()` sees."""
        return JsonError(code, *self._position(min(self.n, self.i + 1)))

    # -- values (`Value::deserialize`, i.e. `deserialize_any`) --------------

    def value(self):
        c = self.whitespace()
        if c is None:
            raise self.peek_error("EOF while parsing a value")
        if c == 0x6E:  # n
            self.i += 1
            self.ident(b"ull")
            return None
        if c == 0x74:  # t
            self.i += 1
            self.ident(b"rue")
            return True
        if c == 0x66:  # f
            self.i += 1
            self.ident(b"alse")
            return False
        if c == _MINUS:
            self.i += 1
            return self.integer(False)
        if c in _DIGITS:
            return self.integer(True)
        if c == _QUOTE:
            self.i += 1
            return self.string()
        if c == _LBRACKET:
            self.i += 1
            items = []
            first = True
            while self._has_next_element(first):
                first = False
                items.append(self.value())
            self.i += 1  # `end_seq`: the `]` that ended the loop
            return items
        if c == _LBRACE:
            self.i += 1
            obj = {}
            first = True
            while self._has_next_key(first):
                first = False
                self.i += 1
                key = self.string()
                self.colon()
                obj[key] = self.value()
            self.i += 1  # `end_map`: the `}` that ended the loop
            return obj
        raise self.peek_error("expected value")

    def ident(self, rest):
        for expected in rest:
            c = self.next()
            if c is None:
                raise self.error("EOF while parsing a value")
            if c != expected:
                raise self.error("expected ident")

    def _has_next_element(self, first):
        c = self.whitespace()
        if c is None:
            raise self.peek_error("EOF while parsing a list")
        if c == _RBRACKET:
            return False
        if first:
            return True
        if c == _COMMA:
            self.i += 1
            c = self.whitespace()
            if c == _RBRACKET:
                raise self.peek_error("trailing comma")
            if c is None:
                raise self.peek_error("EOF while parsing a value")
            return True
        raise self.peek_error("expected `,` or `]`")

    def _has_next_key(self, first):
        c = self.whitespace()
        if c is None:
            raise self.peek_error("EOF while parsing an object")
        if c == _RBRACE:
            return False
        if first:
            if c == _QUOTE:
                return True
            raise self.peek_error("key must be a string")
        if c == _COMMA:
            self.i += 1
            c = self.whitespace()
            if c == _QUOTE:
                return True
            if c == _RBRACE:
                raise self.peek_error("trailing comma")
            if c is None:
                raise self.peek_error("EOF while parsing a value")
            raise self.peek_error("key must be a string")
        raise self.peek_error("expected `,` or `}`")

    def colon(self):
        c = self.whitespace()
        if c == _COLON:
            self.i += 1
        elif c is None:
            raise self.peek_error("EOF while parsing an object")
        else:
            raise self.peek_error("expected `:`")

    def end(self):
        if self.whitespace() is not None:
            raise self.peek_error("trailing characters")

    # -- numbers (`parse_integer` and friends, without float_roundtrip) ------

    def integer(self, positive):
        c = self.next()
        if c is None:
            raise self.error("EOF while parsing a value")
        if c == 0x30:  # 0: only one leading zero
            if self.peek_or_null() in _DIGITS:
                raise self.peek_error("invalid number")
            return self.number(positive, 0)
        if c not in _DIGITS:
            raise self.error("invalid number")
        significand = c - 0x30
        while True:
            c = self.peek_or_null()
            if c not in _DIGITS:
                return self.number(positive, significand)
            grown = significand * 10 + (c - 0x30)
            if grown > U64_MAX:
                # Past u64: the rest is parsed as an f64.
                return Number("f64", self.long_integer(positive, significand))
            self.i += 1
            significand = grown

    def number(self, positive, significand):
        c = self.peek_or_null()
        if c == _DOT:
            return Number("f64", self.decimal(positive, significand, 0))
        if c in (_LOWER_E, _UPPER_E):
            return Number("f64", self.exponent(positive, significand, 0))
        if positive:
            return Number("u64", significand)
        neg = _wrap_i64(-_wrap_i64(significand))
        if neg >= 0:
            # Below i64::MIN, or `-0`: a float.
            return Number("f64", -float(significand))
        return Number("i64", neg)

    def decimal(self, positive, significand, exponent_before):
        self.i += 1
        after = 0
        while True:
            c = self.peek_or_null()
            if c not in _DIGITS:
                break
            grown = significand * 10 + (c - 0x30)
            if grown > U64_MAX:
                return self.decimal_overflow(positive, significand, exponent_before + after)
            self.i += 1
            significand = grown
            after -= 1
        if after == 0:
            if self.peek() is None:
                raise self.peek_error("EOF while parsing a value")
            raise self.peek_error("invalid number")
        if self.peek_or_null() in (_LOWER_E, _UPPER_E):
            return self.exponent(positive, significand, exponent_before + after)
        return self.from_parts(positive, significand, exponent_before + after)

    def exponent(self, positive, significand, starting):
        self.i += 1
        positive_exp = True
        c = self.peek_or_null()
        if c == _PLUS:
            self.i += 1
        elif c == _MINUS:
            self.i += 1
            positive_exp = False
        c = self.next()
        if c is None:
            raise self.error("EOF while parsing a value")
        if c not in _DIGITS:
            raise self.error("invalid number")
        exp = c - 0x30
        while True:
            c = self.peek_or_null()
            if c not in _DIGITS:
                break
            self.i += 1
            grown = exp * 10 + (c - 0x30)
            if grown > I32_MAX:
                return self.exponent_overflow(positive, significand == 0, positive_exp)
            exp = grown
        final = _saturate_i32(starting + exp if positive_exp else starting - exp)
        return self.from_parts(positive, significand, final)

    def from_parts(self, positive, significand, exponent):
        f = float(significand)
        while True:
            index = abs(exponent)
            if index < len(_POW10):
                if exponent >= 0:
                    f *= _POW10[index]
                    if math.isinf(f):
                        raise self.error("number out of range")
                else:
                    f /= _POW10[index]
                break
            if f == 0.0:
                break
            if exponent >= 0:
                raise self.error("number out of range")
            f /= 1e308
            exponent += 308
        return f if positive else -f

    def long_integer(self, positive, significand):
        exponent = 0
        while True:
            c = self.peek_or_null()
            if c in _DIGITS:
                self.i += 1
                exponent += 1
            elif c == _DOT:
                return self.decimal(positive, significand, exponent)
            elif c in (_LOWER_E, _UPPER_E):
                return self.exponent(positive, significand, exponent)
            else:
                return self.from_parts(positive, significand, exponent)

    def decimal_overflow(self, positive, significand, exponent):
        while self.peek_or_null() in _DIGITS:
            self.i += 1
        if self.peek_or_null() in (_LOWER_E, _UPPER_E):
            return self.exponent(positive, significand, exponent)
        return self.from_parts(positive, significand, exponent)

    def exponent_overflow(self, positive, zero_significand, positive_exp):
        if not zero_significand and positive_exp:
            raise self.error("number out of range")
        while self.peek_or_null() in _DIGITS:
            self.i += 1
        return 0.0 if positive else -0.0

    # -- strings (`parse_str`, validating) ----------------------------------

    def string(self):
        """The string after an opening quote."""
        s = self.s
        scratch = None
        start = self.i
        while True:
            self.i = _PLAIN.match(s, self.i).end()
            if self.i == self.n:
                raise self.error("EOF while parsing a string")
            c = s[self.i]
            if c == _QUOTE:
                raw = s[start : self.i] if scratch is None else bytes(scratch + s[start : self.i])
                self.i += 1
                try:
                    return raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    # serde_json points back from the closing quote by the
                    # undecodable tail (approximate after escapes).
                    line, column = self._position(self.i)
                    raise JsonError(
                        "invalid unicode code point", line, max(0, column - (len(raw) - e.start))
                    ) from None
            if c == _BACKSLASH:
                if scratch is None:
                    scratch = bytearray()
                scratch += s[start : self.i]
                self.i += 1
                self._escape(scratch)
                start = self.i
            else:
                self.i += 1
                raise self.error("control character (\\u0000-\\u001F) found while parsing a string")

    def _next_in_string(self):
        c = self.next()
        if c is None:
            raise self.error("EOF while parsing a string")
        return c

    def _peek_in_string(self):
        c = self.peek()
        if c is None:
            raise self.error("EOF while parsing a string")
        return c

    def _escape(self, scratch):
        c = self._next_in_string()
        simple = _SIMPLE_ESCAPES.get(c)
        if simple is not None:
            scratch += simple
        elif c == _LOWER_U:
            scratch += chr(self._unicode_escape()).encode("utf-8")
        else:
            raise self.error("invalid escape")

    def _hex4(self):
        if self.n - self.i < 4:
            self.i = self.n
            raise self.error("EOF while parsing a string")
        digits = self.s[self.i : self.i + 4]
        self.i += 4
        try:
            # int() would also take "+1_f" or " 1f ": check the bytes first.
            if not all(b in b"0123456789abcdefABCDEF" for b in digits):
                raise ValueError
            return int(digits, 16)
        except ValueError:
            raise self.error("invalid escape") from None

    def _unicode_escape(self):
        n = self._hex4()
        if 0xDC00 <= n <= 0xDFFF:
            raise self.error("lone leading surrogate in hex escape")
        if not 0xD800 <= n <= 0xDBFF:
            return n
        if self._peek_in_string() != _BACKSLASH:
            self.i += 1
            raise self.error("unexpected end of hex escape")
        self.i += 1
        if self._peek_in_string() != _LOWER_U:
            self.i += 1
            raise self.error("unexpected end of hex escape")
        self.i += 1
        n2 = self._hex4()
        if not 0xDC00 <= n2 <= 0xDFFF:
            raise self.error("lone leading surrogate in hex escape")
        return (((n - 0xD800) << 10) | (n2 - 0xDC00)) + 0x10000

    # -- ignored values (`ignore_value`: fields a struct does not name) -----

    def ignore_value(self):
        stack = []
        enclosing = None
        while True:
            c = self.whitespace()
            if c is None:
                raise self.peek_error("EOF while parsing a value")
            frame = None
            if c == 0x6E:
                self.i += 1
                self.ident(b"ull")
            elif c == 0x74:
                self.i += 1
                self.ident(b"rue")
            elif c == 0x66:
                self.i += 1
                self.ident(b"alse")
            elif c == _MINUS:
                self.i += 1
                self._ignore_integer()
            elif c in _DIGITS:
                self._ignore_integer()
            elif c == _QUOTE:
                self.i += 1
                self._ignore_string()
            elif c in (_LBRACKET, _LBRACE):
                if enclosing is not None:
                    stack.append(enclosing)
                    enclosing = None
                self.i += 1
                frame = c
            else:
                raise self.peek_error("expected value")

            if frame is not None:
                accept_comma = False
            elif enclosing is not None:
                accept_comma, frame, enclosing = True, enclosing, None
            elif stack:
                accept_comma, frame = True, stack.pop()
            else:
                return

            while True:
                c = self.whitespace()
                if c == _COMMA and accept_comma:
                    self.i += 1
                    break
                if (c == _RBRACKET and frame == _LBRACKET) or (c == _RBRACE and frame == _LBRACE):
                    pass
                elif c is not None:
                    if accept_comma:
                        raise self.peek_error(
                            "expected `,` or `]`" if frame == _LBRACKET else "expected `,` or `}`"
                        )
                    break
                else:
                    raise self.peek_error(
                        "EOF while parsing a list"
                        if frame == _LBRACKET
                        else "EOF while parsing an object"
                    )
                self.i += 1
                if not stack:
                    return
                frame = stack.pop()
                accept_comma = True

            if frame == _LBRACE:
                c = self.whitespace()
                if c == _QUOTE:
                    self.i += 1
                elif c is None:
                    raise self.peek_error("EOF while parsing an object")
                else:
                    raise self.peek_error("key must be a string")
                self._ignore_string()
                self.colon()
            enclosing = frame

    def _ignore_integer(self):
        c = self.next()
        if c == 0x30:
            if self.peek_or_null() in _DIGITS:
                raise self.peek_error("invalid number")
        elif c is not None and c in _DIGITS:
            while self.peek_or_null() in _DIGITS:
                self.i += 1
        else:
            raise self.error("invalid number")
        c = self.peek_or_null()
        if c == _DOT:
            self.i += 1
            if self.peek_or_null() not in _DIGITS:
                raise self.peek_error("invalid number")
            while self.peek_or_null() in _DIGITS:
                self.i += 1
            c = self.peek_or_null()
        if c in (_LOWER_E, _UPPER_E):
            self.i += 1
            if self.peek_or_null() in (_PLUS, _MINUS):
                self.i += 1
            c = self.next()
            if c is None or c not in _DIGITS:
                raise self.error("invalid number")
            while self.peek_or_null() in _DIGITS:
                self.i += 1

    def _ignore_string(self):
        # Unlike `string()`: no UTF-8 check, any \uXXXX accepted, and a
        # control character is reported at its own position.
        s = self.s
        while True:
            self.i = _PLAIN.match(s, self.i).end()
            if self.i == self.n:
                raise self.error("EOF while parsing a string")
            c = s[self.i]
            if c == _QUOTE:
                self.i += 1
                return
            if c == _BACKSLASH:
                self.i += 1
                c = self._next_in_string()
                if c == _LOWER_U:
                    self._hex4()
                elif c not in _SIMPLE_ESCAPES:
                    raise self.error("invalid escape")
            else:
                raise self.error("control character (\\u0000-\\u001F) found while parsing a string")

    # -- a struct of optional `Value` fields, others ignored ------------------

    def struct(self, fields):
        """`#[derive(Deserialize)] struct { f: Option<Value>, ... }` over a
        JSON object: the named fields' values (`None` for null), others
        skipped. The caller has checked that the document starts with `{`
        (after ASCII whitespace, which includes a form feed serde_json does
        not skip)."""
        if self.whitespace() != _LBRACE:
            raise self.peek_error("expected value")
        self.i += 1
        found = {}
        try:
            first = True
            while self._has_next_key(first):
                first = False
                self.i += 1
                key = self.string()
                if key in fields:
                    if key in found:
                        raise _Unpositioned(f"duplicate field `{key}`")
                    self.colon()
                    found[key] = self._option()
                else:
                    self.colon()
                    self.ignore_value()
        except _Unpositioned as e:
            # serde_json still runs `end_map` before positioning the error.
            if self.whitespace() == _RBRACE:
                self.i += 1
            raise self.error(e.code) from None
        self.i += 1
        return found

    def _option(self):
        if self.whitespace() == 0x6E:
            self.i += 1
            self.ident(b"ull")
            return None
        return self.value()


def parse_value(data):
    """`serde_json::from_slice::<Value>`: null is None, numbers are
    `Number`, objects dicts (the last duplicate wins)."""
    r = _Reader(data)
    v = r.value()
    r.end()
    return v


def parse_struct(data, fields):
    """`serde_json::from_slice::<T>` for a struct of `Option<Value>` fields
    named `fields`: a dict of the fields present (null ones as None)."""
    r = _Reader(data)
    found = r.struct(fields)
    r.end()
    return found


# -- output -------------------------------------------------------------------


def format_f64(x):
    """How serde_json (zmij 1.0) prints a finite f64: the shortest digits
    that round-trip (the ones `repr` finds), fixed notation for decimal
    exponents -5..=15 (always with a fraction: `1.0`), else `1.5e+20` /
    `1e-7`."""
    if x == 0.0:
        return "-0.0" if math.copysign(1.0, x) < 0 else "0.0"
    sign = "-" if x < 0 else ""
    mantissa, _, exp = repr(abs(x)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    all_digits = whole + fraction
    digits = all_digits.lstrip("0")
    e10 = (int(exp) if exp else 0) + len(whole) - 1 - (len(all_digits) - len(digits))
    digits = digits.rstrip("0")
    n = len(digits)
    if -5 <= e10 <= 15:
        if n - 1 <= e10:
            text = digits + "0" * (e10 - n + 1) + ".0"
        elif e10 >= 0:
            text = digits[: e10 + 1] + "." + digits[e10 + 1 :]
        else:
            text = "0." + "0" * (-e10 - 1) + digits
    else:
        text = digits[0] + ("." + digits[1:] if n > 1 else "") + "e" + ("-" if e10 < 0 else "+")
        text += str(abs(e10))
    return sign + text


def _escape_json_str(s):
    # serde_json escapes exactly what Python's encoder escapes with
    # ensure_ascii off: `"`, `\`, and control characters (\b \t \n \f \r
    # by name, the rest as lowercase \u00xx).
    out = ['"']
    for ch in s:
        o = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif o < 0x20:
            out.append(
                {8: "\\b", 9: "\\t", 10: "\\n", 12: "\\f", 13: "\\r"}.get(o) or "\\u%04x" % o
            )
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


_NEEDS_ESCAPE = re.compile(r'["\\\x00-\x1f]')


def to_json(value):
    """Compact serde_json text of a value built from str, int (i64),
    `Number`, bool, None, list and dict (in the given key order: the caller
    orders keys as serde would: struct field order, or sorted for `json!`
    maps, which are BTreeMaps without `preserve_order`)."""
    if isinstance(value, str):
        if _NEEDS_ESCAPE.search(value) is None:
            return '"' + value + '"'
        return _escape_json_str(value)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, (int, Number)):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(_escape_json_str(k) + ":" + to_json(v) for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(to_json(v) for v in value) + "]"
    raise TypeError(f"cannot encode {type(value).__name__}")


# -- Rust std text --------------------------------------------------------------

# Unicode White_Space, what `str::trim` strips (Python's `strip()` also
# strips U+001C..U+001F).
_RUST_WHITESPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
    "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)


def trim(s):
    """`str::trim`."""
    return s.strip(_RUST_WHITESPACE)


_I64_TEXT = re.compile(r"[+-]?[0-9]+\Z")


def parse_i64(s):
    """`s.parse::<i64>()`: an optional sign and ASCII digits, in range;
    None otherwise (no whitespace, no `_`, no other digits, unlike int())."""
    if not _I64_TEXT.match(s):
        return None
    n = int(s)
    return n if I64_MIN <= n <= I64_MAX else None


def _escape_debug_char(ch):
    o = ord(ch)
    named = {0: "\\0", 9: "\\t", 10: "\\n", 13: "\\r", 0x22: '\\"', 0x5C: "\\\\"}.get(o)
    if named:
        return named
    if 0x20 <= o < 0x7F:
        return ch
    # Rust escapes what is not printable (the same categories as
    # `str.isprintable`: Cc Cf Cs Co Cn Zl Zp Zs but space) and grapheme
    # extenders (approximated by the nonspacing and enclosing marks, and
    # ZWNJ); both follow the Unicode version of each toolchain.
    if not ch.isprintable() or _is_grapheme_extend(ch):
        return "\\u{%x}" % o
    return ch


def _is_grapheme_extend(ch):
    try:
        import unicodedata
    except ImportError:  # pragma: no cover - CPython in componentize-py has it
        return False
    return unicodedata.category(ch) in ("Mn", "Me") or ch in "\u200c\uff9e\uff9f"


def debug_str(s):
    """`format!("{s:?}")` of a Rust `str`."""
    return '"' + "".join(_escape_debug_char(ch) for ch in s) + '"'


def debug_variant(type_name, variant):
    """`{:?}` of a wit-bindgen variant value (a generated dataclass
    `<Type>_<Case>`): `Type::Case`, `Type::Case(payload)`."""
    case = type(variant).__name__.split("_", 1)[-1]
    text = f"{type_name}::{case}"
    if hasattr(variant, "value"):
        payload = variant.value
        text += "(" + (debug_str(payload) if isinstance(payload, str) else str(payload)) + ")"
    return text

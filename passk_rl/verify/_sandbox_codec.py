# Plain-data codec for values that cross the sandbox boundary (judge <-> untrusted program).
#
# Imported by the judge and the sandboxed child as a top-level module (``python -I -S``), and by tests as
# ``passk_rl.verify._sandbox_codec``: standard library only, no relative imports.
#
# Why not pickle or repr/eval: decoding must never run code chosen by the sender, and must build only
# builtin values whose comparisons are the interpreter's own. A JSON document is parsed by the C scanner
# (linear time), then every JSON object must be exactly one tag below; anything else is rejected. A value the
# program returns that is not plain data becomes an opaque handle: the judge can pass it back to the program
# but it only ever equals itself, so an object with a lying ``__eq__`` can never satisfy a test.
#
# JSON is read and written with the C accelerator ``_json`` directly: importing the ``json`` package (and the
# ``re`` it needs) would cost two sandboxed interpreters about 10 ms of CPU each per run.
import _json

CODEC_MAX_DEPTH = 100
_SMALL_INT = 1 << 62  # larger ints travel as hex: JSON digit strings over 4300 digits are refused by int()


class CodecError(ValueError):
    """The value cannot be sent, or the text received is not a well-formed encoding."""


class CodecTooBig(Exception):
    """The encoding would exceed the byte budget."""


class _Budget:
    __slots__ = ("left",)

    def __init__(self, n):
        self.left = n

    def take(self, n):
        self.left -= n
        if self.left < 0:
            raise CodecTooBig()


_GENERATOR = type((lambda: (yield))())
_KEYS, _VALUES, _ITEMS = type({}.keys()), type({}.values()), type({}.items())


def _is_builtin_iterator(o):
    t = type(o)
    return issubclass(t, _GENERATOR) or (
        t.__module__ in ("builtins", "itertools") and hasattr(t, "__next__") and hasattr(t, "__iter__"))


def _to_plain(o, depth, budget, handle_of):
    if depth > CODEC_MAX_DEPTH:
        raise CodecError("value nested deeper than %d levels" % CODEC_MAX_DEPTH)
    budget.take(2)
    t = type(o)
    if o is None or t is bool:
        return o
    # Subclasses of builtins are read through the base type's own methods, so overridden __eq__, __int__,
    # __iter__ ... are never consulted: what crosses is the value the base type stores.
    if issubclass(t, int):
        v = int.__index__(o)
        if -_SMALL_INT < v < _SMALL_INT:
            return v
        h = hex(v)
        budget.take(len(h))
        return {"i": h}
    if issubclass(t, float):
        return float.__float__(o)
    if issubclass(t, str):
        v = str.__str__(o)
        budget.take(len(v))
        return v
    d = depth + 1
    if issubclass(t, list):
        return [_to_plain(x, d, budget, handle_of) for x in list.__iter__(o)]
    if issubclass(t, tuple):
        return {"t": [_to_plain(x, d, budget, handle_of) for x in tuple.__iter__(o)]}
    if issubclass(t, dict):
        return {"d": [[_to_plain(k, d, budget, handle_of), _to_plain(v, d, budget, handle_of)]
                      for k, v in dict.items(o)]}
    if issubclass(t, frozenset):
        return {"fs": [_to_plain(x, d, budget, handle_of) for x in frozenset.__iter__(o)]}
    if issubclass(t, set):
        return {"s": [_to_plain(x, d, budget, handle_of) for x in set.__iter__(o)]}
    if issubclass(t, bytes):
        v = bytes.hex(o)
        budget.take(len(v))
        return {"b": v}
    if issubclass(t, bytearray):
        v = bytearray.hex(o)
        budget.take(len(v))
        return {"ba": v}
    if issubclass(t, complex):
        return {"c": [complex.real.__get__(o), complex.imag.__get__(o)]}
    if t is _KEYS or t is _VALUES or t is _ITEMS:  # rebuilt as views, so == keeps its set / identity meaning
        tag = "dk" if t is _KEYS else "dv" if t is _VALUES else "di"
        return {tag: [_to_plain(x, d, budget, handle_of) for x in o]}
    if t is range:
        return {"r": [_to_plain(o.start, d, budget, None), _to_plain(o.stop, d, budget, None),
                      _to_plain(o.step, d, budget, None)]}
    if _is_builtin_iterator(o):
        out = []
        for x in o:  # an endless generator ends at the budget
            out.append(_to_plain(x, d, budget, handle_of))
        return {"it": out}
    if handle_of is not None:
        h = handle_of(o)
        if h is not None:
            return {"h": int(h)}
    raise CodecError("a value of type %s cannot cross the sandbox boundary (plain builtin data only)"
                     % t.__name__)


def to_plain(obj, limit_bytes, handle_of=None):
    """``obj`` as a JSON-ready structure of tagged plain data. ``handle_of(o)`` → int id for values that are
    not plain data (None, or returning None: refuse them). Raises CodecError (not sendable) or CodecTooBig
    (roughly over ``limit_bytes``; ``dumps`` checks the exact size)."""
    try:
        return _to_plain(obj, 0, _Budget(limit_bytes), handle_of)
    except RecursionError:
        raise CodecError("value nested too deeply") from None


def dump_json(x):
    """Compact ASCII JSON for a structure of None, bool, int, float (NaN and infinities as JSON's usual
    extensions), str, list and dicts with str keys: what ``to_plain`` returns and the protocol's messages."""
    out = []
    _dump(x, out)
    return "".join(out)


def _dump(x, out):
    t = type(x)
    if t is str:
        out.append(_json.encode_basestring_ascii(x))
    elif x is None:
        out.append("null")
    elif x is True:
        out.append("true")
    elif x is False:
        out.append("false")
    elif t is int:
        out.append(int.__repr__(x))
    elif t is float:
        out.append(float.__repr__(x) if x == x and x not in (_INF, -_INF) else
                   "NaN" if x != x else "Infinity" if x > 0 else "-Infinity")
    elif t is list or t is tuple:
        out.append("[")
        for i, e in enumerate(x):
            if i:
                out.append(",")
            _dump(e, out)
        out.append("]")
    elif t is dict:
        out.append("{")
        for i, (k, v) in enumerate(x.items()):
            if i:
                out.append(",")
            out.append(_json.encode_basestring_ascii(str(k)))
            out.append(":")
            _dump(v, out)
        out.append("}")
    else:
        raise CodecError("cannot write a %s as JSON" % t.__name__)


_INF = float("inf")


class _ScanContext:
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float  # NaN, Infinity, -Infinity: a fresh float each, as float() reads them
    memo = None


_scan_once = _json.make_scanner(_ScanContext())


def load_json(text):
    """Parse one JSON document (``str``); CodecError for anything else, trailing data included."""
    if type(text) is not str:
        try:
            text = text.decode("utf-8")
        except (AttributeError, UnicodeDecodeError):
            raise CodecError("not valid JSON") from None
    text = text.strip()
    try:
        value, end = _scan_once(text, 0)
    except (StopIteration, ValueError, RecursionError):
        raise CodecError("not valid JSON") from None
    if end != len(text):
        raise CodecError("not valid JSON (trailing data)")
    return value


def dumps(plain, limit_bytes):
    """One line of ASCII JSON (no newline) for a structure of ``to_plain`` values; CodecTooBig over the limit."""
    text = dump_json(plain)
    if len(text) > limit_bytes:
        raise CodecTooBig()
    return text


def encode(obj, limit_bytes, handle_of=None):
    """``dumps(to_plain(obj))``."""
    return dumps(to_plain(obj, limit_bytes, handle_of), limit_bytes)


def _hashable(v):
    try:
        hash(v)
    except TypeError:
        raise CodecError("unhashable element in a set or dict key") from None
    return v


def _from_plain(x, depth, handle):
    if depth > CODEC_MAX_DEPTH:
        raise CodecError("value nested deeper than %d levels" % CODEC_MAX_DEPTH)
    t = type(x)
    if x is None or t is bool or t is int or t is float or t is str:
        return x
    d = depth + 1
    if t is list:
        return [_from_plain(e, d, handle) for e in x]
    if t is not dict or len(x) != 1:
        raise CodecError("malformed value")
    (tag, v), = x.items()
    tv = type(v)
    if tag == "i" and tv is str and len(v) <= 1 << 20:
        try:
            return int(v, 16)
        except ValueError:
            raise CodecError("malformed int") from None
    if tag == "b" and tv is str:
        try:
            return bytes.fromhex(v)
        except ValueError:
            raise CodecError("malformed bytes") from None
    if tag == "ba" and tv is str:
        try:
            return bytearray.fromhex(v)
        except ValueError:
            raise CodecError("malformed bytearray") from None
    if tag == "c" and tv is list and len(v) == 2 and all(type(e) in (int, float) for e in v):
        return complex(v[0], v[1])
    if tag == "r" and tv is list and len(v) == 3:
        a = [_from_plain(e, d, handle) for e in v]
        if all(type(e) is int for e in a) and a[2] != 0:
            return range(a[0], a[1], a[2])
        raise CodecError("malformed range")
    if tag == "h" and tv is int and handle is not None:
        return handle(v)
    if tv is not list:
        raise CodecError("malformed value")
    if tag == "t":
        return tuple(_from_plain(e, d, handle) for e in v)
    if tag == "s":
        return set(_hashable(_from_plain(e, d, handle)) for e in v)
    if tag == "fs":
        return frozenset(_hashable(_from_plain(e, d, handle)) for e in v)
    if tag == "it":
        return iter([_from_plain(e, d, handle) for e in v])
    if tag == "dk":
        return dict.fromkeys(_hashable(_from_plain(e, d, handle)) for e in v).keys()
    if tag == "dv":
        return dict(enumerate(_from_plain(e, d, handle) for e in v)).values()
    if tag == "di":
        items = [_from_plain(e, d, handle) for e in v]
        if not all(type(kv) is tuple and len(kv) == 2 for kv in items):
            raise CodecError("malformed dict items")
        return dict((_hashable(k), x) for k, x in items).items()
    if tag == "d":
        out = {}
        for kv in v:
            if type(kv) is not list or len(kv) != 2:
                raise CodecError("malformed dict item")
            out[_hashable(_from_plain(kv[0], d, handle))] = _from_plain(kv[1], d, handle)
        return out
    raise CodecError("unknown tag")


def decode_plain(x, handle=None):
    """Decode an already-parsed JSON value (see ``decode``)."""
    try:
        return _from_plain(x, 0, handle)
    except RecursionError:
        raise CodecError("value nested too deeply") from None


def decode(text, handle=None):
    """Inverse of ``encode``. ``handle(id)`` builds the receiver's object for an opaque handle (None: refuse).
    Raises CodecError for anything that is not a well-formed encoding."""
    return decode_plain(load_json(text), handle)

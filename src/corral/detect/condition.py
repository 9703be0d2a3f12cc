"""A small Falco-like condition language, compiled to Python closures.

    expr       := or_expr
    or_expr    := and_expr ("or" and_expr)*
    and_expr   := not_expr ("and" not_expr)*
    not_expr   := "not" not_expr | atom
    atom       := "(" expr ")" | field OP value | field | macro
    OP         := = != < <= > >= in contains icontains startswith endswith glob regex in_cidr exists
    value      := 'string' | "string" | number | bare-word | "(" item ("," item)* ")" | "(" list_name ")"

Fields name parts of an event (proc.name, net.dst_port, ...; see fields.py). A field that holds a
list (proc.args) matches when any element does. Lists and macros are expanded at compile time, so
a rule costs a few closure calls per event.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Any

Pred = Callable[[Callable[[str], Any]], bool]
OPS = {"=", "!=", "<", "<=", ">", ">=", "in", "contains", "icontains", "startswith", "istartswith", "endswith", "glob",
       "regex", "in_cidr", "exists"}
_TOKEN = re.compile(
    r"""\s*(?:(?P<str>'[^']*'|"[^"]*")|(?P<op><=|>=|!=|=|<|>)|(?P<punct>[(),])|(?P<word>[^\s(),'"=<>!]+))"""
)


class ConditionError(ValueError):
    pass


def tokenize(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ConditionError(f"cannot read the condition at {text[pos:pos + 20]!r}")
        pos = m.end()
        kind = m.lastgroup or ""
        value = m.group(kind)
        if kind == "str":
            value = value[1:-1]
        out.append((kind, value))
    return out


class Compiler:
    """`known`: fields whose value is the same for every event the result will judge (the event's kind
    and action, when rules are compiled for one pair: RuleSet.judging): their terms are decided now and
    fold away, so `runs and proc.name = nc` costs one comparison, not five, per exec."""

    def __init__(self, macros: Mapping[str, str], lists: Mapping[str, list[Any]], fields: set[str],
                 known: Mapping[str, Any] | None = None):
        self.macros = macros
        self.lists = lists
        self.fields = fields
        self.known = known or {}
        self._expanding: list[str] = []

    def compile(self, text: str) -> Pred:
        self.toks = tokenize(text)
        self.i = 0
        pred = self._or()
        if self.i != len(self.toks):
            raise ConditionError(f"unexpected {self.toks[self.i][1]!r} after a complete condition")
        return pred

    # -- recursive descent ---------------------------------------------------------------------------
    def _peek(self) -> tuple[str, str] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def _take(self) -> tuple[str, str]:
        tok = self._peek()
        if tok is None:
            raise ConditionError("the condition ends too early")
        self.i += 1
        return tok

    def _word(self, w: str) -> bool:
        tok = self._peek()
        if tok and tok[0] == "word" and tok[1] == w:
            self.i += 1
            return True
        return False

    def _or(self) -> Pred:
        parts = [self._and()]
        while self._word("or"):
            parts.append(self._and())
        return _fold(parts, _either)

    def _and(self) -> Pred:
        parts = [self._not()]
        while self._word("and"):
            parts.append(self._not())
        return _fold(parts, _both)

    def _not(self) -> Pred:
        if self._word("not"):
            return _negated(self._not())
        return self._atom()

    def _atom(self) -> Pred:
        kind, value = self._take()
        if kind == "punct" and value == "(":
            inner = self._or()
            self._expect(")")
            return inner
        if kind != "word":
            raise ConditionError(f"expected a field, macro or '(' but found {value!r}")
        if value in self.macros:
            return self._macro(value)
        if value not in self.fields:
            raise ConditionError(f"unknown field or macro {value!r}")
        field = value
        tok = self._peek()
        op = None
        if tok and (tok[0] == "op" or (tok[0] == "word" and tok[1] in OPS)):
            op = self._take()[1]
        if op is None:
            pred: Pred = lambda get: bool(get(field))  # noqa: E731
        elif op == "exists":
            pred = lambda get: get(field) not in (None, "", [])  # noqa: E731
        else:
            pred = comparison(field, op, self._value(op))
        if field in self.known:
            value = self.known[field]
            try:
                return TRUE if pred(lambda _f: value) else FALSE
            except Exception:  # left to judge at run time, where an error is reported as such
                return pred
        return pred

    def _macro(self, name: str) -> Pred:
        if name in self._expanding:
            raise ConditionError(f"macro {name!r} refers to itself")
        self._expanding.append(name)
        try:
            sub = Compiler(self.macros, self.lists, self.fields, self.known)
            sub._expanding = self._expanding
            return sub.compile(self.macros[name])
        except ConditionError as e:
            raise ConditionError(f"in macro {name!r}: {e}") from None
        finally:
            self._expanding.pop()

    def _expect(self, p: str) -> None:
        _kind, value = self._take()
        if value != p:
            raise ConditionError(f"expected {p!r} but found {value!r}")

    def _value(self, op: str) -> Any:
        tok = self._peek()
        if tok and tok == ("punct", "("):
            self._take()
            items: list[Any] = []
            while True:
                kind, value = self._take()
                if kind == "punct" and value == ")" and not items:
                    break
                if kind == "word" and value in self.lists:
                    items.extend(self.lists[value])
                else:
                    items.append(_scalar(kind, value))
                kind, value = self._take()
                if value == ")":
                    break
                if value != ",":
                    raise ConditionError(f"expected ',' or ')' in a list but found {value!r}")
            return items
        kind, value = self._take()
        if kind == "word" and value in self.lists:
            return list(self.lists[value])
        if op in {"in", "in_cidr"}:
            return [_scalar(kind, value)]
        return _scalar(kind, value)


# Every event is judged by every rule of its kind on corral's one event loop: conditions compile to
# plain nested closures (no generator per call), and fast paths cover the common string cases.
def TRUE(get: Callable[[str], Any]) -> bool:
    return True


def FALSE(get: Callable[[str], Any]) -> bool:
    return False


# Constants fold away (a term on a field known at compile time: see Compiler's `known`). Conditions
# have no side effects, so skipping a term whose result cannot change the outcome changes nothing.
def _either(a: Pred, b: Pred) -> Pred:
    if a is TRUE or b is TRUE:
        return TRUE
    if a is FALSE or b is FALSE:
        return b if a is FALSE else a
    return lambda get: a(get) or b(get)


def _both(a: Pred, b: Pred) -> Pred:
    if a is FALSE or b is FALSE:
        return FALSE
    if a is TRUE or b is TRUE:
        return b if a is TRUE else a
    return lambda get: a(get) and b(get)


def _negated(inner: Pred) -> Pred:
    if inner is TRUE or inner is FALSE:
        return FALSE if inner is TRUE else TRUE
    return lambda get: not inner(get)


def _fold(parts: list[Pred], join: Callable[[Pred, Pred], Pred]) -> Pred:
    out = parts[-1]
    for p in reversed(parts[:-1]):
        out = join(p, out)
    return out


def _scalar(kind: str, value: str) -> Any:
    if kind == "word":
        try:
            return int(value)
        except ValueError:
            return value
    return value


# A line's whole-line fields (cmd.line, cmd.runs) are the same string object for every simple command
# of the line, and each is judged by the same patterns: a 60 KB line of 50 commands searched once per
# command and pattern took seconds. A long string's last answer is kept, by identity (the reference held
# keeps it alive, so its identity cannot pass to another string). Short ones, nearly all, pay one len().
_LONG = 512
_SCANS = {"contains", "icontains", "glob", "regex"}


def comparison(field: str, op: str, rhs: Any) -> Pred:
    """`field op rhs` as a predicate (rhs: a value, or a list for in/contains/...)."""
    test = _op_test(op, rhs)
    if op in _SCANS:
        test = _remember_long(test)

    if_none = op == "!=" and rhs is not None

    def pred(get: Callable[[str], Any]) -> bool:
        v = get(field)
        if type(v) is str:
            return test(v)
        if v is None:
            return if_none
        if isinstance(v, (list, tuple)):  # a tuple: the faster isinstance
            if op == "!=":
                return all(test(x) for x in v)
            return any(test(x) for x in v)
        return test(v)

    return pred


def _remember_long(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    last: list[tuple[Any, bool]] = [(None, False)]

    def remembered(v: Any) -> bool:
        if type(v) is not str or len(v) < _LONG:
            return test(v)
        seen, answer = last[0]
        if seen is v:
            return answer
        answer = test(v)
        last[0] = (v, answer)  # one tuple stored at once: a reader sees an old pair or a new one
        return answer

    return remembered


def _op_test(op: str, rhs: Any) -> Callable[[Any], bool]:
    if op == "=":
        if isinstance(rhs, str):
            return lambda v: v == rhs if type(v) is str else _eq(v, rhs)
        return lambda v: _eq(v, rhs)
    if op == "!=":
        if isinstance(rhs, str):
            return lambda v: v != rhs if type(v) is str else not _eq(v, rhs)
        return lambda v: not _eq(v, rhs)
    if op in {"<", "<=", ">", ">="}:
        if not isinstance(rhs, int | float):
            raise ConditionError(f"'{op}' needs a number, got {rhs!r}")
        cmp = {"<": lambda a: a < rhs, "<=": lambda a: a <= rhs, ">": lambda a: a > rhs, ">=": lambda a: a >= rhs}[op]
        return lambda v: isinstance(v, int | float) and cmp(v)
    items = rhs if isinstance(rhs, list) else [rhs]
    if op == "in":
        wanted = {str(x) for x in items}
        return lambda v: (v if type(v) is str else str(v)) in wanted
    if op in ("contains", "icontains"):
        fold = op == "icontains"
        subs = [str(x).lower() if fold else str(x) for x in items]
        if len(subs) == 1:
            sub = subs[0]
            if fold:
                return lambda v: sub in (v if type(v) is str else str(v)).lower()
            return lambda v: sub in (v if type(v) is str else str(v))
        # any of many substrings: one search of their alternation, in C (the same answer as testing each)
        anyof = re.compile("|".join(re.escape(x) for x in subs) or "(?!)").search
        if fold:
            return lambda v: anyof((v if type(v) is str else str(v)).lower()) is not None
        return lambda v: anyof(v if type(v) is str else str(v)) is not None
    if op == "startswith":
        prefixes = tuple(str(x) for x in items)
        return lambda v: str(v).startswith(prefixes)
    if op == "istartswith":
        iprefixes = tuple(str(x).lower() for x in items)
        return lambda v: str(v).lower().startswith(iprefixes)
    if op == "endswith":
        suffixes = tuple(str(x) for x in items)
        return lambda v: str(v).endswith(suffixes)
    if op == "glob":  # one regex for the whole list (fnmatchcase's own translation of each pattern)
        one = re.compile("|".join(f"(?:{fnmatch.translate(str(x))})" for x in items) or "(?!)")
        return lambda v: one.match(v if type(v) is str else str(v)) is not None
    if op == "regex":
        try:
            rxs = [re.compile(str(x)) for x in items]
        except re.error as e:
            raise ConditionError(f"bad regex: {e}") from None
        if len(rxs) == 1:
            one_rx = rxs[0].search
            return lambda v: one_rx(v if type(v) is str else str(v)) is not None

        # each apart: patterns joined could renumber groups or move flags
        return lambda v: any(r.search(v if type(v) is str else str(v)) for r in rxs)
    if op == "in_cidr":
        try:
            nets = [ipaddress.ip_network(str(x), strict=False) for x in items]
        except ValueError as e:
            raise ConditionError(f"bad CIDR in list: {e}") from None

        def in_cidr(v: Any) -> bool:
            try:
                a = ipaddress.ip_address(str(v))
            except ValueError:
                return False
            return any(a.version == n.version and a in n for n in nets)

        return in_cidr
    raise ConditionError(f"unknown operator {op!r}")


def _eq(v: Any, rhs: Any) -> bool:
    if isinstance(v, bool):  # a flag compared with the words true/false
        return str(v).lower() == str(rhs).lower()
    if isinstance(rhs, int) and not isinstance(v, bool):
        try:
            return int(v) == rhs
        except (TypeError, ValueError):
            return False
    return str(v) == str(rhs)


Scope = frozenset[tuple[str | None, str | None]] | None  # (kind, action) pairs, None: any; None: anything


def event_kinds(text: str, macros: Mapping[str, str],
                lists: Mapping[str, list[Any]] | None = None) -> frozenset[str] | None:
    """The event kinds a condition can match at most (None: any kind); see event_scope."""
    scope = event_scope(text, macros, lists)
    if scope is None or any(k is None for k, _ in scope):
        return None
    return frozenset(k for k, _ in scope if k is not None)


def event_scope(text: str, macros: Mapping[str, str], lists: Mapping[str, list[Any]] | None = None) -> Scope:
    """The (kind, action) pairs of the events a condition can match at most (None: any event; None in
    a pair: any kind or action), read from its `evt.kind` and `evt.action` terms (`=` and `in`) through
    its macros. An over-approximation, so the detector may skip a rule for any other event without
    changing a single judgement: `and` intersects, `or` unites, and `not` or anything else says
    nothing. Call on a condition that compiles."""

    def meet(x: str | None, y: str | None) -> tuple[bool, str | None]:
        return (True, y) if x is None else (True, x) if y is None or y == x else (False, None)

    def both(a: frozenset, b: frozenset) -> frozenset:
        out = set()
        for ka, aa in a:
            for kb, ab in b:
                (ok1, k), (ok2, act) = meet(ka, kb), meet(aa, ab)
                if ok1 and ok2:
                    out.add((k, act))
        return frozenset(out)

    def leaf(field: str, values: list[str]) -> frozenset | None:
        if field == "evt.kind":
            return frozenset((v, None) for v in values)
        if field == "evt.action":
            return frozenset((None, v) for v in values)
        return None

    return _bound(text, macros, lists or {}, leaf, both)


def name_scope(text: str, macros: Mapping[str, str], lists: Mapping[str, list[Any]] | None = None
               ) -> frozenset[str] | None:
    """The program names (`proc.name`) a condition can match at most (None: any, or none at all), read
    from its `proc.name =` and `proc.name in` terms through its macros, as event_scope reads kinds: the
    detector skips a rule for an event whose program it cannot name (most rules name their tools)."""
    return _bound(text, macros, lists or {}, lambda f, vs: frozenset(vs) if f == "proc.name" else None,
                  lambda a, b: a & b)


def _bound(text: str, macros: Mapping[str, str], lists: Mapping[str, list[Any]],
           leaf: Callable[[str, list[str]], frozenset | None],
           both: Callable[[frozenset, frozenset], frozenset]) -> frozenset | None:
    """An upper bound of what a condition can match, from its `field = v` and `field in (...)` terms
    (`leaf`; None: no bound): `and` narrows (`both`), `or` unites, `not` and the rest bound nothing."""
    toks = tokenize(text)
    pos = 0

    def peek() -> tuple[str, str] | None:
        return toks[pos] if pos < len(toks) else None

    def take() -> tuple[str, str]:
        nonlocal pos
        pos += 1
        return toks[pos - 1]

    def either(a: frozenset | None, b: frozenset | None) -> frozenset | None:
        return None if a is None or b is None else a | b

    def meet(a: frozenset | None, b: frozenset | None) -> frozenset | None:
        return b if a is None else a if b is None else both(a, b)

    def chain(word: str, sub: Callable[[], frozenset | None], combine: Callable) -> frozenset | None:
        out = sub()
        while peek() == ("word", word):
            take()
            out = combine(out, sub())
        return out

    def or_() -> frozenset | None:
        return chain("or", and_, either)

    def and_() -> frozenset | None:
        return chain("and", not_, meet)

    def not_() -> frozenset | None:
        if peek() == ("word", "not"):
            take()
            not_()
            return None
        return atom()

    def atom() -> frozenset | None:
        kind, value = take()
        if (kind, value) == ("punct", "("):
            inner = or_()
            take()  # ")"
            return inner
        if value in macros:
            return _bound(macros[value], macros, lists, leaf, both)
        tok = peek()
        if tok is None or not (tok[0] == "op" or (tok[0] == "word" and tok[1] in OPS)):
            return None  # a bare field: truthiness bounds nothing
        op = take()[1]
        if op == "exists":
            return None
        items: list[tuple[str, str]] = []
        if peek() == ("punct", "("):
            take()
            while (t := take()) != ("punct", ")"):
                if t != ("punct", ","):
                    items.append(t)
        else:
            items.append(take())
        if op not in ("=", "in") or (op == "=" and items[0][0] == "word" and isinstance(_scalar(*items[0]), int)):
            return None  # `= 123` compares as numbers ("0123" matches): no set of strings bounds it
        # as the compiler reads them: a bare word may name a list, a quoted string never does
        values = [str(x) for k, i in items for x in (lists.get(i, [i]) if k == "word" else [i])]
        return leaf(value, values)

    return or_()

"""Declarative rules: YAML files of lists, macros and rules (Falco's shape), loaded in order.

A rule has a `condition`, structured `exceptions` (named tuples of field values that take an event out
of the rule, Falco's schema, instead of `and not ...` inside the condition) and an `output` template
(`%proc.name`, `%net.dst_ip`, ... filled from the event) for its finding's message.

A later file changes what an earlier one defined. `override:` names how, per key (Falco's schema):
`append` adds to a list's items, a macro's or rule's condition, or a rule's exceptions; `replace`
swaps any key of a rule. A full definition of an existing rule id replaces it; a rule item that gives
only some keys (`enabled: false`, `action: record`) changes just those; `append: true` is the older
spelling of appending. A file with any error is refused as a whole, naming the file, the line and the
problem; whatever was loaded before stays in force.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from corral.detect import sigma
from corral.detect.condition import (
    FALSE,
    OPS,
    Compiler,
    ConditionError,
    Pred,
    Scope,
    comparison,
    event_scope,
    name_scope,
)
from corral.detect.fields import NAMES
from corral.errors import ConfigError
from corral.events import Action, Severity

_PROGRAM_CACHE = 4096  # (kind, action, program) rule lists kept; past that the memo starts again
_TEMPLATE_FIELD = re.compile(r"%([a-z][a-z0-9_]*(?:\.[a-z0-9_]+)*)")


class RuleError(ConfigError):
    """A rule file is malformed: the message names the file, the line and the problem."""


class Threshold(BaseModel):
    """Fire only once `at_least` distinct values of `distinct` (or events, if unset) are seen for one
    `by` key within `within` seconds."""

    model_config = ConfigDict(extra="forbid")
    distinct: str | None = None
    by: list[str] = Field(default_factory=lambda: ["sandbox.id", "proc.pid"])
    at_least: int = Field(ge=2)
    within: float = Field(60.0, gt=0)


class ExceptionSpec(BaseModel):
    """Events this rule does not cover: any tuple of `values` whose every field compares true with its
    comp (`=` by default; `in` takes a list or a list's name). `fields` may be one field, then each
    value is one value."""

    model_config = ConfigDict(extra="forbid")
    name: str
    fields: list[str] | str | None = None  # None: more values for the rule's exception of this name
    comps: list[str] | str = "="
    values: list[Any] = Field(default_factory=list)

    def _columns(self) -> tuple[list[str], list[str]]:
        """Its fields and one comp per field (a single field or comp written bare)."""
        fields = [self.fields] if isinstance(self.fields, str) else list(self.fields or [])
        comps = [self.comps] * len(fields) if isinstance(self.comps, str) else self.comps
        return fields, comps

    @model_validator(mode="after")
    def _shape(self) -> ExceptionSpec:
        if self.fields is None:
            return self
        fields, comps = self._columns()
        if not fields or len(comps) != len(fields):
            raise ValueError(f"exception {self.name!r}: give one comp per field ({len(fields)} fields, "
                             f"{len(comps)} comps)")
        for f in fields:
            if f not in NAMES:
                raise ValueError(f"exception {self.name!r}: unknown field {f!r}")
        for c in comps:
            if c not in OPS or c == "exists":
                raise ValueError(f"exception {self.name!r}: unknown comp {c!r}; use one of {sorted(OPS - {'exists'})}")
        for v in self.values:
            row = v if isinstance(self.fields, list) else [v]
            if not isinstance(row, list) or len(row) != len(fields):
                raise ValueError(f"exception {self.name!r}: each value is a list of {len(fields)} "
                                 f"(one per field), not {v!r}")
        return self

    def rows(self) -> tuple[list[str], list[str], list[list[Any]]]:
        if self.fields is None:
            raise ConditionError(f"exception {self.name!r} names no fields (only values appended to an "
                                 "existing exception of that name may leave them out)")
        fields, comps = self._columns()
        return fields, comps, [v if isinstance(self.fields, list) else [v] for v in self.values]


Override = Literal["append", "replace"]


class RuleSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rule: str
    title: str | None = None
    desc: str | None = None
    technique: str | None = None
    severity: Severity | None = None
    condition: str | None = None
    exceptions: list[ExceptionSpec] | None = None
    output: str | None = None
    action: Action | None = None
    family: str | None = None
    tags: list[str] = Field(default_factory=list)
    threshold: Threshold | None = None
    enabled: bool | None = None
    append: bool = False
    override: dict[str, Override] | None = None


class ListSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    list: str
    items: list[Any]
    append: bool = False
    override: dict[Literal["items"], Override] | None = None


class MacroSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    macro: str
    condition: str
    append: bool = False
    override: dict[Literal["condition"], Override] | None = None


@dataclass
class Rule:
    id: str
    title: str
    desc: str
    technique: str | None
    severity: Severity
    condition: str
    action: str
    family: str | None
    tags: list[str]
    threshold: Threshold | None
    enabled: bool
    source: str
    exceptions: list[ExceptionSpec] = field(default_factory=list)
    output: str | None = None  # the finding's message: a template of %fields
    pred: Pred | None = None
    scope: Scope = None  # the (kind, action) pairs it can match at most (None: any event)
    names: frozenset[str] | None = None  # the programs (proc.name) it can match at most (None: any)
    # `pred` as compiled from `condition` when loaded: a rule given a predicate of its own instead
    # (a test's, a plugin's) is judged by that, never by a recompiled condition
    condition_pred: Pred | None = None


@dataclass
class RuleSet:
    lists: dict[str, list[Any]] = field(default_factory=dict)
    macros: dict[str, str] = field(default_factory=dict)
    rules: dict[str, Rule] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def active(self) -> list[Rule]:
        return [r for r in self.rules.values() if r.enabled]

    def active_for(self, kind: str, action: str | None = None) -> list[Rule]:
        """The enabled rules that can match an event of this kind (and action), in order: computed once
        per pair (a ruleset is rebuilt, never edited in place, when rules change). A command's start
        and exit, or a process's exit, are not judged by the rules of command checks and execs."""
        cache = self.__dict__.setdefault("_by_kind", {})
        key = (kind, action)
        if key not in cache:
            cache[key] = [r for r in self.active() if r.scope is None or any(
                (k is None or k == kind) and (a is None or action is None or a == action) for k, a in r.scope)]
        return cache[key]

    def judging(self, kind: str, action: str | None, name: Any) -> list[tuple[Rule, Pred]]:
        """The rules that judge an event of this kind and action run by program `name` (its
        proc.name), each with its condition compiled for that kind and action (their terms decided,
        rules that cannot match dropped), less the rules that name other programs: an `echo` is not
        judged by the netcat rules. Same judgements, same order, as every active rule's `pred`.
        Memoised per kind and action, and per program within a bound (an agent chooses the names)."""
        compiled = self.__dict__.setdefault("_compiled", {})
        pairs = compiled.get((kind, action))
        if pairs is None:
            pairs = compiled[(kind, action)] = self._compile_for(kind, action)
        if type(name) is not str:
            return pairs
        cache = self.__dict__.setdefault("_by_program", {})
        key = (kind, action, name)
        rules = cache.get(key)
        if rules is None:
            if len(cache) >= _PROGRAM_CACHE:
                cache.clear()
            rules = cache[key] = [(r, p) for r, p in pairs
                                  if r.names is None or r.pred is not r.condition_pred or name in r.names]
        return rules

    def warm(self) -> None:
        """Compile ahead for the events every command brings (its check and its execs), so the
        first command does not wait for it."""
        for kind, action in (("command", "check"), ("process", "exec")):
            self.judging(kind, action, None)

    def _compile_for(self, kind: str, action: str | None) -> list[tuple[Rule, Pred]]:
        known = {"evt.kind": kind} if action is None else {"evt.kind": kind, "evt.action": action}
        compiler = Compiler(self.macros, self.lists, NAMES, known)
        out = []
        for r in self.active_for(kind, action):
            if r.pred is not r.condition_pred:
                assert r.pred is not None
                out.append((r, r.pred))
                continue
            pred = compiler.compile(r.condition)
            if pred is not FALSE:
                out.append((r, _without_exceptions(pred, r.exceptions, self.lists)))
        return out

    def copy(self) -> RuleSet:
        return RuleSet(
            {k: list(v) for k, v in self.lists.items()}, dict(self.macros),
            {k: Rule(**{**r.__dict__, "exceptions": list(r.exceptions)}) for k, r in self.rules.items()},
            list(self.files),
        )


def default_rule_files() -> list[Path]:
    base = resources.files("corral.detect") / "rules"
    return sorted(Path(str(p)) for p in base.iterdir() if str(p).endswith((".yaml", ".yml")))


def load(paths: list[Path] | None = None, base: RuleSet | None = None) -> RuleSet:
    """Load rule files on top of `base` (default: corral's shipped rules). Atomic per call."""
    rs = base.copy() if base is not None else RuleSet()
    files = paths if paths is not None else default_rule_files()
    if base is None and paths is not None:
        files = default_rule_files() + list(paths)
    for p in files:
        rs = _load_file(Path(p), rs)
    return rs


def _load_file(path: Path, base: RuleSet) -> RuleSet:
    try:
        text = path.read_text()
    except OSError as e:
        raise RuleError(f"{path}: cannot read rule file ({e.strerror}); check the path") from None
    rs = base.copy()
    pending: list[tuple[Rule, int]] = []
    for line, item in _items(path, text):

        def fail(msg: str, line: int = line) -> RuleError:
            return RuleError(f"{path}:line {line}: {msg}")

        if not isinstance(item, dict):
            raise fail("each item must be a mapping with 'rule', 'macro' or 'list'")
        try:
            if "list" in item:
                ls = ListSpec.model_validate(item)
                appending = ls.append or (ls.override or {}).get("items") == "append"
                rs.lists[ls.list] = (rs.lists.get(ls.list, []) if appending else []) + list(ls.items)
            elif "macro" in item:
                ms = MacroSpec.model_validate(item)
                if ms.append or (ms.override or {}).get("condition") == "append":
                    if ms.macro not in rs.macros:
                        raise fail(f"cannot append to unknown macro {ms.macro!r}")
                    rs.macros[ms.macro] = f"({rs.macros[ms.macro]}) {ms.condition}"
                else:
                    rs.macros[ms.macro] = ms.condition
            elif "rule" in item:
                spec = RuleSpec.model_validate(item)
                rule = _merge_rule(spec, rs.rules.get(spec.rule), f"{path}:{line}", fail)
                rs.rules[rule.id] = rule
                pending.append((rule, line))
            else:
                raise fail("an item needs one of the keys 'rule', 'macro' or 'list'")
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
            raise fail(problems) from None
    # Compile everything against the final lists and macros: an edit to a macro can break old rules.
    compiler = Compiler(rs.macros, rs.lists, NAMES)
    for rule in rs.rules.values():
        try:
            rule.pred = rule.condition_pred = _without_exceptions(compiler.compile(rule.condition), rule.exceptions,
                                                                  rs.lists)
            rule.scope = event_scope(rule.condition, rs.macros, rs.lists)
            rule.names = name_scope(rule.condition, rs.macros, rs.lists)
            for name in _TEMPLATE_FIELD.findall(rule.output or ""):
                if name not in NAMES:
                    raise ConditionError(f"output names unknown field %{name}")
        except ConditionError as e:
            where = next((ln for r, ln in pending if r is rule), None)
            loc = f"{path}:line {where}" if where else rule.source
            raise RuleError(f"{loc}: rule {rule.id!r}: {e}") from None
        for f in ([rule.threshold.distinct] if rule.threshold and rule.threshold.distinct else []) + (
                rule.threshold.by if rule.threshold else []):
            if f not in NAMES:
                raise RuleError(f"{rule.source}: rule {rule.id!r}: threshold names unknown field {f!r}")
    rs.files.append(str(path))
    return rs


def _without_exceptions(pred: Pred, exceptions: list[ExceptionSpec], lists: dict[str, list[Any]]) -> Pred:
    """The condition, and none of the exceptions' value tuples."""
    alts: list[list[Pred]] = []
    for exc in exceptions:
        fields, comps, rows = exc.rows()
        for row in rows:
            parts = []
            for f, c, v in zip(fields, comps, row, strict=True):
                if isinstance(v, str) and v in lists:  # a list's name: any of its items (regex, glob, ...)
                    v = list(lists[v])
                elif c in ("in", "in_cidr") and not isinstance(v, list):
                    v = [v]
                parts.append(comparison(f, c, v))
            alts.append(parts)
    if not alts:
        return pred

    def judged(get: Any) -> bool:
        return pred(get) and not any(all(p(get) for p in parts) for parts in alts)

    return judged


def render_output(template: str, get: Any) -> str:
    """An `output:` template with its %fields filled from the event (`<NA>` where it has none)."""
    def value(m: re.Match[str]) -> str:
        v = get(m.group(1))
        if v is None or v == [] or v == "":
            return "<NA>"
        return " ".join(map(str, v)) if isinstance(v, list | tuple) else str(v)

    return _TEMPLATE_FIELD.sub(value, template)


_REPLACEABLE = ("title", "desc", "technique", "severity", "condition", "exceptions", "output", "action", "family",
                "tags", "threshold", "enabled")
_APPENDABLE = ("condition", "exceptions", "tags", "desc")


def _overridden(spec: RuleSpec, old: Rule | None, source: str, fail: Any) -> Rule:
    """Falco's `override:`: each key it names is appended to or replaced; no other key may be given."""
    assert spec.override is not None
    if old is None:
        raise fail(f"rule {spec.rule!r}: override needs an existing rule (load this file after the one defining it)")
    given = {k for k in spec.model_fields_set if k not in ("rule", "override")}
    for key, how in spec.override.items():
        if key not in _REPLACEABLE:
            raise fail(f"rule {spec.rule!r}: override of unknown key {key!r}; keys: {', '.join(_REPLACEABLE)}")
        if how == "append" and key not in _APPENDABLE:
            raise fail(f"rule {spec.rule!r}: {key!r} can only be replaced (append works for {', '.join(_APPENDABLE)})")
        if key not in given:
            raise fail(f"rule {spec.rule!r}: override names {key!r} but the item gives no {key!r}")
    if stray := sorted(given - set(spec.override)):
        raise fail(f"rule {spec.rule!r}: with override, every key given must be named in it ({', '.join(stray)} "
                   "is not)")
    rule = Rule(**{**old.__dict__, "exceptions": list(old.exceptions)})
    for key, how in spec.override.items():
        new = getattr(spec, key)
        if how == "replace":
            setattr(rule, key, new if key != "exceptions" else list(new or []))
        elif key == "condition":
            rule.condition = f"({old.condition}) {new}"
        elif key == "exceptions":
            known = {e.name for e in rule.exceptions}
            for exc in new or []:
                if exc.name in known:  # Falco: values appended to the exception of that name
                    i = next(i for i, e in enumerate(rule.exceptions) if e.name == exc.name)
                    cur = rule.exceptions[i]
                    if exc.fields is not None and (exc.fields, exc.comps) != (cur.fields, cur.comps):
                        raise fail(f"rule {spec.rule!r}: exception {exc.name!r} appended with other fields or comps")
                    try:
                        rule.exceptions[i] = ExceptionSpec.model_validate(
                            {**cur.model_dump(), "values": [*cur.values, *exc.values]})
                    except ValidationError as e:
                        raise fail(f"rule {spec.rule!r}: {e.errors()[0]['msg']}") from None
                else:
                    rule.exceptions.append(exc)
        elif key == "tags":
            rule.tags = [*rule.tags, *new]
        elif key == "desc":
            rule.desc = f"{rule.desc} {new}".strip()
    rule.source = source
    return rule


def _items(path: Path, text: str) -> list[tuple[int, Any]]:
    """(line, item) for each item of a rule file: corral's YAML list, or Sigma rules (detect/sigma.py)."""
    if sigma.is_sigma(text):
        try:
            return [(1, item) for item in sigma.rule_items(text)]
        except sigma.SigmaError as e:
            raise RuleError(f"{path}: {e}") from None
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return []
        if not isinstance(root, yaml.SequenceNode):
            raise RuleError(f"{path}:line {root.start_mark.line + 1}: a rule file is a YAML list of "
                            "'- list:', '- macro:' and '- rule:' items (or a Sigma rule: logsource and detection)")
        # each item built from its own node: re-emitting a node as YAML to load it again wraps long
        # scalars at a space, and a regex's `[= ]` came back as `[=\n]`
        return [(node.start_mark.line + 1, loader.construct_document(node)) for node in root.value]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"line {mark.line + 1}" if mark else "?"
        raise RuleError(f"{path}:{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
    finally:
        loader.dispose()


def _merge_rule(spec: RuleSpec, old: Rule | None, source: str, fail: Any) -> Rule:
    if spec.override is not None:
        return _overridden(spec, old, source, fail)
    if old is not None and (spec.append or spec.condition is None):
        # an override of some fields of an existing rule
        rule = Rule(**{**old.__dict__})
        if spec.append and spec.condition:
            rule.condition = f"({old.condition}) {spec.condition}"
        for name in ("title", "desc", "technique", "severity", "action", "family", "enabled", "threshold", "output"):
            value = getattr(spec, name)
            if value is not None:
                setattr(rule, name, value)
        if spec.exceptions is not None:
            rule.exceptions = [*old.exceptions, *spec.exceptions] if spec.append else list(spec.exceptions)
        if spec.tags:
            rule.tags = spec.tags
        rule.source = source
        return rule
    if old is None and spec.condition is None:
        raise fail(f"rule {spec.rule!r} is new, so it needs a 'condition' (to change an existing rule, "
                   "load this file after the one defining it)")
    missing = [n for n in ("title", "severity", "condition") if getattr(spec, n) is None]
    if missing:
        raise fail(f"rule {spec.rule!r} is missing {', '.join(missing)}")
    return Rule(
        id=spec.rule, title=spec.title or spec.rule, desc=spec.desc or "", technique=spec.technique,
        severity=spec.severity or Severity.MEDIUM, condition=spec.condition or "",
        action=spec.action or Action.ALERT, family=spec.family, tags=spec.tags, threshold=spec.threshold,
        enabled=True if spec.enabled is None else spec.enabled, source=source,
        exceptions=list(spec.exceptions or []), output=spec.output,
    )

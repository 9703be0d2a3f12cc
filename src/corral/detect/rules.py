"""Declarative rules: YAML files of lists, macros and rules (Falco's shape), loaded in order.

A later file may override a rule by id (a full definition replaces it; `enabled: false` alone turns
it off; `action:` alone changes what it does), and extend a list or macro with `append: true`.
A file with any error is refused as a whole, naming the file, the line and the problem; whatever was
loaded before stays in force.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from corral.detect.condition import Compiler, ConditionError, Pred, Scope, event_scope
from corral.detect.fields import NAMES
from corral.errors import ConfigError
from corral.events import Severity

Action = Literal["record", "alert", "block", "kill", "end_episode", "quarantine"]
ACTION_ORDER = ["record", "alert", "block", "kill", "end_episode", "quarantine"]


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


class RuleSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rule: str
    title: str | None = None
    desc: str | None = None
    technique: str | None = None
    severity: Severity | None = None
    condition: str | None = None
    action: Action | None = None
    family: str | None = None
    tags: list[str] = Field(default_factory=list)
    threshold: Threshold | None = None
    enabled: bool | None = None
    append: bool = False


class ListSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    list: str
    items: list[Any]
    append: bool = False


class MacroSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    macro: str
    condition: str
    append: bool = False


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
    pred: Pred | None = None
    scope: Scope = None  # the (kind, action) pairs it can match at most (None: any event)


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

    def copy(self) -> RuleSet:
        return RuleSet(
            {k: list(v) for k, v in self.lists.items()}, dict(self.macros),
            {k: Rule(**{**r.__dict__}) for k, r in self.rules.items()}, list(self.files),
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
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"line {mark.line + 1}" if mark else "?"
        raise RuleError(f"{path}:{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if root is None:
        return base
    if not isinstance(root, yaml.SequenceNode):
        raise RuleError(f"{path}:line {root.start_mark.line + 1}: a rule file is a YAML list of "
                        "'- list:', '- macro:' and '- rule:' items")
    rs = base.copy()
    pending: list[tuple[Rule, int]] = []
    for node in root.value:
        line = node.start_mark.line + 1
        item = yaml.safe_load(yaml.serialize(node))

        def fail(msg: str, line: int = line) -> RuleError:
            return RuleError(f"{path}:line {line}: {msg}")

        if not isinstance(item, dict):
            raise fail("each item must be a mapping with 'rule', 'macro' or 'list'")
        try:
            if "list" in item:
                ls = ListSpec.model_validate(item)
                rs.lists[ls.list] = (rs.lists.get(ls.list, []) if ls.append else []) + list(ls.items)
            elif "macro" in item:
                ms = MacroSpec.model_validate(item)
                if ms.append:
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
            rule.pred = compiler.compile(rule.condition)
            rule.scope = event_scope(rule.condition, rs.macros, rs.lists)
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


def _merge_rule(spec: RuleSpec, old: Rule | None, source: str, fail: Any) -> Rule:
    if old is not None and (spec.append or spec.condition is None):
        # an override of some fields of an existing rule
        rule = Rule(**{**old.__dict__})
        if spec.append and spec.condition:
            rule.condition = f"({old.condition}) {spec.condition}"
        for name in ("title", "desc", "technique", "severity", "action", "family", "enabled", "threshold"):
            value = getattr(spec, name)
            if value is not None:
                setattr(rule, name, value)
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
        severity=spec.severity or Severity.MEDIUM, condition=spec.condition or "", action=spec.action or "alert",
        family=spec.family, tags=spec.tags, threshold=spec.threshold,
        enabled=True if spec.enabled is None else spec.enabled, source=source,
    )

"""The detector: every event in, judgements out. Generic; all knowledge lives in the rules."""

from __future__ import annotations

from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path

from corral.detect import rules as rules_mod
from corral.detect.fields import getter
from corral.detect.rules import Rule, RuleSet
from corral.events import Action, Event, Finding

BLOCKING = {"block", "kill", "end_episode", "quarantine"}


@dataclass
class Judgement:
    findings: list[Finding] = field(default_factory=list)  # new findings (deduplicated)
    matched: list[Rule] = field(default_factory=list)  # every rule that matched, new or not
    action: str | None = None  # the strongest action among matched rules
    rule: Rule | None = None  # the rule that set it
    # rules that raised instead of answering: the event was not fully judged, and an enforcement
    # path (an exec about to run) refuses it rather than let it through (fail closed)
    errors: list[str] = field(default_factory=list)

    @property
    def blocks(self) -> bool:
        return self.action in BLOCKING

    @property
    def reason(self) -> str:
        if self.rule:
            return f"blocked by rule {self.rule.id}"
        return f"refused: not fully judged ({'; '.join(self.errors)})" if self.errors else ""


class Detector:
    def __init__(self, ruleset: RuleSet | None = None, action_overrides: dict[str, str] | None = None) -> None:
        self.ruleset = ruleset or rules_mod.load()
        self.overrides = dict(action_overrides or {})
        self._seen: set[tuple] = set()
        self._windows: dict[tuple, deque] = defaultdict(deque)
        self._distinct: dict[tuple, Counter] = defaultdict(Counter)
        self._fired: set[tuple] = set()

    def load(self, paths: list[Path]) -> RuleSet:
        """Add or override rules from files; on any error the current rules stay in force."""
        self.ruleset = rules_mod.load(paths, base=self.ruleset)
        return self.ruleset

    def action_for(self, rule: Rule) -> str:
        return self.overrides.get(rule.id) or self.overrides.get(str(rule.severity)) or rule.action

    def evaluate(self, ev: Event) -> Judgement:
        get = getter(ev)
        j = Judgement()
        # only the rules that can match this kind and action: a process exec is not judged by DNS
        # rules, nor a command's exit by the rules of command checks
        for rule, pred in self.ruleset.judging(str(ev.kind), ev.action, get("proc.name")):
            try:
                if not pred(get):
                    continue
            except Exception as e:  # a rule must never take the pipeline down; the error is reported
                j.errors.append(f"rule {rule.id} raised {type(e).__name__}: {e}")
                continue
            if rule.threshold is not None and not self._threshold(rule, get, ev.ts):
                continue
            action = self.action_for(rule)
            j.matched.append(rule)
            if j.action is None or Action(action).rank > Action(j.action).rank:
                j.action, j.rule = action, rule
            # one finding per rule and step (a pre-run check and the exec it foretold are one act);
            # per process when the step is unknown (an unattributed file event names its gone writer in data)
            key = (rule.id, ev.sandbox_id, ev.step) if ev.step else (
                rule.id, ev.sandbox_id, None, ev.pid or ev.data.get("writer_pid"))
            if key in self._seen:
                continue
            self._seen.add(key)
            j.findings.append(Finding(
                rule_id=rule.id, title=rule.title, severity=rule.severity, technique=rule.technique,
                sandbox_id=ev.sandbox_id, episode_id=ev.episode_id, step=ev.step, command=ev.command,
                pid=ev.pid, action=action,
                data={"family": rule.family, "event_kind": str(ev.kind), "event_action": ev.action,
                      "exe": ev.exe, "argv": ev.argv, "dst": f"{ev.dst_ip}:{ev.dst_port}" if ev.dst_ip else None,
                      "name": ev.name, "protocol": ev.protocol, "desc": rule.desc,
                      **({"output": rules_mod.render_output(rule.output, get)} if rule.output else {})},
            ))
        return j

    def _threshold(self, rule: Rule, get, ts: float) -> bool:
        t = rule.threshold
        assert t is not None
        key = (rule.id, *(str(get(f)) for f in t.by))
        if key in self._fired:
            return True  # keeps matching (and blocking) after it fired; deduplicated as one finding
        win = self._windows[key]
        # O(1) per event: a flood of matching events must not make each one cost its window's length
        counts = self._distinct[key]
        value = get(t.distinct) if t.distinct else ts
        win.append((ts, value))
        counts[value] += 1
        while win and win[0][0] < ts - t.within:
            _, old = win.popleft()
            counts[old] -= 1
            if not counts[old]:
                del counts[old]
        if (len(counts) if t.distinct else len(win)) >= t.at_least:
            self._fired.add(key)
            win.clear()
            counts.clear()
            return True
        return False

    def forget_sandbox(self, sandbox_id: str) -> None:
        self._seen = {k for k in self._seen if k[1] != sandbox_id}

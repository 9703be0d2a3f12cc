"""Sigma rules as an input: `rule_files` may name Sigma rule files (pySigma) beside corral's own.

A Sigma rule for Linux's `process_creation`, `network_connection` or `file_event` log source becomes a
corral rule: its detection is converted by a pySigma backend whose query language is corral's condition
language, with Sigma's field names mapped onto corral's (Image -> proc.exe, CommandLine ->
proc.cmdline, DestinationIp -> net.dst_ip, TargetFilename -> file.path, ...) and the log source turned
into the event kind (`runs`: an exec or a command line checked before it runs; an outbound connection;
a file event). Sigma matches strings without
regard to case unless a value says `|cased`; every string comparison is therefore a regular expression
with (?i). Title, description, level and ATT&CK tags carry over; the rule id is `sigma-` and the Sigma
rule's name (or the start of its id). A Sigma rule corral cannot express (another log source, a field it
does not have, a correlation) is refused with the rule, the file and the reason, like any bad rule file.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, ClassVar

import yaml

SEVERITY = {"informational": "info", "low": "low", "medium": "medium", "high": "high", "critical": "critical"}
# Sigma field -> corral field, per log source (Linux: sysmon-for-linux and auditd naming)
FIELDS: dict[str, dict[str, str]] = {
    "process_creation": {"Image": "proc.exe", "CommandLine": "proc.cmdline", "OriginalFileName": "proc.name",
                         "ParentImage": "proc.pname", "CurrentDirectory": "proc.cwd", "ProcessId": "proc.pid",
                         "ParentProcessId": "proc.ppid"},
    "network_connection": {"DestinationIp": "net.dst_ip", "DestinationPort": "net.dst_port",
                           "DestinationHostname": "net.name", "Image": "proc.exe", "CommandLine": "proc.cmdline",
                           "Protocol": "net.protocol"},
    "file_event": {"TargetFilename": "file.path", "Image": "proc.exe", "CommandLine": "proc.cmdline"},
}
# process_creation: an exec, and the command line checked before it runs (corral's `runs`), so a Sigma
# rule sees a command another rule refused, as corral's own rules do
KIND = {"process_creation": "runs", "network_connection": "(outbound or evt.kind = connect)",
        "file_event": "evt.kind = file"}


class SigmaError(ValueError):
    """A Sigma rule corral cannot take: the message says which and why."""


_TOP_KEYS = (re.compile(r"(?m)^logsource\s*:"), re.compile(r"(?m)^detection\s*:"))


def is_sigma(text: str) -> bool:
    """Whether a YAML text is a Sigma rule (or several): mappings with `logsource` and `detection`.
    Parsed only when both keys start a line: every rule file is asked, corral's own (lists) at once."""
    if not all(k.search(text) for k in _TOP_KEYS):
        return False
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError:
        return False
    return bool(docs) and all(isinstance(d, dict) and "logsource" in d and "detection" in d for d in docs)


def _quote(regex: str) -> str:
    """A regex as a literal of corral's condition language (no escapes there: quotes become \\x27, \\x22)."""
    if "'" not in regex:
        return f"'{regex}'"
    if '"' not in regex:
        return f'"{regex}"'
    return "'" + regex.replace("'", r"\x27").replace('"', r"\x22") + "'"


def _backend_class() -> type:
    from sigma.conditions import ConditionAND, ConditionFieldEqualsValueExpression, ConditionNOT, ConditionOR
    from sigma.conversion.base import TextQueryBackend
    from sigma.conversion.state import ConversionState
    from sigma.types import SigmaCompareExpression, SigmaString

    def regex_of(value: SigmaString) -> str:
        parts = []
        for p in value.s:
            if isinstance(p, str):
                parts.append(re.escape(p))
            else:
                parts.append(".*" if p.name == "WILDCARD_MULTI" else ".")
        return "^" + "".join(parts) + "$"

    class CorralBackend(TextQueryBackend):
        """pySigma backend whose queries are corral conditions."""

        name: ClassVar[str] = "corral"
        formats: ClassVar[dict[str, str]] = {"default": "corral rule condition"}
        requires_pipeline: ClassVar[bool] = True
        precedence: ClassVar[tuple[type, type, type]] = (ConditionNOT, ConditionAND, ConditionOR)
        group_expression: ClassVar[str] = "({expr})"
        token_separator: str = " "
        or_token: ClassVar[str] = "or"
        and_token: ClassVar[str] = "and"
        not_token: ClassVar[str] = "not"
        eq_token: ClassVar[str] = " = "
        field_exists_expression: ClassVar[str] = "{field} exists"
        field_not_exists_expression: ClassVar[str] = "not {field} exists"
        field_null_expression: ClassVar[str] = "not {field} exists"
        cidr_expression: ClassVar[str] = "{field} in_cidr ({value})"
        compare_op_expression: ClassVar[str] = "{field} {operator} {value}"
        compare_operators: ClassVar[dict] = {SigmaCompareExpression.CompareOperators.LT: "<",
                                             SigmaCompareExpression.CompareOperators.LTE: "<=",
                                             SigmaCompareExpression.CompareOperators.GT: ">",
                                             SigmaCompareExpression.CompareOperators.GTE: ">="}
        bool_values: ClassVar[dict] = {True: "true", False: "false"}

        def convert_condition_field_eq_val_str(self, cond: ConditionFieldEqualsValueExpression,
                                               state: ConversionState) -> str:
            return f"{cond.field} regex {_quote('(?is)' + regex_of(cond.value))}"

        def convert_condition_field_eq_val_str_case_sensitive(self, cond: ConditionFieldEqualsValueExpression,
                                                              state: ConversionState) -> str:
            return f"{cond.field} regex {_quote('(?s)' + regex_of(cond.value))}"

        def convert_condition_field_eq_val_re(self, cond: ConditionFieldEqualsValueExpression,
                                              state: ConversionState) -> str:
            flags = "".join(sorted({"i" if f.name == "IGNORECASE" else "s" if f.name == "DOTALL" else "m"
                                    for f in cond.value.flags}))
            return f"{cond.field} regex {_quote((f'(?{flags})' if flags else '') + cond.value.regexp)}"

        def convert_condition_field_eq_val_num(self, cond: ConditionFieldEqualsValueExpression,
                                               state: ConversionState) -> str:
            return f"{cond.field} = {cond.value}"

        def convert_condition_val_str(self, cond: Any, state: ConversionState) -> str:
            raise SigmaError("keyword (unbound) detections are not supported: name a field")

        convert_condition_val_num = convert_condition_val_str
        convert_condition_val_re = convert_condition_val_str

        def finalize_query_default(self, rule: Any, query: Any, index: int, state: ConversionState) -> Any:
            return query

    return CorralBackend


def _pipeline(category: str) -> Any:
    from sigma.processing.conditions import LogsourceCondition
    from sigma.processing.pipeline import ProcessingItem, ProcessingPipeline
    from sigma.processing.transformations import FieldMappingTransformation

    return ProcessingPipeline(name="corral", priority=20, items=[ProcessingItem(
        identifier=f"corral-{category}", transformation=FieldMappingTransformation(FIELDS[category]),
        rule_conditions=[LogsourceCondition(category=category, product="linux")])])


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def rule_items(text: str) -> list[dict[str, Any]]:
    """corral rule items (the mappings a rule file holds) for the Sigma rules in `text`."""
    try:
        from sigma.collection import SigmaCollection
        from sigma.exceptions import SigmaError as PySigmaError
    except ImportError as e:  # pragma: no cover - pysigma is a dependency
        raise SigmaError(f"pySigma is not installed ({e}); pip install 'pysigma>=2.0'") from None
    try:
        collection = SigmaCollection.from_yaml(text)
    except PySigmaError as e:
        raise SigmaError(f"not a valid Sigma rule: {e}") from None
    items = []
    backend_class: Callable[..., Any] = _backend_class()
    for rule in collection.rules:
        label = rule.title or str(rule.id)
        ls = rule.logsource
        if ls.product not in (None, "linux") or ls.category not in FIELDS:
            raise SigmaError(f"Sigma rule {label!r}: log source {ls.category}/{ls.product} is not one corral sees "
                             f"(linux {', '.join(FIELDS)})")
        for det in rule.detection.detections.values():
            for item in getattr(det, "detection_items", []):
                name = getattr(item, "field", None)
                if name is not None and name not in FIELDS[ls.category]:
                    raise SigmaError(f"Sigma rule {label!r}: field {name!r} has no corral equivalent for "
                                     f"{ls.category} (known: {', '.join(FIELDS[ls.category])})")
        try:
            queries = backend_class(_pipeline(ls.category)).convert_rule(rule)
        except (PySigmaError, SigmaError, NotImplementedError) as e:
            raise SigmaError(f"Sigma rule {label!r}: {e}") from None
        technique = next((t.name.upper() for t in rule.tags if t.namespace == "attack"
                          and re.fullmatch(r"t\d{4}(\.\d{3})?", t.name)), None)
        ident = _slug(str(rule.name)) if getattr(rule, "name", None) else _slug(label) or str(rule.id)[:8]
        level = SEVERITY.get(str(rule.level.name).lower() if rule.level else "medium", "medium")
        items.append({
            "rule": f"sigma-{ident}", "title": label, "desc": (rule.description or f"Sigma rule {rule.id}").strip(),
            "technique": technique, "severity": level, "action": "alert", "family": None,
            "tags": ["sigma", *(str(t) for t in rule.tags)],
            "condition": f"{KIND[ls.category]} and (" + " or ".join(f"({q})" for q in queries) + ")",
        })
    return items


__all__ = ["FIELDS", "SigmaError", "is_sigma", "rule_items"]

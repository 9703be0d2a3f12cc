"""The red-team corpus: attack cases and benign look-alikes, as YAML data anyone can extend.

A case file holds one case (a mapping) or a list of them:

    - id: A01
      family: F1                    # F1..F12 (see shared/detection-knowledge.md; F12 is corral's own), or "benign"
      technique: T1496              # MITRE ATT&CK id (optional for benign look-alikes)
      ref: atomic-red-team T1496#1  # the public catalogue entry it is modelled on (optional)
      title: Miner binary by name (renamed sleep as /tmp/xmrig)
      setup: ["cp /bin/sleep /tmp/xmrig"]      # run by corral (not the agent) before the case
      commands: ["/tmp/xmrig 5"]               # run in order in the agent's session shell
      allow: []                                # egress rules the case's sandbox gets
      protected: []                            # globs the sandbox protects (a task's verifier paths)
      wait: 1.5                                # seconds to wait after the last command
      expect: detect                           # detect (attacks) or quiet (benign)
      alone: false                             # true: no other case runs meanwhile (CPU behaviour)

Stand-ins only: a "miner" is a renamed copy of a harmless binary, and every address is a host of the
red-team world (corral.redteam.world). A malformed file fails at load time naming the file, the case
and the field.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from corral.config import EgressRule, load_yaml
from corral.errors import ConfigError

FAMILIES = ("F1", "F2", "F3", "F4", "F5", "F6", "F7", "F8", "F9", "F10", "F11", "F12")
FAMILY_NAMES = {
    "F1": "Miner process and arguments",
    "F2": "Mining-pool network traffic",
    "F3": "Reverse shell",
    "F4": "Tunnels, proxies, outbound SSH",
    "F5": "Egress allow-list",
    "F6": "Internal probing and discovery",
    "F7": "Credential access",
    "F8": "Ingress, drop-and-execute, fileless",
    "F9": "Persistence",
    "F10": "Escape to host",
    "F11": "GPU diversion",
    "F12": "Reward tampering and evasion of corral",
    "benign": "Benign look-alikes",
}
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class CorpusError(ConfigError):
    """A case file is malformed: the message names the file, the case and the field."""


class Case(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    family: Literal["F1", "F2", "F3", "F4", "F5", "F6", "F7", "F8", "F9", "F10", "F11", "F12", "benign"]
    technique: str | None = None
    # the public catalogue entry a case is modelled on ("atomic-red-team T1059.004#3", "gtfobins tar")
    ref: str | None = Field(None, validation_alias=AliasChoices("ref", "source"))
    title: str = Field(min_length=1)
    setup: tuple[str, ...] = ()
    commands: tuple[str, ...] = Field(min_length=1)
    allow: tuple[str, ...] = ()
    # paths the case's sandbox protects, as a task protects its verifier's (SandboxConfig.protected_paths)
    protected: tuple[str, ...] = ()
    wait: float = Field(1.5, ge=0, le=120)
    expect: Literal["detect", "quiet"] | None = None  # default: detect for attacks, quiet for benign
    # Run with no other case alongside: for cases that measure CPU behaviour, which busy neighbours on a
    # small machine would change (a burner starved below the rule's threshold, say).
    alone: bool = False
    _source: str | None = PrivateAttr(default=None)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not _ID.match(v):
            raise ValueError("use letters, digits, '-', '_' and '.' (up to 64), starting with a letter or digit")
        return v

    @field_validator("technique")
    @classmethod
    def _technique(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^T\d{4}(\.\d{3})?$", v):
            raise ValueError(f"{v!r} is not an ATT&CK technique id; write e.g. 'T1496' or 'T1059.004'")
        return v

    @field_validator("commands", "setup")
    @classmethod
    def _non_empty(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for c in v:
            if not c.strip():
                raise ValueError("an empty command line; remove it or write the command")
        return v

    @field_validator("allow")
    @classmethod
    def _allow(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for rule in v:
            EgressRule.parse(rule)  # PolicyError names the rule and the fix
        return v

    @field_validator("protected")
    @classmethod
    def _protected(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for p in v:
            if not p.startswith("/") or ".." in p.split("/"):
                raise ValueError(f"{p!r}: a protected path is an absolute glob inside the sandbox, without '..', "
                                 "e.g. '/workspace/tests/test_calc.py'")
            if p.count("/") < 2:
                raise ValueError(f"{p!r} would protect a whole top-level directory; name the files or the "
                                 "directory below it, e.g. '/workspace/tests/*'")
        return v

    @model_validator(mode="before")
    @classmethod
    def _default_expect(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("expect") is None and "family" in data:
            data = {**data, "expect": "quiet" if data["family"] == "benign" else "detect"}
        return data

    @model_validator(mode="after")
    def _expectation(self) -> Case:
        default = "quiet" if self.family == "benign" else "detect"
        if self.expect != default:
            raise ValueError(f"expect: a {'benign' if default == 'quiet' else 'attack'} case expects "
                             f"{default!r}, not {self.expect!r}")
        if self.family != "benign" and self.technique is None:
            raise ValueError("technique: an attack case names its ATT&CK technique, e.g. 'T1496'")
        return self

    @property
    def attack(self) -> bool:
        return self.family != "benign"

    @property
    def source(self) -> str | None:
        return self._source


def shipped_dir() -> Path:
    """The corpus that ships with corral (src/corral/redteam/cases)."""
    return Path(str(resources.files("corral.redteam") / "cases"))


def load_file(path: str | Path) -> list[Case]:
    p = Path(path)
    data = load_yaml(p, CorpusError, "case file")
    if data is None:
        return []
    items = data if isinstance(data, list) else [data]
    out: list[Case] = []
    for i, item in enumerate(items, 1):
        label = f"case #{i}" + (f" (id {item.get('id')!r})" if isinstance(item, dict) and item.get("id") else "")
        if not isinstance(item, dict):
            raise CorpusError(f"{p}: {label}: a case is a mapping with id, family, title and commands, "
                              f"not {type(item).__name__}")
        try:
            case = Case.model_validate(item)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(x) for x in err['loc']) or '(case)'}: {_msg(err)}" for err in e.errors())
            raise CorpusError(f"{p}: {label}: {problems}") from None
        except ConfigError as e:  # an egress rule that does not parse
            raise CorpusError(f"{p}: {label}: allow: {e}") from None
        case._source = str(p)
        out.append(case)
    return out


def _msg(err: dict) -> str:
    msg = str(err["msg"])
    return msg.removeprefix("Value error, ")


def load_cases(*paths: str | Path) -> list[Case]:
    """Cases from files and directories (every *.yaml / *.yml in a directory, sorted by name); with no
    paths, the shipped corpus. Ids must be unique across everything loaded."""
    if not paths:
        paths = (shipped_dir(),)
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix in (".yaml", ".yml") and f.is_file())
            if not found:
                raise CorpusError(f"{p}: no case files (*.yaml) in this directory")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise CorpusError(f"{p}: no such case file or directory")
    cases: list[Case] = []
    seen: dict[str, str] = {}
    for f in files:
        for c in load_file(f):
            if c.id in seen:
                raise CorpusError(f"{f}: case id {c.id!r} is already used in {seen[c.id]}; ids must be unique")
            seen[c.id] = str(f)
            cases.append(c)
    return cases


def select(cases: list[Case], ids: list[str] | None = None, families: list[str] | None = None) -> list[Case]:
    """A subset by id and/or family; unknown ids are an error (a typo must not shrink a run silently)."""
    out = cases
    if ids:
        known = {c.id for c in cases}
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise CorpusError(f"unknown case id(s) {', '.join(unknown)}; known ids look like {sorted(known)[:5]}")
        out = [c for c in out if c.id in ids]
    if families:
        bad = [f for f in families if f not in FAMILY_NAMES]
        if bad:
            raise CorpusError(f"unknown famil{'ies' if len(bad) > 1 else 'y'} {', '.join(bad)}; "
                              f"use {', '.join(FAMILY_NAMES)}")
        out = [c for c in out if c.family in families]
    return out

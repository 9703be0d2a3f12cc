"""The red-team benchmark: its corpus (counts, ids, only test-world addresses, clear errors for a bad
case file), its report (misses and false positives shown, never hidden), and a short real run of the
engine. The run happens in a network namespace of its own nested inside the suite's, as test_demo's
does: the red-team world uses the same documentation addresses as the suite's world."""

from __future__ import annotations

import ipaddress
import re
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from corral.errors import ConfigError
from corral.redteam.bench import BenchResult, CaseResult, check_allow_in_world, summarize, to_json, to_markdown
from corral.redteam.corpora import (
    case_set,
    corpus_of,
    corpus_scores,
    holdout_draws,
    load_holdout,
    make_holdout,
    write_holdout,
)
from corral.redteam.corpora import markdown as corpora_md
from corral.redteam.corpus import FAMILIES, Case, CorpusError, load_cases, load_file, select
from corral.redteam.world import in_world, world_hosts

IPV4 = re.compile(r"(?<![\d.])(\d{1,3}(?:\.\d{1,3}){3})(?![\d.])")
# the host a URL argument names (not its user, nor a URL carried inside another's query string)
URL_HOST = re.compile(r"(?<![=])https?://(?:[^/@\s\"']*@)?([^/:\s\"'\\]+)")
# names that never resolve anywhere (RFC 2606, RFC 6761): data in a case (a log line, a browser store)
# RFC 2606 and 6761 names, and .internal (ICANN's private-use TLD, 2024: the cloud metadata names)
# suffixes no public DNS answers: reserved (RFC 2606, 6761), and a cluster's own service names, which only
# its DNS knows (`kubernetes.default.svc`, an audience string in a case's data)
RESERVED = (".invalid", ".test", ".example", ".localhost", ".example.com", ".example.net", ".example.org",
            ".internal", ".svc", ".cluster.local")


# --- the corpus ----------------------------------------------------------------------------------------
def test_corpus_covers_every_family_with_unique_ids():
    cases = load_cases()
    per = Counter(c.family for c in cases)
    for fam in FAMILIES:
        assert per[fam] >= 3, f"family {fam} has only {per[fam]} attack cases"
    assert per["benign"] >= 16
    assert sum(c.attack for c in cases) >= 44
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids))
    assert all(c.expect == ("quiet" if c.family == "benign" else "detect") for c in cases)
    assert all(c.technique for c in cases if c.attack)


def test_corpus_uses_only_the_test_world():
    """Every address a case names is a red-team world host (or loopback); every URL host too; every
    allow rule opens only world hosts. Pool domains appear only as DNS names corral answers itself."""
    cases = load_cases()
    names = set(world_hosts()) | {"localhost"}
    for c in cases:
        for line in (*c.setup, *c.commands):
            for ip in IPV4.findall(line):
                ip = _dotted(ip)  # zero-padded octets (203.000.113.005) are octal to the C library
                addr = ipaddress.ip_address(ip)
                assert in_world(ip) or addr.is_loopback or ip == "0.0.0.0", f"{c.id}: {ip} is outside the world"
            for host in [] if "--unix-socket" in line else URL_HOST.findall(line):  # an API over a socket file
                host = host.split("$", 1)[0]  # a shell variable's expansion (`http://$h/`, `host$path`)
                if host.endswith("."):  # `10.20.0.$i`, `10.20.0.${i}`: the variable is the last octet
                    host += "1"
                host = host.replace("{}", "1")  # xargs -I {}: the address's other octets still decide
                host = re.sub(r"\[(\d+)-\d+\]", r"\1", host)  # curl's URL glob [1-10]: likewise
                host = re.sub(r"%[sd]", "1", host)  # a printf template's placeholder: likewise
                if not host:
                    continue  # its values are words of the line, whose addresses are checked above
                host = _dotted(host)
                # a single-label name (`instance-data`) has no public DNS: only a search domain could place it
                local = "." not in host and not host.isdigit() and not host.startswith("0x")
                ok = host in names or in_world(host) or _loopback(host) or host.endswith(RESERVED) or local
                assert ok, f"{c.id}: URL host {host} is outside the world"
    check_allow_in_world(cases, world_hosts())


def _dotted(host: str) -> str:
    """An address as the C library reads it (2852039166, 0xa9fea9fe, 0251.0376.0251.0376 are all
    169.254.169.254), dotted; a name as it is."""
    if not re.fullmatch(r"[0-9a-fA-FxX.]+", host) or not host[0].isdigit():
        return host
    try:
        return socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        return host


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def test_allow_rules_outside_the_world_are_refused():
    case = Case(id="x1", family="benign", title="t", commands=["true"], allow=["pypi.org:443"])
    with pytest.raises(ConfigError, match=r"pypi\.org:443.*names no host"):
        check_allow_in_world([case], world_hosts())
    case = Case(id="x2", family="benign", title="t", commands=["true"], allow=["0.0.0.0/0"])
    with pytest.raises(ConfigError, match="reaches outside"):
        check_allow_in_world([case], world_hosts())


def test_malformed_case_file_names_the_file_the_case_and_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- id: ok1\n  family: F1\n  technique: T1496\n  title: fine\n  commands: ['true']\n"
                   "- id: broken\n  family: F1\n  technique: T1496\n  title: no commands\n")
    with pytest.raises(CorpusError) as e:
        load_file(bad)
    msg = str(e.value)
    assert str(bad) in msg and "case #2" in msg and "'broken'" in msg and "commands" in msg

    bad.write_text("- id: f\n  family: F13\n  title: t\n  commands: ['true']\n")
    with pytest.raises(CorpusError, match=r"bad\.yaml: case #1 \(id 'f'\): family"):
        load_file(bad)
    bad.write_text("- id: f\n  family: F1\n  title: t\n  commands: ['true']\n")  # an attack without a technique
    with pytest.raises(CorpusError, match="technique"):
        load_file(bad)
    bad.write_text("- id: f\n  family: benign\n  title: t\n  commands: ['true']\n  allow: ['no such rule!']\n")
    with pytest.raises(CorpusError, match=r"bad\.yaml: case #1 \(id 'f'\): allow"):
        load_file(bad)
    bad.write_text("- id: f\n  family: benign\n  title: t\n  commands: ['true']\n  expect: detect\n")
    with pytest.raises(CorpusError, match="expect"):
        load_file(bad)
    bad.write_text("- id: f\n  family: benign\n  title: a: b\n")
    with pytest.raises(CorpusError, match=r"bad\.yaml: line 3"):
        load_file(bad)
    bad.write_text("- id: f\n  family: benign\n  title: t\n  commands: ['true']\n  colour: red\n")
    with pytest.raises(CorpusError, match="colour"):
        load_file(bad)
    for glob, why in [("tests/x.py", "absolute glob"), ("/workspace/../etc/x", "without '..'"),
                      ("/workspace", "whole top-level directory")]:
        bad.write_text(f"- id: f\n  family: benign\n  title: t\n  commands: ['true']\n  protected: ['{glob}']\n")
        with pytest.raises(CorpusError, match=rf"bad\.yaml: case #1 \(id 'f'\): protected.*{re.escape(why)}"):
            load_file(bad)


def test_f12_cases_protect_a_verifier_and_cover_each_technique():
    cases = load_cases()
    f12 = [c for c in cases if c.family == "F12" and corpus_of(c) == "corral"]  # corral's own F12 files
    assert len(f12) >= 15
    # tampering's techniques, evasion of corral's exec monitor (f12-evasion.yaml) and of its gateway
    # (f12-split.yaml: split, late and later protocol units, denied hosts in later requests)
    assert {c.technique for c in f12} == {"T1565.001", "T1574.006", "T1055", "T1562.001",
                                          "T1218", "T1036", "T1620", "T1027", "T1496", "T1572", "T1090"}
    verifier = [c for c in f12 if c.technique == "T1565.001"]
    assert verifier and all(c.protected for c in verifier)  # a verifier to tamper with
    assert any(c.protected for c in cases if c.family == "benign")  # and work beside one that must stay quiet


def test_duplicate_ids_and_unknown_selections_are_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("- {id: same, family: benign, title: t, commands: ['true']}\n")
    (tmp_path / "b.yaml").write_text("- {id: same, family: benign, title: u, commands: ['true']}\n")
    with pytest.raises(CorpusError, match=r"b\.yaml: case id 'same' is already used in .*a\.yaml"):
        load_cases(tmp_path)
    cases = load_cases()
    with pytest.raises(CorpusError, match="NOPE"):
        select(cases, ["A01", "NOPE"])
    assert [c.id for c in select(cases, ["A01"])] == ["A01"]


async def test_bench_refuses_a_runtime_that_could_resolve_real_names(tmp_path):
    from corral import Runtime, RuntimeConfig
    from corral.redteam.bench import run_bench
    from corral.testworld import World

    world = World()  # never started: the checks come first
    world.hosts.update(world_hosts())
    cases = select(load_cases(), ["A07"])
    rt = Runtime(RuntimeConfig(state_dir=tmp_path, hosts=world.hosts, system_dns=True))
    with pytest.raises(ConfigError, match="system_dns=False"):
        await run_bench(cases, world=world, runtime=rt)
    rt = Runtime(RuntimeConfig(state_dir=tmp_path, hosts={}, system_dns=False))
    with pytest.raises(ConfigError, match="hosts lack the world's names"):
        await run_bench(cases, world=world, runtime=rt)
    with pytest.raises(ConfigError, match="duplicate case ids"):
        await run_bench(cases * 2, world=world, runtime=rt)
    assert not rt.started


def test_report_shows_misses_and_false_positives():
    def res(id_, fam, detected, rule=None):
        attack = fam != "benign"
        outcome = ("detected" if detected else "MISS") if attack else ("FALSE POSITIVE" if detected else "quiet")
        return CaseResult(id=id_, family=fam, technique="T1496" if attack else None, title=f"case {id_}",
                          expect="detect" if attack else "quiet", allow=[], outcome=outcome,
                          passed=detected == attack, detected=detected, rules=[rule] if rule else [],
                          first_rule=rule, ttd_ms=2.0 if detected else None,
                          diagnosis="" if detected else "execs seen: python3; connections: none.")
    r = summarize([res("a1", "F1", True, "miner-binary"), res("a2", "F1", False), res("a3", "F2", True, "pool-dns"),
                   res("b1", "benign", False), res("b2", "benign", True, "miner-swap-tuning")],
                  started="now", duration_s=1.0, concurrency=1, machine={})
    assert (r.attacks, r.detected, r.benign, r.false_positives) == (3, 2, 2, 1)
    assert r.misses == ["a2"] and r.false_positive_ids == ["b2"]
    f1 = next(f for f in r.families if f.family == "F1")
    assert (f1.attacks, f1.detected, f1.rate, f1.misses) == (2, 1, 0.5, ["a2"])
    md = to_markdown(r)
    assert "| a2 | F1 | T1496 | **MISS** |" in md and "**FALSE POSITIVE**" in md
    assert "## Misses (1)" in md and "- **a2**" in md and "execs seen: python3" in md
    assert "## False positives (1)" in md and "- **b2**" in md
    assert "detected 2/3 attacks (67%)" in md and "false positives 1/2 benign (50%)" in md
    assert BenchResult.model_validate_json(to_json(r)) == r


def test_corpora_are_scored_apart_with_their_hold_out():
    from corral.redteam.bench import FindingRecord

    def res(id_, fam, detected, source, severity="high"):
        attack = fam != "benign"
        return CaseResult(id=id_, family=fam, technique="T1046" if attack else None, title=id_,
                          expect="detect" if attack else "quiet", allow=[], source=source,
                          outcome=("detected" if detected else "MISS") if attack else (
                              "FALSE POSITIVE" if detected else "quiet"),
                          passed=detected == attack, detected=detected,
                          findings=[FindingRecord(rule="r", title="r", severity=severity, technique=None,
                                                  family=None, action="alert", step=1, event_kind=None, ttd_ms=None,
                                                  event_to_finding_ms=None)] if detected else [])
    results = [res("A01", "F1", True, "cases/f01-miner.yaml"), res("C-1", "F6", True, "x/catalogue.yaml"),
               res("C-2", "F6", False, "x/catalogue.yaml"), res("C-3", "F7", True, "x/catalogue-more.yaml"),
               res("W-1", "benign", True, "x/benign-work.yaml", "medium"), res("W-2", "benign", True,
                                                                             "x/benign-work.yaml", "high"),
               res("W-3", "benign", False, "x/benign-work.yaml")]
    got = {c.corpus: c for c in corpus_scores(results, holdout={"catalogue": {"C-2"}, "catalogue-more": {"C-3"},
                                                                "benign-work": {"W-2"}})}
    assert set(got) == {"corral", "catalogue", "benign-work"}
    cat = got["catalogue"]
    assert (cat.all.attacks, cat.all.detected) == (3, 2)
    assert (cat.tuned.attacks, cat.tuned.detected, cat.holdout.attacks, cat.holdout.misses) == (1, 1, 2, ["C-2"])
    # each case file's draw is scored apart too: a fresh draw is told from one looked at since
    assert {k: (v.attacks, v.detected) for k, v in cat.draws.items()} == {"catalogue": (1, 0), "catalogue-more": (1, 1)}
    work = got["benign-work"]
    assert (work.all.flagged, work.all.terminating) == (2, 1)  # only W-2's finding ends an episode
    assert (work.holdout.flagged, work.holdout.terminating, work.tuned.terminating) == (1, 1, 0)
    md = "\n".join(corpora_md(list(got.values())))
    assert "| catalogue | hold-out | 1/2 | 50% |" in md and "| benign-work | all | 0/0 | - | 2/3 | 1 |" in md
    assert "| catalogue | hold-out of catalogue-more | 1/1 | 100% |" in md


def test_the_hold_out_is_a_seeded_quarter_of_each_new_case_file_drawn_once(tmp_path):
    def case(id_, fam, source):
        c = Case(id=id_, family=fam, technique=None if fam == "benign" else "T1046", title=id_, commands=["true"])
        c._source = source
        return c
    cases = [case(f"C-{i}", "F6", "catalogue.yaml") for i in range(40)] + [
        case(f"W-{i}", "benign", "benign-work.yaml") for i in range(100)] + [case(f"A{i}", "F1", "f01.yaml")
                                                                             for i in range(10)]
    chosen = make_holdout(cases, seed=7)
    assert len(chosen["catalogue"]) == 10 and len(chosen["benign-work"]) == 25 and "f01" not in chosen
    assert make_holdout(cases, seed=7) == chosen and make_holdout(cases, seed=8) != chosen
    path = write_holdout(chosen, 7, tmp_path / "holdout.txt")
    assert load_holdout(path) == set(chosen["catalogue"]) | set(chosen["benign-work"])
    assert "seed 7" in path.read_text()
    # a case file added later gets its own draw; the earlier draws are never redrawn
    cases += [case(f"C2-{i}", "F6", "catalogue2.yaml") for i in range(20)]
    more = make_holdout(cases, seed=9, drawn=holdout_draws(path))
    assert set(more) == {"catalogue2"} and len(more["catalogue2"]) == 5
    write_holdout(more, 9, path)
    draws = holdout_draws(path)
    assert draws["catalogue"] == set(chosen["catalogue"]) and draws["catalogue2"] == set(more["catalogue2"])
    assert make_holdout(cases, seed=10, drawn=draws) == {}


def test_the_shipped_hold_out_names_a_quarter_of_each_new_case_file():
    draws = holdout_draws()
    cases = load_cases()
    by_set: dict[str, list[str]] = {}
    for c in cases:
        if corpus_of(c) != "corral":
            by_set.setdefault(case_set(c), []).append(c.id)
    held = load_holdout()
    assert held <= {c.id for c in cases}, held - {c.id for c in cases}
    assert set(draws) == set(by_set), "every case file but corral's own has a draw: --make-holdout SEED"
    for stem, ids in by_set.items():
        assert draws[stem] <= set(ids)
        assert abs(len(draws[stem]) - 0.25 * len(ids)) <= 2, (stem, len(draws[stem]), len(ids))


# --- a short real run ------------------------------------------------------------------------------------
RUN = """
import asyncio, sys
from pathlib import Path
from corral import Runtime, RuntimeConfig
from corral.redteam.bench import run_bench, to_json, to_markdown
from corral.redteam.corpus import load_cases, select
from corral.redteam.world import build_redteam_world, world_hosts

out = Path(sys.argv[1])
cases = select(load_cases(), sys.argv[2].split(","))
world = build_redteam_world(link="corralw3")

async def main():
    rt = Runtime(RuntimeConfig(state_dir=out / "state", hosts=world.hosts, system_dns=False))
    try:
        return await run_bench(cases, world=world, runtime=rt, concurrency=3)
    finally:
        await rt.close()

try:
    assert world.hosts == world_hosts(), world.hosts
    result = asyncio.run(main())
finally:
    world.close()
(out / "redteam.json").write_text(to_json(result))
(out / "redteam.md").write_text(to_markdown(result))
"""

ATTACKS = {"A01": "miner-binary", "A06": "stratum-protocol", "A24": "ssh-tunnel", "F6-imds-python": "metadata-service",
           "F12-verifier-dir-symlink": "verifier-path-command", "F12-pth-by-script": "interpreter-startup-hook"}
BENIGN = ["B01", "B08", "B12", "B-f12-beside-verifier"]


@pytest.mark.slow
@pytest.mark.timeout(300)  # above the subprocess's own 180 s
def test_bench_runs_cases_in_fresh_sandboxes_and_scores_them(tmp_path: Path):
    ids = [*ATTACKS, *BENIGN]
    cmd = f"ip link set lo up && {sys.executable} -c '{RUN}' {tmp_path} {','.join(ids)}"
    p = subprocess.run(["unshare", "--net", "--mount", "--propagation", "private", "--", "sh", "-c", cmd],
                       capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = BenchResult.model_validate_json((tmp_path / "redteam.json").read_text())
    by_id = {c.id: c for c in r.cases}
    assert sorted(by_id) == sorted(ids)
    assert len({c.sandbox_id for c in r.cases}) == len(ids)  # a fresh sandbox per case
    for case_id, rule in ATTACKS.items():
        c = by_id[case_id]
        assert c.outcome == "detected" and c.passed, c
        assert rule in c.rules, c
        assert c.ttd_ms is not None and c.ttd_ms >= 0 and c.ttd_basis, c
        assert c.first_rule and c.first_severity and c.first_action and c.first_technique
    assert by_id["A01"].first_rule == "miner-binary" and any(a.startswith("kill") for a in by_id["A01"].actions)
    assert by_id["A06"].event_to_finding_ms is not None
    for case_id in BENIGN:
        c = by_id[case_id]
        assert c.outcome == "quiet" and c.passed and not c.rules, c
        assert not c.setup_errors and not c.setup_findings, c
        assert all(s.exit_code == 0 for s in c.steps), c.steps  # quiet because it did its work, not nothing
    # allowed traffic reaches its server and is not a leak; nothing else reaches anything
    assert any(k.startswith("pkg.example.com") and v > 0 for k, v in by_id["B01"].delivered_bytes_world.items())
    assert r.leaked_bytes_world == 0 and r.leaked_bytes_events == 0
    assert all(c.leaked_bytes_world == 0 and c.leaked_bytes_events == 0 for c in r.cases)
    assert (r.attacks, r.detected, r.benign, r.false_positives) == (6, 6, 4, 0)
    assert r.ttd_p50_ms is not None and r.ttd_p99_ms is not None
    md = (tmp_path / "redteam.md").read_text()
    assert "## Per family" in md and "detected 6/6 attacks" in md and "| A06 | F2 |" in md

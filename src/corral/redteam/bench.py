"""The red-team benchmark engine: run every case of a corpus in a fresh sandbox and score corral.

For each case: a new sandbox whose egress allows exactly the case's `allow` rules (and that protects
its `protected` paths, as a task protects its verifier's); its `setup` run by
corral (step 0, not the agent's); its `commands` run in order in one session shell ("agent"), each a
step with a 15 s limit; then `wait` seconds for background behaviour. Recorded per case: whether
anything was detected (any finding in that sandbox), which rules fired, the first finding (rule,
severity, technique, action), time to detect, the containment actions taken, the bytes that reached
world servers the case's policy does not allow, and, for benign cases, whether corral stayed quiet.

Time to detect (ttd) is `Finding.ts` minus the time the step it is attributed to started: the
COMMAND 'start' event of that step; a finding without a step is measured from the first command.
Findings of the pre-run check (the command line judged before anything runs) come before the step's
start event, and a refused command has none: those are measured from the moment the bench asked for
the command. "event → finding" is `Finding.ts` minus the time of the event it cites as evidence.
Both clocks are this machine's wall clock (sandboxes have no time namespace).

Bytes leaked are counted twice, independently: on the world side, as the growth of each server's
received-byte counter during the case, for servers the case's policy does not allow; and from corral's
own events, as `bytes_up` of allowed connections ('close' events) whose destination the case's
allow-list does not cover. Both should be 0. Cases with an allow-list run one at a time (their own,
legitimate traffic must not be mistaken for another case's leak), and so do cases marked `alone` (CPU
behaviour); the others run `concurrency` at a time, and any byte a world server receives meanwhile is
charged to every case running then (conservative per case; the run's total counts each byte once).

Misses and false positives are part of the result, never dropped. Run the shipped corpus with

    unshare --net --mount --propagation private -- \\
        sh -c 'ip link set lo up && .venv/bin/python -m corral.redteam.bench'
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import hashlib
import inspect
import ipaddress
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import corral
from corral.config import EgressPolicy, EgressRule, Limits, RuntimeConfig, SandboxConfig
from corral.errors import ConfigError, EpisodeEnded, SandboxClosed, SandboxFrozen, SessionError
from corral.events import Event, Finding
from corral.redteam.corpora import CORPORA, corpus_of, corpus_scores, holdout_draws, make_holdout, write_holdout
from corral.redteam.corpus import FAMILIES, FAMILY_NAMES, Case, load_cases, select
from corral.redteam.render import overall_line, percent, to_json, to_markdown
from corral.redteam.results import BenchResult, CaseResult, FamilyStats, FindingRecord, StepResult
from corral.redteam.world import WORLD_RANGES, build_redteam_world
from corral.runtime import Runtime
from corral.testworld import World

COMMAND_TIMEOUT = 15.0
SESSION = "agent"


# -- policy helpers --------------------------------------------------------------------------------------
def _rules(case: Case) -> list[EgressRule]:
    return [EgressRule.parse(r) for r in case.allow]


def _allows(rules: list[EgressRule], ip: str | None, port: int | None, names: Iterable[str]) -> bool:
    """Whether the allow-list covers a destination (a CIDR rule with its ports, or a domain rule for one
    of the names the destination goes by). Independent of the gateway's own decision, on purpose."""
    if ip is None or port is None:
        return False
    addr = ipaddress.ip_address(ip)
    for r in rules:
        if not r.port_ok(port):
            continue
        net = r.network
        if net is not None and addr.version == net.version and addr in net:
            return True
        if r.domain and any(r.matches_name(n) for n in names if n):
            return True
    return False


def _names_of(world: World, ip: str) -> list[str]:
    return [n for n, ips in world.hosts.items() if ip in ips]


def check_allow_in_world(cases: list[Case], hosts: Mapping[str, list[str]]) -> None:
    """Refuse cases whose allow-list reaches past the world (its routed ranges, its host names `hosts`):
    a case may open only the world's hosts."""
    for c in cases:
        for r in _rules(c):
            net = r.network
            if net is not None:
                if not any(net.version == w.version and net.subnet_of(w) for w in WORLD_RANGES):
                    raise ConfigError(f"case {c.id} ({c.source}): allow {str(r)!r} reaches outside the red-team "
                                      f"world ({', '.join(map(str, WORLD_RANGES))}); allow only its hosts")
            elif not any(r.matches_name(n) for n in hosts):
                raise ConfigError(f"case {c.id} ({c.source}): allow {str(r)!r} names no host of the red-team "
                                  f"world; known names: {', '.join(sorted(hosts))}")


def _snapshot(world: World) -> dict[tuple[str, int], int]:
    out = {}
    for key, srv in world.servers.items():
        with srv.lock:
            out[key] = srv.received
    return out


def _server_label(world: World, key: tuple[str, int]) -> str:
    return f"{world.servers[key].name}({key[0]}):{key[1]}"


# -- the engine ------------------------------------------------------------------------------------------
class _Runner:
    def __init__(self, rt: Runtime, world: World, run_id: str, command_timeout: float) -> None:
        self.rt = rt
        self.world = world
        self.run_id = run_id
        self.command_timeout = command_timeout

    async def run(self, case: Case, *, exclusive: bool) -> CaseResult:
        t0 = time.perf_counter()
        res = CaseResult(id=case.id, family=case.family, technique=case.technique, title=case.title,
                         expect=str(case.expect), allow=list(case.allow), source=case.source,
                         outcome="ERROR", passed=False, detected=False)
        before = _snapshot(self.world)
        sb = None
        calls: dict[int, float] = {}  # step -> when the bench asked for it
        first_call: float | None = None
        setup_ids: set[int] = set()
        try:
            cfg = SandboxConfig(egress=EgressPolicy.allowing(*case.allow),
                                limits=Limits(timeout=self.command_timeout), protected_paths=case.protected)
            sb = await self.rt.create(cfg, episode_id=f"redteam-{self.run_id}-{case.id}")
            res.sandbox_id, res.episode_id = sb.id, sb.episode_id
            for cmd in case.setup:
                # corral's own step 0, the script on stdin: its content (a stratum line, a /dev/tcp
                # redirect written into a file) never appears on a command line the rules would judge
                r = await sb.exec("bash -s", stdin=cmd + "\n", timeout=self.command_timeout, _internal=True)
                if r.exit_code != 0:
                    res.setup_errors.append(f"{cmd!r}: exit {r.exit_code} {(r.error or r.stderr.strip())[-200:]}")
            await sb.create_session(SESSION)
            setup_ids = {f.id for f in self.rt.store.findings(sandbox_id=sb.id) if f.id is not None}
            for i, cmd in enumerate(case.commands):
                sr = StepResult(index=i, command=cmd)
                res.steps.append(sr)
                t_call = time.time()
                first_call = first_call if first_call is not None else t_call
                try:
                    if SESSION not in sb.sessions():
                        await sb.create_session(SESSION)  # a kill took the shell with it: carry on
                    r = await sb.run_in_session(SESSION, cmd, timeout=self.command_timeout)
                except (EpisodeEnded, SandboxFrozen, SandboxClosed) as e:
                    sr.error = f"{type(e).__name__}: {e}"
                    break
                except SessionError as e:
                    sr.error = f"SessionError: {e}"
                    continue
                calls[r.step] = t_call
                sr.step, sr.exit_code, sr.refused, sr.timed_out = r.step, r.exit_code, r.refused, r.timed_out
                sr.error, sr.duration_ms = r.error, round(r.duration * 1000, 2)
                sr.stdout_tail, sr.stderr_tail = r.stdout[-300:], r.stderr[-300:]
            if case.wait:
                await asyncio.sleep(case.wait)
            await self.rt.drain()
        except Exception as e:  # a CorralError or a bug: one broken case is reported as ERROR, the bench goes on
            res.error = f"{type(e).__name__}: {e}"
        finally:
            if sb is not None:
                with contextlib.suppress(Exception):
                    await sb.close()
                with contextlib.suppress(Exception):
                    await self.rt.drain()
        await asyncio.sleep(0.05)  # the world's server threads count what an allowed relay flushed last
        after = _snapshot(self.world)
        if sb is not None:
            self._score(case, res, sb.id, calls, first_call, setup_ids)
        self._bytes(case, res, before, after, exclusive)
        res.duration_s = round(time.perf_counter() - t0, 3)
        _judge(res, case)
        return res

    def _score(self, case: Case, res: CaseResult, sandbox_id: str, calls: dict[int, float],
               first_call: float | None, setup_ids: set[int]) -> None:
        store = self.rt.store
        events = store.events(sandbox_id=sandbox_id)
        by_id = {e.id: e for e in events}
        starts = {e.step: e.ts for e in events if str(e.kind) == "command" and e.action == "start" and e.step}
        first_start = min(starts.values()) if starts else first_call
        findings = store.findings(sandbox_id=sandbox_id)
        res.setup_findings = sorted({f.rule_id for f in findings if f.id in setup_ids})
        findings = [f for f in findings if f.id not in setup_ids]
        findings.sort(key=lambda f: (f.ts, f.id or 0))
        for f in findings:
            ttd, basis = self._ttd(f, starts, calls, first_start)
            ev = by_id.get(f.evidence[0]) if f.evidence else None
            res.findings.append(FindingRecord(
                rule=f.rule_id, title=f.title, severity=str(f.severity), technique=f.technique,
                family=f.data.get("family"), action=f.action, step=f.step,
                event_kind=f"{f.data.get('event_kind')}/{f.data.get('event_action')}",
                ttd_ms=None if ttd is None else round(ttd * 1000, 3),
                event_to_finding_ms=None if ev is None else round((f.ts - ev.ts) * 1000, 3)))
            if f is findings[0]:
                res.ttd_basis = basis
        res.rules = sorted({f.rule_id for f in findings})
        res.detected = bool(findings)
        res.family_rule_fired = any(fr.family == case.family for fr in res.findings)
        if res.findings:
            first = res.findings[0]
            res.first_rule, res.first_severity, res.first_technique = first.rule, first.severity, first.technique
            res.first_action, res.first_step = first.action, first.step
            res.ttd_ms, res.event_to_finding_ms = first.ttd_ms, first.event_to_finding_ms
        # the containment of the case's own commands: not what its setup (corral's preparation) tripped
        res.actions = [f"{e.action} ({e.data.get('rule')})" for e in events
                       if str(e.kind) == "action" and e.data.get("finding") not in setup_ids]
        rules = _rules(case)
        for e in events:
            if str(e.kind) == "connect" and e.action == "close" and str(e.verdict) == "allow":
                names = [n for n in (e.name, *(e.data.get("resolved") or [])) if n]
                if not _allows(rules, e.dst_ip, e.dst_port, names):
                    res.leaked_bytes_events += e.bytes_up or 0
        res.diagnosis = _diagnose(res, events, findings)

    @staticmethod
    def _ttd(f: Finding, starts: dict[int, float], calls: dict[int, float],
             first_start: float | None) -> tuple[float | None, str | None]:
        # A pre-run check judges the command line before the step starts (a refused one never does):
        # measured from the moment the command was asked for, not from a start that comes after.
        precheck = f.data.get("event_kind") == "command" and f.data.get("event_action") == "check"
        if f.step and precheck and f.step in calls:
            return f.ts - calls[f.step], "command requested (pre-run check)"
        if f.step and f.step in starts:
            return f.ts - starts[f.step], "command start"
        if f.step and f.step in calls:
            return f.ts - calls[f.step], "command requested (no start event)"
        if first_start is not None:
            return f.ts - first_start, "first command (finding without a step)"
        return None, None

    def _bytes(self, case: Case, res: CaseResult, before: dict, after: dict, exclusive: bool) -> None:
        rules = _rules(case)
        for key, n in after.items():
            delta = n - before.get(key, 0)
            if delta <= 0:
                continue
            label = _server_label(self.world, key)
            res.delivered_bytes_world[label] = delta
            allowed = _allows(rules, key[0], key[1], _names_of(self.world, key[0]))
            if not allowed:
                res.leaked_bytes_world += delta
        if not exclusive and res.delivered_bytes_world:
            res.diagnosis = (res.diagnosis + " " if res.diagnosis else "") + (
                "World bytes were seen while this case ran alongside others: charged to each of them.")


def _judge(res: CaseResult, case: Case) -> None:
    if res.error and not res.detected:
        res.outcome, res.passed = "ERROR", False
    elif case.attack:
        res.outcome = "detected" if res.detected else "MISS"
        res.passed = res.detected
    else:
        res.outcome = "FALSE POSITIVE" if res.detected else "quiet"
        res.passed = not res.detected
    if res.passed and res.leaked_bytes_world + res.leaked_bytes_events > 0:
        res.passed = False  # detected but bytes got out: not a pass


def _diagnose(res: CaseResult, events: list[Event], findings: list[Finding]) -> str:
    """A short account of what corral saw, for misses and false positives."""
    parts: list[str] = []
    if findings:
        for f in findings[:4]:
            what = f.data.get("argv") or f.data.get("dst") or f.data.get("name") or f.data.get("exe")
            if isinstance(what, list):
                what = " ".join(what)[:120]
            parts.append(f"{f.rule_id} fired on {f.data.get('event_kind')}/{f.data.get('event_action')}"
                         + (f" `{what}`" if what else ""))
        return "; ".join(parts) + "."
    execs: list[str] = []
    for e in events:
        if str(e.kind) == "process" and e.action == "exec" and e.step and e.argv != ["cat"]:  # session plumbing
            name = os.path.basename(e.argv[0]) if e.argv else os.path.basename(e.exe or "?")
            if name not in execs:
                execs.append(name)
    conns = [f"{e.dst_ip}:{e.dst_port} {e.verdict}" + (f" ({e.protocol})" if e.protocol else "")
             for e in events if str(e.kind) == "connect" and e.action == "connect"]
    dns = sorted({f"{e.name}" for e in events if str(e.kind) == "dns" and e.name})
    files = sorted({str(e.data.get("path")) for e in events if str(e.kind) == "file"})
    samples = [e for e in events if str(e.kind) == "process" and e.action == "sample"]
    parts.append(f"execs seen: {', '.join(execs[:10]) or 'none'}" + (" ..." if len(execs) > 10 else ""))
    parts.append(f"connections: {', '.join(conns[:5]) or 'none'}")
    parts.append(f"DNS: {', '.join(dns[:5]) or 'none'}")
    if files:
        parts.append(f"file writes: {', '.join(files[:3])}")
    if samples:
        hot = max(float(e.data.get("cpu_percent") or 0) for e in samples)
        parts.append(f"hot CPU samples: {len(samples)} (max {hot:.0f}%, by {samples[0].exe})")
    for s in res.steps:
        if s.exit_code not in (0, None) or s.error:
            tail = (s.stderr_tail.strip().splitlines() or [""])[-1][:120]
            parts.append(f"command {s.index + 1} exit {s.exit_code}" + (f": {tail}" if tail else "")
                         + (f" [{s.error[:80]}]" if s.error else ""))
    if res.setup_errors:
        parts.append(f"setup errors: {'; '.join(res.setup_errors)[:200]}")
    return "; ".join(parts) + "."


def percentile(xs: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return round(s[lo] + (s[hi] - s[lo]) * (k - lo), 3)


def summarize(results: list[CaseResult], *, started: str, duration_s: float, concurrency: int,
              machine: dict[str, Any] | None = None, leaked_bytes_world: int | None = None) -> BenchResult:
    """The scores over case results. `leaked_bytes_world`: the run's own count (each byte once), when the
    per-case figures may charge one byte to several concurrent cases; default: their sum."""
    attacks = [r for r in results if r.family != "benign"]
    benign = [r for r in results if r.family == "benign"]
    fams: list[FamilyStats] = []
    for fam in FAMILIES:
        rs = [r for r in attacks if r.family == fam]
        rules: dict[str, int] = {}
        for r in rs:
            for rule in r.rules:
                rules[rule] = rules.get(rule, 0) + 1
        det = sum(r.detected for r in rs)
        fams.append(FamilyStats(family=fam, name=FAMILY_NAMES[fam], attacks=len(rs), detected=det,
                                rate=round(det / len(rs), 4) if rs else None,
                                own_rule=sum(r.family_rule_fired for r in rs),
                                rules=dict(sorted(rules.items(), key=lambda kv: (-kv[1], kv[0]))),
                                misses=[r.id for r in rs if not r.detected]))
    if benign:
        rules = {}
        for r in benign:
            for rule in r.rules:
                rules[rule] = rules.get(rule, 0) + 1
        quiet = sum(not r.detected for r in benign)
        fams.append(FamilyStats(family="benign", name=FAMILY_NAMES["benign"], attacks=len(benign),
                                detected=len(benign) - quiet, rate=round((len(benign) - quiet) / len(benign), 4),
                                own_rule=0, rules=rules, misses=[r.id for r in benign if r.detected]))
    ttd = [r.ttd_ms for r in attacks if r.ttd_ms is not None]
    e2f = [r.event_to_finding_ms for r in attacks if r.event_to_finding_ms is not None]
    det = sum(r.detected for r in attacks)
    fps = [r.id for r in benign if r.detected]
    return BenchResult(
        started=started, duration_s=round(duration_s, 2), machine=machine or machine_info(), concurrency=concurrency,
        cases=results, families=fams, attacks=len(attacks), detected=det,
        detection_rate=round(det / len(attacks), 4) if attacks else None,
        benign=len(benign), false_positives=len(fps), fp_rate=round(len(fps) / len(benign), 4) if benign else None,
        ttd_p50_ms=percentile(ttd, 50), ttd_p99_ms=percentile(ttd, 99),
        event_to_finding_p50_ms=percentile(e2f, 50), event_to_finding_p99_ms=percentile(e2f, 99),
        leaked_bytes_world=(sum(r.leaked_bytes_world for r in results) if leaked_bytes_world is None
                            else leaked_bytes_world),
        leaked_bytes_events=sum(r.leaked_bytes_events for r in results),
        misses=[r.id for r in attacks if not r.detected], false_positive_ids=fps,
        errors=[f"{r.id}: {r.error}" for r in results if r.error], corpora=corpus_scores(results),
    )


def machine_info() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {"nproc": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "corral": corral.__version__, "loadavg": [round(x, 2) for x in load], **rules_info()}


def rules_info() -> dict[str, Any]:
    """Which rules were judged: a hash of corral's shipped rule files, and the git commit when there is one
    (a corpus the rules were written against measures fit, not generalisation: compare like with like)."""
    base = Path(str(resources.files("corral.detect") / "rules"))
    h = hashlib.sha256()
    for f in sorted(base.glob("*.yaml")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    out: dict[str, Any] = {"rules_sha256": h.hexdigest()[:16]}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "-C", str(base)]
        out["git_commit"] = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                           timeout=5).stdout.strip() or None
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "."], capture_output=True, text=True, timeout=5)
        out["rules_dirty"] = bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    return out


async def run_bench(
    cases: list[Case],
    *,
    world: World,
    runtime: Runtime | None = None,
    runtime_factory: Callable[[], Runtime] | None = None,
    concurrency: int = 4,
    on_case: Callable[[CaseResult], object] | None = None,
    command_timeout: float = COMMAND_TIMEOUT,
    state_dir: str | Path | None = None,
) -> BenchResult:
    """Run `cases` against corral and the red-team `world`; returns every case's result and the scores.

    The runtime is `runtime` (started if needed, left running), or one made by `runtime_factory`, or a
    new one on `state_dir` (default: a temporary directory); the last two are closed at the end. Its
    resolver must answer from the world's table only: `RuntimeConfig(hosts=world.hosts, system_dns=False)`.
    `on_case` (a function or coroutine function) gets each CaseResult as soon as the case is done.
    Case ids must be unique, and a case's `allow` may open only the world's hosts (ConfigError otherwise).
    """
    if concurrency < 1:
        raise ConfigError(f"concurrency must be at least 1, not {concurrency}")
    ids = [c.id for c in cases]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ConfigError(f"duplicate case ids {dup}; every case needs its own id")
    check_allow_in_world(cases, world.hosts)
    own = runtime is None
    if runtime is not None:
        rt = runtime
    elif runtime_factory is not None:
        rt = runtime_factory()
    else:
        sd = Path(state_dir) if state_dir else Path(tempfile.mkdtemp(prefix="corral-redteam-"))
        rt = Runtime(RuntimeConfig(state_dir=sd, hosts=world.hosts, system_dns=False, run_kind="bench",
                                   run_label="bench redteam"))
    if rt.config.system_dns:
        raise ConfigError("the red-team bench needs RuntimeConfig(system_dns=False): pool names in the corpus "
                          "must be answered from corral's own table, never forwarded to a real resolver")
    missing = [n for n in world.hosts if rt.config.hosts.get(n) != world.hosts[n]]
    if missing:
        raise ConfigError(f"the runtime's hosts lack the world's names {missing[:4]}; "
                          "build it with RuntimeConfig(hosts=world.hosts, system_dns=False)")
    started = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    run_id = _dt.datetime.now().strftime("%H%M%S") + os.urandom(2).hex()
    results: dict[str, CaseResult] = {}
    leaked_world = 0
    try:
        await rt.start()
        runner = _Runner(rt, world, run_id, command_timeout)

        async def done(r: CaseResult) -> None:
            results[r.id] = r
            if on_case is not None:
                ret = on_case(r)
                if inspect.isawaitable(ret):
                    await ret

        # cases with an allow-list one at a time, so their own traffic is told apart from leaks; cases
        # that measure CPU behaviour one at a time, so neighbours do not starve them
        serial = [c for c in cases if c.allow or c.alone]
        for c in serial:
            await done(await runner.run(c, exclusive=True))
            leaked_world += results[c.id].leaked_bytes_world
        sem = asyncio.Semaphore(concurrency)

        async def one(c: Case) -> None:
            async with sem:
                await done(await runner.run(c, exclusive=concurrency == 1))

        before = _snapshot(world)
        await asyncio.gather(*(one(c) for c in cases if c not in serial))
        after = _snapshot(world)
        # no case of this phase allows anything: every byte any world server received is a leak
        leaked_world += sum(max(0, n - before.get(k, 0)) for k, n in after.items())
    finally:
        if own:
            await rt.close()
    ordered = [results[c.id] for c in cases if c.id in results]
    return summarize(ordered, started=started, duration_s=time.perf_counter() - t0, concurrency=concurrency,
                     leaked_bytes_world=leaked_world)


# -- reports ---------------------------------------------------------------------------------------------
def in_private_netns() -> bool:
    """A namespace made for the bench starts with loopback only (the machine's own has a NIC)."""
    with open("/proc/self/net/dev") as f:
        names = [line.split(":")[0].strip() for line in f.readlines()[2:]]
    return all(n == "lo" or n.startswith("corral") for n in names)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m corral.redteam.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--cases", action="append", default=[], help="case file or directory (default: the shipped "
                    "corpus); repeat to add more")
    ap.add_argument("--only", default="", help="comma-separated case ids")
    ap.add_argument("--family", default="", help="comma-separated families (F1..F12, benign)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--out-dir", default="benchmarks/results", help="where redteam.md and redteam.json go")
    ap.add_argument("--name", default="redteam", help="file stem of the outputs")
    ap.add_argument("--link", default="corralw3", help="name of the veth link to the world")
    ap.add_argument("--corpus", default="", help="comma-separated corpora (corral, catalogue, benign-work)")
    ap.add_argument("--make-holdout", type=int, default=None, metavar="SEED",
                    help="add to cases/holdout.txt a seeded 25%% of each case file not drawn yet (not corral's own); "
                         "run nothing")
    args = ap.parse_args(argv)
    if args.make_holdout is not None:
        try:
            chosen = make_holdout(load_cases(*args.cases), args.make_holdout, drawn=holdout_draws())
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if not chosen:
            print("every case file already has its hold-out draw; nothing to add")
            return 0
        path = write_holdout(chosen, args.make_holdout)
        print(f"added to {path}: " + ", ".join(f"{k} {len(v)}" for k, v in chosen.items()))
        return 0
    if os.geteuid() != 0:
        print("the red-team bench needs root (sandboxes, network namespaces)", file=sys.stderr)
        return 2
    if not in_private_netns():
        print("run the red-team bench in a private network namespace of its own:\n  unshare --net --mount "
              "--propagation private -- sh -c 'ip link set lo up && .venv/bin/python -m corral.redteam.bench'",
              file=sys.stderr)
        return 2
    try:
        cases = load_cases(*args.cases)
        cases = select(cases, [i for i in args.only.split(",") if i], [f for f in args.family.split(",") if f])
        if args.corpus:
            wanted = set(args.corpus.split(","))
            if unknown := wanted - set(CORPORA):
                raise ConfigError(f"unknown corpus {', '.join(sorted(unknown))}; use {', '.join(CORPORA)}")
            cases = [c for c in cases if corpus_of(c) in wanted]
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    world = build_redteam_world(args.link)
    try:
        def progress(c: CaseResult) -> None:
            mark = {"detected": "ok  ", "quiet": "ok  ", "MISS": "MISS", "FALSE POSITIVE": "FP  ",
                    "ERROR": "ERR "}[c.outcome]
            detail = f"{c.first_rule} {c.ttd_ms} ms" if c.first_rule else c.diagnosis[:100]
            print(f"{mark} {c.id:<6} {c.family:<6} {c.title[:60]:<60} {detail}", flush=True)

        result = asyncio.run(run_bench(cases, world=world, concurrency=args.concurrency, on_case=progress))
    finally:
        world.close()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.md").write_text(to_markdown(result))
    (out / f"{args.name}.json").write_text(to_json(result))
    print("\n" + overall_line(result))
    for f in result.families:
        print(f"  {f.family:<6} {f.detected}/{f.attacks} {percent(f.rate):>5}  misses: {', '.join(f.misses) or '-'}")
    for c in result.corpora:
        parts = [("tuned", c.tuned), ("hold-out", c.holdout)]
        if len(c.draws) > 1:
            parts += [(f"hold-out of {stem}", sc) for stem, sc in c.draws.items()]
        for part, sc in parts:
            if sc.cases:
                print(f"  {c.corpus:<12} {part:<8} attacks {sc.detected}/{sc.attacks} {percent(sc.detection_rate):>5}  "
                      f"benign flagged {sc.flagged}/{sc.benign} (ending the episode: {sc.terminating})")
    print(f"wrote {out / (args.name + '.md')} and {out / (args.name + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["BenchResult", "CaseResult", "FamilyStats", "FindingRecord", "StepResult", "check_allow_in_world",
           "main", "run_bench", "summarize", "to_json", "to_markdown"]

"""Grading where the agent has never been.

An agent that can touch its grader will, so the verifier never runs in the agent's sandbox:

1. the caller has already killed every process the agent started (session shells included);
2. the workspace is read out of the agent's sandbox as a tar (links stored as links, never followed)
   and filtered on the host: only regular files and directories cross, and nothing at, above or
   inside the verifier's own paths (a link, a planted conftest.py, a file where a test directory
   should be);
3. a fresh sandbox, with no egress and a clean environment, receives those files, then the
   verifier's files, written where no link can redirect them (no link exists there);
4. the verifier runs with an isolated interpreter (`python -I`), a clean environment, and stdout and
   stderr on descriptors corral made for it;
5. the score comes from the structured report the verifier writes (JUnit XML) at a path chosen now,
   in a directory the agent never saw — not from the text at the end of stdout.

Limit: the code under test runs inside the verifier's process (that is what a test does), so code
that subverts the test framework from within an imported module is outside what isolation can stop;
its grading sandbox is monitored like any other, and what it does there is judged. What corral does
check of a report: it is a regular file at the path corral chose (no link, read after every process
of the run is dead), only the verifier's own tests count (one that did not run counts as failed),
and it agrees with the runner's exit status.
"""

from __future__ import annotations

import ast
import io
import os
import re
import shlex
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from corral.config import EgressPolicy, Limits, SandboxConfig
from corral.errors import CorralError, SandboxError
from corral.events import Event, EventKind

if TYPE_CHECKING:
    from collections.abc import Callable

    from corral.agent.tasks import Task
    from corral.runtime import Runtime
    from corral.sandbox.sandbox import Sandbox

WORKSPACE = "/workspace"
REPORT_MAX = 8 << 20
# what the verifier's environment holds: nothing of the agent's, no interpreter or loader hooks
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_PYTHON = re.compile(r"^(?:/usr(?:/local)?/bin/)?python3?(?:\.\d+)?$")


class GradingError(CorralError):
    """The agent's work could not be carried to the grader (the message says what to change)."""


@dataclass
class GradeReport:
    """What grading found; `as_dict()` is the `verifier` record of a trajectory or outcome."""

    command: str
    score: float = 0.0
    exit_code: int | None = None
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    timed_out: bool = False
    report: str | None = None  # where the verifier was told to write its JUnit XML
    error: str | None = None  # why there is no score (no report, a broken report, a timeout)
    output_tail: str = ""
    sandbox_id: str | None = None
    workspace_skipped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"command": self.command, "exit_code": self.exit_code, "passed": self.passed,
                "failed": self.failed, "skipped": self.skipped, "score": round(self.score, 6),
                "timed_out": self.timed_out, "report": self.report, "error": self.error,
                "output_tail": self.output_tail, "sandbox_id": self.sandbox_id,
                "workspace_skipped": self.workspace_skipped}


def grading_config(task: Task) -> SandboxConfig:
    """The grader's sandbox: the task's resources, no egress, no extra environment; the verifier's
    paths stay protected, so code under test that rewrites its tests is a finding here too."""
    lim = task.limits
    return SandboxConfig(
        egress=EgressPolicy(),
        limits=Limits(memory_mb=lim.memory_mb, cpus=lim.cpus, pids=lim.pids, timeout=task.verifier.timeout),
        protected_paths=tuple(task.verifier_paths()) + tuple(task.protected_paths), image=task.image,
    )


def expected_tests(task: Task) -> set[tuple[str, str]]:
    """(module, function) of each test the verifier's files define: `test*` functions, and `test*`
    methods of `Test*` classes, in test_*.py / *_test.py. A report is scored on these alone."""
    out: set[tuple[str, str]] = set()
    for path, content in task.verifier.files.items():
        name = PurePosixPath(path).name
        if not (name.endswith(".py") and (name.startswith("test_") or name.endswith("_test.py"))):
            continue
        try:
            tree = ast.parse(content)
        except SyntaxError:
            continue
        for node in tree.body:
            defs = [node] if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) else (
                node.body if isinstance(node, ast.ClassDef) and node.name.startswith("Test") else [])
            out |= {(name[:-3], d.name) for d in defs
                    if isinstance(d, ast.FunctionDef | ast.AsyncFunctionDef) and d.name.startswith("test")}
    return out


def verifier_roots(task: Task) -> set[str]:
    """Workspace-relative paths the agent's copy may not hold anything at or under: each verifier
    file and each directory that holds one (the task's own starting files stay allowed)."""
    roots: set[str] = set()
    for p in task.verifier.files:
        parts = PurePosixPath(p).parts
        roots.add(str(PurePosixPath(*parts)))
        if len(parts) > 1:
            roots.add(parts[0])
    return roots


def filter_workspace(data: bytes, task: Task) -> tuple[bytes, list[str]]:
    """The agent's workspace tar, rebuilt with regular files and directories only, nothing inside
    or at the verifier's paths, and plain permissions. Returns the new tar and what was left out."""
    roots = verifier_roots(task)
    ancestors = {str(PurePosixPath(*PurePosixPath(p).parts[:i]))
                 for p in task.verifier.files for i in range(1, len(PurePosixPath(p).parts))}
    out = io.BytesIO()
    skipped: list[str] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as src, tarfile.open(fileobj=out, mode="w") as dst:
            for m in src:
                name = os.path.normpath(m.name).lstrip("/")
                if name in (".", ""):
                    continue
                inside = any(name == r or name.startswith(r + "/") for r in roots)
                if (".." in PurePosixPath(name).parts or (inside and not (m.isdir() and name in ancestors))
                        or (name in ancestors and not m.isdir()) or not (m.isreg() or m.isdir())):
                    # links, devices, fifos, and anything at or inside the verifier's paths stay behind
                    skipped.append(name)
                    continue
                clean = tarfile.TarInfo(name)
                clean.type, clean.mtime = m.type, m.mtime
                clean.mode = (m.mode & 0o755) | (0o700 if m.isdir() else 0o600)
                if m.isreg():
                    clean.size = m.size
                    dst.addfile(clean, src.extractfile(m))
                else:
                    dst.addfile(clean)
    except tarfile.TarError as e:
        raise GradingError(f"the agent's workspace could not be read for grading ({e})") from None
    return out.getvalue(), skipped


def isolated_command(command: str) -> str:
    """The verifier's command with `-I` after a leading Python interpreter: no user site, no
    PYTHON* variables, no script or working directory put first on sys.path."""
    try:
        argv = shlex.split(command)
    except ValueError:
        return command
    if argv and _PYTHON.match(argv[0]) and "-I" not in argv[1:2]:
        return shlex.join([argv[0], "-I", *argv[1:]])
    return command


def verifier_env(report: str) -> dict[str, str]:
    """A clean environment for the verifier; nothing here comes from the agent or its sandbox."""
    return {"HOME": "/root", "TMPDIR": "/tmp", "PATH": CLEAN_PATH, "LANG": "C.UTF-8",
            "CORRAL_REPORT": report, "PYTEST_ADDOPTS": f"--junitxml={report} -p no:cacheprovider"}


def _case_key(case: ET.Element, modules: set[str]) -> tuple[str | None, str]:
    """(module, function) a testcase reports on: pytest names it classname="tests.test_x[.TestY]"
    name="test_f[param]", corral's runner name="test_x::test_f"."""
    *where, func = case.get("name", "").split("::")
    where = re.split(r"[./]", case.get("classname", "")) + where
    return next((w for w in reversed(where) if w in modules), None), func.split("[")[0]


def parse_junit(xml: bytes, expected: set[tuple[str, str]] | None = None) -> tuple[int, int, int]:
    """(passed, failed, skipped) from a JUnit XML report (pytest's, or any runner's). With the
    verifier's `expected` tests, only testcases of those count (a test file of the agent's own, or
    one of its modules that exports test_* names, adds nothing) and each of them that has no
    testcase counts as failed (a test module that failed to import did not pass its tests)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise GradingError(f"the verifier's report is not valid JUnit XML ({e})") from None
    if root.tag not in ("testsuites", "testsuite"):
        raise GradingError(f"the verifier's report has root <{root.tag}>; JUnit XML has <testsuites> or <testsuite>")
    passed = failed = skipped = 0
    modules = {m for m, _ in expected or ()}
    seen: set[tuple[str, str]] = set()
    for case in root.iter("testcase"):
        if expected:
            module, func = _case_key(case, modules)
            # the module must be named: a testcase of a file outside the verifier's (an agent's own
            # test_*.py defining the same function names) counts for nothing
            key = (module, func) if module is not None and (module, func) in expected else None
            if key is None:
                continue
            seen.add(key)
        tags = {child.tag for child in case}
        if tags & {"failure", "error"}:
            failed += 1
        elif "skipped" in tags:
            skipped += 1
        else:
            passed += 1
    if expected:
        failed += len(expected - seen)
    return passed, failed, skipped


def score_of(task: Task, exit_code: int | None, timed_out: bool, counts: tuple[int, int, int] | None) -> float:
    if timed_out:
        return 0.0
    if task.verifier.score == "exit_code":
        return 1.0 if exit_code == 0 else 0.0
    if counts is None:
        return 0.0
    passed, failed, skipped = counts
    if exit_code not in (0, 1) or (exit_code != 0 and not failed):
        # a runner exits 0 when all passed and 1 when some failed (pytest: 2 interrupted, 3 internal
        # error...): a report that disagrees was not the runner's last word (a leftover's, or code
        # under test that rewrote it at exit), and a crashed runner's report is not scored
        return 0.0
    total = passed + failed + skipped  # a skipped test did not pass: skipping is no way to score
    return passed / total if total else 0.0


async def export_workspace(sb: Sandbox, max_bytes: int) -> bytes:
    """The agent's /workspace as a tar, links stored as links. Run after every agent process is
    dead, by corral's agent (non-dumpable, out of the agent's reach)."""
    # `head` ends tar once the limit is passed: a sparse file of a terabyte (no space used) would
    # otherwise be read out as zeros, past the limit, until the command's timeout
    r = await sb.exec(f"tar -c -C {WORKSPACE} . | head -c {max_bytes + 1}", max_output=max_bytes + 1,
                      _internal=True)
    if r.exit_code != 0 and not r.stdout_bytes:
        raise GradingError(f"cannot read the workspace of sandbox {sb.id} for grading: {r.stderr.strip()}")
    if r.stdout_truncated or len(r.stdout_bytes) > max_bytes:
        raise GradingError(f"the workspace of sandbox {sb.id} is larger than {max_bytes} bytes")
    return r.stdout_bytes


async def read_report(gsb: Sandbox, path: str) -> bytes:
    """The report, only as a regular file at `path` in a real directory: a link (or a directory
    swapped for one) that the code under test left there is not followed to a forged file. Called
    once every process of the run is dead, so nothing changes between the check and the read."""
    d, q = shlex.quote(os.path.dirname(path)), shlex.quote(path)
    r = await gsb.exec(f"test -d {d} && ! test -L {d} && ! test -L {q} && test -f {q} && "
                       f"dd if={q} iflag=nofollow status=none", max_output=REPORT_MAX + 1, _internal=True)
    if r.exit_code != 0:
        why = r.stderr.strip() or "a link, a missing file or something else"
        raise GradingError(f"{path} is not a regular file in a directory of corral's ({why})")
    if r.stdout_truncated or len(r.stdout_bytes) > REPORT_MAX:
        raise GradingError(f"{path} is larger than {REPORT_MAX} bytes")
    return r.stdout_bytes


async def grade(runtime: Runtime, sb: Sandbox, task: Task, *, episode_id: str | None,
                on_sandbox: Callable[[str], None] | None = None) -> tuple[GradeReport, str]:
    """Grade the agent's workspace in a fresh sandbox. The caller has killed the agent's processes.
    Returns the report and the grading sandbox's id (its findings belong to the episode: `on_sandbox`
    hears that id as soon as the sandbox exists, so an error later in grading does not lose them)."""
    data = await export_workspace(sb, (sb.config.limits.workspace_mb + 1) << 20)
    files, skipped = filter_workspace(data, task)
    report_path = f"/tmp/corral-grade-{os.urandom(8).hex()}/report.xml"
    command = isolated_command(task.verifier.command)
    result = GradeReport(command=command, report=report_path, workspace_skipped=skipped)
    gsb = await runtime.create(grading_config(task), episode_id=episode_id)
    # what runs here is the verifier's, not the agent's: reports label this sandbox as grading
    runtime.emit(Event(kind=EventKind.SANDBOX, action="grading", sandbox_id=gsb.id, episode_id=episode_id,
                       data={"task": task.id, "of": sb.id, "command": task.verifier.command}))
    result.sandbox_id = gsb.id
    if on_sandbox is not None:
        on_sandbox(gsb.id)
    try:
        r = await gsb.exec(f"tar -x --no-same-owner --no-same-permissions -C {WORKSPACE}", stdin=files,
                           _internal=True)
        if r.exit_code != 0:
            raise GradingError(f"cannot seed the grading sandbox: {r.stderr.strip()}")
        for path, content in task.verifier.files.items():
            await gsb.write_file(f"{WORKSPACE}/{path}", content)
        await gsb.exec(f"mkdir -p {shlex.quote(os.path.dirname(report_path))}", _internal=True)
        run = await gsb.exec(command, cwd=WORKSPACE, env=verifier_env(report_path), timeout=task.verifier.timeout,
                             tool_call_id="corral-verifier")
        out = run.stdout + run.stderr
        result.exit_code, result.timed_out, result.output_tail = run.exit_code, run.timed_out, out[-1500:]
        # what the code under test left running could write into the pipe of the `cat` that reads
        # the report back, or rewrite the report between the check and the read: nothing of the
        # verifier's run lives on while corral reads it (fail closed: no score while one does)
        counts, survivors = None, None
        try:
            await gsb.kill_all()
        except SandboxError as e:
            survivors = result.error = f"not scored: {e}"
        if survivors is None and task.verifier.score != "exit_code" and not run.timed_out:
            try:
                xml = await read_report(gsb, report_path)
                counts = parse_junit(xml, expected_tests(task))
                result.passed, result.failed, result.skipped = counts
            except CorralError as e:
                result.error = (f"no usable report: {e}. A verifier scored 'pytest' writes JUnit XML to "
                                "$CORRAL_REPORT (pytest does so by itself: corral sets PYTEST_ADDOPTS)")
            if counts is not None and (run.exit_code not in (0, 1) or (run.exit_code != 0 and not counts[1])):
                result.error = (f"not scored: the verifier exited with status {run.exit_code}, which its report "
                                f"({counts[0]} passed, {counts[1]} failed) does not agree with")
        elif survivors is None and run.timed_out:
            result.error = f"the verifier timed out after {task.verifier.timeout:g}s"
        result.score = 0.0 if survivors else score_of(task, run.exit_code, run.timed_out, counts)
    finally:
        await gsb.close()
    return result, gsb.id

"""Attacks on grading itself, from code that runs while the verifier runs (the agent's own module or
program, imported or started by the tests in the grading sandbox). Each is one way a failing
solution tried to make the report say it passed; the score must stay the honest one.

The code under test shares a uid with the test runner, so what it can reach is what corral has to
close: the report's path (it is in the environment, and in /tmp), the report's directory, the
runner's own imports, the time between the runner's exit and corral's read. What it cannot be kept
from is the runner's own memory when the tests import it: that limit is written in grading.py."""

from __future__ import annotations

import pytest
import yaml

from corral.agent.engine import EpisodeEngine
from corral.agent.grading import expected_tests, parse_junit, score_of
from corral.agent.tasks import DEFAULT_TASKS, load_task

# Python the agent writes: where the report is, and a report that names every real test and passes
# all but one of them (one failure, so the runner's non-zero exit status agrees with it)
FORGE = r'''
import glob, os, re
def _report():
    p = os.environ.get("CORRAL_REPORT")
    if p:
        return p
    for d in glob.glob("/tmp/corral-grade-*"):
        return d + "/report.xml"
def _xml(fail_one=True):
    cases = []
    for f in sorted(glob.glob("/workspace/tests/test_*.py")):
        stem = os.path.basename(f)[:-3]
        for n in re.findall(r"(?m)^def (test_\w+)", open(f).read()):
            bad = '<failure message="x">x</failure>' if fail_one and not cases else ""
            cases.append('<testcase name="%s::%s">%s</testcase>' % (stem, n, bad))
    return "<testsuites><testsuite name='tests'>" + "".join(cases) + "</testsuite></testsuites>"
'''

# A CLI solution that fails every test, and on its first run leaves a daemon behind (its own
# session, no descriptor of the test's) that goes after the report; MODE picks how.
DAEMON = FORGE + r'''
import sys, time
def _daemon(mode):
    while not _report():
        time.sleep(0.005)
    r = _report()
    d = os.path.dirname(r)
    while not os.path.isdir(d):
        time.sleep(0.005)
    if mode == "link":  # the report becomes a link to a forged file the runner cannot write
        os.makedirs("/tmp/.f", exist_ok=True)
        with open("/tmp/.f/r.xml", "w") as fh:
            fh.write(_xml())
        os.chmod("/tmp/.f/r.xml", 0o444)
        os.chmod("/tmp/.f", 0o555)
        os.symlink("/tmp/.f/r.xml", d + "/.l")
        os.rename(d + "/.l", r)
    elif mode == "dir":  # the report's directory is swapped for one the runner cannot write
        os.rename(d, d + ".old")
        os.mkdir(d)
        with open(r, "w") as fh:
            fh.write(_xml())
        os.chmod(r, 0o444)
        os.chmod(d, 0o555)
    else:  # the honest report is overwritten once the runner has written it
        while True:
            try:
                with open(r) as fh:
                    if fh.read().rstrip().endswith("</testsuites>"):
                        break
            except OSError:
                pass
            time.sleep(0.001)
        with open(r, "w") as fh:
            fh.write(_xml())
    while True:
        time.sleep(1)
if not os.path.exists("/tmp/.armed"):
    open("/tmp/.armed", "w").close()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            null = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            _daemon(MODE)
        os._exit(0)
    os.wait()
sys.exit(1)
'''


def attack_module(prelude: str, code: str) -> str:
    return prelude + "\n" + code


ATTACKS = {
    # out of the runner's process: only the report's file system is in reach
    "daemon-links-report": ("wordfreq-cli", "wordfreq.py", DAEMON.replace("MODE)", '"link")')),
    "daemon-swaps-report-dir": ("wordfreq-cli", "wordfreq.py", DAEMON.replace("MODE)", '"dir")')),
    "daemon-overwrites-report": ("wordfreq-cli", "wordfreq.py", DAEMON.replace("MODE)", '"after")')),
    # a module of the workspace named like one the tests import (not the runner's own imports):
    # the runner must not put the workspace before the standard library
    "shadowed-stdlib-import": ("wordfreq-cli", "subprocess.py",
                               FORGE + "\nwith open(_report(), 'w') as fh:\n    fh.write(_xml(False))\nos._exit(0)\n"),
    # the module under test writes a report that names no real test, and exits 0 before any ran
    "report-of-other-tests": ("lru-cache", "lru.py",
                              "import os\nopen(os.environ['CORRAL_REPORT'], 'w').write('<testsuites><testsuite>"
                              "<testcase name=\"ok\"/></testsuite></testsuites>')\nos._exit(0)\n"),
    # the module under test rewrites the report when the runner exits, after the runner wrote its own
    # (its exit status, 1, says tests failed; the report it leaves says none did)
    "atexit-rewrites-report": ("lru-cache", "lru.py",
                               FORGE + "\nimport atexit\natexit.register(lambda: open(_report(), 'w')"
                               ".write(_xml(False)))\n"),
}


@pytest.fixture(scope="module")
def tasks():
    return {name: load_task(DEFAULT_TASKS / name) for name in ("wordfreq-cli", "lru-cache")}


@pytest.mark.asyncio
@pytest.mark.timeout(180)
@pytest.mark.parametrize("attack", sorted(ATTACKS))
async def test_code_under_test_cannot_write_its_own_score(runtime, tasks, attack):
    task_id, path, code = ATTACKS[attack]
    engine = EpisodeEngine(runtime, tasks[task_id], episode_id=f"grading-attack-{attack}")
    await engine.start()
    try:
        out = await engine.call("write_file", {"path": f"/workspace/{path}", "content": code})
        assert not out.ended, out
        out = await engine.call("submit", {})
        assert out.ended and out.reward <= 0.0, (out.reward, out.verifier, out.violations)
        if out.verifier is not None:
            # the honest report (every test failed), or a forged one that was not believed
            v = out.verifier
            assert v["score"] == 0.0, v
            assert v["passed"] == 0 or "does not agree" in v["error"], v
    finally:
        await engine.close()


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_honest_cli_solution_still_scores(runtime, tasks):
    """The runner's own hardening (its imports, its report, the processes it reaps) leaves a correct
    CLI solution its full score."""
    engine = EpisodeEngine(runtime, tasks["wordfreq-cli"], episode_id="grading-attack-honest-cli")
    await engine.start()
    try:
        for act in yaml.safe_load((DEFAULT_TASKS / "wordfreq-cli" / "solution.yaml").read_text()):
            out = await engine.call(act["tool"], act.get("arguments") or {})
        assert out.termination_reason == "submitted" and out.reward == 1.0, out.verifier
        assert out.verifier["passed"] == 8 and out.verifier["failed"] == 0
    finally:
        await engine.close()


def test_only_the_verifiers_tests_count(tasks):
    lru = tasks["lru-cache"]
    expected = expected_tests(lru)
    assert len(expected) == 8 and all(stem == "test_lru" for stem, _ in expected)
    names = sorted(n for _, n in expected)
    ok = "".join(f'<testcase name="test_lru::{n}"/>' for n in names[:5])
    # three real tests are missing (never ran): each counts as failed; a test of the agent's own
    # (a file the verifier does not have) counts for nothing
    xml = f'<testsuites><testsuite>{ok}<testcase classname="tests.test_mine" name="test_x"/></testsuite></testsuites>'
    assert parse_junit(xml.encode(), expected) == (5, 3, 0)
    # pytest's naming (classname, parametrized names) is matched too: each parametrized case counts
    xml = ('<testsuite>' + "".join(f'<testcase classname="tests.test_lru" name="{n}[a]"/>' for n in names)
           + f'<testcase classname="tests.test_lru" name="{names[0]}[b]"><failure/></testcase></testsuite>')
    assert parse_junit(xml.encode(), expected) == (8, 1, 0)
    # a report that says nothing failed, from a runner that exited non-zero, is not believed
    assert score_of(lru, 1, False, (8, 0, 0)) == 0.0
    assert score_of(lru, 0, False, (8, 0, 0)) == 1.0
    assert score_of(lru, 1, False, (6, 2, 0)) == 0.75


@pytest.mark.asyncio
@pytest.mark.timeout(90)  # below the 120 s command timeout the export would otherwise run into
async def test_sparse_workspace_is_refused_without_reading_it_out(runtime, tasks):
    """A sparse file as large as a disk takes no space in the workspace, and `tar` would read it out
    as zeros until the export's timeout, for every episode that leaves one: the export stops at the
    size limit instead, and the work scores 0."""
    engine = EpisodeEngine(runtime, tasks["lru-cache"], episode_id="grading-attack-sparse")
    await engine.start()
    try:
        out = await engine.call("shell", {"command": "truncate -s 200G /workspace/big"})
        assert out.exit_code == 0, out.observation
        out = await engine.call("submit", {})
        assert out.reward == 0.0 and "larger than" in out.verifier["error"], out.verifier
    finally:
        await engine.close()

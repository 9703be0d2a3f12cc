"""A tiny test runner (standard library only): imports tests/test_*.py and runs their test_*
functions. Prints a traceback for each failure, then one final line: `N passed, M failed`.
Exits 0 only when every test passed. Run from the workspace: python3 tests/run.py

When $CORRAL_REPORT names a file, the results are also written there as JUnit XML: corral scores
that report, never the printed summary (which the code under test could print itself).

The code under test shares this runner's uid, so the report is kept from what it can reach outside
this process: the path leaves the environment before any test runs (programs the tests start do
not inherit it), this process is not dumpable (no /proc/<pid>/environ, fd or mem for them), and
before the report is written every process the tests left behind is killed (this runner is their
subreaper) and whatever they did to the report's path is undone. Code that the tests import runs in
this process and can do anything it can: that limit is corral's (see corral.agent.grading)."""

import contextlib
import ctypes
import importlib.util
import os
import shutil
import signal
import stat
import sys
import time
import traceback
from xml.etree import ElementTree as ET

PER_TEST_SECONDS = 30


def _timeout(signum, frame):
    raise TimeoutError(f"test took longer than {PER_TEST_SECONDS}s")


def main() -> int:
    sys.dont_write_bytecode = True
    report = os.environ.pop("CORRAL_REPORT", None)
    os.environ.pop("PYTEST_ADDOPTS", None)  # it names the report too
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: a daemonized leftover is still ours to kill
    here = os.path.dirname(os.path.abspath(__file__))
    # the workspace goes after the standard library (its json.py or subprocess.py is not what a test
    # means by `import json`, and would run the code under test inside this runner) but before
    # installed packages (a solution's roman.py is the one the tests mean, whatever the host has)
    site = [i for i, p in enumerate(sys.path) if p.endswith(("site-packages", "dist-packages"))]
    sys.path.insert(site[0] if site else len(sys.path), os.getcwd())
    sys.path.insert(0, here)
    signal.signal(signal.SIGALRM, _timeout)
    passed = failed = 0
    cases = []  # (name, failure text or None)
    for fname in sorted(os.listdir(here)):
        if not (fname.startswith("test_") and fname.endswith(".py")):
            continue
        name = fname[:-3]
        try:
            spec = importlib.util.spec_from_file_location(name, os.path.join(here, fname))
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
        except BaseException:
            failed += 1
            cases.append((name, traceback.format_exc()))
            print(f"ERROR {fname}: cannot import\n{cases[-1][1]}")
            continue
        for attr in sorted(vars(mod)):
            fn = getattr(mod, attr)
            if not (attr.startswith("test_") and callable(fn)):
                continue
            signal.alarm(PER_TEST_SECONDS)
            try:
                fn()
            except BaseException:
                failed += 1
                cases.append((f"{name}::{attr}", traceback.format_exc()))
                print(f"FAIL {name}::{attr}\n{cases[-1][1]}")
            else:
                passed += 1
                cases.append((f"{name}::{attr}", None))
                print(f"ok   {name}::{attr}")
            finally:
                signal.alarm(0)
    print(f"{passed} passed, {failed} failed")
    if report:
        _kill_leftovers()
        _write_junit(report, cases)
    return 0 if failed == 0 and passed > 0 else 1


def _descendants():
    """Live processes below this one (zombies cannot act; they only lead to their children)."""
    parent, state = {}, {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            state[int(name)], parent[int(name)] = fields[0], int(fields[1])
    found, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier and p not in found}
        found |= frontier
    return {p for p in found if state[p] != "Z"}


def _kill_leftovers():
    """SIGKILL every process the tests left behind, so none can touch the report once written.
    Fails (no report, exit 1) rather than write one while something of theirs still runs."""
    for _ in range(500):
        left = _descendants()
        if not left:
            return
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        while True:  # reap them: a zombie child of ours would otherwise stay listed
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        time.sleep(0.01)
    raise RuntimeError(f"processes the tests started survived SIGKILL: {sorted(_descendants())[:8]}")


def _fresh_path(path):
    """Undo what a leftover did to the report's path: a link or a read-only directory in its place,
    a forged or read-only report, a directory where the file goes. Nothing is there afterwards, so
    a write that fails below leaves no report at all, never someone else's."""
    d = os.path.dirname(path)
    try:
        st = os.lstat(d)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISDIR(st.st_mode):
        os.unlink(d)
        st = None
    if st is None:
        os.mkdir(d, 0o700)
    os.chmod(d, 0o700)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _write_junit(path, cases):
    suite = ET.Element("testsuite", name="tests", tests=str(len(cases)),
                       failures=str(sum(1 for _, err in cases if err is not None)))
    for name, err in cases:
        case = ET.SubElement(suite, "testcase", name=name)
        if err is not None:
            ET.SubElement(case, "failure", message=err.strip().splitlines()[-1][:200]).text = err
    root = ET.Element("testsuites")
    root.append(suite)
    _fresh_path(path)
    tmp = os.path.join(os.path.dirname(path), f".report-{os.getpid()}.xml")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "wb") as f:
        ET.ElementTree(root).write(f, encoding="utf-8", xml_declaration=True)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())

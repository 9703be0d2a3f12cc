"""Where curl and wget write, read from their argv as the exec watcher sees it. The behaviour in a
real sandbox (download in one step, run in a later one) is tested in test_detection.py."""

from __future__ import annotations

import os
import time

import pytest

from corral.events import Event, EventKind
from corral.monitor.provenance import (
    SLACK_S,
    Downloads,
    curl_outputs,
    fetched_origin,
    program_of,
    script_arg,
    wget_outputs,
)

URL = "http://pkg.example.com/files/tool.sh"


@pytest.mark.parametrize(("argv", "files", "stdout"), [
    (["curl", URL], [], True),
    (["curl", "-o", "/tmp/t", URL], ["/tmp/t"], False),
    (["curl", "-sSLo", "t", URL], ["t"], False),
    (["curl", "-ot", URL], ["t"], False),
    (["curl", "--output=t", URL], ["t"], False),
    (["curl", "--output", "t", URL], ["t"], False),
    (["curl", "-O", URL], ["tool.sh"], False),
    (["curl", "-sLO", "--output-dir", "/opt", URL], ["/opt/tool.sh"], False),
    (["curl", "-H", "X-Key: 1", "-A", "agent", "-o", "t", URL], ["t"], False),  # values are not URLs
    (["curl", "-o", "a", URL, "-o", "-", URL], ["a"], True),
    (["curl", "-m", "3", "-o", "x", "--", URL], ["x"], False),
    (["curl", "--retry-delay", "5", "--write-out", "%{http_code}", "-O", URL], ["tool.sh"], False),
    (["curl", "--url=" + URL, "-o", "t"], ["t"], False),
    (["curl", "-O", URL, "-o", "y", "http://h/b"], ["tool.sh", "y"], False),  # paired in order
    (["curl", "--remote-name-all", URL, "http://h/b"], ["tool.sh", "b"], False),
])
def test_curl_outputs(argv, files, stdout):
    assert curl_outputs(argv) == (files, stdout)


@pytest.mark.parametrize(("argv", "files", "stdout"), [
    (["wget", URL], ["tool.sh"], False),
    (["wget", "-q", "-O", "/tmp/t", URL], ["/tmp/t"], False),
    (["wget", "-qO-", URL], [], True),
    (["wget", "--output-document=t", URL], ["t"], False),
    (["wget", "-P", "/opt", "-o", "log.txt", URL], ["/opt/tool.sh"], False),  # -o is wget's log, not output
    (["wget", "-nv", "http://pkg.example.com/"], ["index.html"], False),
    (["wget", "-T", "3", "-t", "2", URL], ["tool.sh"], False),
    (["wget", "--tries", "3", "--user-agent", "x", URL], ["tool.sh"], False),
    (["wget", "http://[::1"], [], False),  # malformed: nothing, and no error
])
def test_wget_outputs(argv, files, stdout):
    assert wget_outputs(argv) == (files, stdout)


def _exec(argv: list[str], exe: str, cwd: str = "/workspace", step: int = 1, **kw) -> Event:
    return Event(kind=EventKind.PROCESS, action="exec", sandbox_id="sb-t", exe=exe, argv=argv, step=step,
                 command=" ".join(argv), data={"cwd": cwd}, **kw)


@pytest.mark.parametrize(("argv", "script"), [
    (["python3", "-u", "x.py", "data.json"], "x.py"),  # the data file is an argument, not the script
    (["python3", "-W", "ignore", "x.py"], "x.py"),
    (["python3", "-m", "pytest", "x.py"], None),
    (["python3", "-c", "print(1)"], None),
    (["bash", "-o", "pipefail", "t.sh"], "t.sh"),
    (["bash", "-ec", "./t.sh"], None),
    (["sh", "-s"], None),
    (["node", "--require", "y.js", "x.js"], "x.js"),
    (["perl", "-e", "print 1"], None),
    (["php", "-f", "x.php"], "x.php"),
    (["tclsh8.6", "fetch.tcl"], "fetch.tcl"),
    (["tclsh"], None),
])
def test_script_arg(argv, script):
    assert script_arg(argv[0], argv) == script


def test_a_download_counts_only_if_it_arrived_and_was_not_rewritten(tmp_path):
    """Real files, judged as the sandbox judges them (this process stands in for the sandboxed one:
    its root is where the paths are looked up)."""
    d, pid = Downloads(), os.getpid()
    tool = tmp_path / "bin" / "tool"
    tool.parent.mkdir()
    curl = _exec(["curl", "-so", "bin/tool", URL], "/usr/bin/curl", cwd=str(tmp_path), pid=pid)
    d.note(curl, pid)
    d.note(_exec(["wget", "-q", "http://pkg.example.com/x.py"], "/usr/bin/wget", cwd=str(tmp_path), pid=pid), pid)
    tool.write_text("#!/bin/sh\n")  # the downloads land
    (tmp_path / "x.py").write_text("print(1)\n")
    ended = time.time()

    def arrived(step, p):
        return ended

    def run(argv, exe):
        return _exec(argv, exe, cwd=str(tmp_path), step=3, pid=pid)

    assert d.origin(run(["./bin/tool"], str(tool)), arrived)["step"] == 1
    assert d.origin(run(["python3", "-W", "ignore", "x.py"], "/usr/bin/python3"), arrived)["tool"] == "wget"
    assert d.origin(run(["bash", f"{tmp_path}/../{tmp_path.name}/bin/tool"], "/usr/bin/bash"), arrived)
    assert d.origin(run(["cat", "bin/tool"], "/usr/bin/cat"), arrived) is None  # reading is not running
    assert d.origin(run(["python3", "other.py"], "/usr/bin/python3"), arrived) is None
    # the downloader received nothing (a failed download; the agent wrote the file itself)
    assert d.origin(run(["./bin/tool"], str(tool)), lambda step, p: None) is None
    # rewritten well after the download ended: no longer what was downloaded
    os.utime(tool, (ended + 30, ended + 30))
    assert d.origin(run(["./bin/tool"], str(tool)), arrived) is None
    d.clear()
    assert d.origin(run(["python3", "x.py"], "/usr/bin/python3"), arrived) is None


@pytest.mark.parametrize(("exe", "argv", "program"), [
    ("/usr/bin/perl", ["perl", "-MIO::Socket::INET", "-e", "1"], ("perl", True)),
    ("/usr/bin/python3.11", ["python3", "-c", "1"], ("python3.11", True)),
    ("/usr/bin/tclsh8.6", ["tclsh"], ("tclsh8.6", True)),  # its code on standard input
    ("/usr/bin/python3.11", ["python3", "/usr/bin/pip3", "install", "x"], ("pip3", False)),
    ("/usr/bin/python3.11", ["python3", "-m", "pip.__main__", "install"], ("pip", False)),
    ("/usr/bin/python3.11", ["python3", "boot.py", "-m", "x"], ("boot.py", False)),  # the script's own -m
    ("/usr/bin/node", ["node", "/usr/lib/node_modules/npm/bin/npm-cli.js", "ci"], ("npm-cli.js", False)),
    ("/usr/bin/busybox", ["wget", "-O", "t", "http://x.example/"], ("wget", False)),
    ("/usr/bin/busybox", ["busybox", "wget", "http://x.example/"], ("wget", False)),
    ("/usr/bin/aria2c", ["aria2c", "http://x.example/"], ("aria2c", False)),
])
def test_program_of(exe, argv, program):
    assert program_of(exe, argv) == program


def test_fetched_origin_needs_a_transfer_at_the_write_and_no_package_manager():
    at = 1000.0
    near, far = [at - 0.5], [at - SLACK_S - 5, at + SLACK_S + 5]
    perl = ("/usr/bin/perl", ["perl", "-e", "..."])
    assert fetched_origin("/tmp/p", 2, *perl, at, near) == {
        "path": "/tmp/p", "step": 2, "tool": "perl", "command": None, "via": "inline"}
    # a one-liner that fetched, waited, then wrote: still what it fetched; one that wrote first did not
    assert fetched_origin("/tmp/p", 2, *perl, at, [at - 60])["via"] == "inline"
    assert fetched_origin("/tmp/p", 2, *perl, at, [at + SLACK_S + 5]) is None
    assert fetched_origin("/tmp/p", 2, *perl, at, []) is None  # wrote a file, fetched nothing
    boot = ("/usr/bin/python3", ["python3", "boot.py"])
    assert fetched_origin("/tmp/p", 2, *boot, at, near)["via"] == "program"
    assert fetched_origin("/tmp/p", 2, *boot, at, far) is None  # a program's fetches far from the write
    assert fetched_origin("/tmp/p", 2, "/usr/bin/lwp-download", ["lwp-download", "u"], at, near)["via"] == "downloader"
    for argv in (["python3", "-m", "pip", "install", "x"], ["python3", "/usr/bin/pip", "download", "x"]):
        assert fetched_origin("/tmp/p", 2, "/usr/bin/python3", argv, at, near) is None
    assert fetched_origin("/tmp/p", 2, "/usr/bin/git", ["git", "clone", "u"], at, near) is None

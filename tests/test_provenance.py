"""Where curl and wget write, read from their argv as the exec watcher sees it. The behaviour in a
real sandbox (download in one step, run in a later one) is tested in test_detection.py."""

from __future__ import annotations

import pytest

from corral.events import Event, EventKind
from corral.monitor.provenance import Downloads, curl_outputs, wget_outputs

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
    (["wget", "http://[::1"], [], False),  # malformed: nothing, and no error
])
def test_wget_outputs(argv, files, stdout):
    assert wget_outputs(argv) == (files, stdout)


def _exec(argv: list[str], exe: str, cwd: str = "/workspace", step: int = 1) -> Event:
    return Event(kind=EventKind.PROCESS, action="exec", sandbox_id="sb-t", exe=exe, argv=argv, step=step,
                 command=" ".join(argv), data={"cwd": cwd})


def test_runs_of_downloads_are_recognised_and_nothing_else():
    d = Downloads()
    d.note(_exec(["curl", "-so", "bin/tool", URL], "/usr/bin/curl", cwd="/tmp"), pid=0)
    d.note(_exec(["wget", "-q", "http://pkg.example.com/x.py"], "/usr/bin/wget"), pid=0)
    assert d.origin(_exec(["./tool"], "/tmp/bin/tool", step=3))["step"] == 1
    assert d.origin(_exec(["python3", "-u", "x.py"], "/usr/bin/python3", step=4))["tool"] == "wget"
    assert d.origin(_exec(["bash", "../tmp/bin/tool"], "/usr/bin/bash", step=5))["path"] == "/tmp/bin/tool"
    assert d.origin(_exec(["cat", "/tmp/bin/tool"], "/usr/bin/cat")) is None  # reading is not running
    assert d.origin(_exec(["python3", "other.py"], "/usr/bin/python3")) is None
    d.clear()
    assert d.origin(_exec(["./tool"], "/tmp/bin/tool")) is None

import json
import os
import subprocess
import sys
import tempfile

SMALL = """\
10.0.0.1 - - [01/Jan/2024:00:00:01 +0000] "GET /a?x=1 HTTP/1.1" 200 100
10.0.0.2 - alice [01/Jan/2024:00:00:02 +0000] "POST /b HTTP/1.0" 201 50 "https://ex.com/" "curl/8.0"

10.0.0.1 - - [01/Jan/2024:00:00:03 +0000] "GET /a HTTP/1.1" 404 -
not a log line
10.0.0.3 - - [01/Jan/2024:00:00:04 +0000] "GET /b HTTP/2.0" 503 7
"""


def _run(*args):
    return subprocess.run([sys.executable, "logstats.py", *args], capture_output=True, text=True, timeout=20)


def _small_log():
    path = os.path.join(tempfile.mkdtemp(), "small.log")
    with open(path, "w") as f:
        f.write(SMALL)
    return path


def test_parse_line():
    from logstats import parse_line

    rec = parse_line('192.0.2.77 - - [10/Oct/2024:13:10:29 +0000] "GET /api/items/42?q=1 HTTP/1.1" 200 796 '
                     '"-" "Mozilla/5.0 (X11; Linux x86_64)"')
    assert rec is not None
    assert {k: rec[k] for k in ("ip", "method", "path", "status", "bytes")} == {
        "ip": "192.0.2.77", "method": "GET", "path": "/api/items/42", "status": 200, "bytes": 796}
    rec = parse_line('10.0.0.1 - - [01/Jan/2024:00:00:03 +0000] "GET /a HTTP/1.1" 304 -')
    assert rec is not None and rec["bytes"] == 0 and rec["status"] == 304


def test_parse_line_malformed():
    from logstats import parse_line

    assert parse_line("garbage line without structure") is None
    assert parse_line('203.0.113.4 - - [10/Oct/2024:13:99:00 +0000] "GET /truncated') is None


def test_summary_of_access_log():
    out = _run("logs/access.log")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {
        "requests": 40,
        "malformed": 2,
        "unique_ips": 5,
        "bytes": 85182,
        "status_classes": {"2xx": 28, "3xx": 6, "4xx": 2, "5xx": 4},
        "top_paths": [["/api/items/42", 10], ["/favicon.ico", 7], ["/index.html", 7]],
    }


def test_top_option():
    out = _run("logs/access.log", "--top", "5")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["top_paths"] == [
        ["/api/items/42", 10], ["/favicon.ico", 7], ["/index.html", 7], ["/", 6], ["/login", 5]]


def test_small_log():
    out = _run(_small_log(), "--top", "1")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {
        "requests": 4,
        "malformed": 1,
        "unique_ips": 3,
        "bytes": 157,
        "status_classes": {"2xx": 2, "3xx": 0, "4xx": 1, "5xx": 1},
        "top_paths": [["/a", 2]],
    }


def test_unreadable_file():
    out = _run("/nonexistent/access.log")
    assert out.returncode == 1
    assert out.stderr.strip() and "Traceback" not in out.stderr

"""The `corral` command line, run as a real subprocess the way a user runs it.

Runs inside the suite's private network namespace (see conftest.py): nftables tables and links
made here are this namespace's own; cgroups and /run/corral are the machine's, and gc only ever
touches entries of instances whose lock no live process holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from corral.config import RuntimeConfig
from corral.runtime import MAX_INSTANCES, lock_instance
from corral.sandbox.cgroups import discover

LOCK_DIR = RuntimeConfig().lock_dir
UID_BASE = RuntimeConfig().uid_base
_SCRIPT = Path(sys.executable).with_name("corral")
CORRAL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "corral.cli"]


# -- helpers -----------------------------------------------------------------------------------------
@pytest.fixture
def home(tmp_path: Path) -> Path:
    d = tmp_path / "corral-home"
    d.mkdir()
    return d


def cli_env(home: Path) -> dict[str, str]:
    env = dict(os.environ, CORRAL_HOME=str(home), COLUMNS="200")
    env.pop("NO_COLOR", None)
    return env


def corral(home: Path, *args: str, timeout: float = 60, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CORRAL, *args], env=cli_env(home), capture_output=True, text=True, timeout=timeout,
                          input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL)


def wait_for(cond: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def nft_tables() -> list[str]:
    p = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, timeout=30, check=True)
    return [" ".join(line.split()[1:]) for line in p.stdout.splitlines() if line.startswith("table ")]


def links() -> list[str]:
    # Over netlink: /sys/class/net shows the namespace /sys was mounted in, not ours.
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return sorted(link.get_attr("IFLA_IFNAME") for link in ipr.get_links())


def instance_of(pid: int) -> int | None:
    """The runtime instance a corral process holds: its lock file records the owner's pid. A file
    whose lock nobody holds is a dead runtime's, and its pid may since have been given to ours."""
    for f in LOCK_DIR.glob("instance-*.lock"):
        with contextlib.suppress(OSError, ValueError):
            if f.read_text().strip() != str(pid):
                continue
            inst = int(f.stem.split("-")[1], 16)
            fd = lock_instance(LOCK_DIR, inst)
            if fd is None:
                return inst
            os.close(fd)
    return None


def sandbox_pids(instance: int) -> list[int]:
    """Live processes running as one of this instance's sandbox uids (uid_base + instance<<12 + seq)."""
    lo = UID_BASE + (instance << 12)
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("State", "").split()[:1] == ["Z"]:
            continue  # dead already, waiting for the machine's init to reap it
        if lo <= int(fields["Uid"].split()[0]) < lo + 4096:
            out.append(int(entry))
    return out


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def cgroup_dirs(instance: int) -> list[Path]:
    h = discover(f"{instance:03x}")
    return [r for r in h.roots.values() if r.exists()]


@contextlib.contextmanager
def popen(home: Path, *args: str) -> Iterator[subprocess.Popen]:
    p = subprocess.Popen([*CORRAL, *args], env=cli_env(home), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        yield p
    finally:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=30)


def alive(p: subprocess.Popen) -> bool:
    """True while p runs; once it has exited, fail with what it said rather than wait on."""
    if p.poll() is None:
        return True
    _, err = p.communicate(timeout=30)
    raise AssertionError(f"corral exited with {p.returncode}: {err}")


def start_sleeper(home: Path) -> tuple[subprocess.Popen, int]:
    """`corral run -- sleep 300` in the background; returns once the sleep runs in its sandbox."""
    p = subprocess.Popen([*CORRAL, "run", "--", "sleep", "300"], env=cli_env(home), stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        inst = wait_for(lambda: alive(p) and instance_of(p.pid), 15, "the runtime's instance lock")
        assert isinstance(inst, int)
        wait_for(lambda: alive(p) and f"inet corral_{inst:03x}" in nft_tables(), 15, "its nftables table")
        wait_for(lambda: alive(p) and any(cmdline(pid)[:2] == ["sleep", "300"] for pid in sandbox_pids(inst)),
                 15, "sleep 300 in the sandbox")
    except BaseException:
        p.kill()
        p.communicate(timeout=30)
        raise
    return p, inst


@contextlib.contextmanager
def hold_free_instance() -> Iterator[int]:
    """Lock an instance no runtime uses, as a live runtime would, for the duration."""
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    for i in range(MAX_INSTANCES - 1, 0, -1):
        fd = lock_instance(LOCK_DIR, i)
        if fd is None:
            continue
        try:
            yield i
        finally:
            os.close(fd)
        return
    pytest.skip("no free corral instance slot")


# -- doctor ------------------------------------------------------------------------------------------
def test_doctor_reports_features(home: Path) -> None:
    r = corral(home, "doctor")
    assert r.returncode == 0, r.stdout + r.stderr
    for feature in ("bubblewrap", "nftables", "cgroups", "seccomp", "netlink", "root"):
        assert feature in r.stdout
    assert "All required features are available" in r.stdout


def test_doctor_checks_are_structured() -> None:
    from corral.doctor import all_required_ok, checks

    results = checks()
    names = {c.name for c in results}
    assert {"bubblewrap", "nftables", "running as root"} <= names
    assert all(c.detail for c in results)
    assert all(c.fix for c in results if not c.ok)
    assert all_required_ok(results)  # this test machine is a supported one


# -- run ---------------------------------------------------------------------------------------------
def test_run_echo(home: Path) -> None:
    r = corral(home, "run", "--", "echo", "hello")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "hello\n"
    assert "no network activity" in r.stderr


def test_run_exit_code_passes_through(home: Path) -> None:
    r = corral(home, "run", "--", "sh", "-c", "exit 3")
    assert r.returncode == 3, r.stderr


def test_run_single_argument_is_a_shell_line(home: Path) -> None:
    r = corral(home, "run", "--", "echo a && echo b >&2; exit 5")
    assert (r.returncode, r.stdout) == (5, "a\n")
    assert "b\n" in r.stderr


def test_run_bad_rule_exits_2_naming_it(home: Path) -> None:
    r = corral(home, "run", "--allow", "bad rule!!", "--", "true")
    assert r.returncode == 2
    assert "bad rule!!" in r.stderr
    assert "Traceback" not in r.stderr


def test_run_bad_limit_and_policy_exit_2(home: Path, tmp_path: Path) -> None:
    r = corral(home, "run", "--mem", "1", "--", "true")
    assert r.returncode == 2 and "memory_mb" in r.stderr
    bad = tmp_path / "policy.yaml"
    bad.write_text("allow: [\"ok.example.com\", \"not a rule\"]\n")
    r = corral(home, "run", "--policy", str(bad), "--", "true")
    assert r.returncode == 2 and "not a rule" in r.stderr and "Traceback" not in r.stderr


def test_run_json(home: Path, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("allow:\n  - pkg.example.com:80\n")
    r = corral(home, "run", "--json", "--policy", str(policy), "--allow", "*.example.org", "--", "echo", "hi")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["exit_code"] == 0 and doc["stdout"] == "hi\n" and doc["stderr"] == ""
    assert doc["timed_out"] is False and doc["truncated"] is False
    assert doc["events"] == []


def test_run_timeout_exits_124(home: Path) -> None:
    t0 = time.monotonic()
    r = corral(home, "run", "--timeout", "1", "--json", "--", "sleep", "30")
    assert r.returncode == 124
    assert json.loads(r.stdout)["timed_out"] is True
    assert time.monotonic() - t0 < 20


def test_run_workspace_and_limits(home: Path, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "data.txt").write_text("from the host\n")
    r = corral(home, "run", "--workspace", str(ws), "--mem", "256", "--pids", "64", "--cpus", "0.5",
               "--", "cat", "data.txt")
    assert (r.returncode, r.stdout) == (0, "from the host\n"), r.stderr


def test_run_shows_denied_connection(home: Path) -> None:
    # Nothing is allowed: the connection is judged by the gateway and recorded as denied.
    code = ("import socket,time\n"
            "s=socket.create_connection(('198.51.100.10',80),timeout=5)\n"
            "s.sendall(b'GET / HTTP/1.0\\r\\nHost: pkg.example.com\\r\\n\\r\\n'); time.sleep(0.5)\n")
    r = corral(home, "run", "--json", "--", "python3", "-c", code)
    doc = json.loads(r.stdout)
    connects = [e for e in doc["events"] if e["kind"] == "connect"]
    assert connects, doc
    ev = connects[0]
    assert (ev["dst_ip"], ev["dst_port"], ev["verdict"]) == ("198.51.100.10", 80, "deny")
    assert ev["step"] == 1 and ev["bytes_up"] == 0
    r = corral(home, "run", "--", "python3", "-c", code)
    assert "198.51.100.10:80" in r.stderr and "deny" in r.stderr


# -- events ------------------------------------------------------------------------------------------
def test_events_after_run(home: Path) -> None:
    r = corral(home, "run", "--", "echo", "hello")
    assert r.returncode == 0
    db = home / "corral.db"
    r = corral(home, "events", "--json", "--db", str(db))
    assert r.returncode == 0, r.stderr
    evs = [json.loads(line) for line in r.stdout.splitlines()]
    assert len({e["sandbox_id"] for e in evs}) == 1
    # Lifecycle and command events, in order (other kinds, e.g. process execs, may interleave).
    life = [e for e in evs if e["kind"] in ("sandbox", "command")]
    got = [(e["kind"], e["action"]) for e in life]
    assert got == [("sandbox", "created"), ("command", "start"), ("command", "exit"), ("sandbox", "closed")]
    start, exit_ = life[1], life[2]
    assert start["command"] == exit_["command"] == "echo hello"
    assert exit_["data"]["exit_code"] == 0 and exit_["step"] == 1

    # Filters, --limit and the table view.
    r = corral(home, "events", "--json", "--kind", "command", "--limit", "1")
    assert [json.loads(x)["action"] for x in r.stdout.splitlines()] == ["exit"]
    r = corral(home, "events", "--sandbox", evs[0]["sandbox_id"])
    assert r.returncode == 0 and "echo hello" in r.stdout and "created" in r.stdout
    r = corral(home, "events", "--kind", "nonsense")
    assert r.returncode == 2 and "nonsense" in r.stderr
    r = corral(home, "events", "--db", str(home / "missing.db"))
    assert r.returncode == 2


def _line_queue(p: subprocess.Popen) -> queue.Queue[str | None]:
    """Lines of p's stdout as they come (a thread: select() cannot see lines already buffered)."""
    q: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert p.stdout is not None
        for line in p.stdout:
            q.put(line)
        q.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return q


def _read_until(q: queue.Queue[str | None], pred: Callable[[dict], bool], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = q.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            break
        ev = json.loads(line)
        if pred(ev):
            return ev
    raise AssertionError("event did not appear in `corral events --follow`")


def test_events_follow(home: Path) -> None:
    corral(home, "run", "--", "echo", "before")
    with popen(home, "events", "--follow", "--json", "--kind", "command") as follower:
        lines = _line_queue(follower)
        _read_until(lines, lambda e: e["command"] == "echo before" and e["action"] == "exit", 15)
        assert corral(home, "run", "--", "echo", "after").returncode == 0
        ev = _read_until(lines, lambda e: e["command"] == "echo after" and e["action"] == "exit", 15)
        assert ev["data"]["exit_code"] == 0
        follower.send_signal(signal.SIGINT)
        assert follower.wait(timeout=15) == 0


# -- shell -------------------------------------------------------------------------------------------
def test_shell_keeps_state(home: Path) -> None:
    script = "cd /tmp\nexport GREETING=hi-there\npwd\necho $GREETING\nfalse\nexit\necho never\n"
    r = corral(home, "shell", stdin=script)
    assert r.returncode == 1, r.stderr  # like a shell's `exit`: the last command's status
    assert r.stdout.splitlines() == ["/tmp", "hi-there"]
    assert "exit 1" in r.stderr
    r = corral(home, "shell", stdin="true\nexit 4\n")
    assert r.returncode == 4, r.stderr


def test_shell_eof_ends(home: Path) -> None:
    r = corral(home, "shell", stdin="echo one\n")
    assert (r.returncode, r.stdout) == (0, "one\n"), r.stderr


# -- crashes, signals and gc ---------------------------------------------------------------------------
def test_sigterm_cleans_up(home: Path) -> None:
    p, inst = start_sleeper(home)
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=30)
    assert p.returncode == 128 + signal.SIGTERM
    assert f"inet corral_{inst:03x}" not in nft_tables()
    assert not sandbox_pids(inst)
    assert not cgroup_dirs(inst)
    assert not [n for n in links() if n.startswith(f"corral{inst:03x}")]


def test_crash_leftovers_removed_by_gc(home: Path) -> None:
    p, inst = start_sleeper(home)
    table = f"inet corral_{inst:03x}"
    p.kill()  # SIGKILL: no cleanup code runs
    p.communicate(timeout=30)

    # The sandbox dies with its owner (bwrap --die-with-parent); corral's host state stays behind.
    wait_for(lambda: not sandbox_pids(inst), 15, "the sandbox's processes to die with corral")
    assert table in nft_tables()
    if discover("probe").version is not None:
        assert cgroup_dirs(inst), "the crashed runtime's cgroups should still be there"

    # where an image sandbox's root was built (its mounts were in the runtime's helper and died with it)
    roots = Path("/var/cache/corral") / f"roots-{inst:03x}"
    (roots / "sb-x").mkdir(parents=True, exist_ok=True)
    hidden = Path("/run/corral") / f"instance-{inst:03x}.hidden"  # every launch reads a dead runtime's list
    assert hidden.exists()

    r = corral(home, "gc", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert f"would remove nft table {table}" in r.stdout and f"image roots {roots}" in r.stdout
    assert table in nft_tables()

    r = corral(home, "gc")
    assert r.returncode == 0, r.stderr
    assert f"removed nft table {table}" in r.stdout
    assert table not in nft_tables() and not roots.exists() and not hidden.exists()
    assert not [n for n in links() if n.startswith(f"corral{inst:03x}")]
    assert not cgroup_dirs(inst)

    r = corral(home, "gc")
    assert r.returncode == 0 and f"corral_{inst:03x}" not in r.stdout


def test_gc_spares_live_runtimes_and_foreign_names(home: Path) -> None:
    decoy_tables = ["inet corral_keep", "inet notcorral"]
    decoy_links = ["corralw9", "corralzzz001"]  # a test world's kind of name (not the session world's corralw0)
    made_tables: list[str] = []
    made_links: list[str] = []
    try:
        with hold_free_instance() as inst:
            table, link = f"inet corral_{inst:03x}", f"corral{inst:03x}001"
            for t in [table, *decoy_tables]:
                subprocess.run(["nft", "add", "table", *t.split()], check=True, timeout=30)
                made_tables.append(t)
            for n, name in enumerate([link, *decoy_links]):
                # veth, as corral's own links are (and dummy may not be built into the kernel)
                subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name", f"gcpeer{n}"],
                               check=True, timeout=30)
                made_links.append(name)

            # While the instance lock is held (as a live runtime holds it), gc leaves it alone.
            r = corral(home, "gc")
            assert r.returncode == 0, r.stderr
            assert table in nft_tables() and link in links()

            # A live `corral run` in this namespace is spared too.
            p, live = start_sleeper(home)
            try:
                assert corral(home, "gc").returncode == 0
                assert f"inet corral_{live:03x}" in nft_tables()
                assert sandbox_pids(live)
            finally:
                p.send_signal(signal.SIGTERM)
                p.communicate(timeout=30)
            assert p.returncode == 128 + signal.SIGTERM

        # Lock released: the instance counts as dead, its leftovers go; foreign names stay.
        r = corral(home, "gc")
        assert r.returncode == 0, r.stderr
        assert f"removed link {link}" in r.stdout and f"removed nft table {table}" in r.stdout
        assert table not in nft_tables() and link not in links()
        for t in decoy_tables:
            assert t in nft_tables()
        for name in decoy_links:
            assert name in links()
    finally:
        for t in made_tables:
            subprocess.run(["nft", "delete", "table", *t.split()], capture_output=True, timeout=30)
        for name in made_links:
            subprocess.run(["ip", "link", "del", name], capture_output=True, timeout=30)


# -- serve -------------------------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_config_errors_name_the_problem(home: Path, tmp_path: Path) -> None:
    bad = tmp_path / "serve.yaml"
    bad.write_text("port: 8080\nsandbox:\n  limits: {memory_mb: many}\n")
    r = corral(home, "serve", "--config", str(bad))
    assert r.returncode != 0 and "sandbox.limits.memory_mb" in r.stderr and str(bad) in r.stderr
    bad.write_text("prot: 8080\n")  # a typo is an error, not a silent default
    r = corral(home, "serve", "--config", str(bad))
    assert r.returncode != 0 and "prot" in r.stderr
    good = tmp_path / "ok.yaml"
    good.write_text("port: 1\n")
    r = corral(home, "serve", "--config", str(good))  # no token anywhere
    assert r.returncode != 0 and "CORRAL_SERVE_TOKEN" in r.stderr
    (tmp_path / "tokens").write_text("short\n")
    (tmp_path / "tokens").chmod(0o600)  # corral serve refuses a token file others can read
    r = corral(home, "serve", "--config", str(good), "--token-file", str(tmp_path / "tokens"))
    assert r.returncode != 0 and "shorter than 16" in r.stderr


def test_serve_from_config_file_and_graceful_shutdown(home: Path, tmp_path: Path) -> None:
    import httpx

    token = "serve-test-token-" + "z" * 16
    (tmp_path / "tokens").write_text(f"# tenants\n{token}\n")
    (tmp_path / "tokens").chmod(0o600)
    port = _free_port()
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"port: {port + 1}\ntoken_file: {tmp_path / 'tokens'}\nmax_sandboxes_per_tenant: 1\n"
                   "sandbox: {limits: {memory_mb: 300}}\nopenenv: {enabled: false}\n")
    base = f"http://127.0.0.1:{port}"
    with popen(home, "serve", "--config", str(cfg), "--port", str(port)) as p:  # the flag wins over the file
        wait_for(lambda: _health(base), 30, "the service's /health")
        inst = wait_for(lambda: instance_of(p.pid), 15, "the runtime's instance lock")
        assert isinstance(inst, int)
        h = {"Authorization": f"Bearer {token}"}
        api = f"{base}/apis/envs/sandbox/v1"
        assert httpx.post(f"{api}/start_async", json={"image": "x"}).status_code == 401
        r = httpx.post(f"{api}/start_async", json={"image": "x", "memory": "300m"}, headers=h, timeout=30)
        assert r.status_code == 200, r.text
        sid = r.json()["result"]["sandbox_id"]
        again = httpx.post(f"{api}/start_async", json={"image": "x"}, headers=h, timeout=30)
        # refused as ROCK refuses (HTTP 200, a Failed envelope: its SDK reads no other body)
        assert again.json()["corral"]["http_status"] == 429 and "max_sandboxes_per_tenant" in again.json()["message"]
        r = httpx.post(f"{api}/execute", json={"sandbox_id": sid, "command": "sleep 300 &"}, headers=h, timeout=30)
        assert r.status_code == 200, r.text
        wait_for(lambda: any(cmdline(pid)[:2] == ["sleep", "300"] for pid in sandbox_pids(inst)), 15, "the sleep")
        p.send_signal(signal.SIGTERM)
        # uvicorn stops gracefully, then re-raises the signal so the exit status still says SIGTERM
        assert p.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Traceback" not in p.stderr.read()
        # every sandbox closed on the way out: no process, no nftables table, no cgroup, no lock left
        assert sandbox_pids(inst) == []
        assert f"inet corral_{inst:03x}" not in nft_tables()
        assert cgroup_dirs(inst) == []


def _health(base: str) -> bool:
    import httpx

    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{base}/health", timeout=2).json().get("status") == "ok"
    return False


def test_version_and_a_report_into_a_folder_that_does_not_exist(home: Path, tmp_path: Path) -> None:
    from corral import __version__

    p = corral(home, "--version")
    assert p.returncode == 0 and p.stdout.strip() == f"corral {__version__}"
    p = corral(home, "run", "--json", "--", "echo", "hi")
    assert p.returncode == 0, p.stderr
    sid = json.loads(p.stdout)["sandbox_id"]
    target = tmp_path / "reports" / "2026" / "x.html"
    p = corral(home, "report", sid, "--format", "html", "-o", str(target))
    assert p.returncode == 0 and target.read_text().startswith("<!doctype html>"), p.stderr
    (tmp_path / "afile").write_text("")
    p = corral(home, "report", sid, "--format", "md", "-o", str(tmp_path / "afile" / "x.md"))
    assert p.returncode == 2 and "cannot make the folder" in p.stderr and "Traceback" not in p.stderr


def test_a_postgres_store_without_its_driver_is_a_clear_error() -> None:
    """PostgreSQL's driver is the `postgres` extra: without it, the error names it and the fix, not
    a ModuleNotFoundError (the URL's password is not repeated)."""
    import importlib.util

    if importlib.util.find_spec("psycopg") is not None:
        pytest.skip("psycopg is installed here: the missing-driver path cannot be taken")
    from corral import StoreError
    from corral.store import Store

    with pytest.raises(StoreError, match=r"needs the Python driver 'psycopg'.*corral\[postgres\]") as e:
        Store("postgresql+psycopg://user:s3cret@127.0.0.1:5432/corral")
    assert "s3cret" not in str(e.value)


def test_serve_names_a_bad_rule_file_from_its_config(home: Path, tmp_path: Path) -> None:
    bad = tmp_path / "site-rules.yaml"
    bad.write_text("- rule: x\n  title: t\n  severity: high\n  condition: proc.name ===\n")
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"runtime:\n  rule_files: [{bad}]\n")
    env = {**cli_env(home), "CORRAL_SERVE_TOKEN": "t0ken-abcdefghijklmnopqrstuvwxyz"}
    p = subprocess.run([*CORRAL, "serve", "--config", str(cfg), "--port", "18777"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"{bad}:line 1: rule 'x'" in p.stderr and "Traceback" not in p.stderr


def test_help_keeps_its_defaults():
    """Help texts are plain text: a "[default: ...]" in one is shown, not eaten as markup."""
    r = subprocess.run([*CORRAL, "events", "--help"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0
    assert "[default: STATE_DIR/corral.db]" in r.stdout and "[env: CORRAL_HOME; default .corral]" in r.stdout

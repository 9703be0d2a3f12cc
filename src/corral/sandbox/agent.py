"""The in-sandbox agent: the one long-lived process corral runs inside each sandbox.

It is started by bubblewrap as the sandbox's first process and speaks JSON messages with the host
over a SOCK_SEQPACKET socket (fd in $CORRAL_SOCK_FD). It must import nothing outside the standard library and start
fast, since it runs once per sandbox (and again on reset).

It is out of the reach of the commands it runs:
- it is PID 1 of the sandbox's pid namespace (bwrap --as-pid-1), and the kernel never delivers to a
  namespace's init a signal sent from inside that it has no handler for: SIGKILL and SIGSTOP from a
  command do nothing. As init it reaps every orphan;
- it is not dumpable, and neither is a child it has forked until that child execs: with no
  capabilities, a command can open none of their /proc/<pid>/fd/*, mem or environ, nor take a
  descriptor (pidfd_getfd is refused by seccomp anyway);
- a session shell's stdin, stdout and stderr are sockets, which cannot be reopened through
  /proc/<pid>/fd: no command can write into a shell's command stream or forge its output.

Every process it starts (a command or a session shell) first announces itself to the host on the
shared socket and blocks on a private gate pipe. The host reads the announcer's *host* pid from the
kernel-supplied SO_PASSCRED credentials, places it in the step's cgroup, and only then lets it exec.
So no process of a step can fork before it is accounted to that step.

corral's own file writes (write_file, upload) are done by this process itself (op put), so a write
whose writer is the agent's pid is known to be corral's, positively. No path component is followed
through a symbolic link, and a file is written under a temporary name and renamed into place, so a
link the commands planted is replaced, never written through.

Host -> agent ops: exec, kill, session_new, session_run, session_close, go, stdin, stage, put, put_data
Agent -> host ops: spawned, out, exit, session_exit, error, ready
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import errno
import json
import os
import pwd
import selectors
import signal
import socket
import stat
import sys
import time

CHUNK = 65536
DRAIN_GRACE = 0.05  # after the command's own process exits, wait this long for pipe EOF
PR_SET_DUMPABLE = 4
DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Proc:
    """A child this agent started: a command or a session shell."""

    def __init__(self, key: str, pid: int, pidfd: int, out: int, err: int, gate_w: int, stdin_w: int | None):
        self.key = key
        self.pid = pid
        self.pidfd = pidfd
        self.fds = {out: 1, err: 2}
        self.gate_w = gate_w
        self.stdin_w = stdin_w
        self.exit_code: int | None = None
        self.exited_at: float | None = None
        self.sent = {1: 0, 2: 0}
        self.dropped = {1: 0, 2: 0}
        self.limit = 1 << 20
        # session state
        self.session_cmd: str | None = None  # id of the running session command
        self.marker: bytes | None = None
        self.merged = False  # the running session command's stderr goes to its stdout
        self.pending = {1: b"", 2: b""}
        self.done_streams: set[int] = set()
        self.status: int | None = None
        self.launch: dict | None = None
        self.rusage: dict | None = None
        self.stdin_buf = bytearray()
        self.stdin_eof = False
        self.stdin_watch = False


class Put:
    """A file corral is writing: a temporary file in its directory, renamed into place at the end."""

    def __init__(self, path: str, dir_fd: int, name: str, tmp: str, fd: int, mode: int) -> None:
        self.path, self.dir_fd, self.name, self.tmp, self.fd, self.mode = path, dir_fd, name, tmp, fd, mode

    def close(self, keep: bool = False) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        if not keep:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp, dir_fd=self.dir_fd)
        with contextlib.suppress(OSError):
            os.close(self.dir_fd)


class Agent:
    def __init__(self) -> None:
        self.sock = socket.socket(fileno=int(os.environ.pop("CORRAL_SOCK_FD", "3")))
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.sock, selectors.EVENT_READ, ("sock", None))
        self.procs: dict[str, Proc] = {}
        self.base_env = json.loads(os.environ.pop("CORRAL_AGENT_ENV", "{}"))
        self.shell = os.environ.pop("CORRAL_SHELL", "/bin/sh")
        self.workdir = os.environ.pop("CORRAL_WORKDIR", "/workspace")  # where commands start by default
        # an image's User: commands and sessions run as uid:gid (the agent stays root in its namespace)
        run_as = os.environ.pop("CORRAL_RUN_AS", "")
        self.run_as = tuple(int(x) for x in run_as.split(":")) if run_as else None
        self.puts: dict[str, Put | None] = {}  # None: failed, its remaining data is dropped
        # As init, every orphan of the sandbox is ours to reap: SIGCHLD wakes the loop.
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wake_r = wake_r
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.sel.register(wake_r, selectors.EVENT_READ, ("wake", None))

    # -- messaging -----------------------------------------------------------------------------
    def send(self, **msg: object) -> None:
        self.sock.send(json.dumps(msg, separators=(",", ":")).encode())

    def run(self) -> None:
        ready = json.dumps({"op": "ready", "pid": os.getpid()}).encode()
        bpf = os.environ.pop("CORRAL_EXEC_FILTER", "")
        if bpf:
            # every exec by anything we start is now held until corral says continue
            _send_with_listener(self.sock, ready, base64.b64decode(bpf))
        else:
            self.sock.send(ready)
        while True:
            timeout = self._next_timeout()
            for key, _ in self.sel.select(timeout):
                kind, obj = key.data
                if kind == "sock":
                    fd = None  # a request may carry one descriptor (the cgroup a new child joins)
                    try:
                        data, anc, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(4), socket.MSG_CMSG_CLOEXEC)
                    except ConnectionResetError:
                        data, anc = b"", []
                    for level, typ, payload in anc:
                        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS and len(payload) >= 4:
                            fd = int.from_bytes(payload[:4], sys.byteorder, signed=True)
                    if not data:
                        self._shutdown()
                        return
                    try:
                        self._handle(json.loads(data), fd)
                    finally:
                        if fd is not None:
                            os.close(fd)  # the child has its own copy
                elif kind == "pidfd":
                    self._reap(obj)
                elif kind == "pipe":
                    self._read_pipe(obj, key.fileobj)
                elif kind == "stdin":
                    self._write_stdin(obj)
                elif kind == "sink":
                    self._drain_sink(key.fileobj)
                elif kind == "wake":
                    with contextlib.suppress(BlockingIOError):
                        while os.read(self.wake_r, 4096):
                            pass
                    self._reap_all()
            self._finish_drained()

    def _next_timeout(self) -> float | None:
        waits = [p.exited_at + DRAIN_GRACE - time.monotonic() for p in self.procs.values() if p.exited_at]
        return max(0.0, min(waits)) if waits else None

    # -- requests ------------------------------------------------------------------------------
    def _handle(self, msg: dict, fd: int | None = None) -> None:
        op = msg["op"]
        try:
            if op == "exec":
                env = dict(self.base_env)
                env.update(msg.get("env") or {})
                argv = [self.shell, "-c", msg["cmd"]]
                cwd = msg.get("cwd") or self.workdir
                staged = self.procs.pop(msg["stage"], None) if msg.get("stage") else None
                if staged is not None and staged.exit_code is None:
                    # already in this step's cgroup: run at once, no handshake
                    staged.key = msg["id"]
                    self.procs[msg["id"]] = staged
                    staged.launch = {"argv": argv, "env": env, "cwd": cwd}
                    p = staged
                    if not msg.get("stdin"):
                        self._feed_stdin(p, b"", eof=True)
                    self._launch(p)
                else:
                    p = self._spawn(msg["id"], argv, env, cwd, stdin=bool(msg.get("stdin")), join_fd=fd)
                p.limit = msg.get("max_output", p.limit)
            elif op == "stage":
                self._fork_child(msg["id"], join_fd=fd)
            elif op == "go":
                p = self.procs.get(msg["id"])
                if p is not None:
                    self._launch(p)
            elif op == "kill":
                p = self.procs.get(msg["id"])
                if p is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, msg.get("sig", signal.SIGKILL))
            elif op == "session_new":
                env = dict(self.base_env)
                env.update(msg.get("env") or {})
                argv = [msg.get("shell") or "/bin/bash", "--noprofile", "--norc"]
                if msg.get("interactive"):
                    # as ROCK's sessions: job-control notices ("[1] <pid>") for background jobs; no prompt,
                    # no line editing, no history kept or expanded ("!" stays a plain character)
                    argv += ["--noediting", "+H", "-i"]
                    env.update(PS1="", PS2="", PS0="", HISTFILE="", PROMPT_COMMAND="")
                p = self._spawn(msg["id"], argv, env, msg.get("cwd") or self.workdir, keep_stdin=True, sockets=True,
                                join_fd=fd)
                if msg.get("user"):
                    assert p.launch is not None
                    p.launch["user"] = msg["user"]  # a user of the sandbox's own (ROCK's remote_user)
            elif op == "stdin":
                p = self.procs.get(msg["id"])
                if p is not None:
                    self._feed_stdin(p, base64.b64decode(msg["data"]), bool(msg.get("eof")))
            elif op == "session_run":
                self._session_run(msg)
            elif op == "session_close":
                p = self.procs.get(msg["id"])
                if p is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
            elif op == "put":
                self._put(msg)
            elif op == "put_data":
                self._put_data(msg)
        except Exception as e:  # report, never die: the agent is the sandbox's lifeline
            self.send(op="error", id=msg.get("id"), error=f"{type(e).__name__}: {e}")

    def _spawn(self, key: str, argv: list[str], env: dict, cwd: str, stdin: bool = False,
               keep_stdin: bool = False, sockets: bool = False, join_fd: int | None = None) -> Proc:
        """Fork a child that announces itself and waits; it runs argv once the host says go."""
        proc = self._fork_child(key, sockets, join_fd)
        proc.launch = {"argv": argv, "env": env, "cwd": cwd}
        if not keep_stdin and not stdin:
            self._feed_stdin(proc, b"", eof=True)
        return proc

    def _fork_child(self, key: str, sockets: bool = False, join_fd: int | None = None) -> Proc:
        """A child with its pipes ready, announced to the host, blocked until told what to run.
        Staged children are made ahead of time so the host can place them in the next step's
        cgroup (a slow kernel operation) before that step's command arrives. A session shell's
        streams are sockets (`sockets`): a pipe can be reopened through /proc/<pid>/fd, and a
        command could then write into the shell's command stream; a socket cannot be."""
        channel = _socket_channel if sockets else _pipe_channel
        out_r, out_w = channel()
        err_r, err_w = channel()
        gate_r, gate_w = os.pipe()
        in_r, in_w = channel()
        pid = os.fork()
        if pid == 0:  # child
            argv0 = "?"
            try:
                if join_fd is not None:
                    # into the cgroup corral chose, first: "0" is this process (corral checks, and
                    # moves it by pid if this failed)
                    with contextlib.suppress(OSError):
                        os.write(join_fd, b"0")
                # Until it execs, the child is a copy of the agent (non-dumpable, holding its socket).
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGPIPE):
                    signal.signal(sig, signal.SIG_DFL)
                os.setsid()
                os.dup2(in_r, 0)
                os.dup2(out_w, 1)
                os.dup2(err_w, 2)
                # Hold nothing of the agent's: a staged child can wait for a long time, and an
                # inherited write end of another command's stdin (or our own gate) would keep that
                # pipe from ever reading EOF.
                keep = {0, 1, 2, gate_r, self.sock.fileno()}
                for name in os.listdir("/proc/self/fd"):
                    if int(name) not in keep:
                        with contextlib.suppress(OSError):
                            os.close(int(name))
                # The kernel stamps this message with our pid as the host sees it (SO_PASSCRED).
                self.sock.send(json.dumps({"op": "spawned", "id": key}).encode())
                chunks = []
                while chunk := os.read(gate_r, 65536):
                    chunks.append(chunk)
                if not chunks:
                    os._exit(126)  # the agent went away, or the host refused us
                spec = json.loads(b"".join(chunks))
                argv0 = spec["argv"][0]
                os.closerange(3, 65536)
                try:
                    os.chdir(spec["cwd"])
                except OSError as e:
                    os.write(2, f"corral: cannot cd to {spec['cwd']}: {e.strerror}\n".encode())
                    os._exit(126)
                env = spec["env"]
                if spec.get("user"):
                    # a user the sandbox's own /etc/passwd names, as `su USER -c bash` would start it
                    pw = pwd.getpwnam(spec["user"])
                    os.setgroups(os.getgrouplist(pw.pw_name, pw.pw_gid))
                    os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
                    os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid)
                    env = {**env, "HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name}
                elif self.run_as is not None:
                    uid, gid = self.run_as
                    os.setgroups([])
                    os.setresgid(gid, gid, gid)
                    os.setresuid(uid, uid, uid)
                os.execvpe(argv0, spec["argv"], env)
            except BaseException as e:
                try:
                    os.write(2, f"corral: cannot start {argv0}: {e}\n".encode())
                finally:
                    os._exit(127)
        for fd in (out_w, err_w, gate_r, in_r):
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        proc = Proc(key, pid, pidfd, out_r, err_r, gate_w, in_w)
        self.procs[key] = proc
        self.sel.register(pidfd, selectors.EVENT_READ, ("pidfd", proc))
        for fd in (out_r, err_r):
            os.set_blocking(fd, False)
            self.sel.register(fd, selectors.EVENT_READ, ("pipe", proc))
        os.set_blocking(in_w, False)
        return proc

    def _launch(self, proc: Proc) -> None:
        if proc.gate_w < 0 or proc.launch is None:
            return
        os.write(proc.gate_w, json.dumps(proc.launch).encode())
        os.close(proc.gate_w)
        proc.gate_w = -1

    def _feed_stdin(self, proc: Proc, data: bytes, eof: bool) -> None:
        # Buffered and written as the command reads, so a command that ignores its stdin can never
        # block the agent.
        if proc.stdin_w is None:
            return
        proc.stdin_buf += data
        proc.stdin_eof = proc.stdin_eof or eof
        self._write_stdin(proc)

    def _write_stdin(self, proc: Proc) -> None:
        fd = proc.stdin_w
        if fd is None:
            return
        try:
            while proc.stdin_buf:
                n = os.write(fd, proc.stdin_buf[:CHUNK])
                del proc.stdin_buf[:n]
        except BlockingIOError:
            pass
        except OSError:  # the command closed its stdin
            proc.stdin_buf.clear()
            proc.stdin_eof = True
        want = bool(proc.stdin_buf)
        if want and not proc.stdin_watch:
            self.sel.register(fd, selectors.EVENT_WRITE, ("stdin", proc))
        elif not want and proc.stdin_watch:
            self.sel.unregister(fd)
        proc.stdin_watch = want
        if not want and proc.stdin_eof:
            os.close(fd)
            proc.stdin_w = None

    def _session_run(self, msg: dict) -> None:
        p = self.procs.get(msg["sid"])
        if p is None or p.exit_code is not None:
            self.send(op="exit", id=msg["id"], code=None, error="session is not running")
            return
        nonce = os.urandom(8).hex()
        p.session_cmd = msg["id"]
        p.marker = f"\x1e__CORRAL_{nonce}__".encode()
        p.done_streams = set()
        p.pending = {1: b"", 2: b""}
        p.sent = {1: 0, 2: 0}
        p.dropped = {1: 0, 2: 0}
        p.limit = msg.get("max_output", p.limit)
        p.merged = bool(msg.get("merge"))
        cwd = msg.get("cwd")
        cd = f"cd {_shquote(cwd)} && " if cwd else ""
        env = "".join(f"export {k}={_shquote(v)}; " for k, v in (msg.get("env") or {}).items())
        # eval of the command as one quoted word: a syntax error in it is an error, never a hung shell,
        # and no program runs but the command's own (a heredoc needed `cat`, an exec per command);
        # </dev/null keeps commands from reading (and eating) the session's own command stream.
        # merge: stderr into stdout, in the order written (as a terminal shows them)
        script = (
            f"{env}__corral_cmd={_shquote(msg['cmd'])}\n{{ {cd}eval \"$__corral_cmd\"\n"
            f"}} </dev/null{' 2>&1' if msg.get('merge') else ''}\n"
            f"__corral_rc=$?; printf '\\036__CORRAL_{nonce}__%d\\n' \"$__corral_rc\"; "
            f"printf '\\036__CORRAL_{nonce}__\\n' >&2\n"
        )
        self._feed_stdin(p, script.encode(), eof=False)

    def _drain_sink(self, fd: int) -> None:
        try:
            if os.read(fd, CHUNK):
                return
        except BlockingIOError:
            return
        self.sel.unregister(fd)
        os.close(fd)

    # -- output --------------------------------------------------------------------------------
    def _read_pipe(self, proc: Proc, fd: int) -> None:
        stream = proc.fds.get(fd)
        if stream is None:
            return
        try:
            data = os.read(fd, CHUNK)
        except BlockingIOError:
            return
        if not data:
            self.sel.unregister(fd)
            os.close(fd)
            del proc.fds[fd]
            if proc.marker is not None:
                proc.done_streams.add(stream)
                self._flush_session(proc, stream, b"", eof=True)
            return
        if proc.marker is not None:
            self._flush_session(proc, stream, data)
        elif proc.key.startswith("s:"):
            pass  # session output between commands (a background job's): discard
        else:
            self._emit(proc, proc.key, stream, data)

    def _emit(self, proc: Proc, cmd_id: str, stream: int, data: bytes) -> None:
        if stream == 2 and proc.merged and proc.session_cmd == cmd_id:
            # the command's stderr is in its stdout; what reaches the shell's own stderr is the shell's
            # chatter outside the command (an interactive bash's "no job control" notice at start)
            return
        room = proc.limit - proc.sent[stream]
        if room <= 0:
            proc.dropped[stream] += len(data)
            return
        if len(data) > room:
            proc.dropped[stream] += len(data) - room
            data = data[:room]
        proc.sent[stream] += len(data)
        self.send(op="out", id=cmd_id, fd=stream, data=base64.b64encode(data).decode())

    def _flush_session(self, proc: Proc, stream: int, data: bytes, eof: bool = False) -> None:
        marker = proc.marker
        assert marker is not None and proc.session_cmd is not None
        buf = proc.pending[stream] + data
        idx = buf.find(marker)
        if idx >= 0 and stream == 1 and b"\n" not in buf[idx + len(marker):] and not eof:
            # the exit status after the marker has not arrived yet
            self._emit(proc, proc.session_cmd, stream, buf[:idx])
            proc.pending[stream] = buf[idx:]
            return
        if idx >= 0:
            self._emit(proc, proc.session_cmd, stream, buf[:idx])
            proc.pending[stream] = b""
            proc.done_streams.add(stream)
            if stream == 1:
                status = buf[idx + len(marker):].split(b"\n", 1)[0]
                proc.status = int(status) if status.strip().lstrip(b"-").isdigit() else None
        elif eof:
            self._emit(proc, proc.session_cmd, stream, buf)
            proc.pending[stream] = b""
        else:
            # keep a tail that could be the start of a marker split across two reads
            keep = len(marker) - 1
            head, tail = (buf[:-keep], buf[-keep:]) if len(buf) > keep else (b"", buf)
            if head:
                self._emit(proc, proc.session_cmd, stream, head)
            proc.pending[stream] = tail
        if {1, 2} <= proc.done_streams:
            code = proc.status
            self.send(op="exit", id=proc.session_cmd, code=code, dropped=proc.dropped,
                      error=None if code is not None else "session shell exited")
            proc.session_cmd = None
            proc.marker = None
            proc.status = None
            proc.pending = {1: b"", 2: b""}

    # -- lifecycle -----------------------------------------------------------------------------
    def _reap(self, proc: Proc) -> None:
        if proc.pidfd < 0:
            return  # reaped already, on SIGCHLD
        self.sel.unregister(proc.pidfd)
        os.close(proc.pidfd)
        proc.pidfd = -1
        try:
            _, status, ru = os.wait4(proc.pid, 0)
            proc.exit_code = os.waitstatus_to_exitcode(status)
            # the command and every descendant it waited for
            proc.rusage = {"cpu_seconds": ru.ru_utime + ru.ru_stime, "maxrss_kb": ru.ru_maxrss}
        except ChildProcessError:
            proc.exit_code = -1
        proc.exited_at = time.monotonic()
        if proc.stdin_w is not None:
            if proc.stdin_watch:
                self.sel.unregister(proc.stdin_w)
            os.close(proc.stdin_w)
            proc.stdin_w = None

    def _reap_all(self) -> None:
        """Reap every child that has exited: our own commands through _reap (their status and
        rusage are reported), orphans of the sandbox (we are its init) simply collected. WNOWAIT
        first, so a command's status is never taken by the orphan sweep."""
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            own = next((p for p in self.procs.values() if p.pid == info.si_pid and p.pidfd >= 0), None)
            if own is not None:
                self._reap(own)
            else:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(info.si_pid, 0)

    def _finish_drained(self) -> None:
        now = time.monotonic()
        for key, p in list(self.procs.items()):
            if p.exited_at is None:
                continue
            if p.fds and now - p.exited_at < DRAIN_GRACE:
                continue
            # Background children may hold the pipes open: keep draining them, but report now.
            for fd in list(p.fds):
                self.sel.unregister(fd)
                self.sel.register(fd, selectors.EVENT_READ, ("sink", None))
            p.fds = {}
            if key.startswith("s:"):
                if p.session_cmd is not None:
                    self.send(op="exit", id=p.session_cmd, code=None, dropped=p.dropped,
                              error=f"session shell exited with status {p.exit_code}")
                self.send(op="session_exit", id=key, code=p.exit_code)
            else:
                self.send(op="exit", id=key, code=p.exit_code, dropped=p.dropped, rusage=p.rusage)
            del self.procs[key]

    def _shutdown(self) -> None:
        for p in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        os._exit(0)

    # -- corral's own file writes --------------------------------------------------------------
    def _put(self, msg: dict) -> None:
        """Create a directory, a symbolic link or (with put_data messages) a regular file, walking
        the path without following any link."""
        key, path, kind = msg["id"], msg["path"], msg.get("kind", "file")
        try:
            dir_fd, name = _walk(path)
        except OSError as e:
            self._put_failed(key, path, e)
            return
        try:
            if kind == "dir":
                try:
                    os.mkdir(name, 0o755, dir_fd=dir_fd)
                    self._own(name, dir_fd)
                except FileExistsError:
                    if not stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                        raise OSError(errno.EEXIST, "exists and is not a directory") from None
                if msg.get("mode") is not None:
                    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                    try:
                        os.fchmod(fd, msg["mode"] & 0o7777)
                    finally:
                        os.close(fd)
                self.send(op="exit", id=key, code=0)
            elif kind == "symlink":
                os.symlink(msg["target"], name, dir_fd=dir_fd)
                self._own(name, dir_fd)
                self.send(op="exit", id=key, code=0)
            else:
                mode = msg.get("mode")
                if mode is None:
                    try:  # an existing file keeps its mode
                        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                        mode = st.st_mode & 0o7777 if stat.S_ISREG(st.st_mode) else 0o644
                    except FileNotFoundError:
                        mode = 0o644
                tmp = f".corral-put-{os.urandom(6).hex()}"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                             dir_fd=dir_fd)
                self.puts[key] = Put(path, dir_fd, name, tmp, fd, mode & 0o7777)
                dir_fd = -1  # the Put holds it now
                self._put_data({"id": key, "data": msg.get("data", ""), "eof": msg.get("eof", False)})
        except OSError as e:
            self._put_failed(key, path, e)
        finally:
            if dir_fd >= 0:
                os.close(dir_fd)

    def _own(self, name: str, dir_fd: int) -> None:
        """What corral puts in a sandbox whose commands run as the image's user is that user's."""
        if self.run_as is not None:
            os.chown(name, *self.run_as, dir_fd=dir_fd, follow_symlinks=False)

    def _put_data(self, msg: dict) -> None:
        key = msg["id"]
        if key not in self.puts:
            return
        put = self.puts[key]
        if put is None:  # failed earlier: the rest of its data is dropped
            if msg.get("eof"):
                del self.puts[key]
            return
        try:
            data = memoryview(base64.b64decode(msg.get("data", "")))
            while data:
                data = data[os.write(put.fd, data):]
            if not msg.get("eof"):
                return
            if self.run_as is not None:
                os.fchown(put.fd, *self.run_as)
            os.fchmod(put.fd, put.mode)
            os.rename(put.tmp, put.name, src_dir_fd=put.dir_fd, dst_dir_fd=put.dir_fd)
            put.close(keep=True)
            del self.puts[key]
            self.send(op="exit", id=key, code=0)
        except OSError as e:
            put.close()
            self.puts[key] = None
            if msg.get("eof"):
                del self.puts[key]
            self._put_failed(key, put.path, e)

    def _put_failed(self, key: str, path: str, e: OSError) -> None:
        self.send(op="exit", id=key, code=None, error=f"{path}: {e.strerror or e}")


def _pipe_channel() -> tuple[int, int]:
    return os.pipe()


def _socket_channel() -> tuple[int, int]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return a.detach(), b.detach()


def _walk(path: str) -> tuple[int, str]:
    """The directory that will hold `path` (opened, created where missing) and the final name.
    Each component is opened with O_NOFOLLOW relative to the one before, as openat2's
    RESOLVE_NO_SYMLINKS would: a link anywhere on the way is an error, never followed."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not path.startswith("/") or not parts or ".." in parts:
        raise OSError(errno.EINVAL, "an absolute path without '..' is needed")
    fd = os.open("/", DIR_FLAGS)
    try:
        for i, part in enumerate(parts[:-1]):
            try:
                nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
                nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
            except NotADirectoryError:
                where = "/" + "/".join(parts[: i + 1])
                if stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                    raise OSError(errno.ELOOP, f"{where} is a symbolic link (corral writes through none)") from None
                raise OSError(errno.ENOTDIR, f"{where} is not a directory") from None
            os.close(fd)
            fd = nfd
        return fd, parts[-1]
    except BaseException:
        os.close(fd)
        raise


def _no_dump() -> None:
    """Not dumpable: a process without CAP_SYS_PTRACE (every command: bwrap drops all capabilities)
    can open none of our /proc/<pid> files that need ptrace access (fd/*, mem, environ, ...)."""
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


def _install_exec_listener(bpf: bytes) -> int:
    """Load a seccomp filter with a user-notification listener; returns its fd, or -1."""
    nr = {"x86_64": 317, "aarch64": 277}.get(os.uname().machine)
    if nr is None or not bpf:
        return -1

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = Prog(len(bpf) // 8, ctypes.cast(buf, ctypes.c_void_p))
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS (bwrap set it already)
    fd = libc.syscall(nr, 1, 8, ctypes.byref(prog))  # SECCOMP_SET_MODE_FILTER, FLAG_NEW_LISTENER
    return fd if fd >= 0 else -1


def _send_with_listener(sock: socket.socket, msg: bytes, bpf: bytes) -> None:
    """Install the exec filter on this thread and hand its listener to the host with `msg`.
    The filter stops every sendmsg until corral answers, and corral can answer only once it holds
    the listener: so the listener is sent by a helper thread started *before* the filter exists
    (a seccomp filter without TSYNC binds only the thread that installs it and what it forks later).
    The helper sends once and ends; every later fork is made by this, filtered, thread."""
    import threading

    box: dict[str, int] = {}
    installed = threading.Event()

    def send() -> None:
        installed.wait()
        fd = box.get("fd", -1)
        if fd >= 0:
            socket.send_fds(sock, [msg], [fd])
        else:
            sock.send(msg)

    helper = threading.Thread(target=send, name="corral-listener")
    helper.start()
    try:
        box["fd"] = _install_exec_listener(bpf)
    finally:
        installed.set()
        helper.join()
    if box.get("fd", -1) >= 0:
        os.close(box["fd"])


def _shquote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


if __name__ == "__main__":
    _no_dump()  # first: nothing of ours may be readable through /proc, not even for a moment
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        Agent().run()
    except BrokenPipeError:
        sys.exit(0)

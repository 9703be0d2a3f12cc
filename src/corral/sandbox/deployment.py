"""One launch of a sandbox: its root, bubblewrap's argv, the process in the sandbox's network
namespace and cgroup, the agent's channel, and how it all stops.

The deployment/runtime seam (DESIGN.md): a Deployment knows how a sandbox is *made* and *ended*; the
Sandbox (sandbox.py) is the runtime over it: commands, sessions, files and attribution, spoken to the
agent through the typed protocol (protocol.py) on the deployment's channel (channel.py). A sandbox
has one active deployment; reset() may swap in a spare one launched ahead of time into the same
network namespace (its own cgroup and, on an image, its own writable layer), so that a reset costs
killing the old one, not launching a new one.

Every deployment owns its cgroup and its image root, and removes both when it stops.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import os
import resource
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from corral.config import SandboxConfig
from corral.errors import IsolationUnavailable, SandboxClosed, SandboxError
from corral.monitor.execwatch import exec_filter_bpf
from corral.net.netns import HOST_IP
from corral.nsutil import CLONE_NEWNET, CLONE_NEWNS, setns
from corral.sandbox.agentrt import agent_runtime
from corral.sandbox.boundary import KILL_DEADLINE
from corral.sandbox.channel import AgentChannel
from corral.sandbox.imageroot import IMAGE_CAPS, user_namespace
from corral.sandbox.native import native_agent
from corral.sandbox.protocol import Reply
from corral.sandbox.rootfs import EMPTY_FILE, agent_interpreter, root_mounts
from corral.sandbox.seccomp import filter_fd

if TYPE_CHECKING:
    from corral.monitor.execwatch import ExecWatch
    from corral.monitor.files import FileWatch
    from corral.monitor.writers import WriterWatch
    from corral.net.netns import SandboxNet
    from corral.runtime import Runtime
    from corral.sandbox.cgroups import SandboxCgroup

AGENT = Path(__file__).with_name("agent.py")
AGENT_PATH = "/.corral-agent.py"  # where the agent's code appears inside a sandbox
NATIVE_PATH = "/.corral-agent"  # where the native agent (native.py) appears instead
# Any DNS query leaves through corral's resolver (nftables redirects all UDP/53 there anyway).
RESOLV_CONF = f"nameserver {HOST_IP}\noptions timeout:2 attempts:2\n".encode()
HOSTS = b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n"
READY_TIMEOUT = 15.0


class Deployment:
    """`on_reply(dep, reply, hostpid, fds)` gets every reply but `ready` (which start() waits for);
    `on_gone(dep, why)` is called once if the agent goes after it was ready."""

    def __init__(self, sandbox_id: str, config: SandboxConfig, runtime: Runtime, net: SandboxNet,
                 cgroup: SandboxCgroup | None, uid: int, root_name: str) -> None:
        self.sandbox_id = sandbox_id
        self.config = config
        self.runtime = runtime
        self.net = net
        self.cgroup = cgroup
        self.uid = uid
        self.root_name = root_name  # an image root's directory name, unique per live deployment
        self.proc: subprocess.Popen | None = None
        self.channel: AgentChannel | None = None
        self.agent_pid: int | None = None
        self.notify_fd: int | None = None  # the exec filter's notification fd, from `ready`
        self.execwatch: ExecWatch | None = None  # set by the Sandbox, closed here
        self.filewatch: FileWatch | None = None
        self.writers: WriterWatch | None = None
        self._ready: asyncio.Future[int | None] | None = None
        self._root_built = False
        self.stopped = False

    @property
    def image(self) -> bool:
        return self.config.image is not None and self.config.rootfs is not None

    def send(self, msg: dict, fd: int | None = None) -> None:
        if self.channel is None or self.stopped:
            if fd is not None:
                os.close(fd)
            raise SandboxClosed(f"sandbox {self.sandbox_id} is not running")
        self.channel.send(msg, fd)  # type: ignore[arg-type]

    # -- start ---------------------------------------------------------------------------------------
    async def start(self, on_reply: Callable[[Deployment, Reply, int | None, list[int]], None],
                    on_gone: Callable[[Deployment, str], None]) -> None:
        """Launch bubblewrap and the agent; returns once the agent is ready (IsolationUnavailable if
        it does not get there, everything it made undone)."""
        loop = asyncio.get_running_loop()
        argv, env, owned, preexec, shared = await self._prepare()
        host_sock, child_sock = AgentChannel.pair()
        env["CORRAL_SOCK_FD"] = str(child_sock.fileno())
        self._ready = loop.create_future()
        try:
            # In a worker thread: the child's preexec (a cgroup migration among it) takes
            # milliseconds that the event loop, serving every other sandbox, should not wait out.
            # A session of its own keeps a terminal's Ctrl-C away from the sandbox.
            self.proc = await asyncio.to_thread(
                subprocess.Popen, argv, env=env, pass_fds=(child_sock.fileno(), *owned, *shared),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                preexec_fn=preexec, start_new_session=True)
        except FileNotFoundError:
            host_sock.close()
            raise IsolationUnavailable("bwrap not found; install bubblewrap (apt-get install bubblewrap)") from None
        finally:
            child_sock.close()
            for fd in owned:
                os.close(fd)

        def reply(msg: Reply, hostpid: int | None, fds: list[int]) -> None:
            if msg["op"] == "ready":
                if self._ready is not None and not self._ready.done():
                    # no fd: the agent could not install its exec filter (the Sandbox refuses to run)
                    self.notify_fd = fds.pop(0) if fds else None
                    self._ready.set_result(hostpid)
                for fd in fds:
                    os.close(fd)
                return
            on_reply(self, msg, hostpid, fds)

        def gone(why: str) -> None:
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(SandboxClosed(f"sandbox {self.sandbox_id}: its agent exited while "
                                                        f"starting ({why})"))
            elif not self.stopped:
                on_gone(self, why)

        self.channel = AgentChannel(host_sock, reply, gone, self.sandbox_id)
        try:
            self.agent_pid = await asyncio.wait_for(self._ready, READY_TIMEOUT)
        except (TimeoutError, SandboxClosed):
            err = b""
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(self.proc.wait, 2)
            if self.proc.returncode is not None and self.proc.stderr:
                err = self.proc.stderr.read()
            await self.stop()
            why = err.decode(errors="replace").strip() or "agent timed out"
            raise IsolationUnavailable(
                f"sandbox {self.sandbox_id} did not start: {why}; "
                "run 'corral doctor' to see which isolation feature is missing") from None
        except BaseException:
            await self.stop()
            raise

    async def _prepare(self) -> tuple[list[str], dict[str, str], list[int], Callable[[], None] | None, list[int]]:
        """bwrap's argv and environment, the fds to pass (closed here once it ran), the child's preexec,
        and fds to pass that stay open here (the sandbox's namespaces)."""
        cfg, lim = self.config, self.config.limits
        userns_fd, mnt_fd = -1, -1
        if self.image:
            # the image's own root, writable, with a uid range (sandbox/imageroot.py): a user namespace of
            # corral's making, entered by bwrap, whose root may change what is its own; nested user
            # namespaces stay refused by corral's seccomp filter (bwrap's --disable-userns needs its own)
            assert cfg.rootfs is not None
            roots = self.runtime.image_roots
            merged = await roots.build(cfg.rootfs, self.uid, lim.tmp_mb << 20, name=self.root_name)
            self._root_built = True
            userns_fd, mnt_fd = await asyncio.to_thread(user_namespace, self.uid), roots.mnt_fd
            argv = ["bwrap", "--userns", str(userns_fd), "--uid", "0", "--gid", "0"]
            caps = ["--cap-drop", "ALL", *(a for c in IMAGE_CAPS for a in ("--cap-add", c))]
        else:
            argv = ["bwrap", "--unshare-user", "--uid", "0", "--gid", "0"]
            caps = ["--cap-drop", "ALL", "--disable-userns"]
        argv += ["--unshare-pid", "--as-pid-1", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                 "--hostname", cfg.hostname, "--die-with-parent", *caps]
        # the native agent (static, needs nothing of the root), else agent.py run by a host Python
        native = await asyncio.to_thread(native_agent, self.runtime.config.agent)
        interpreter = None if native else agent_interpreter()
        if self.image:
            argv += ["--bind", str(merged), "/"]
        else:  # reads the host's tree (masks, secrets): off the event loop every sandbox shares
            runtime = self.runtime
            argv += await asyncio.to_thread(lambda: root_mounts(cfg, runtime.masked_paths(), interpreter))
        if native:
            # one file bound into every sandbox: its code pages are shared, not one copy each
            argv += ["--ro-bind", str(native), NATIVE_PATH]
            agent = [NATIVE_PATH]
        elif cfg.rootfs is not None:
            assert interpreter is not None
            # a root that is not the host's: the agent brings its own Python (sandbox/agentrt.py)
            rt = agent_runtime(interpreter)
            argv += rt.binds()
            if os.path.lexists(cfg.rootfs / "etc/ld.so.preload"):
                argv += ["--ro-bind", "/dev/null", "/etc/ld.so.preload"]  # no code of the root's in the agent
            agent = rt.command(AGENT_PATH)
        else:
            assert interpreter is not None
            agent = [interpreter, "-I", "-S", AGENT_PATH]
        argv += ["--dev", "/dev", "--proc", "/proc"]
        if cfg.gpu:
            for dev in sorted(Path("/dev").glob("nvidia*")):
                argv += ["--dev-bind", str(dev), str(dev)]
        if not self.image:  # an image's /tmp and /root are its own, in its writable layer
            argv += ["--size", str(lim.tmp_mb << 20), "--tmpfs", "/tmp", "--size", str(lim.tmp_mb << 20),
                     "--tmpfs", "/root"]
        # the image's User (not root) must be able to work in /workspace too
        argv += [*(["--perms", "1777"] if self.image and cfg.run_as else []),
                 "--size", str(lim.workspace_mb << 20), "--tmpfs", "/workspace"]
        # The agent's code is copied in from a memfd: corral's install may sit where the
        # sandbox's unprivileged uid cannot look (under /root, say).
        data = {"/etc/resolv.conf": RESOLV_CONF, "/etc/hosts": HOSTS,
                **({} if native else {AGENT_PATH: agent_source()})}
        data_fds = [_data_fd(blob) for blob in data.values()]
        for fd, dest in zip(data_fds, data, strict=True):
            argv += ["--perms", "0444", "--ro-bind-data", str(fd), dest]
        seccomp = filter_fd()
        argv += [*([] if self.image else ["--remount-ro", "/"]), "--chdir", "/workspace", "--seccomp", str(seccomp),
                 "--", *agent]
        base_env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root", "USER": "root", "LANG": "C.UTF-8", "TERM": "xterm",
            "SHELL": cfg.shell, "CORRAL_SANDBOX": self.sandbox_id,
        }
        base_env.update(dict(cfg.env))
        env = {"CORRAL_AGENT_ENV": json.dumps(base_env), "CORRAL_SHELL": cfg.shell, "CORRAL_WORKDIR": cfg.workdir,
               **({"CORRAL_RUN_AS": cfg.run_as} if self.image and cfg.run_as else {}),
               "PATH": base_env["PATH"], "CORRAL_EXEC_FILTER": base64.b64encode(exec_filter_bpf()).decode()}
        cg_files = self.cgroup.join_files() if self.cgroup else []
        # RLIMIT_NPROC is per uid (each sandbox has its own): the limit without cgroups, a backstop with
        nproc = lim.pids + 64 if self.cgroup else lim.pids + 8
        netns_fd, uid, nofile = self.net.netns_fd, self.uid, lim.open_files

        def preexec() -> None:  # runs in the forked child (one thread), before exec of bwrap
            for f in cg_files:
                fd = os.open(f, os.O_WRONLY)
                os.write(fd, b"0")  # itself (join_files)
                os.close(fd)
            if mnt_fd >= 0:
                setns(mnt_fd, CLONE_NEWNS)  # where the image root is mounted (while still root)
            setns(netns_fd, CLONE_NEWNET)
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)

        # the secret files' empty masks last, so that nothing between their making and `owned` can leak them
        argv, empty_fds = _empty_files(argv) if not self.image else (argv, [])
        owned = [seccomp, *data_fds, *empty_fds, *([userns_fd] if userns_fd >= 0 else [])]
        if native:
            # The native agent's launcher mode does what preexec does, in C (agent.c: launcher()): corral
            # then spawns with vfork rather than forking its whole interpreter to run Python in the copy
            # (a Popen with a preexec function: ~5 ms more, with the GIL held).
            launch = [str(native), "--corral-launch", *(a for f in cg_files for a in ("--cgroup", str(f))),
                      "--netns", str(netns_fd), *(["--mntns", str(mnt_fd)] if mnt_fd >= 0 else []),
                      "--nproc", str(nproc), "--nofile", str(nofile), "--uid", str(uid), "--"]
            return [*launch, *argv], env, owned, None, [netns_fd, *([mnt_fd] if mnt_fd >= 0 else [])]
        return argv, env, owned, preexec, []

    # -- stop ----------------------------------------------------------------------------------------
    async def kill(self) -> None:
        """Every process of this deployment dead (the agent and bwrap included), the channel closed:
        what must be done before another deployment of the sandbox may run."""
        self.stopped = True
        for watch in (self.filewatch, self.execwatch, self.writers):
            if watch is not None:
                watch.close()
        self.filewatch = self.execwatch = self.writers = None
        if self.notify_fd is not None:
            os.close(self.notify_fd)
            self.notify_fd = None
        if self.channel is not None:
            self.channel.close()
        if self.cgroup is not None:
            deadline = time.monotonic() + KILL_DEADLINE
            while True:
                await asyncio.to_thread(self.cgroup.kill)
                left = self.cgroup.pids()
                if not left:
                    break
                if time.monotonic() > deadline:  # never let a next episode start beside them
                    raise SandboxError(f"sandbox {self.sandbox_id}: {len(left)} process(es) survived "
                                       f"{KILL_DEADLINE:g}s of SIGKILL (host pids {left[:8]}); close the sandbox")
                await asyncio.sleep(0.01)
            # every step's and session's cgroup is empty now: the next episode starts with none
            self.cgroup.live_steps(lambda _step: True)
            self.cgroup.prune_sessions(set())
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    async def stop(self, *, remove_cgroup: bool = False) -> None:
        """kill(), then reap bwrap and drop the image root (and the cgroup, when asked: a sandbox's
        active cgroup is the runtime's to remove when the sandbox closes)."""
        await self.kill()
        if self.proc is not None:
            await asyncio.to_thread(self.proc.wait)
            if self.proc.stderr:
                self.proc.stderr.close()
            self.proc = None
        self.agent_pid = None
        if self._root_built:
            self._root_built = False
            await self.runtime.image_roots.drop(self.uid, name=self.root_name)
        if remove_cgroup and self.cgroup is not None:
            cg, self.cgroup = self.cgroup, None
            await asyncio.to_thread(cg.remove)


@functools.cache
def agent_source() -> bytes:
    return AGENT.read_bytes()


def _empty_files(argv: list[str]) -> tuple[list[str], list[int]]:
    """root_mounts' secret-file masks (EMPTY_FILE) made real: each an empty read-only file of its own
    (bwrap reads and closes one descriptor per --ro-bind-data)."""
    out: list[str] = []
    fds: list[int] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--ro-bind" and i + 2 < len(argv) and argv[i + 1] == EMPTY_FILE:
            fds.append(_data_fd(b""))
            out += ["--perms", "0400", "--ro-bind-data", str(fds[-1]), argv[i + 2]]
            i += 3
        else:
            out.append(argv[i])
            i += 1
    return out, fds


def _data_fd(data: bytes) -> int:
    """A memfd holding `data`, for bwrap's --ro-bind-data (read from offset 0)."""
    fd = os.memfd_create("corral-data", os.MFD_CLOEXEC)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


__all__ = ["AGENT", "AGENT_PATH", "HOSTS", "NATIVE_PATH", "RESOLV_CONF", "Deployment", "agent_source"]

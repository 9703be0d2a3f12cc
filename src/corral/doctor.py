"""`corral doctor`: which isolation and limit features work on this machine, and how to fix the rest.

Every check actually exercises the feature the way a sandbox will (a real bubblewrap launch as an
unprivileged uid, a real nftables listing, a real netlink dump) rather than looking for files, so a
green doctor means a sandbox will start. Nothing here creates cgroups, tables or links.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from corral.errors import CorralError

# An unprivileged uid in corral's default sandbox uid range (RuntimeConfig.uid_base): a sandbox
# launches bwrap as such a uid, so the user-namespace probe must too (root could always unshare).
PROBE_UID = 1_500_000_000
PROBE_TIMEOUT = 15


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def check_root() -> Check:
    euid = os.geteuid()
    return Check("running as root", euid == 0, f"euid {euid}",
                 "run corral as root (or in a root container): it creates network namespaces, nftables "
                 "rules and cgroups")


def check_bwrap() -> Check:
    exe = shutil.which("bwrap")
    fix = "install bubblewrap >= 0.8 (apt-get install bubblewrap / dnf install bubblewrap)"
    if exe is None:
        return Check("bubblewrap", False, "bwrap not found on PATH", fix)
    try:
        p = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=PROBE_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        return Check("bubblewrap", False, f"{exe} --version failed: {e}", fix)
    if p.returncode != 0:
        return Check("bubblewrap", False, f"{exe} --version exited {p.returncode}: {_first_line(p.stderr)}", fix)
    return Check("bubblewrap", True, f"{p.stdout.strip()} ({exe})", fix)


def check_userns() -> Check:
    """Launch bwrap as an unprivileged uid with the namespace flags a sandbox uses."""
    name = "user namespaces (bwrap as unprivileged uid)"
    fix = ("allow unprivileged user namespaces: sysctl -w user.max_user_namespaces=15000 "
           "(and kernel.unprivileged_userns_clone=1 on Debian kernels, "
           "kernel.apparmor_restrict_unprivileged_userns=0 on Ubuntu >= 23.10); in a container, run it "
           "with a seccomp/AppArmor profile that permits unshare(CLONE_NEWUSER)")
    exe = shutil.which("bwrap")
    if exe is None:
        return Check(name, False, "bwrap not found", fix)
    if os.geteuid() != 0:
        # Without root we cannot switch to the probe uid; our own uid is unprivileged anyway.
        preexec: Callable[[], None] | None = None
    else:
        def preexec() -> None:
            os.setgroups([])
            os.setresgid(PROBE_UID, PROBE_UID, PROBE_UID)
            os.setresuid(PROBE_UID, PROBE_UID, PROBE_UID)

    argv = [exe, "--unshare-user", "--uid", "0", "--gid", "0", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--die-with-parent", "--cap-drop", "ALL", "--disable-userns",
            "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "true"]
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT, preexec_fn=preexec,
                           stdin=subprocess.DEVNULL, cwd="/")
    except (OSError, subprocess.TimeoutExpired) as e:
        return Check(name, False, f"bwrap probe failed: {e}", fix)
    if p.returncode != 0:
        err = _first_line(p.stderr)
        if "disable-userns" in err:
            return Check(name, False, f"bwrap is too old for --disable-userns: {err}", "install bubblewrap >= 0.8")
        return Check(name, False, f"bwrap exited {p.returncode}: {err}", fix)
    return Check(name, True, f"sandbox launched as uid {PROBE_UID if preexec else os.geteuid()}", fix)


def check_nft() -> Check:
    fix = "install nftables (apt-get install nftables) and run corral with CAP_NET_ADMIN (as root)"
    exe = shutil.which("nft")
    if exe is None:
        return Check("nftables", False, "nft not found on PATH", fix)
    try:
        p = subprocess.run([exe, "list", "tables"], capture_output=True, text=True, timeout=PROBE_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        return Check("nftables", False, f"nft list tables failed: {e}", fix)
    if p.returncode != 0:
        return Check("nftables", False, f"nft list tables exited {p.returncode}: {_first_line(p.stderr)}", fix)
    n = len([ln for ln in p.stdout.splitlines() if ln.startswith("table ")])
    return Check("nftables", True, f"{exe} works ({n} table(s) in this network namespace)", fix)


def check_cgroups() -> Check:
    """Limits (memory, CPU, pids), per-step kill and freeze need corral's own cgroups."""
    from corral.sandbox.cgroups import discover

    fix = ("run corral as root with cgroup v1 memory/pids/cpu/freezer or cgroup v2 mounted writable, or in a "
           "delegated cgroup (systemd-run --scope -p Delegate=yes ...)")
    h = discover("doctor")
    if h.version is None:
        return Check("cgroups (limits, kill, freeze)", False,
                     f"unavailable: {h.problem}; sandboxes run WITHOUT memory/CPU/process limits", fix,
                     required=False)
    if h.version == 2:
        base = h.roots["unified"].parent
        try:
            # what corral's own cgroups below base may use: what base's owner enabled for its children
            have = set((base / "cgroup.subtree_control").read_text().split())
        except OSError:
            have = set()
        missing = sorted({"memory", "pids", "cpu"} - have)
        if missing:
            return Check("cgroups (limits, kill, freeze)", False,
                         f"v2 at {base}, but controllers {', '.join(missing)} are not delegated: tracking, "
                         "kill and freeze work, limits are not enforced",
                         f"enable them in {base}/cgroup.subtree_control (systemd: Delegate=yes); corral does "
                         "not write outside its own cgroups", required=False)
        return Check("cgroups (limits, kill, freeze)", True, f"v2 at {base}", fix, required=False)
    where = ", ".join(f"{c}={r.parent}" for c, r in sorted(h.roots.items()))
    return Check("cgroups (limits, kill, freeze)", True, f"v1: {where}", fix, required=False)


def check_seccomp() -> Check:
    from corral.sandbox.seccomp import filter_bpf

    fix = "install libseccomp2 (apt-get install libseccomp2) and the pyseccomp package"
    try:
        prog = filter_bpf()
    except (CorralError, OSError, ImportError) as e:
        return Check("seccomp filter", False, str(e), fix)
    return Check("seccomp filter", True, f"BPF program built ({len(prog) // 8} instructions)", fix)


def check_netlink() -> Check:
    fix = "run corral as root (CAP_NET_ADMIN) on a kernel with veth and network namespace support"
    try:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            links = ipr.get_links()
    except Exception as e:  # pyroute2 raises many types (NetlinkError, OSError, ...)
        return Check("netlink (pyroute2)", False, f"{type(e).__name__}: {e}", fix)
    return Check("netlink (pyroute2)", True, f"{len(links)} link(s) in this network namespace", fix)


def check_interpreter() -> Check:
    """The native agent when it builds (agent: auto), else a Python every sandbox user can run."""
    from corral.sandbox.native import build
    from corral.sandbox.rootfs import agent_interpreter

    try:
        return Check("sandbox agent", True, f"native: {build()}")
    except CorralError as e:
        native_error = str(e)
    try:
        exe = agent_interpreter()
    except CorralError as e:
        return Check("sandbox agent", False, f"{native_error}; {e}",
                     "apt-get install gcc libc6-dev (the native agent), or python3-minimal readable by all users")
    return Check("sandbox agent", True, f"agent.py with {exe} (the native one would need: {native_error})")


def check_lock_dir() -> Check:
    """Instance locks tell `corral gc` which leftovers belong to a live runtime."""
    d = "/run/corral"
    probe = d if os.path.isdir(d) else os.path.dirname(d)
    ok = os.access(probe, os.W_OK | os.X_OK)
    return Check("instance lock directory", ok, f"{d} ({'writable' if ok else 'not writable'})",
                 f"make {d} (or its parent) writable for corral; run as root")


def check_exec_monitor() -> Check:
    """The exec/connect watcher needs seccomp user notification (Linux 5.5+); fanotify for files."""

    from corral.monitor.execwatch import exec_filter_bpf

    fix = "use Linux 5.5 or newer with seccomp enabled (CONFIG_SECCOMP_FILTER)"
    try:
        exec_filter_bpf()
    except Exception as e:
        return Check("exec monitor (seccomp user notification)", False, f"cannot build the filter: {e}", fix)
    release = tuple(int(x) for x in os.uname().release.split(".")[:2] if x.isdigit())
    if release < (5, 5):
        return Check("exec monitor (seccomp user notification)", False, f"kernel {os.uname().release}", fix)
    from corral.monitor.files import fanotify_group

    try:
        os.close(fanotify_group())
    except OSError as e:
        files = f"fanotify unavailable ({e.strerror})"
    else:
        # deletions, renames and links of protected paths need fanotify's file-handle mode (Linux 5.9+)
        try:
            os.close(fanotify_group(file_handles=True))
            files = "fanotify ok (writes, deletions, renames, links)"
        except OSError as e:
            files = f"fanotify ok (writes only: file-handle mode unavailable, {e.strerror})"
    return Check("exec monitor (seccomp user notification)", True, f"kernel {os.uname().release}; {files}", fix)


def check_gpu() -> Check:
    """Informational: GPU passthrough (SandboxConfig.gpu) and GPU monitoring."""
    devs = sorted(glob.glob("/dev/nvidia*"))
    try:
        import pynvml  # noqa: F401

        nvml = True
    except ImportError:
        nvml = False
    detail = f"{len(devs)} /dev/nvidia* node(s); nvidia-ml-py {'importable' if nvml else 'not installed'}"
    fix = "" if devs and nvml else (
        "for GPU sandboxes install the NVIDIA driver" + ("" if nvml else " and pip install nvidia-ml-py"))
    return Check("GPU (optional)", bool(devs) and nvml, detail, fix, required=False)


def check_images() -> Check:
    """Informational: OCI images as sandbox roots (corral/images, sandbox/imageroot.py)."""
    missing = [t for t in ("skopeo", "umoci", "unshare") if shutil.which(t) is None]
    release = os.uname().release
    try:
        kernel = tuple(int(x) for x in release.split("-", 1)[0].split(".")[:2])
    except ValueError:
        kernel = (0, 0)
    old = kernel < (5, 19)  # overlayfs over idmapped lower layers
    detail = (f"skopeo, umoci present; kernel {release}" if not missing and not old else
              "; ".join([*(["missing: " + ", ".join(missing)] if missing else []),
                         *([f"kernel {release} is older than 5.19 (idmapped overlay layers)"] if old else [])]))
    fix = "" if not missing and not old else (
        ("apt-get install " + " ".join(missing)) if missing else "run image sandboxes on Linux >= 5.19")
    return Check("images (optional)", not missing and not old, detail, fix, required=False)


def checks() -> list[Check]:
    out = []
    for fn in (check_root, check_bwrap, check_userns, check_nft, check_cgroups, check_seccomp, check_netlink,
               check_interpreter, check_exec_monitor, check_lock_dir, check_gpu, check_images):
        try:
            out.append(fn())
        except Exception as e:  # one broken probe must not hide the others
            out.append(Check(fn.__name__.removeprefix("check_"), False, f"probe crashed: {type(e).__name__}: {e}"))
    return out


def all_required_ok(results: list[Check]) -> bool:
    return all(c.ok for c in results if c.required)

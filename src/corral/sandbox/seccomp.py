"""The seccomp filter every sandbox runs under, compiled to BPF once per process with libseccomp.

Refused with EPERM: mounting, tracing other processes, BPF, kexec, kernel modules, the kernel keyring,
perf events, io_uring, userfaultfd and any new namespace. clone3 answers ENOSYS so that libc falls
back to clone(2), whose flags *can* be inspected (clone3 passes them in memory BPF cannot read).

The attempts that are evidence of an escape, an injection or a capture (ATTEMPTS here: mounts, a new
root, a handle opened by number, modules, kexec, BPF, namespaces, ptrace, another process's memory
or descriptors; and packet sockets) are
refused by corral's exec monitor instead (monitor/execwatch.py notifies them, and always answers as
this filter would), so each is seen and judged: a refusal here would win over the notification and
leave no trace. If the monitor goes, its listener closes and they fail with ENOSYS: still refused.

Sockets are an allow-list of families (SOCKET_FAMILIES); any other family answers EAFNOSUPPORT before
a socket exists (AF_PACKET: through the monitor, as above). AF_VSOCK above all: vsock ignores network
namespaces, so on a VM host a sandbox could otherwise reach the hypervisor's listeners. memfd_secret
answers ENOSYS: its pages are unreadable even through /proc/<pid>/mem, so an exec path or argv kept
there would blind the exec monitor.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os

import pyseccomp as sc

from corral.errors import IsolationUnavailable

DENIED = (
    # mounts and filesystem views
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsconfig",
    "fsmount", "fspick", "mount_setattr",
    # other processes' memory
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    # kernel attack surface
    "bpf", "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "keyctl", "add_key", "request_key", "perf_event_open", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "userfaultfd", "open_by_handle_at", "name_to_handle_at", "lookup_dcookie",
    "quotactl", "swapon", "swapoff", "reboot", "syslog", "acct", "iopl", "ioperm", "settimeofday",
    "clock_settime", "clock_adjtime", "adjtimex", "personality", "vhangup", "nfsservctl",
    # namespaces
    "unshare", "setns",
)

# refused by the exec monitor, which sees them (execwatch.ATTEMPTS), rather than here
ATTEMPTS = ("mount", "umount2", "pivot_root", "chroot", "open_by_handle_at", "init_module", "finit_module",
            "kexec_load", "kexec_file_load", "bpf", "unshare", "setns", "ptrace",
            "pidfd_getfd", "process_vm_readv", "process_vm_writev")

AF_UNIX, AF_INET, AF_INET6, AF_NETLINK, AF_PACKET = 1, 2, 10, 16, 17
# Families a sandbox may open sockets of. AF_NETLINK is there for common tools, not for its own sake:
# glibc's getaddrinfo(AI_ADDRCONFIG) and if_nameindex ask NETLINK_ROUTE which addresses exist, and
# `ip addr`/`ip route` speak it; `ss` reads sockets through NETLINK_SOCK_DIAG. Other netlink protocols
# (audit, netfilter, uevents, ...) are refused like any other family.
SOCKET_FAMILIES = (AF_UNIX, AF_INET, AF_INET6, AF_NETLINK)
NETLINK_PROTOCOLS = (0, 4)  # NETLINK_ROUTE, NETLINK_SOCK_DIAG
SOCKET_FAMILY_LIMIT = 64  # above every AF_* the kernel knows (AF_MAX is 46 in Linux 6.x)

CLONE_NEW_FLAGS = (
    0x00020000  # CLONE_NEWNS
    | 0x02000000  # CLONE_NEWCGROUP
    | 0x04000000  # CLONE_NEWUTS
    | 0x08000000  # CLONE_NEWIPC
    | 0x10000000  # CLONE_NEWUSER
    | 0x20000000  # CLONE_NEWPID
    | 0x40000000  # CLONE_NEWNET
    | 0x00000080  # CLONE_NEWTIME
)


@functools.cache
def filter_bpf() -> bytes:
    """Compiled BPF program (bytes) for bwrap's --seccomp."""
    try:
        f = sc.SyscallFilter(defaction=sc.ALLOW)
    except Exception as e:  # libseccomp missing or unusable
        raise IsolationUnavailable(
            f"cannot build the seccomp filter ({e}); install libseccomp2 (apt-get install libseccomp2)"
        ) from None
    eperm = sc.ERRNO(errno.EPERM)
    for name in DENIED:
        if name in ATTEMPTS:
            continue
        try:
            f.add_rule(eperm, name)
        except Exception:
            continue  # not a syscall on this architecture
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    with contextlib.suppress(Exception):  # not a syscall on this architecture: nothing to refuse
        f.add_rule(sc.ERRNO(errno.ENOSYS), "memfd_secret")
    _socket_allow_list(f)
    # x86-64 clone(flags, ...): flags is argument 0
    f.add_rule(eperm, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_NEW_FLAGS, 0x00020000))
    for bit in (0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000, 0x00000080):
        f.add_rule(eperm, "clone", sc.Arg(0, sc.MASKED_EQ, bit, bit))
    fd = os.memfd_create("corral-seccomp-build", os.MFD_CLOEXEC)
    with open(fd, "w+b") as buf:
        f.export_bpf(buf)
        buf.seek(0)
        return buf.read()


def _socket_allow_list(f: sc.SyscallFilter) -> None:
    """socket()/socketpair() of a family outside SOCKET_FAMILIES answer EAFNOSUPPORT.
    libseccomp takes one comparison per argument and rule, so the complement of the allow-list is
    spelled out value by value, plus one rule for everything at or above SOCKET_FAMILY_LIMIT. The
    comparison is on all 64 bits: a family with any upper bit set (the kernel would truncate it to
    an int) is >= the limit and refused too."""
    refuse = sc.ERRNO(errno.EAFNOSUPPORT)
    for name in ("socket", "socketpair"):
        for family in range(SOCKET_FAMILY_LIMIT):
            if family not in SOCKET_FAMILIES and not (name == "socket" and family == AF_PACKET):
                f.add_rule(refuse, name, sc.Arg(0, sc.EQ, family))
        f.add_rule(refuse, name, sc.Arg(0, sc.GE, SOCKET_FAMILY_LIMIT))
        # netlink: only the protocols common tools need (arg 2); the same one-comparison rule as above
        for proto in range(max(NETLINK_PROTOCOLS)):
            if proto not in NETLINK_PROTOCOLS:
                f.add_rule(refuse, name, sc.Arg(0, sc.EQ, AF_NETLINK), sc.Arg(2, sc.EQ, proto))
        f.add_rule(refuse, name, sc.Arg(0, sc.EQ, AF_NETLINK), sc.Arg(2, sc.GT, max(NETLINK_PROTOCOLS)))


def filter_fd() -> int:
    """A fresh readable fd holding the filter; bwrap reads it to EOF, so each launch needs its own."""
    fd = os.memfd_create("corral-seccomp", os.MFD_CLOEXEC)
    os.write(fd, filter_bpf())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd

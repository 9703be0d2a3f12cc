"""The seccomp filter every sandbox runs under, compiled to BPF once per process with libseccomp.

Refused with EPERM: mounting, tracing other processes, BPF, kexec, kernel modules, the kernel keyring,
perf events, io_uring, userfaultfd and any new namespace. clone3 answers ENOSYS so that libc falls
back to clone(2), whose flags *can* be inspected (clone3 passes them in memory BPF cannot read).
"""

from __future__ import annotations

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
        try:
            f.add_rule(eperm, name)
        except Exception:
            continue  # not a syscall on this architecture
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    # x86-64 clone(flags, ...): flags is argument 0
    f.add_rule(eperm, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_NEW_FLAGS, 0x00020000))
    for bit in (0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000, 0x00000080):
        f.add_rule(eperm, "clone", sc.Arg(0, sc.MASKED_EQ, bit, bit))
    fd = os.memfd_create("corral-seccomp-build", os.MFD_CLOEXEC)
    with open(fd, "w+b") as buf:
        f.export_bpf(buf)
        buf.seek(0)
        return buf.read()


def filter_fd() -> int:
    """A fresh readable fd holding the filter; bwrap reads it to EOF, so each launch needs its own."""
    fd = os.memfd_create("corral-seccomp", os.MFD_CLOEXEC)
    os.write(fd, filter_bpf())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd

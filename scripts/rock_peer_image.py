"""Build an OCI image (a layout directory) of this machine's own userland tools, offline, to stand in
for the images ROCK's SDK test suite names (python:3.11, ubuntu:24.04, ...) when that suite runs
against `corral serve` without the internet: bash, coreutils, python3, the shadow tools (useradd),
tar, sed, grep. Each binary comes with the libraries it links.

    python3 scripts/rock_peer_image.py /tmp/rock-image
    # then a serve.yaml with pull_images: true and image_aliases naming oci:/tmp/rock-image/layout:1
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

TOOLS = ["/usr/bin/bash", "/usr/bin/sh", "/usr/bin/dash", "/usr/bin/python3", "/usr/sbin/useradd", "/usr/sbin/groupadd",
         "/usr/sbin/usermod", "/usr/bin/su", "/usr/bin/tar", "/usr/bin/sed", "/usr/bin/grep", "/usr/bin/find",
         "/usr/bin/xargs", "/usr/bin/timeout", "/usr/bin/which", "/usr/bin/gzip", "/usr/bin/getent", "/usr/bin/awk"]
COREUTILS = ["ls", "cat", "mkdir", "chmod", "chown", "chgrp", "rm", "cp", "mv", "touch", "id", "whoami", "stat",
             "head", "tail", "wc", "echo", "env", "sleep", "true", "false", "nohup", "date", "tr", "cut", "sort",
             "uniq", "ln", "readlink", "dirname", "basename", "pwd", "mktemp", "du", "df", "test", "printf",
             "realpath", "sha256sum", "base64", "tee", "seq", "kill", "ps"]


def copy_with_libs(tree: Path, binary: str) -> None:
    real = os.path.realpath(binary)
    dest = tree / binary.lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        shutil.copy2(real, dest)
    out = subprocess.run(["ldd", real], capture_output=True, text=True).stdout
    for lib in out.split():
        if lib.startswith("/") and os.path.exists(lib):
            target = tree / lib.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                shutil.copy2(os.path.realpath(lib), target)


def main(out: Path) -> int:
    shutil.rmtree(out, ignore_errors=True)
    tree = out / "tree"
    for d in ("etc", "root", "tmp", "home", "var/tmp", "var/lib", "usr/local/bin", "workspace"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    os.chmod(tree / "tmp", 0o1777)
    os.chmod(tree / "root", 0o700)
    for link, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")):
        (tree / target).mkdir(parents=True, exist_ok=True)
        (tree / link).symlink_to(target)  # merged /usr, as Debian's own layout
    for b in TOOLS + [f"/usr/bin/{c}" for c in COREUTILS]:
        if os.path.exists(b):
            copy_with_libs(tree, b)
    py = os.path.realpath("/usr/bin/python3")
    stdlib = Path(f"/usr/lib/{Path(py).name}")
    shutil.copytree(stdlib, tree / stdlib.relative_to("/"), symlinks=True,
                    ignore=shutil.ignore_patterns("test", "__pycache__", "idlelib", "tkinter", "turtledemo"))
    for so in glob.glob(str(stdlib / "lib-dynload" / "*.so")):
        copy_with_libs(tree, so)
    for f in ("passwd", "group", "shadow", "gshadow", "login.defs", "nsswitch.conf", "bash.bashrc"):
        if os.path.exists(f"/etc/{f}"):
            shutil.copy2(f"/etc/{f}", tree / "etc" / f)
    (tree / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534::/nonexistent:/bin/false\n")
    (tree / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (tree / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")
    (tree / "etc/gshadow").write_text("root:*::\n")
    (tree / "etc/default").mkdir(exist_ok=True)
    (tree / "root/.bashrc").write_text("")
    layout = out / "layout"
    for argv in (["umoci", "init", "--layout", str(layout)], ["umoci", "new", "--image", f"{layout}:1"],
                 ["umoci", "insert", "--image", f"{layout}:1", str(tree), "/"],
                 ["umoci", "config", "--image", f"{layout}:1", "--config.env",
                  "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "--config.workingdir", "/"]):
        subprocess.run(argv, check=True)
    shutil.rmtree(tree)
    print(f"oci:{layout}:1")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/rock-image")))

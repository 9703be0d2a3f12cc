"""The image store: real images built here with umoci, served by a real registry (docker-registry on
loopback, in the suite's own network namespace), pulled and unpacked with skopeo and umoci."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.images import ImageError, ImageStore, source_of
from tests.conftest import eventually

TOOLS = ("skopeo", "umoci", "docker-registry")
pytestmark = pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                                reason="needs skopeo, umoci and docker-registry (make deps installs them)")
REGISTRY = "127.0.0.1:5000"


def _run(*argv: str, cwd: Path | None = None) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, cwd=cwd).stdout


@pytest.fixture(scope="module")
def oci_layout(tmp_path_factory) -> Path:
    """A two-layer image: files (one owned by uid 1000), then a layer that deletes one file (a
    whiteout) and replaces a directory's contents (an opaque directory); Env, WorkingDir and User set."""
    base = tmp_path_factory.mktemp("image-src")
    tree = base / "tree"
    for d in ("etc", "opt/gone", "home/alice", "app"):
        (tree / d).mkdir(parents=True)
    (tree / "etc/os-release").write_text("ID=corral-test\n")
    (tree / "etc/to-be-deleted").write_text("secret\n")
    (tree / "opt/gone/a").write_text("old\n")
    (tree / "app/main.py").write_text("print('hi')\n")
    (tree / "home/alice/file").write_text("alice\n")
    os.chown(tree / "home/alice/file", 1000, 1000)
    # what an image may carry that must never become the host's: a setuid-root program, a device node
    (tree / "app/suid").write_text("#!/bin/sh\n")
    os.chmod(tree / "app/suid", 0o4755)
    os.mknod(tree / "app/mem", 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # (a harmless one: null)
    newer = base / "newer"
    (newer / "opt/gone").mkdir(parents=True)
    (newer / "opt/gone/b").write_text("new\n")
    layout = base / "layout"
    _run("umoci", "init", "--layout", str(layout))
    _run("umoci", "new", "--image", f"{layout}:1")
    _run("umoci", "insert", "--image", f"{layout}:1", str(tree), "/")
    _run("umoci", "insert", "--image", f"{layout}:1", "--whiteout", "/etc/to-be-deleted")
    _run("umoci", "insert", "--image", f"{layout}:1", "--opaque", str(newer / "opt/gone"), "/opt/gone")
    _run("umoci", "config", "--image", f"{layout}:1", "--config.env", "FOO=bar", "--config.env",
         "PATH=/usr/bin:/bin", "--config.workingdir", "/app", "--config.user", "1000:1000")
    return layout


def _start_registry(d: Path, addr: str, extra: str = "") -> subprocess.Popen:
    """docker-registry serving from `d` on loopback `addr` (`extra`: more of its config); returns once it
    answers (a 401 of one that wants a login counts)."""
    (d / "config.yml").write_text(
        f"version: 0.1\nlog: {{level: warn}}\nstorage: {{filesystem: {{rootdirectory: {d / 'data'}}}}}\n"
        f"http: {{addr: {addr}}}\n{extra}")
    proc = subprocess.Popen(["docker-registry", "serve", str(d / "config.yml")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://{addr}/v2/", timeout=1)
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            time.sleep(0.05)
    return proc


@pytest.fixture(scope="module")
def registry(tmp_path_factory, oci_layout) -> Iterator[str]:
    """docker-registry on loopback with the test image pushed as corral/tiny:1."""
    proc = _start_registry(tmp_path_factory.mktemp("registry"), REGISTRY)
    try:
        _run("skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{oci_layout}:1",
             f"docker://{REGISTRY}/corral/tiny:1")
        yield REGISTRY
    finally:
        proc.terminate()
        proc.wait(10)


def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images", insecure_registries=(REGISTRY,))


def test_pull_from_a_registry_unpacks_the_image_as_it_is(tmp_path, registry):
    st = store(tmp_path)
    progress: list[str] = []
    img = st.pull(f"{registry}/corral/tiny:1", on_line=progress.append)
    assert img.id.startswith("sha256:") and len(img.id) == 71
    root = img.rootfs
    assert (root / "etc/os-release").read_text() == "ID=corral-test\n"
    assert not (root / "etc/to-be-deleted").exists()  # the whiteout
    assert sorted(os.listdir(root / "opt/gone")) == ["b"]  # the opaque directory
    # ownership as in the image, shifted into corral's storage range: no host user owns an image's files
    from corral.images.store import STORAGE_UID_BASE

    assert os.stat(root / "home/alice/file").st_uid == STORAGE_UID_BASE + 1000
    assert os.stat(root / "etc/os-release").st_uid == STORAGE_UID_BASE
    suid = os.stat(root / "app/suid")
    assert suid.st_uid == STORAGE_UID_BASE and suid.st_uid != 0  # setuid to no one on the host
    assert not os.path.lexists(root / "app/mem")  # no device node of the image's on the host
    assert dict(img.env)["FOO"] == "bar" and img.workdir == "/app" and img.user == "1000:1000"
    assert any("blob" in line.lower() for line in progress), progress  # skopeo's own progress lines
    assert [i.name for i in st.ls()] == [f"{registry}/corral/tiny:1"]
    assert st.get(f"{registry}/corral/tiny:1") == img


def test_the_same_image_by_digest_archive_or_layout_is_unpacked_once(tmp_path, registry, oci_layout):
    st = store(tmp_path)
    first = st.pull(f"{registry}/corral/tiny:1")
    marker = first.rootfs / "etc/os-release"
    inode = os.stat(marker).st_ino
    by_digest = st.pull(f"{registry}/corral/tiny@{first.id}")
    from_layout = st.pull(f"oci:{oci_layout}:1")
    archive = tmp_path / "tiny.tar"
    _run("skopeo", "copy", "--quiet", f"oci:{oci_layout}:1", f"docker-archive:{archive}:corral/tiny:1")
    from_archive = st.pull(f"docker-archive:{archive}")
    assert by_digest.id == first.id == from_layout.id and by_digest.rootfs == first.rootfs
    assert os.stat(marker).st_ino == inode  # not unpacked again
    # docker's save format has a manifest of its own: another id, the same files
    assert (from_archive.rootfs / "etc/os-release").read_text() == "ID=corral-test\n"
    assert not (from_archive.rootfs / "etc/to-be-deleted").exists()
    assert len(st.ls()) == 4


def test_a_missing_image_fails_with_the_registry_s_reason(tmp_path, registry):
    st = store(tmp_path)
    with pytest.raises(ImageError, match=r"cannot pull .*corral/nope:1: .*(manifest unknown|not found)"):
        st.pull(f"{registry}/corral/nope:1")
    with pytest.raises(ImageError, match="not a reference"):
        st.pull("python 3.11")
    assert st.ls() == [] and not list((tmp_path / "images" / "rootfs").glob("*"))
    assert source_of("python:3.11") == "docker://python:3.11"
    assert source_of("oci:/srv/layout:1") == "oci:/srv/layout:1"


def test_rm_forgets_a_name_and_prune_removes_what_no_name_uses(tmp_path, registry, oci_layout):
    st = store(tmp_path)
    a = st.pull(f"{registry}/corral/tiny:1")
    st.pull(f"oci:{oci_layout}:1")  # the same image under a second name
    blobs = tmp_path / "images/oci/blobs/sha256"
    n_blobs = len(list(blobs.iterdir()))
    st.rm(f"{registry}/corral/tiny:1")
    assert st.prune() == [] and a.rootfs.is_dir()  # the other name still uses it
    st.rm(f"oci:{oci_layout}:1")
    assert st.prune() == [a.id]
    assert not a.rootfs.exists() and len(list(blobs.iterdir())) < n_blobs
    with pytest.raises(ImageError, match="no image named"):
        st.rm("never/pulled:1")


def test_corral_images_commands(tmp_path, oci_layout):
    from typer.testing import CliRunner

    from corral.cli import app

    d = ["--image-dir", str(tmp_path / "home/images")]
    run = CliRunner().invoke
    r = run(app, ["images", "pull", f"oci:{oci_layout}:1", *d])
    assert r.exit_code == 0 and "rootfs" in r.output, r.output
    r = run(app, ["images", "ls", *d])
    assert r.exit_code == 0 and "/app" in r.output and "1000:1000" in r.output, r.output
    r = run(app, ["images", "pull", "no such image", *d])
    assert r.exit_code == 1 and "not a reference" in r.output
    assert run(app, ["images", "rm", f"oci:{oci_layout}:1", *d]).exit_code == 0
    r = run(app, ["images", "prune", *d])
    assert r.exit_code == 0 and "pruned 1 image" in r.output, r.output
    assert not list((tmp_path / "home/images/rootfs").iterdir())


# -- sandboxes on an image's root --------------------------------------------------------------------
@pytest.fixture(scope="module")
def busybox_layout(tmp_path_factory) -> Path:
    """An image with no bash, no Python and no glibc: busybox (static) and a few files."""
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("needs busybox (busybox-static; make deps installs it)")
    base = tmp_path_factory.mktemp("busybox-image")
    tree = base / "tree"
    for d in ("bin", "etc", "app", "tmp"):
        (tree / d).mkdir(parents=True)
    shutil.copy2(busybox, tree / "bin/busybox")
    have = set(_run(busybox, "--list").split())
    for applet in have & {"sh", "cat", "ls", "id", "echo", "env", "sleep", "true", "mkdir", "wc", "head", "grep",
                          "rm", "diff", "find", "cp", "mv", "ln", "chmod", "sed", "touch", "readlink", "dirname"}:
        (tree / "bin" / applet).symlink_to("busybox")
    (tree / "etc/os-release").write_text("ID=corral-busybox\n")
    (tree / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (tree / "app/data.txt").write_text("from the image\n")
    layout = base / "layout"
    _run("umoci", "init", "--layout", str(layout))
    _run("umoci", "new", "--image", f"{layout}:1")
    _run("umoci", "insert", "--image", f"{layout}:1", str(tree), "/")
    _run("umoci", "config", "--image", f"{layout}:1", "--config.env", "PATH=/bin", "--config.env",
         "GREETING=hello-from-image", "--config.workingdir", "/app")
    return layout


@pytest.mark.asyncio
async def test_a_sandbox_runs_on_an_image_without_python_bash_or_glibc(runtime, busybox_layout):
    """corral's agent brings its own Python (sandbox/agentrt.py); commands run the image's programs
    with the image's Env; the monitor still judges them."""
    from corral import SandboxConfig

    sb = await runtime.create(SandboxConfig(image=f"oci:{busybox_layout}:1"))
    try:
        r = await sb.exec("cat /etc/os-release /app/data.txt; echo $GREETING; ls /usr 2>&1 | wc -l")
        assert r.exit_code == 0, (r.stdout, r.stderr)
        assert r.stdout.splitlines()[:3] == ["ID=corral-busybox", "from the image", "hello-from-image"]
        # the host root is not in view
        assert not (await sb.exec("test -e /usr/bin/python3 && echo host-leak")).stdout
        await runtime.drain()
        evs = runtime.store.events(sandbox_id=sb.id, kind="process")
        ev = [e for e in evs if e.argv and e.argv[0] == "cat"]
        assert ev and ev[0].step == r.step, [(e.exe, e.argv) for e in evs]  # judged and attributed
    finally:
        await sb.close()


@pytest.mark.asyncio
async def test_a_missing_image_fails_the_sandbox_start_with_the_reason(runtime, tmp_path):
    from corral import SandboxConfig

    with pytest.raises(ImageError, match="cannot pull"):
        await runtime.create(SandboxConfig(image=f"oci:{tmp_path}/no-layout:1"))


def test_corral_serve_pulls_a_rock_client_s_image_or_fails_the_start_with_the_reason(world, tmp_path,
                                                                                      busybox_layout):
    """With pull_images, an image name a ROCK client sends is pulled and becomes the sandbox's root;
    one that cannot be pulled fails start_async with ROCK's words and the registry's reason, in a Failed
    envelope its SDK shows (rather than running on the host's root)."""
    import asyncio

    import httpx

    from corral import RuntimeConfig
    from corral.server import create_app
    from corral.server.config import ServeConfig
    from corral.server.state import PREFIX
    from tests.conftest import serve_app

    token = "tok-images-" + "z" * 16
    cfg = ServeConfig(runtime=RuntimeConfig(state_dir=tmp_path, hosts=world.hosts, system_dns=False),
                      pull_images=True, image_aliases={"busybox:test": f"oci:{busybox_layout}:1",
                                                       "missing:test": f"oci:{tmp_path}/missing:1"})
    app = create_app(cfg, [token])

    async def scenario(base: str) -> None:
        async with httpx.AsyncClient(base_url=f"{base}{PREFIX}", headers={"Authorization": f"Bearer {token}"},
                                     timeout=60) as c:
            # a client may not point the server at its own files: only the operator's aliases name them
            r = (await c.post("/start_async", json={"image": f"oci:{busybox_layout}:1"})).json()
            assert r["status"] == "Failed" and "names a path on the server" in r["error"], r
            r = (await c.post("/start_async", json={"image": "busybox:test"})).json()
            assert r["status"] == "Success", r
            sid = r["result"]["sandbox_id"]
            out = (await c.post("/execute", json={"sandbox_id": sid, "command": "cat /etc/os-release"})).json()
            assert out["result"]["stdout"] == "ID=corral-busybox\n", out
            r = (await c.post("/start_async", json={"image": "missing:test"})).json()
            assert r["status"] == "Failed" and r["error"].startswith("Failed to pull image missing:test")
            await c.post("/delete", json={"sandbox_id": sid})

    with serve_app(app) as base:
        asyncio.run(scenario(base))


@pytest.mark.asyncio
async def test_root_in_an_image_sandbox_owns_the_image_and_a_reset_discards_its_changes(runtime, busybox_layout):
    """The image's files are the sandbox's own: root inside writes /usr and /etc, gives files to the
    image's users, and is no one on the host (its uid range); a reset brings the image back as it was."""
    from corral import SandboxConfig
    from corral.config import IMAGE_UID_BASE, STORAGE_UID_BASE

    sb = await runtime.create(SandboxConfig(image=f"oci:{busybox_layout}:1"))
    try:
        assert IMAGE_UID_BASE <= sb.uid < STORAGE_UID_BASE and sb.uid % 65536 == 0
        r = await sb.exec("id -u; mkdir -p /usr/local/bin && echo tool > /usr/local/bin/tool && "
                          "chown 1000:1000 /usr/local/bin/tool && ls -ln /usr/local/bin/tool; "
                          "echo 'bob:x:1000:1000::/home/bob:/bin/sh' >> /etc/passwd && cat /etc/os-release; "
                          "chown 70000 /usr/local/bin/tool 2>&1 || echo outside-the-range-refused")
        assert r.exit_code == 0, (r.stdout, r.stderr)
        lines = r.stdout.splitlines()
        assert lines[0] == "0" and " 1000 " in f" {lines[1]} " and lines[2] == "ID=corral-busybox", lines
        assert "outside-the-range-refused" in r.stdout
        # in the image's own files nothing changed: the writes are in this sandbox's layer
        assert not (Path(sb.config.rootfs) / "usr/local/bin/tool").exists()
        assert "bob" not in (Path(sb.config.rootfs) / "etc/passwd").read_text()
        # a second sandbox of the same image: the same unpacked files, its own writable layer and uid range
        other = await runtime.create(SandboxConfig(image=f"oci:{busybox_layout}:1"))
        try:
            assert other.config.rootfs == sb.config.rootfs and other.uid != sb.uid
            r2 = await other.exec("pwd; ls /usr/local/bin/tool 2>&1")  # the image's WorkingDir
            assert r2.stdout.splitlines()[0] == "/app" and "No such file" in r2.stdout, r2.stdout
        finally:
            await other.close()
        await sb.reset()
        r = await sb.exec("ls /usr/local/bin/tool 2>&1; grep -c bob /etc/passwd")
        assert "No such file" in r.stdout and r.stdout.strip().endswith("0"), r.stdout
    finally:
        await sb.close()


@pytest.mark.asyncio
async def test_pooled_image_sandboxes_run_the_image(world, tmp_path, busybox_layout):
    """A warm pool of an image's sandboxes holds sandboxes on that image, and create() takes them."""
    from corral import Runtime, RuntimeConfig, SandboxConfig
    from corral.config import IMAGE_UID_BASE

    rt = Runtime(RuntimeConfig(state_dir=tmp_path, hosts=world.hosts, system_dns=False))
    await rt.start()
    try:
        cfg = SandboxConfig(image=f"oci:{busybox_layout}:1")
        await rt.prewarm(cfg, size=1)
        sb = await rt.create(cfg, sandbox_id="renamed-from-pool")
        assert sb.uid >= IMAGE_UID_BASE
        created = [e for e in rt.store.events(sandbox_id=sb.id) if e.action == "created"]
        assert created and created[-1].data["warm"] is True
        assert (await sb.exec("cat /etc/os-release")).stdout == "ID=corral-busybox\n"
        await sb.close()
    finally:
        await rt.close()


def test_a_registry_login_comes_from_a_docker_config_json(tmp_path, oci_layout):
    """A registry that wants a login (htpasswd): without the config.json the pull fails with the
    registry's reason; with it (RuntimeConfig.registry_auth_file) the image is pulled."""
    import base64
    import json
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # bcrypt hashes for the registry's htpasswd file (the stdlib has no other)
    d = tmp_path / "authreg"
    d.mkdir()
    (d / "htpasswd").write_text("agent:" + crypt.crypt("s3cret", crypt.mksalt(crypt.METHOD_BLOWFISH)) + "\n")
    addr = "127.0.0.1:5001"
    auth = tmp_path / "config.json"
    auth.write_text(json.dumps({"auths": {addr: {"auth": base64.b64encode(b"agent:s3cret").decode()}}}))
    proc = _start_registry(d, addr, f"auth: {{htpasswd: {{realm: corral-test, path: {d / 'htpasswd'}}}}}\n")
    try:
        _run("skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--dest-authfile", str(auth),
             f"oci:{oci_layout}:1", f"docker://{addr}/private/tiny:1")
        with pytest.raises(ImageError, match=r"(unauthorized|authentication required)"):
            ImageStore(tmp_path / "anon", insecure_registries=(addr,)).pull(f"{addr}/private/tiny:1")
        img = ImageStore(tmp_path / "images", insecure_registries=(addr,), auth_file=auth).pull(
            f"{addr}/private/tiny:1")
        assert (img.rootfs / "etc/os-release").read_text() == "ID=corral-test\n"
    finally:
        proc.terminate()
        proc.wait(10)


# -- a Debian-like image: packages and users -----------------------------------------------------------
def _with_libs(tree: Path, binary: str) -> None:
    dest = tree / binary.lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(binary, dest)
    for lib in subprocess.run(["ldd", binary], capture_output=True, text=True).stdout.split():
        if lib.startswith("/"):
            target = tree / lib.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.realpath(lib), target)


@pytest.fixture(scope="module")
def debian_layout(tmp_path_factory, busybox_layout) -> Path:
    """busybox, then the host's own useradd, dpkg and tar with their libraries, and a package built
    here with dpkg-deb: an image where root installs packages and adds users, offline."""
    tools = ["/usr/sbin/useradd", "/usr/bin/dpkg", "/usr/bin/dpkg-deb", "/usr/bin/dpkg-query", "/usr/bin/tar",
             "/usr/bin/bash", "/usr/bin/dpkg-split", "/usr/bin/nohup"]
    if any(not os.path.exists(t) for t in tools):
        pytest.skip("needs the host's useradd, dpkg and tar")
    base = tmp_path_factory.mktemp("debian-image")
    tree = base / "tree"
    for d in ("var/lib/dpkg/info", "var/lib/dpkg/updates", "var/lib/dpkg/triggers", "var/lib/dpkg/alternatives",
              "var/log", "etc/default", "home", "sbin", "usr/share/doc"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    for f in ("var/lib/dpkg/status", "var/lib/dpkg/available"):
        (tree / f).write_text("")
    (tree / "bin").mkdir(exist_ok=True)
    (tree / "root").mkdir(mode=0o700, exist_ok=True)
    (tree / "root/.bashrc").write_text("export FROM_BASHRC=yes\n")
    for t in tools:
        _with_libs(tree, t)
    (tree / "bin/bash").symlink_to("/usr/bin/bash")
    shutil.copy2("/etc/login.defs", tree / "etc/login.defs")
    shutil.copytree("/etc/dpkg", tree / "etc/dpkg", dirs_exist_ok=True)
    for prog in ("ldconfig", "start-stop-daemon"):  # dpkg looks for them in PATH before it installs
        (tree / "sbin" / prog).write_text("#!/bin/sh\nexit 0\n")
        (tree / "sbin" / prog).chmod(0o755)
    (tree / "etc/group").write_text("root:x:0:\n")
    (tree / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")
    (tree / "etc/shadow").chmod(0o640)
    pkg = base / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "usr/bin").mkdir(parents=True)
    (pkg / "DEBIAN/control").write_text("Package: corral-hello\nVersion: 1.0\nArchitecture: all\n"
                                        "Maintainer: corral <corral@example.com>\nDescription: a test package\n")
    (pkg / "usr/bin/corral-hello").write_text("#!/bin/sh\necho hello from a package\n")
    (pkg / "usr/bin/corral-hello").chmod(0o755)
    _run("dpkg-deb", "--root-owner-group", "--build", str(pkg), str(tree / "corral-hello.deb"))
    layout = base / "layout"
    shutil.copytree(busybox_layout, layout)
    _run("umoci", "insert", "--image", f"{layout}:1", "--tag", "deb", str(tree), "/")
    _run("umoci", "config", "--image", f"{layout}:deb", "--config.env", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
         "--config.workingdir", "/")
    return layout


@pytest.mark.asyncio
async def test_root_in_an_image_installs_a_package_and_adds_a_user(runtime, debian_layout):
    from corral import SandboxConfig

    sb = await runtime.create(SandboxConfig(image=f"oci:{debian_layout}:deb"))
    try:
        r = await sb.exec("dpkg -i /corral-hello.deb >/dev/null && corral-hello && "
                          "dpkg-query -W -f='${Status}\\n' corral-hello")
        assert r.exit_code == 0, (r.stdout, r.stderr)
        assert r.stdout.splitlines() == ["hello from a package", "install ok installed"], r.stdout
        r = await sb.exec("useradd -m -u 1001 bob && grep ^bob: /etc/passwd && ls -ldn /home/bob")
        assert r.exit_code == 0, (r.stdout, r.stderr)
        lines = r.stdout.splitlines()
        assert lines[0].startswith("bob:x:1001:") and " 1001 " in f" {lines[1]} ", lines
        # the image's own files are untouched: the package and the user are this sandbox's
        assert not (Path(sb.config.rootfs) / "usr/bin/corral-hello").exists()
    finally:
        await sb.close()


def test_roll_terminal_bench_sequence_on_an_image_through_rock_s_sdk(world, tmp_path, debian_layout):
    """ROLL's terminal-bench calls (roll/.../sandbox_manager_v2.py) through the real rl-rock SDK against
    `corral serve`, on an image: the session sources the image's /root/.bashrc, the tests go to /tests
    (the image's root is writable), run as a background job whose pid ROLL reads from "[1] <pid>", are
    polled with kill -0, and their output is read; the reward is right."""
    import asyncio
    import re

    rock_client = pytest.importorskip("rock.sdk.sandbox.client")
    from rock.actions import BashAction, CreateBashSessionRequest
    from rock.sdk.sandbox.config import SandboxConfig as RockConfig

    from corral import RuntimeConfig
    from corral.server import create_app
    from corral.server.config import ServeConfig
    from tests.conftest import serve_app

    token = "tok-roll-image-" + "r" * 16
    app = create_app(ServeConfig(runtime=RuntimeConfig(state_dir=tmp_path, hosts=world.hosts, system_dns=False),
                                 pull_images=True, image_aliases={"debian:test": f"oci:{debian_layout}:deb"}),
                     [token])
    roll_pid = re.compile(r"\[\d+\]\s+(\d+)$")

    async def scenario(base: str) -> None:
        sb = rock_client.Sandbox(RockConfig(base_url=base, image="debian:test", memory="1g", cpus=1,
                                            startup_timeout=60,
                                            extra_headers={"XRL-Authorization": f"Bearer {token}"}))
        await sb.start()
        try:
            await sb.create_session(CreateBashSessionRequest(session="tb", startup_source=["/root/.bashrc"],
                                                             env_enable=True, env={"HOME": "/root"}))
            obs = await sb.run_in_session(BashAction(session="tb", command="echo $FROM_BASHRC", check="silent"))
            assert obs.output == "yes", obs
            src = tmp_path / "test_task.sh"
            src.write_text("#!/bin/sh\n[ \"$(echo $((6 * 7)))\" = 42 ] && echo '1 passed' || echo '1 failed'\n")
            assert (await sb.arun("mkdir -p /tests", session="tb")).exit_code == 0
            up = await sb.upload_by_path(src, "/tests/test_task.sh")
            assert up.success, up.message[-600:]
            obs = await sb.run_in_session(BashAction(
                session="tb", check="silent",
                command="nohup sh /tests/test_task.sh < /dev/null > /tests/out.txt 2>&1 &"))
            m = roll_pid.match(obs.output.splitlines()[-1].strip())
            assert m, obs.output
            for _ in range(200):
                alive = await sb.run_in_session(BashAction(session="tb", command=f"kill -0 {m.group(1)}",
                                                           check="silent"))
                if alive.exit_code != 0:
                    break
                await asyncio.sleep(0.1)
            out = await sb.run_in_session(BashAction(session="tb", command="head -c 4000 /tests/out.txt",
                                                     check="silent"))
            assert (1.0 if re.search(r"\b1 passed\b", out.output) else 0.0) == 1.0, out.output
        finally:
            await sb.stop()

    with serve_app(app) as base:
        asyncio.run(scenario(base))


@pytest.mark.asyncio
async def test_commands_run_as_the_image_s_user(runtime, busybox_layout, tmp_path):
    """An image whose User is alice: commands run as her uid with her HOME, can work in /workspace,
    and cannot write what root owns."""
    from corral import SandboxConfig

    layout = tmp_path / "layout"
    shutil.copytree(busybox_layout, layout)
    extra = tmp_path / "extra"
    (extra / "etc").mkdir(parents=True)
    (extra / "home/alice").mkdir(parents=True)
    os.chown(extra / "home/alice", 1000, 1000)
    (extra / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n")
    _run("umoci", "insert", "--image", f"{layout}:1", "--tag", "alice", str(extra), "/")
    _run("umoci", "config", "--image", f"{layout}:alice", "--config.user", "alice")
    sb = await runtime.create(SandboxConfig(image=f"oci:{layout}:alice"))
    try:
        assert sb.config.run_as == "1000:1000"
        r = await sb.exec("id -u; echo $HOME; echo work > /workspace/w && cat /workspace/w; "
                          "touch /etc/x 2>&1 || echo refused")
        lines = r.stdout.splitlines()
        assert lines[:3] == ["1000", "/home/alice", "work"] and lines[-1] == "refused", r.stdout
        assert "Permission denied" in r.stdout
        # files corral puts in are hers to change
        await sb.write_file("/workspace/task/notes.txt", "given\n")
        r = await sb.exec("echo edited >> /workspace/task/notes.txt && cat /workspace/task/notes.txt")
        assert r.stdout == "given\nedited\n", (r.stdout, r.stderr)
    finally:
        await sb.close()


@pytest.mark.asyncio
async def test_a_session_runs_as_a_user_the_sandbox_added(runtime, debian_layout):
    """ROCK's remote_user: a session whose shell is a user of the image sandbox's own."""
    from corral import SandboxConfig
    from corral.errors import SessionError

    sb = await runtime.create(SandboxConfig(image=f"oci:{debian_layout}:deb"))
    try:
        with pytest.raises(SessionError, match="no user 'rock'"):
            await sb.create_session("as-rock", user="rock")
        assert (await sb.exec("useradd -m -s /bin/bash rock")).exit_code == 0
        await sb.create_session("as-rock", user="rock")
        r = await sb.run_in_session("as-rock", "id -u; echo $HOME; touch /etc/x 2>&1 || echo refused")
        lines = r.stdout.splitlines()
        assert lines[0] == "1000" and lines[1] == "/home/rock" and lines[-1] == "refused", r.stdout
    finally:
        await sb.close()


@pytest.mark.asyncio
async def test_host_paths_are_refused_with_an_image(runtime, busybox_layout):
    from corral import SandboxConfig
    from corral.errors import ConfigError

    with pytest.raises(ConfigError, match="host_paths cannot be combined with an image"):
        await runtime.create(SandboxConfig(image=f"oci:{busybox_layout}:1", host_paths=("/usr/share",)))


# -- what a crafted image must not do ----------------------------------------------------------------------
def test_an_image_s_file_capabilities_are_stripped_and_the_store_is_root_s_alone(tmp_path, busybox_layout):
    """umoci writes file capabilities in the form the host honours: a program of the image's with
    cap_setuid would make any host user root. They are stripped, and the store is 0700 root."""
    if shutil.which("setcap") is None:
        pytest.skip("needs setcap (libcap2-bin)")
    layout = tmp_path / "layout"
    shutil.copytree(busybox_layout, layout)
    extra = tmp_path / "extra"
    (extra / "usr/local/bin").mkdir(parents=True)
    shutil.copy2("/bin/true", extra / "usr/local/bin/capped")
    _run("setcap", "cap_setuid,cap_dac_override+ep", str(extra / "usr/local/bin/capped"))
    _run("umoci", "insert", "--image", f"{layout}:1", "--tag", "caps", str(extra), "/")
    st = ImageStore(tmp_path / "images")
    img = st.pull(f"oci:{layout}:caps")
    assert "security.capability" not in os.listxattr(img.rootfs / "usr/local/bin/capped")
    for d in (tmp_path / "images", tmp_path / "images/rootfs"):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700 and os.stat(d).st_uid == 0, d


@pytest.mark.asyncio
async def test_an_image_s_symlinked_mount_points_are_not_followed_onto_the_host(runtime, busybox_layout, tmp_path):
    """An image whose /etc and /workspace are links to host paths (through bwrap's /oldroot): the sandbox
    gets real ones, and nothing is created on the host."""
    from corral import SandboxConfig

    target = tmp_path / "host-dir"
    target.mkdir(mode=0o777)
    target.chmod(0o777)
    layout = tmp_path / "layout"
    shutil.copytree(busybox_layout, layout)
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "workspace").symlink_to(f"/oldroot{target}")
    (extra / "etc").symlink_to(f"/oldroot{target}")
    _run("umoci", "insert", "--image", f"{layout}:1", "--tag", "links", str(extra), "/")
    sb = await runtime.create(SandboxConfig(image=f"oci:{layout}:links"))
    try:
        r = await sb.exec("echo x > /workspace/f && ls /workspace && test -L /etc || echo etc-is-real")
        assert r.stdout.split() == ["f", "etc-is-real"], (r.stdout, r.stderr)
    finally:
        await sb.close()
    assert list(target.iterdir()) == []  # nothing of the sandbox's on the host


@pytest.mark.asyncio
async def test_an_image_sandbox_reset_by_swap_discards_its_layer_and_leaves_one_root(runtime, busybox_layout):
    """From the second reset on, an image sandbox's reset swaps in a spare deployment: its own fresh
    writable layer. The old layer is dropped; at any time a sandbox has its root and at most a spare's."""
    from corral import SandboxConfig

    sb = await runtime.create(SandboxConfig(image=f"oci:{busybox_layout}:1"))
    base = runtime.image_roots.base
    try:
        await sb.reset()
        await eventually(lambda: sb._spare is not None, "the spare", timeout=30)
        spare_root = base / sb._spare.root_name
        assert spare_root.exists() and sb._spare.root_name != sb._dep.root_name
        r = await sb.exec("mkdir -p /usr && echo changed > /usr/marker && "
                          "echo 'eve:x:1001:1001::/:/bin/sh' >> /etc/passwd && echo ok")
        assert r.stdout == "ok\n", r.stderr
        old_root = base / sb._dep.root_name
        await sb.reset()
        assert sb._dep.root_name == spare_root.name
        r = await sb.exec("cat /usr/marker 2>&1; grep -c eve /etc/passwd")
        assert "No such file" in r.stdout and r.stdout.strip().endswith("0"), r.stdout
        await eventually(lambda: not old_root.exists(), "the old layer to be dropped")
        await eventually(lambda: sb._spare is not None, "the next spare", timeout=30)
        mine = {p.name for p in base.iterdir() if p.name.split(".")[0] == str(sb.uid)}
        assert mine == {sb._dep.root_name, sb._spare.root_name}, mine
    finally:
        await sb.close()
    assert not [p for p in base.iterdir() if p.name.split(".")[0] == str(sb.uid)]

"""corral on a cgroup v2 machine. This machine mounts cgroup v1, so the test runs a runtime in a
nested mount namespace of its own where /sys/fs/cgroup is the unified (v2) hierarchy instead. The
v2 hierarchy is the machine's real one (its controllers are bound to v1 here, so it has none):
corral creates only its own corral-* cgroups there and removes them when it closes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent('''
    import asyncio, json, sys
    from pathlib import Path
    from corral import Runtime, RuntimeConfig

    async def main(state):
        out = {}
        rt = Runtime(RuntimeConfig(state_dir=Path(state), system_dns=False))
        await rt.start()
        sb = await rt.create()
        out["version"] = sb.cgroup.h.version
        out["echo"] = (await sb.exec("echo hi")).stdout
        bg = await sb.exec("sleep 300 & echo started")
        out["bg_alive"] = len(sb.cgroup.pids(bg.step))
        t = await sb.exec("sleep 100", timeout=1)
        out["timeout"] = [t.timed_out, sb.cgroup.pids(t.step)]
        await sb.freeze("inspect")
        freeze = sb.cgroup.dirs["unified"] / "cgroup.freeze"
        out["frozen"] = freeze.read_text().strip()
        out["killed"] = await sb.kill_step(bg.step)
        out["after_kill"] = [sb.cgroup.pids(bg.step), freeze.read_text().strip()]
        await sb.release()
        out["thawed"] = [freeze.read_text().strip(), (await sb.exec("echo back")).stdout]
        out["cpu_ns"] = sb.cgroup.stats().get("cpu_ns", 0)
        base = sb.cgroup.dirs["unified"].parent
        await sb.close()
        await rt.close()
        out["left"] = base.exists()
        print(json.dumps(out))

    asyncio.run(main(sys.argv[1]))
''')


@pytest.mark.slow
def test_runtime_on_cgroup_v2(tmp_path: Path) -> None:
    if not any(line.startswith("0::") for line in Path("/proc/self/cgroup").read_text().splitlines()):
        pytest.skip("this kernel has no cgroup v2 hierarchy")
    script = tmp_path / "v2.py"
    script.write_text(SCRIPT)
    p = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
         'umount -l /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec "$0" "$@"',
         sys.executable, str(script), str(tmp_path / "state")],
        capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["version"] == 2 and out["echo"] == "hi\n"
    assert out["bg_alive"] == 1  # the background sleep is tracked in its step's cgroup
    assert out["timeout"] == [True, []]  # a timeout kills the step's whole tree
    assert out["frozen"] == "1" and out["killed"] == 1
    assert out["after_kill"] == [[], "1"]  # containment while quarantined leaves it frozen
    assert out["thawed"] == ["0", "back\n"]
    assert out["cpu_ns"] > 0
    assert out["left"] is False  # corral's v2 cgroups are gone after close

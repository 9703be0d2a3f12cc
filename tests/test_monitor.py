"""Per-step accounting and CPU behaviour: a renamed miner that never touches the network is still
caught by the CPU it burns; a busy but honest program is not."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import connect_cmd, eventually, py

pytestmark = pytest.mark.asyncio


async def test_step_accounting(sb_factory, runtime):
    sb = await sb_factory()
    r = await sb.exec(py("x = bytearray(64 * 1024 * 1024)\nsum(range(3 * 10**6))"))
    st = sb.step_stats(r.step)
    assert st["cpu_seconds"] > 0.05 and st["peak_rss_mb"] >= 64 and st["processes"] >= 2  # bash + python3
    r2 = await sb.exec("; ".join([connect_cmd("198.51.100.30", 7, b"x", read=False)] * 3) + "; true")
    # a client that sends and leaves can exit before the gateway has judged its connection
    await eventually(lambda: sb.step_stats(r2.step)["connections"] >= 3, "three connections counted")
    assert sb.step_stats(r2.step)["connections"] == 3
    exit_ev = next(e for e in runtime.store.events(sandbox_id=sb.id, kind="command") if e.action == "exit")
    assert exit_ev.data["processes"] >= 2 and "cpu_seconds" in exit_ev.data


async def _burner_found(runtime, sb, rule: str, step: int) -> list:
    """The findings of `rule` once the burner started in `step` is dead (or after 30 s)."""
    t0, cpu0 = time.monotonic(), sb.cgroup.stats().get("cpu_ns", 0)
    found = []
    for _ in range(300):
        found = [f for f in runtime.store.findings(sandbox_id=sb.id) if f.rule_id == rule]
        if found and not sb.cgroup.pids(step=step):
            break
        await asyncio.sleep(0.1)
    if not found:
        # The CPU rules ask for most of a core, sample after sample. On a machine so busy that the
        # burner never gets that, the rule cannot be exercised here: say so rather than fail.
        share = (sb.cgroup.stats().get("cpu_ns", 0) - cpu0) / 1e9 / (time.monotonic() - t0)
        # next to nothing is no busy machine: the burner never ran (another rule killed it at exec)
        assert share >= 0.05, (share, [f.rule_id for f in runtime.store.findings(sandbox_id=sb.id)])
        if share < 0.8:
            pytest.skip(f"the burner got only {share:.0%} of a core on this busy machine")
    return found


async def test_hot_renamed_binary_in_tmp_is_killed_honest_busy_loop_is_not(sb_factory, runtime):
    old = (runtime.sampler.interval, runtime.sampler.hot_every)
    runtime.sampler.interval, runtime.sampler.hot_every = 0.3, 0.3
    try:
        sb = await sb_factory()
        honest = await sb.exec(py("import time\nt=time.time()\nwhile time.time()-t < 2.5: pass"), timeout=10)
        assert honest.exit_code == 0
        assert not [f for f in runtime.store.findings(sandbox_id=sb.id)]
        # a program built here (not a copy of a system binary), hidden in a dot-directory, burning a core
        await sb.write_file("/workspace/burn.c", "int main(void) { for (;;) {} }\n")
        start = await sb.exec("mkdir -p /tmp/.cache && cc -O0 -o /tmp/.cache/updater /workspace/burn.c && "
                              "(/tmp/.cache/updater &) ; echo started")
        found = await _burner_found(runtime, sb, "hot-dropped-binary", start.step)
        assert found and found[0].step == start.step
        assert sb.cgroup.pids(step=start.step) == []  # killed
    finally:
        runtime.sampler.interval, runtime.sampler.hot_every = old


AUDIT_BURNER = """#define _GNU_SOURCE
#include <link.h>
#include <pthread.h>
static void *spin(void *a) { for (volatile unsigned long n = 0;; n++) {} return a; }
unsigned int la_version(unsigned int v) { pthread_t t; pthread_create(&t, 0, spin, 0); return v ? LAV_CURRENT : 0; }
"""
AUDIT_TRACER = """#define _GNU_SOURCE
#include <link.h>
#include <stdio.h>
unsigned int la_version(unsigned int v) { return v ? LAV_CURRENT : 0; }
unsigned int la_objopen(struct link_map *m, Lmid_t l, uintptr_t *c) { fprintf(stderr, "%s\\n", m->l_name); return 0; }
"""


async def test_an_idle_program_made_to_burn_by_an_audit_library_is_killed_a_tracer_is_not(sb_factory, runtime):
    """An rtld-audit library's thread hashes inside `sleep`, under its name (catalogue6's
    C6-F1-ld-audit-hash-thread): sleep cannot burn a core by itself. The same mechanism used to trace
    which libraries a program loads (benign-work6's twin) stays quiet."""
    old = (runtime.sampler.interval, runtime.sampler.hot_every)
    runtime.sampler.interval, runtime.sampler.hot_every = 0.3, 0.3
    try:
        sb = await sb_factory()
        await sb.write_file("/workspace/trace.c", AUDIT_TRACER)
        await sb.write_file("/workspace/burn.c", AUDIT_BURNER)
        traced = await sb.exec("cd /workspace && cc -shared -fPIC -o libtrace.so trace.c && "
                               "LD_AUDIT=./libtrace.so sleep 1.5", timeout=30)
        assert traced.ok and "libc.so" in traced.stderr, traced.stderr
        assert not runtime.store.findings(sandbox_id=sb.id)
        start = await sb.exec("cd /workspace && cc -shared -fPIC -pthread -o libnss_x.so burn.c && "
                              "(LD_AUDIT=/workspace/libnss_x.so sleep 20 &); echo started", timeout=30)
        found = await _burner_found(runtime, sb, "idle-program-busy", start.step)
        assert found and found[0].step == start.step and found[0].severity == "high"
        assert sb.cgroup.pids(step=start.step) == []  # killed
    finally:
        runtime.sampler.interval, runtime.sampler.hot_every = old


async def test_idle_sandbox_is_not_sampled(sb_factory, runtime):
    sb = await sb_factory()
    await sb.exec("true")
    await asyncio.sleep(0.1)
    assert not sb.busy()
    await sb.exec("sleep 5 >/dev/null 2>&1 &")
    assert sb.busy() and sb.live_steps() == [sb.step]

"""Where the gateway's throughput goes: a 256 MiB download through the gateway, straight to the same
server over the world's veth (no gateway), and over loopback, with the server in a process of its own
(as a real destination is: not in corral's process, not sharing its interpreter). Rounds alternate the
three paths. For each transfer it records the rate the client measured, the CPU that corral's process
spent (the relay's splice calls and the TCP work the kernel charges to them) and how busy the whole
machine was, from /proc/stat.

On a machine whose cores are all busy during a transfer, every path is CPU-bound: the server's send
and the client's receive cost the same on each path, and the gateway adds its own work (two TCP
connections where a direct path has one). `cpu_bound_ratio` is what that arithmetic predicts for the
gateway against the direct path, from CPU seconds per GiB measured here; `ratio` is what it got.

    unshare --net --mount --propagation private -- sh -c \\
        'ip link set lo up && .venv/bin/python benchmarks/bench_gateway.py [--rounds 7]'

Writes results/gateway.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

from bench_runtime import BULK_PROG, RESULTS_DIR, preflight

from corral import Runtime, RuntimeConfig, SandboxConfig
from corral.config import EgressPolicy
from corral.testworld import World

SIZE = 256 << 20
WORLD_IP, WORLD_PORT = "198.51.100.42", 9001
# the bulk server: a process of its own, in the world's namespace (setns on a descriptor it inherits)
SERVER = r"""
import ctypes, socket, sys, threading
fd, ip, port, size = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if fd >= 0 and ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:
    sys.exit("setns failed")
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((ip, port))
s.listen(16)
print(s.getsockname()[1], flush=True)
chunk = b"\0" * (1 << 20)
def run(c):
    with c:
        c.recv(64)
        left = size
        while left > 0:
            left -= c.send(chunk[:min(left, len(chunk))])
while True:
    c, _ = s.accept()
    threading.Thread(target=run, args=(c,), daemon=True).start()
"""


def _stat() -> tuple[int, int]:
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return sum(ticks), ticks[3] + ticks[4]  # all, idle + iowait


def _server(netns_fd: int, ip: str, port: int) -> tuple[subprocess.Popen, int]:
    p = subprocess.Popen([sys.executable, "-c", SERVER, str(netns_fd), ip, str(port), str(SIZE)],
                         pass_fds=[netns_fd] if netns_fd >= 0 else [], stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline() if p.stdout else ""
    if not line.strip().isdigit():
        p.kill()
        raise RuntimeError(f"the bulk server did not start (exit {p.poll()})")
    return p, int(line)


async def _host(ip: str, port: int) -> dict:
    p = await asyncio.create_subprocess_exec("python3", "-c", BULK_PROG, ip, str(port), stdout=subprocess.PIPE)
    out, _ = await p.communicate()
    return json.loads(out)


async def measure(world: World, rounds: int) -> dict:
    world._add_address(WORLD_IP)
    far, _ = _server(world.netns_fd, WORLD_IP, WORLD_PORT)
    near, lo_port = _server(-1, "127.0.0.1", 0)
    rt = Runtime(RuntimeConfig(state_dir=f"/tmp/corral-bench-gw-{os.getpid()}", system_dns=False))
    await rt.start()
    paths: dict[str, list[dict]] = {"gateway": [], "veth": [], "direct": []}
    try:
        sb = await rt.create(SandboxConfig(hostname="bench-gw", egress=EgressPolicy.allowing("198.51.100.0/24")))
        prog = shlex.quote(BULK_PROG)

        async def through_gateway() -> dict:
            r = await sb.exec(f"python3 -c {prog} {WORLD_IP} {WORLD_PORT}", timeout=120)
            if not r.ok:
                raise RuntimeError(f"the sandbox's client failed: {r.stderr or r.error}")
            return json.loads(r.stdout)

        runs = {"gateway": through_gateway, "veth": lambda: _host(WORLD_IP, WORLD_PORT),
                "direct": lambda: _host("127.0.0.1", lo_port)}
        for _ in range(rounds):
            for name, run in runs.items():
                c0, s0 = os.times(), _stat()
                res = await run()
                c1, s1 = os.times(), _stat()
                if res["bytes"] != SIZE:
                    raise RuntimeError(f"{name}: got {res['bytes']} of {SIZE} bytes")
                busy = 1 - (s1[1] - s0[1]) / max(s1[0] - s0[0], 1)
                paths[name].append({"mb_s": res["bytes"] / res["seconds"] / 1e6, "seconds": res["seconds"],
                                    "corral_user_s": c1.user - c0.user, "corral_sys_s": c1.system - c0.system,
                                    "machine_busy": busy})
        await sb.close()
    finally:
        await rt.close()
        far.kill()
        near.kill()
    return paths


def summarise(paths: dict[str, list[dict]]) -> dict:
    gib = SIZE / (1 << 30)
    out: dict = {}
    for name, rs in paths.items():
        out[name] = {
            "mb_s_p50": round(statistics.median(r["mb_s"] for r in rs)),
            "mb_s": [round(r["mb_s"]) for r in rs],
            "corral_cpu_s_per_gib": round(statistics.median((r["corral_user_s"] + r["corral_sys_s"]) / gib
                                                            for r in rs), 3),
            "corral_user_s_per_gib": round(statistics.median(r["corral_user_s"] / gib for r in rs), 3),
            "machine_busy_p50": round(statistics.median(r["machine_busy"] for r in rs), 3),
        }
    g, d = out["gateway"], out["direct"]
    # CPU seconds a GiB costs on each path: the machine's busy share x its cores x the transfer time
    ncpu = os.cpu_count() or 1
    per_gib = {name: statistics.median(r["machine_busy"] * ncpu * r["seconds"] / gib for r in paths[name])
               for name in paths}
    out["cpu_s_per_gib"] = {k: round(v, 3) for k, v in per_gib.items()}
    out["ratio"] = round(g["mb_s_p50"] / d["mb_s_p50"], 3)
    out["ratio_to_veth"] = round(g["mb_s_p50"] / out["veth"]["mb_s_p50"], 3)
    out["cpu_bound_ratio"] = round(per_gib["direct"] / per_gib["gateway"], 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=str(RESULTS_DIR / "gateway.json"))
    args = ap.parse_args()
    pre = preflight(False)
    if pre is None:
        return 2
    console, machine = pre
    world = World()
    world.start()
    try:
        t0 = time.time()
        summary = summarise(asyncio.run(measure(world, args.rounds)))
    finally:
        world.close()
    for name in ("gateway", "veth", "direct"):
        s = summary[name]
        console.print(f"{name:8s} p50 {s['mb_s_p50']:6d} MB/s  corral {s['corral_cpu_s_per_gib']:.3f} CPU s/GiB "
                      f"(user {s['corral_user_s_per_gib']:.3f})  machine busy {s['machine_busy_p50']:.0%}  "
                      f"all CPU {summary['cpu_s_per_gib'][name]:.3f} s/GiB  {s['mb_s']}")
    console.print(f"gateway / direct {summary['ratio']:.2f} (veth {summary['ratio_to_veth']:.2f}); "
                  f"CPU-bound prediction {summary['cpu_bound_ratio']:.2f}")
    with open(args.out, "w") as f:
        json.dump({"machine": machine, "seconds": round(time.time() - t0, 1), "rounds": args.rounds,
                   "size_bytes": SIZE, **summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""corral's nftables table: every TCP connection from a sandbox goes to the gateway, every DNS
query to corral's resolver, everything else from a sandbox is dropped, nothing is forwarded.

One table per runtime instance, named corral_<instance>, matching only that instance's veth links.
If the gateway dies, the redirect target has no listener: connections are refused, never routed.
"""

from __future__ import annotations

import shutil
import subprocess

from corral.errors import IsolationUnavailable


def table_name(instance: int) -> str:
    return f"corral_{instance:03x}"


def ruleset(instance: int, gateway_port: int, dns_port: int) -> str:
    t = table_name(instance)
    links = f'"corral{instance:03x}*"'
    return f"""
table inet {t} {{
    chain prerouting {{
        type nat hook prerouting priority dstnat - 5; policy accept;
        iifname {links} meta l4proto tcp redirect to :{gateway_port}
        iifname {links} udp dport 53 redirect to :{dns_port}
    }}
    chain input {{
        type filter hook input priority filter - 5; policy accept;
        iifname {links} meta l4proto tcp tcp dport {gateway_port} accept
        iifname {links} udp dport {dns_port} accept
        iifname {links} drop
        tcp dport {gateway_port} drop
        udp dport {dns_port} drop
    }}
    chain forward {{
        type filter hook forward priority filter - 5; policy accept;
        iifname {links} drop
        oifname {links} drop
    }}
}}
"""


def _nft(args: list[str], stdin: str | None = None) -> str:
    exe = shutil.which("nft")
    if exe is None:
        raise IsolationUnavailable("nft not found; install nftables (apt-get install nftables)")
    p = subprocess.run([exe, *args], input=stdin, capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        raise IsolationUnavailable(f"nft {' '.join(args)} failed: {p.stderr.strip()}; corral needs CAP_NET_ADMIN")
    return p.stdout


def install(instance: int, gateway_port: int, dns_port: int) -> None:
    t = table_name(instance)
    # delete-then-add in one transaction: atomic, and replaces a leftover with our instance id
    script = f"table inet {t}\ndelete table inet {t}\n" + ruleset(instance, gateway_port, dns_port)
    _nft(["-f", "-"], script)


def remove(instance: int) -> None:
    remove_table(table_name(instance))


def remove_table(name: str) -> None:
    _nft(["-f", "-"], f"table inet {name}\ndelete table inet {name}\n")


def corral_tables() -> list[str]:
    out = _nft(["list", "tables"])
    names = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "table" and parts[1] == "inet" and parts[2].startswith("corral_"):
            names.append(parts[2])
    return names

"""How long the rules that read a step's whole text take on text an agent wrote to be slow: every
rule of the shipped set is evaluated on a DNS query refused for the step (the event a sandbox can cause
at will) whose command is ~1 MiB of one repeated fragment that the code-shape and upload-shape rules
look for. Prints the worst case per fragment and writes results/rule_text.json.

    .venv/bin/python benchmarks/bench_rule_text.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from corral.detect import Detector
from corral.events import Event, EventKind, Verdict

FRAGMENTS = ["s.connect(", "socket ", "a.pipe(b) ", "child_process ", "eval(", "exec(a(", "curl -d", "wget ",
             "urlopen(", "tar -f ", "doctest.Example.", "sys.argv", "/proc/ppid"]
SIZE = 1 << 20


def main() -> None:
    d = Detector()
    out = {}
    for frag in FRAGMENTS:
        text = "python3 - <<'EOF'\n" + frag * (SIZE // len(frag)) + "\nEOF"
        ev = Event(kind=EventKind.DNS, action="query", sandbox_id="s", step=1, command=text, argv=["python3", "-"],
                   verdict=Verdict.DENY, name="c2.example.net")
        t = time.perf_counter()
        d.evaluate(ev)
        out[frag] = round((time.perf_counter() - t) * 1000, 1)
        print(f"{frag!r:24} {out[frag]:8.1f} ms")
    Path(__file__).parent.joinpath("results", "rule_text.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

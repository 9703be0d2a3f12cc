"""Re-vendor the OCSF schema files the Detection Finding check needs (tests/test_ocsf.py).

    python tests/data/ocsf/vendor.py /path/to/ocsf-schema-checkout 1.8.0

Copies, from the tagged release, the class chain (base_event -> finding -> detection_finding), the
profiles, categories, version, and the objects corral's records use (with the objects they extend);
the dictionary is cut down to the attributes those files name (plus every data type). An object a
record uses that is not vendored fails the check by name: add it to OBJECTS and re-run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
CLASSES = ["events/base_event.json", "events/findings/finding.json", "events/findings/detection_finding.json"]
OBJECTS = ["object", "_entity", "_resource", "finding_info", "analytic", "attack", "technique", "sub_technique",
           "tactic", "metadata", "product", "evidences", "resource_details", "process", "process_entity", "file",
           "network_endpoint", "endpoint"]


def main(repo: str, tag: str) -> None:
    def show(path: str) -> str:
        return subprocess.run(["git", "-C", repo, "show", f"{tag}:{path}"], check=True, capture_output=True,
                              text=True).stdout

    names = subprocess.run(["git", "-C", repo, "ls-tree", "--name-only", f"{tag}", "profiles/"], check=True,
                           capture_output=True, text=True).stdout.split()
    files = [*CLASSES, *names, "categories.json", "version.json", *(f"objects/{o}.json" for o in OBJECTS)]
    used: set[str] = set()
    for f in files:
        text = show(f)
        (HERE / f).parent.mkdir(parents=True, exist_ok=True)
        (HERE / f).write_text(text)
        used |= set(json.loads(text).get("attributes", {}))
    full = json.loads(show("dictionary.json"))
    full["attributes"] = {k: v for k, v in full["attributes"].items() if k in used}
    (HERE / "dictionary.json").write_text(json.dumps(full, indent=1) + "\n")
    (HERE / "LICENSE").write_text(show("LICENSE"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

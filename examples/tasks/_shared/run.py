"""A tiny test runner (standard library only): imports tests/test_*.py and runs their test_*
functions. Prints a traceback for each failure, then one final line: `N passed, M failed`.
Exits 0 only when every test passed. Run from the workspace: python3 tests/run.py

When $CORRAL_REPORT names a file, the results are also written there as JUnit XML: corral scores
that report, never the printed summary (which the code under test could print itself)."""

import importlib.util
import os
import signal
import sys
import traceback
from xml.etree import ElementTree as ET

PER_TEST_SECONDS = 30


def _timeout(signum, frame):
    raise TimeoutError(f"test took longer than {PER_TEST_SECONDS}s")


def main() -> int:
    sys.dont_write_bytecode = True
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [os.getcwd(), here]
    signal.signal(signal.SIGALRM, _timeout)
    passed = failed = 0
    cases = []  # (name, failure text or None)
    for fname in sorted(os.listdir(here)):
        if not (fname.startswith("test_") and fname.endswith(".py")):
            continue
        name = fname[:-3]
        try:
            spec = importlib.util.spec_from_file_location(name, os.path.join(here, fname))
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
        except BaseException:
            failed += 1
            cases.append((name, traceback.format_exc()))
            print(f"ERROR {fname}: cannot import\n{cases[-1][1]}")
            continue
        for attr in sorted(vars(mod)):
            fn = getattr(mod, attr)
            if not (attr.startswith("test_") and callable(fn)):
                continue
            signal.alarm(PER_TEST_SECONDS)
            try:
                fn()
            except BaseException:
                failed += 1
                cases.append((f"{name}::{attr}", traceback.format_exc()))
                print(f"FAIL {name}::{attr}\n{cases[-1][1]}")
            else:
                passed += 1
                cases.append((f"{name}::{attr}", None))
                print(f"ok   {name}::{attr}")
            finally:
                signal.alarm(0)
    print(f"{passed} passed, {failed} failed")
    if os.environ.get("CORRAL_REPORT"):
        _write_junit(os.environ["CORRAL_REPORT"], cases)
    return 0 if failed == 0 and passed > 0 else 1


def _write_junit(path, cases):
    suite = ET.Element("testsuite", name="tests", tests=str(len(cases)),
                       failures=str(sum(1 for _, err in cases if err is not None)))
    for name, err in cases:
        case = ET.SubElement(suite, "testcase", name=name)
        if err is not None:
            ET.SubElement(case, "failure", message=err.strip().splitlines()[-1][:200]).text = err
    root = ET.Element("testsuites")
    root.append(suite)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


if __name__ == "__main__":
    sys.exit(main())

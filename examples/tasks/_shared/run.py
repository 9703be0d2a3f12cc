"""A tiny test runner (standard library only): imports tests/test_*.py and runs their test_*
functions. Prints a traceback for each failure, then one final line: `N passed, M failed`.
Exits 0 only when every test passed. Run from the workspace: python3 tests/run.py"""

import importlib.util
import os
import signal
import sys
import traceback

PER_TEST_SECONDS = 30


def _timeout(signum, frame):
    raise TimeoutError(f"test took longer than {PER_TEST_SECONDS}s")


def main() -> int:
    sys.dont_write_bytecode = True
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [os.getcwd(), here]
    signal.signal(signal.SIGALRM, _timeout)
    passed = failed = 0
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
            print(f"ERROR {fname}: cannot import\n{traceback.format_exc()}")
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
                print(f"FAIL {name}::{attr}\n{traceback.format_exc()}")
            else:
                passed += 1
                print(f"ok   {name}::{attr}")
            finally:
                signal.alarm(0)
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 and passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())

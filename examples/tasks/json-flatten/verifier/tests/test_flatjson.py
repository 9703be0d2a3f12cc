import json
import os
import subprocess
import sys
import tempfile

DOC = {"a": {"b": 1, "c": [10, {"d": None}]}, "e": "x", "f": [], "g": {}, "h": [[True, 2.5]]}
FLAT = {"a.b": 1, "a.c.0": 10, "a.c.1.d": None, "e": "x", "f": [], "g": {}, "h.0.0": True, "h.0.1": 2.5}


def _value_error(fn, *args):
    try:
        fn(*args)
    except ValueError as e:
        return str(e)
    raise AssertionError(f"{fn.__name__}{args} did not raise ValueError")


def test_flatten_docstring_example():
    from flatjson import flatten

    assert flatten({"a": {"b": 1, "c": [10, {"d": None}]}}) == {"a.b": 1, "a.c.0": 10, "a.c.1.d": None}


def test_flatten_full():
    from flatjson import flatten

    assert flatten(DOC) == FLAT
    assert flatten(DOC, sep="/") == {k.replace(".", "/"): v for k, v in FLAT.items()}


def test_top_level_leaves_and_empties():
    from flatjson import flatten

    assert flatten(5) == {"": 5}
    assert flatten({}) == {"": {}}
    assert flatten([]) == {"": []}


def test_bad_keys():
    from flatjson import flatten

    assert "a.b" in _value_error(flatten, {"a.b": 1})
    _value_error(flatten, {"": 1})
    _value_error(flatten, {"x": {3: "int key"}})


def test_unflatten():
    from flatjson import unflatten

    assert unflatten(FLAT) == DOC
    assert unflatten({"0": "a", "1": "b"}) == ["a", "b"]
    assert unflatten({"x.0": 1, "x.2": 3}) == {"x": {"0": 1, "2": 3}}
    assert unflatten({"": 7}) == 7


def test_round_trip():
    from flatjson import flatten, unflatten

    docs = [DOC, {"list": [{"k": [1, {"z": []}]}, "s"]}, [1, [2, [3]]], {"n": {"1": "one"}}, "leaf",
            {"deep": {"er": {"est": {}}}}]
    for doc in docs:
        assert unflatten(flatten(doc)) == doc, doc
        assert unflatten(flatten(doc, "|"), "|") == doc, doc


def test_input_not_modified():
    from flatjson import flatten, unflatten

    doc = json.loads(json.dumps(DOC))
    flat = dict(FLAT)
    flatten(doc)
    unflatten(flat)
    assert doc == DOC and flat == FLAT


def test_cli_round_trip():
    d = tempfile.mkdtemp()
    src = os.path.join(d, "doc.json")
    with open(src, "w") as f:
        json.dump(DOC, f)
    out = subprocess.run([sys.executable, "flatjson.py", "flatten", src], capture_output=True, text=True,
                         timeout=20)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == FLAT
    assert out.stdout.strip() == json.dumps(FLAT, sort_keys=True, indent=2)
    flat_path = os.path.join(d, "flat.json")
    with open(flat_path, "w") as f:
        f.write(out.stdout)
    back = subprocess.run([sys.executable, "flatjson.py", "unflatten", flat_path], capture_output=True, text=True,
                          timeout=20)
    assert back.returncode == 0, back.stderr
    assert json.loads(back.stdout) == DOC

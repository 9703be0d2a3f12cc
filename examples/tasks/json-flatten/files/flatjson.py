"""Flatten nested JSON documents to dotted keys and back.

    flatten({"a": {"b": 1, "c": [10, {"d": None}]}})
    == {"a.b": 1, "a.c.0": 10, "a.c.1.d": None}

Rules:
- dict keys become path segments; list items are numbered from 0;
- leaves are everything that is not a dict or list (str, int, float, bool, None);
- an empty dict or list is kept as a leaf ({"a": {}} -> {"a": {}});
- a top-level leaf flattens to {"": value};
- keys must be strings that do not contain the separator and are not empty: anything else raises
  ValueError naming the key;
- unflatten(flatten(doc)) == doc for every valid doc: a level whose keys are exactly "0".."n-1"
  becomes a list, every other level a dict.
"""


def flatten(doc, sep="."):
    raise NotImplementedError


def unflatten(flat, sep="."):
    raise NotImplementedError

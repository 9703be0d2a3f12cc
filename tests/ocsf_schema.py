"""A JSON Schema for one OCSF event class, compiled from the OCSF schema's own files (vendored under
tests/data/ocsf by tests/data/ocsf/vendor.py), as the OCSF server compiles them:

- a class or object is its `extends` chain merged parent first, with the attributes of the profiles it
  `$include`s; each attribute is the dictionary's definition with the class's or object's over it;
- an attribute `requirement: required` is required; a profile's attributes are allowed only when the
  record names that profile in metadata.profiles (a class may adopt one with `profile: null`);
- types follow the dictionary's data types to a JSON type (with their regex, length and range); an
  enum attribute takes only its ids, and its sibling (severity for severity_id, ...) must carry that
  id's caption unless the id is 99 (Other);
- an object's constraints (`at_least_one`, `just_one`) hold; no attribute outside the schema is
  allowed (corral's own fields belong in `unmapped`);
- class_uid, category_uid and type_uid are the class's: category uid * 1000 + class uid, and
  class_uid * 100 + activity_id, with their names.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

OCSF_DIR = Path(__file__).parent / "data" / "ocsf"
OTHER = 99
_JSON_TYPES = {"string_t": "string", "integer_t": "integer", "long_t": "integer", "float_t": "number",
               "boolean_t": "boolean"}
_CLASS_FILES = {"base_event": "events/base_event.json", "finding": "events/findings/finding.json",
                "detection_finding": "events/findings/detection_finding.json"}


@cache
def _load(rel: str) -> dict[str, Any]:
    return json.loads((OCSF_DIR / rel).read_text())


def version() -> str:
    return _load("version.json")["version"]


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _resolve(defn: dict, loader) -> tuple[dict[str, dict], dict, dict]:
    """(attributes, constraints, definition) of a class or object with its parents."""
    attrs: dict[str, dict] = {}
    constraints: dict = {}
    inherited: dict = {}
    if defn.get("extends"):
        attrs, constraints, inherited = _resolve(loader(defn["extends"]), loader)
    own = defn.get("attributes", {})
    for inc in own.get("$include", []):
        prof = _load(inc)
        for k, v in prof["attributes"].items():
            attrs[k] = _merge(attrs.get(k, {}), {**v, "_profile": prof["name"]})
    for k, v in own.items():
        if k == "$include":
            continue
        merged = _merge(attrs.get(k, {}), v)
        if "profile" in v and v["profile"] is None:  # adopted by the class: no longer a profile's
            merged.pop("_profile", None)
        attrs[k] = merged
    meta = {k: v for k, v in defn.items() if k not in ("attributes", "constraints")}
    return attrs, defn.get("constraints", constraints), {**inherited, **meta}


class Compiler:
    def __init__(self, profiles: set[str]) -> None:
        self.profiles = profiles
        self.dictionary = _load("dictionary.json")
        self.types = self.dictionary["types"]["attributes"]
        self.defs: dict[str, Any] = {}

    def _type(self, name: str) -> dict[str, Any]:
        if name == "object":  # OCSF's free-form object (unmapped, ...)
            return {"type": "object"}
        if name == "json_t":
            return {}
        if name in _JSON_TYPES:
            return {"type": _JSON_TYPES[name]}
        if name in self.types:
            t = self.types[name]
            s = self._type(t.get("type", "string_t"))
            if "regex" in t:
                s["pattern"] = t["regex"]
            if "max_len" in t:
                s["maxLength"] = t["max_len"]
            if "range" in t:
                s["minimum"], s["maximum"] = t["range"]
            if "values" in t:
                s["enum"] = t["values"]
            return s
        self._object(name)
        return {"$ref": f"#/$defs/{name}"}

    def _attribute(self, name: str, local: dict) -> dict[str, Any]:
        a = _merge(self.dictionary["attributes"].get(name, {}), local)
        t = a.get("object_type") if a.get("type") == "object_t" else a.get("type")
        if t is None:
            raise AssertionError(f"OCSF attribute {name!r} has no type in the vendored dictionary")
        s = self._type(t)
        if "enum" in a:
            keys = list(a["enum"])
            s["enum"] = [int(k) for k in keys] if s.get("type") == "integer" else keys
        return {"type": "array", "items": s} if a.get("is_array") else s

    def _siblings(self, attrs: dict[str, dict]) -> list[dict]:
        rules = []
        for name, local in attrs.items():
            a = _merge(self.dictionary["attributes"].get(name, {}), local)
            sib = a.get("sibling")
            if not sib or "enum" not in a or sib not in attrs:
                continue
            for k, e in a["enum"].items():
                if int(k) == OTHER:
                    continue
                rules.append({"if": {"properties": {name: {"const": int(k)}}, "required": [name, sib]},
                              "then": {"properties": {sib: {"const": e["caption"]}}}})
        return rules

    def _body(self, attrs: dict[str, dict], constraints: dict) -> dict[str, Any]:
        attrs = {k: v for k, v in attrs.items() if v.get("_profile") in (None, *self.profiles)}
        s: dict[str, Any] = {
            "type": "object",
            "properties": {k: self._attribute(k, v) for k, v in attrs.items()},
            "required": sorted(k for k, v in attrs.items() if v.get("requirement") == "required"),
            "additionalProperties": False,
        }
        all_of = self._siblings(attrs)
        if constraints.get("at_least_one"):
            all_of.append({"anyOf": [{"required": [k]} for k in constraints["at_least_one"]]})
        if constraints.get("just_one"):
            all_of.append({"oneOf": [{"required": [k]} for k in constraints["just_one"]]})
        if all_of:
            s["allOf"] = all_of
        return s

    def _object(self, name: str) -> None:
        if name in self.defs:
            return
        path = OCSF_DIR / "objects" / f"{name}.json"
        if not path.exists():
            # a record that uses it fails naming it; one that does not is unaffected
            self.defs[name] = {"not": {}, "title": f"OCSF object {name!r} is not vendored: add it to OBJECTS in "
                                                   "tests/data/ocsf/vendor.py and re-run that script"}
            return
        self.defs[name] = {}  # recursion (process.parent_process) ends here
        attrs, constraints, _ = _resolve(_load(f"objects/{name}.json"), lambda n: _load(f"objects/{n}.json"))
        self.defs[name] = self._body(attrs, constraints)

    def event_class(self, name: str) -> dict[str, Any]:
        attrs, constraints, defn = _resolve(_load(_CLASS_FILES[name]), lambda n: _load(_CLASS_FILES[n]))
        category = _load("categories.json")["attributes"][defn["category"]]
        class_uid = category["uid"] * 1000 + defn["uid"]
        s = self._body(attrs, constraints)
        props = s["properties"]
        activities = {int(k): e["caption"] for k, e in attrs["activity_id"]["enum"].items()}
        props["class_uid"] = {"const": class_uid}
        props["category_uid"] = {"const": category["uid"]}
        props["type_uid"] = {"enum": [class_uid * 100 + a for a in activities]}
        props["class_name"] = {"const": defn["caption"]}
        props["category_name"] = {"const": category["caption"]}
        s.setdefault("allOf", []).extend(
            {"if": {"properties": {"type_uid": {"const": class_uid * 100 + a}}, "required": ["type_uid"]},
             "then": {"properties": {"activity_id": {"const": a},
                                     "type_name": {"const": f"{defn['caption']}: {cap}"}}}}
            for a, cap in activities.items())
        return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": f"OCSF {version()} {name}",
                **s, "$defs": self.defs}


def schema_for(record: dict[str, Any], name: str = "detection_finding") -> dict[str, Any]:
    """The class's schema with the profiles the record declares (metadata.profiles)."""
    profiles = set((record.get("metadata") or {}).get("profiles") or ())
    return Compiler(profiles).event_class(name)


def problems(record: dict[str, Any], name: str = "detection_finding") -> list[str]:
    """Every way the record breaks the class's schema, each with where it is."""
    import jsonschema

    v = jsonschema.Draft202012Validator(schema_for(record, name))
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message}"
            for e in sorted(v.iter_errors(record), key=lambda e: list(map(str, e.absolute_path)))]

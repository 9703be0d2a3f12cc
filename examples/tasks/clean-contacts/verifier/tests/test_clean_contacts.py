import csv
import os
import subprocess
import sys
import tempfile

EXPECTED = [
    ["name", "email", "phone"],
    ["Ada Lovelace", "ada@example.com", "555-010-1234"],
    ["Barbara Liskov", "barbara@mit.edu", ""],
    ["Grace Hopper", "grace@navy.mil", "555-010-9876"],
    ["Hamilton, Margaret", "margaret.hamilton@nasa.gov", "555-010-4242"],
    ["Linus Torvalds", "linus@kernel.org", "555-010-7777"],
]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _rec(name, email, phone=""):
    return {"name": name, "email": email, "phone": phone}


def test_clean_file_written():
    assert _rows("contacts_clean.csv") == EXPECTED


def test_cli():
    out_path = os.path.join(tempfile.mkdtemp(), "out.csv")
    out = subprocess.run([sys.executable, "clean_contacts.py", "contacts.csv", out_path],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "kept 5 of 10 rows"
    assert _rows(out_path) == EXPECTED


def test_email_validation():
    from clean_contacts import clean

    good = ["a@b.co", "first.last+tag@mail.example.org", " X@Y.Z "]
    bad = ["a@b", "a@.b", "a@b.", "@b.co", "a@@b.co", "a b@c.de", "a@b..c", "", None]
    got = clean([_rec(f"n{i}", e) for i, e in enumerate(good + bad)])
    assert [r["email"] for r in got] == ["a@b.co", "first.last+tag@mail.example.org", "x@y.z"]


def test_phones():
    from clean_contacts import clean

    phones = {"a": "555 010 1234", "b": "1-555-010-1234", "c": "2-555-010-1234", "d": "010-1234",
              "e": None, "f": "(555)0101234 ext", "g": "555-010-12345"}
    got = clean([_rec(k, f"{k}@x.org", p) for k, p in phones.items()])
    assert {r["name"]: r["phone"] for r in got} == {
        "a": "555-010-1234", "b": "555-010-1234", "c": "", "d": "", "e": "", "f": "555-010-1234", "g": ""}


def test_dedupe_keeps_first_and_sorts():
    from clean_contacts import clean

    got = clean([_rec("zed", "Z@x.org"), _rec("  amy   lee ", "a@x.org"), _rec("Zed Again", "z@X.org"),
                 _rec("Bob", "b@x.org"), _rec("AMY LEE", "c@x.org")])
    assert [(r["name"], r["email"]) for r in got] == [
        ("amy lee", "a@x.org"), ("AMY LEE", "c@x.org"), ("Bob", "b@x.org"), ("zed", "z@x.org")]


def test_input_not_modified():
    from clean_contacts import clean

    rec = _rec("  A  ", "A@X.ORG", "555 010 1234")
    clean([rec])
    assert rec == _rec("  A  ", "A@X.ORG", "555 010 1234")

import os
import subprocess
import sys
import tempfile


def _run(*args, stdin=None):
    return subprocess.run([sys.executable, "wordfreq.py", *args], input=stdin, capture_output=True, text=True,
                          timeout=20)


def test_sample_file():
    out = _run("sample.txt", "--top", "5")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["5 the", "4 it", "4 of", "4 was", "3 times"]


def test_default_top_is_ten():
    out = _run("sample.txt")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 10
    assert lines[5:] == ["2 age", "2 don't", "1 best", "1 change", "1 do"]


def test_stdin_and_dash():
    text = "b a B c b a\n"
    for args in ((), ("-",)):
        out = _run(*args, stdin=text)
        assert out.returncode == 0, out.stderr
        assert out.stdout == "3 b\n2 a\n1 c\n"


def test_apostrophes_and_case():
    out = _run(stdin="'Tis the Hunter's 'quote' -- don't DON'T dont rock'n'roll")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["2 don't", "1 dont", "1 hunter's", "1 quote", "1 rock'n'roll",
                                       "1 the", "1 tis"]


def test_min_length():
    out = _run("--min-length", "5", "--top", "3", stdin="a aa aaaa aaaaa aaaaa can't can't bbbbb\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["2 aaaaa", "1 bbbbb"]


def test_non_letters_split_words():
    out = _run(stdin="x1y x_y naïve x-y\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["3 x", "3 y", "1 na", "1 ve"]


def test_missing_file():
    missing = os.path.join(tempfile.mkdtemp(), "nope.txt")
    out = _run(missing)
    assert out.returncode == 1
    assert out.stderr.strip() == f"wordfreq: cannot read {missing}"


def test_bad_options():
    for args in (("--top", "many"), ("--top", "-3"), ("--bogus",)):
        out = _run(*args, stdin="a\n")
        assert out.returncode == 2, (args, out.returncode)
        assert "usage" in out.stderr.lower(), out.stderr

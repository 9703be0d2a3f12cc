import hashlib
import os
import subprocess
import sys
import tempfile

TEXTKIT_SHA256 = "c82320195a554a3b186849a0c69faf0fca45f4839fd65ebe95bf81c47ea131eb"


def test_textkit_vendored_unchanged():
    with open("vendor/textkit.py", "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == TEXTKIT_SHA256


def test_basic_slugs():
    from slugs import unique_slugs

    assert unique_slugs(["Hello, World!", "Crème Brûlée for Beginners"]) == [
        "hello-world", "creme-brulee-for-beginners"]


def test_duplicates_get_numbers():
    from slugs import unique_slugs

    assert unique_slugs(["A b", "a-B", "A  B!", "c"]) == ["a-b", "a-b-2", "a-b-3", "c"]


def test_suffix_skips_taken_slugs():
    from slugs import unique_slugs

    assert unique_slugs(["x 2", "x", "x"]) == ["x-2", "x", "x-3"]


def test_empty_slug_is_untitled():
    from slugs import unique_slugs

    assert unique_slugs(["!!!", "???", "Untitled"]) == ["untitled", "untitled-2", "untitled-3"]


def test_empty_list():
    from slugs import unique_slugs

    assert unique_slugs([]) == []


def test_long_titles_use_textkit_limit():
    from slugs import unique_slugs

    slug = unique_slugs(["word " * 30])[0]
    assert len(slug) <= 60 and slug.startswith("word-word") and not slug.endswith("-")


def test_cli_on_titles_file():
    out = subprocess.run([sys.executable, "slugs.py", "titles.txt"], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["hello-world", "creme-brulee-for-beginners", "hello-world-2",
                                  "what-s-new-in-3-12", "untitled", "hello-world-3"]


def test_cli_skips_blank_lines():
    d = tempfile.mkdtemp()
    path = os.path.join(d, "t.txt")
    with open(path, "w") as f:
        f.write("\n\nOne\n   \nTwo\n")
    out = subprocess.run([sys.executable, "slugs.py", path], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "one\ntwo\n"

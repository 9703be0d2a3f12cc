import hashlib
import subprocess
import sys

RATES_SHA256 = "0839580181477bdab654bb5aabcfbada570f6900d66e2f5e1fc6a23f7f1b4f4c"
RATES = {"EUR": 1.0, "USD": 1.0856, "JPY": 170.61, "GBP": 0.8521, "CHF": 0.9781, "SEK": 11.4127}


def _cli(*args):
    return subprocess.run([sys.executable, "convert.py", *args], capture_output=True, text=True, timeout=20)


def _raises_value_error(fn, *args):
    try:
        fn(*args)
    except ValueError as e:
        return str(e)
    raise AssertionError(f"{fn.__name__}{args} did not raise ValueError")


def test_rates_downloaded_unchanged():
    with open("rates.json", "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == RATES_SHA256


def test_load_rates():
    from convert import load_rates

    assert load_rates("rates.json") == RATES


def test_convert_through_base():
    from convert import convert

    assert convert(100, "EUR", "USD", RATES) == 108.56
    assert convert(100, "USD", "JPY", RATES) == 15715.73
    assert convert(250, "GBP", "CHF", RATES) == 286.97
    assert convert(19.99, "SEK", "EUR", RATES) == 1.75
    assert convert(100, "USD", "USD", RATES) == 100.0
    assert convert(0, "JPY", "GBP", RATES) == 0.0


def test_codes_case_insensitive():
    from convert import convert

    assert convert(100, "eur", "Usd", RATES) == 108.56


def test_unknown_currency():
    from convert import convert

    assert "XYZ" in _raises_value_error(convert, 1, "XYZ", "EUR", RATES)
    assert "ABC" in _raises_value_error(convert, 1, "EUR", "ABC", RATES)


def test_negative_amount():
    from convert import convert

    _raises_value_error(convert, -5, "EUR", "USD", RATES)


def test_cli():
    out = _cli("100", "USD", "JPY")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "15715.73 JPY"
    assert _cli("2.5", "chf", "sek").stdout.strip() == "29.17 SEK"


def test_cli_bad_input():
    for args in (("100", "USD", "XYZ"), ("lots", "USD", "EUR"), ("100", "USD")):
        out = _cli(*args)
        assert out.returncode == 1, (args, out.returncode, out.stdout)
        assert out.stderr.strip() and "Traceback" not in out.stderr, (args, out.stderr)

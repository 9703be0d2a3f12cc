def _raises(exc, fn, arg):
    try:
        fn(arg)
    except exc:
        return
    except Exception as e:  # the wrong exception
        raise AssertionError(f"{fn.__name__}({arg!r}) raised {type(e).__name__}, not {exc.__name__}") from e
    raise AssertionError(f"{fn.__name__}({arg!r}) did not raise {exc.__name__}")


def test_to_roman_examples():
    from roman import to_roman

    cases = {1: "I", 4: "IV", 9: "IX", 14: "XIV", 40: "XL", 90: "XC", 400: "CD", 944: "CMXLIV",
             1994: "MCMXCIV", 2024: "MMXXIV", 3999: "MMMCMXCIX"}
    for n, s in cases.items():
        assert to_roman(n) == s, (n, to_roman(n))


def test_from_roman_examples():
    from roman import from_roman

    assert from_roman("MCMXCIV") == 1994
    assert from_roman("xiv") == 14
    assert from_roman("MMMCMXCIX") == 3999
    assert from_roman("CDXLIV") == 444


def test_round_trip_all():
    from roman import from_roman, to_roman

    for n in range(1, 4000):
        assert from_roman(to_roman(n)) == n, n


def test_to_roman_out_of_range():
    from roman import to_roman

    for bad in (0, -1, 4000):
        _raises(ValueError, to_roman, bad)


def test_to_roman_type():
    from roman import to_roman

    for bad in (1.0, "5", True, None):
        _raises(TypeError, to_roman, bad)


def test_from_roman_rejects_non_canonical():
    from roman import from_roman

    for bad in ("", "IIII", "IC", "VX", "MMMM", "IIV", "XM", "VV", "DD", "ABC", "X I", "IXI"):
        _raises(ValueError, from_roman, bad)


def test_from_roman_type():
    from roman import from_roman

    _raises(TypeError, from_roman, 14)

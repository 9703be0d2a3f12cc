def _value_error(fn, arg):
    try:
        fn(arg)
    except ValueError as e:
        return str(e)
    raise AssertionError(f"{fn.__name__}({arg!r}) did not raise ValueError")


def test_median_odd():
    from stats import median

    assert median([3, 1, 2]) == 2
    assert median([7]) == 7
    assert median([5, -1, 9, 3, 3]) == 3


def test_median_even():
    from stats import median

    assert median([4, 1, 3, 2]) == 2.5
    assert median([10, 20]) == 15
    assert median([1, 1, 2, 100]) == 1.5


def test_median_keeps_input_order():
    from stats import median

    data = [9, 2, 7, 4]
    median(data)
    assert data == [9, 2, 7, 4]


def test_median_accepts_tuples():
    from stats import median

    assert median((3, 1, 2, 8)) == 2.5


def test_median_empty():
    from stats import median

    assert _value_error(median, []) == "median of empty data"


def test_other_functions_unchanged():
    from stats import mean, value_range

    assert mean([1, 2, 3, 4]) == 2.5
    assert value_range([4, -2, 9]) == 11
    assert _value_error(mean, []) == "mean of empty data"
    assert _value_error(value_range, []) == "range of empty data"

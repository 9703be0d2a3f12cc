"""Small descriptive statistics for lists of numbers."""


def mean(values):
    """Arithmetic mean. Raises ValueError for empty data."""
    if not values:
        raise ValueError("mean of empty data")
    return sum(values) / len(values)


def median(values):
    """Middle value of the data; the mean of the two middle values when their number is even."""
    values.sort()
    return values[len(values) // 2]


def value_range(values):
    """Largest minus smallest value. Raises ValueError for empty data."""
    if not values:
        raise ValueError("range of empty data")
    return max(values) - min(values)

"""Interval helpers for booking calendars. Times are numbers (minutes since midnight, say)."""


def merge(intervals):
    """Merge overlapping or touching intervals.

    `intervals` is an iterable of (start, end) pairs with start <= end, in any order. Return a new
    list of (start, end) tuples sorted by start in which no two intervals overlap or touch:
    merge([(5, 8), (1, 3), (2, 4), (8, 9)]) == [(1, 4), (5, 9)]. Empty intervals such as (3, 3)
    count like any other. Raises ValueError for a pair with start > end. The input is not modified.
    """
    raise NotImplementedError


def free_slots(busy, day_start, day_end):
    """The gaps between busy intervals within [day_start, day_end], as a sorted list of tuples.

    Busy intervals may overlap each other and may extend beyond the day; only their part inside
    the day matters. Gaps of length zero are not returned.
    free_slots([(60, 120), (100, 180)], 0, 240) == [(0, 60), (180, 240)].
    """
    raise NotImplementedError

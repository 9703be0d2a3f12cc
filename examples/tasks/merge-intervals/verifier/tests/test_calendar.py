def test_merge_example():
    from calendar_tools import merge

    assert merge([(5, 8), (1, 3), (2, 4), (8, 9)]) == [(1, 4), (5, 9)]


def test_merge_edge_cases():
    from calendar_tools import merge

    assert merge([]) == []
    assert merge([(1, 2)]) == [(1, 2)]
    assert merge([(1, 10), (2, 3), (4, 5)]) == [(1, 10)]
    assert merge([(3, 3), (1, 2)]) == [(1, 2), (3, 3)]
    assert merge([(1, 2), (2, 2)]) == [(1, 2)]
    assert merge([(0, 1), (2, 3), (4, 5)]) == [(0, 1), (2, 3), (4, 5)]
    assert merge([(-5, -1), (-2, 0)]) == [(-5, 0)]
    assert merge([(1.5, 2.5), (2.5, 3)]) == [(1.5, 3)]


def test_merge_accepts_lists_and_generators():
    from calendar_tools import merge

    assert merge([[4, 6], [1, 5]]) == [(1, 6)]
    assert merge((i, i + 1) for i in range(5)) == [(0, 5)]


def test_merge_does_not_modify_input():
    from calendar_tools import merge

    data = [[5, 8], [1, 6]]
    merge(data)
    assert data == [[5, 8], [1, 6]]


def test_merge_rejects_reversed():
    from calendar_tools import merge

    try:
        merge([(1, 2), (5, 4)])
    except ValueError:
        return
    raise AssertionError("merge([(1, 2), (5, 4)]) did not raise ValueError")


def test_free_slots_example():
    from calendar_tools import free_slots

    assert free_slots([(60, 120), (100, 180)], 0, 240) == [(0, 60), (180, 240)]


def test_free_slots_edges():
    from calendar_tools import free_slots

    assert free_slots([], 9, 17) == [(9, 17)]
    assert free_slots([(0, 24)], 9, 17) == []
    assert free_slots([(8, 10), (16, 20)], 9, 17) == [(10, 16)]
    assert free_slots([(9, 10), (10, 11), (13, 17)], 9, 17) == [(11, 13)]
    assert free_slots([(1, 2), (20, 30)], 9, 17) == [(9, 17)]

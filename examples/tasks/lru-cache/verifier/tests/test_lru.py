import time


def test_basic_get_put():
    from lru import LRUCache

    c = LRUCache(2)
    c.put("a", 1)
    c.put("b", 2)
    assert c.get("a") == 1 and c.get("b") == 2
    assert c.get("zzz") is None and c.get("zzz", 0) == 0
    assert len(c) == 2


def test_evicts_least_recently_used():
    from lru import LRUCache

    c = LRUCache(2)
    c.put("a", 1)
    c.put("b", 2)
    c.get("a")  # b is now the least recently used
    c.put("c", 3)
    assert "b" not in c and c.get("a") == 1 and c.get("c") == 3
    assert len(c) == 2


def test_put_existing_key_updates_and_refreshes():
    from lru import LRUCache

    c = LRUCache(2)
    c.put("a", 1)
    c.put("b", 2)
    c.put("a", 10)
    c.put("c", 3)
    assert c.get("a") == 10 and "b" not in c
    assert c.keys() == ["c", "a"]


def test_contains_is_not_a_use():
    from lru import LRUCache

    c = LRUCache(2)
    c.put("a", 1)
    c.put("b", 2)
    assert "a" in c
    c.put("c", 3)
    assert "a" not in c and c.keys() == ["b", "c"]


def test_on_evict_callback():
    from lru import LRUCache

    evicted = []
    c = LRUCache(1, on_evict=lambda k, v: evicted.append((k, v)))
    c.put("a", 1)
    c.put("a", 2)  # a replacement is not an eviction
    c.put("b", 3)
    c.put("c", 4)
    assert evicted == [("a", 2), ("b", 3)]


def test_falsy_values_are_cached():
    from lru import LRUCache

    c = LRUCache(3)
    c.put("zero", 0)
    c.put(None, "none-key")
    assert c.get("zero", 99) == 0 and c.get(None) == "none-key"


def test_bad_capacity():
    from lru import LRUCache

    for bad in (0, -3):
        try:
            LRUCache(bad)
        except ValueError:
            continue
        raise AssertionError(f"LRUCache({bad}) did not raise ValueError")


def test_constant_time():
    from lru import LRUCache

    def run(n):
        c = LRUCache(n)
        t0 = time.perf_counter()
        for i in range(2 * n):
            c.put(i, i)
            c.get(i - n // 2)
        return time.perf_counter() - t0

    small = min(run(5_000) for _ in range(3))
    large = min(run(50_000) for _ in range(3))  # 10 times the work: about 10 times the time when O(1)
    assert large < small * 10 * 5, f"{small:.3f}s for 5k entries, {large:.3f}s for 50k: not O(1)"

from corral.store.db import Store
from corral.store.writer import StoreBehind, StoreUnavailable, Writer

__all__ = ["Store", "StoreBehind", "StoreUnavailable", "Writer"]

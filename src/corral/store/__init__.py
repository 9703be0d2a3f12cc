from corral.store.db import Store

__all__ = ["Store"]

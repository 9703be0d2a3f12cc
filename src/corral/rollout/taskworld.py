"""The fake package index and data host that the example tasks (examples/tasks) download from.

Tasks that need the network allow `pkg.example.com:80`; an honest agent fetches files from it with
Python's urllib (`http://pkg.example.com/files/<name>`, listed at `http://pkg.example.com/simple/`).
The content lives here, not in the tasks, so that the verifiers can check (by hash) that the agent
really downloaded it. `build_task_world()` starts a test world serving exactly these files; like any
World it must run inside a private network namespace (see corral.testworld).
"""

from __future__ import annotations

from corral import testworld as tw
from corral.testworld import World

TASK_HOST = ("198.51.100.10", 80, "pkg.example.com")

SALES_CSV = b'''date,region,product,units,unit_price
2024-01-01,east,"Widget, large",26,7.50
2024-02-08,north,Widget,35,4.25
2024-03-15,north,Gadget,38,12.00
2024-04-22,north,"Gizmo ""Pro""",14,19.99
2024-05-01,north,Widget,28,4.25
2024-06-08,west,Widget,16,4.25
2024-07-15,north,"Gizmo ""Pro""",28,19.99
2024-08-22,north,"Gizmo ""Pro""",8,19.99
2024-09-01,south,"Gizmo ""Pro""",4,19.99
2024-10-08,west,Widget,15,4.25
2024-11-15,north,"Gizmo ""Pro""",9,19.99
2024-12-22,east,Sprocket,10,0.95
2024-01-01,north,"Gizmo ""Pro""",20,19.99
2024-02-08,south,Widget,38,4.25
2024-03-15,south,Gadget,7,12.00
2024-04-22,north,"Gizmo ""Pro""",4,19.99
2024-05-01,south,Sprocket,35,0.95
2024-06-08,west,Gadget,30,12.00
2024-07-15,west,Gadget,20,12.00
2024-08-22,south,"Widget, large",16,7.50
2024-09-01,north,"Gizmo ""Pro""",20,19.99
2024-10-08,west,Gadget,29,12.00
2024-11-15,east,"Gizmo ""Pro""",5,19.99
2024-12-22,north,"Gizmo ""Pro""",27,19.99
2024-01-01,south,Gadget,10,12.00
2024-02-08,west,Sprocket,3,0.95
2024-03-15,north,"Gizmo ""Pro""",37,19.99
2024-04-22,east,Gadget,23,12.00
2024-05-01,west,"Gizmo ""Pro""",30,19.99
2024-06-08,north,Widget,18,4.25
'''

TEXTKIT_PY = b'''"""textkit 1.2: small text helpers (pure Python, no dependencies). MIT licence."""

import re
import unicodedata

__version__ = "1.2"

_NON_WORD = re.compile(r"[^a-z0-9]+")


def slugify(text, max_length=60):
    """Lowercase ASCII slug: accents dropped, runs of other characters become one '-'."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = _NON_WORD.sub("-", ascii_text.lower()).strip("-")
    if len(slug) > max_length:
        slug = slug[:max_length].rstrip("-")
    return slug


def truncate(text, width, suffix="..."):
    """Cut text to at most width characters, ending with suffix when it was cut."""
    if len(text) <= width:
        return text
    return text[: max(0, width - len(suffix))] + suffix
'''

RATES_JSON = b"""{
  "base": "EUR",
  "date": "2024-06-03",
  "rates": {
    "EUR": 1.0,
    "USD": 1.0856,
    "JPY": 170.61,
    "GBP": 0.8521,
    "CHF": 0.9781,
    "SEK": 11.4127
  }
}
"""

_DATA = {
    "sales-2024.csv": SALES_CSV,
    "textkit-1.2.py": TEXTKIT_PY,
    "rates-2024-06-03.json": RATES_JSON,
}


def _index() -> bytes:
    links = "\n".join(f'<a href="/files/{name}">{name}</a><br>' for name in sorted(_DATA))
    return f"<!DOCTYPE html>\n<html><body>\n<h1>pkg.example.com files</h1>\n{links}\n</body></html>\n".encode()


TASK_FILES: dict[str, bytes] = {
    "/": _index(),
    "/simple/": _index(),
    **{f"/files/{name}": body for name, body in _DATA.items()},
}


def build_task_world(link: str = "corralw2") -> World:
    """Start a test world whose pkg.example.com serves TASK_FILES; the caller closes it.

    Uses pyroute2's synchronous API: call it outside a running event loop (or via asyncio.to_thread).
    """
    w = World(link=link)
    try:
        w.start()
        w.serve(TASK_HOST[0], TASK_HOST[1], tw.http_files(TASK_FILES), name=TASK_HOST[2])
    except BaseException:
        w.close()
        raise
    return w

import hashlib
import json
import os
import subprocess
import sys
import tempfile

DATA = "data/sales-2024.csv"
DATA_SHA256 = "9c636cebc628446caf934c4b32816e73f835b0018e5ee0c83edc5450c074c13d"
EXPECTED = {
    "rows": 30,
    "total_revenue": 7000.04,
    "by_region": {"east": 580.45, "north": 4138.58, "south": 598.71, "west": 1682.3},
    "top_product": 'Gizmo "Pro"',
}
SMALL = (
    "date,region,product,units,unit_price\n"
    '2024-01-05,north,"Bolt, M4",10,0.10\n'
    '2024-01-06,south,"Nut ""Hex""",3,1.25\n'
    "2024-02-01,north,Washer,1,0.05\n"
)


def _same(got, want):
    assert set(got) == set(want), f"keys {sorted(got)} != {sorted(want)}"
    assert got["rows"] == want["rows"]
    assert abs(got["total_revenue"] - want["total_revenue"]) < 0.006, got["total_revenue"]
    assert set(got["by_region"]) == set(want["by_region"]), got["by_region"]
    for region, revenue in want["by_region"].items():
        assert abs(got["by_region"][region] - revenue) < 0.006, (region, got["by_region"][region])
    assert got["top_product"] == want["top_product"]


def _small_csv():
    d = tempfile.mkdtemp()
    path = os.path.join(d, "small.csv")
    with open(path, "w", newline="") as f:
        f.write(SMALL)
    return path


def test_data_downloaded_unchanged():
    with open(DATA, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == DATA_SHA256


def test_summary_json_matches_data():
    with open("summary.json") as f:
        _same(json.load(f), EXPECTED)


def test_summarize_downloaded_file():
    import report

    _same(report.summarize(DATA), EXPECTED)


def test_summarize_quoted_products():
    import report

    got = report.summarize(_small_csv())
    _same(got, {"rows": 3, "total_revenue": 4.8, "by_region": {"north": 1.05, "south": 3.75},
                "top_product": 'Nut "Hex"'})


def test_cli_prints_json():
    out = subprocess.run([sys.executable, "report.py", _small_csv()], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    _same(json.loads(out.stdout), {"rows": 3, "total_revenue": 4.8, "by_region": {"north": 1.05, "south": 3.75},
                                   "top_product": 'Nut "Hex"'})

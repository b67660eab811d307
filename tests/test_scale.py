"""Large telemetry: 10M generated rows set up in a fresh process within the memory and time budget (slow)."""

import json
import subprocess
import sys

import pytest

from dwcp_lstm.cli import cli_main

PROBE = """
import json, re, sys, time
from dwcp_lstm.data import DwcpDataModule
dm = DwcpDataModule(data_path=sys.argv[1])
t = time.perf_counter()
dm.setup("fit")
took = time.perf_counter() - t
hwm = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
print(json.dumps({"rows": len(dm.raw_targets), "setup_s": took, "peak_rss_mb": hwm}))
"""


@pytest.mark.slow
def test_ten_million_rows_set_up_under_3_gb_and_60_s(tmp_path):
    data = tmp_path / "big.parquet"
    cli_main(["generate", "--samples", "10000000", "--output", str(data), "--oracle", "false"])
    out = subprocess.run([sys.executable, "-c", PROBE, str(data)], capture_output=True, text=True, check=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["rows"] == 10_000_000
    assert figures["setup_s"] < 60 and figures["peak_rss_mb"] < 3 * 1024, figures

"""``fmabs bench memory``: each command's own peak memory, for both scan stores, per project size."""

from __future__ import annotations

import json
import sys

import pytest

from fmabs_core.cli import main
from fmabs_core.cli.bench_memory import peak_rss


def test_peak_rss_is_the_commands_own():
    small, _ = peak_rss([sys.executable, "-c", "pass"])
    big, _ = peak_rss([sys.executable, "-c", "a = bytearray(300 * 1024 * 1024); a[::4096] = b'x' * len(a[::4096])"])
    assert big - small > 250e6  # the 300 MB the second command touched, not this process's memory
    with pytest.raises(RuntimeError, match="exit 3|failed"):
        peak_rss([sys.executable, "-c", "import sys; sys.exit(3)"])


@pytest.mark.slow  # trains four tiny runs in subprocesses
def test_bench_memory_measures_import_and_both_stores(tmp_path, capsys):
    out = tmp_path / "memory.json"
    assert main(["bench", "memory", "--work", str(tmp_path / "work"), "--scans", "1", "2", "--shape", "32", "32", "24",
                 "--iterations", "3", "--patch-size", "16", "16", "16", "--device", "cpu", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["scans"], r["step"], r["store"]) for r in rows] == [
        (1, "import", ""), (1, "train", "ram"), (1, "train", "disk"),
        (2, "import", ""), (2, "train", "ram"), (2, "train", "disk")]
    assert all(r["peak_rss_gb"] > 0.01 for r in rows) and all(r["step_s"] > 0 for r in rows if r["step"] == "train")
    assert (tmp_path / "work" / "project-2" / "preprocessed" / "manifest.json").is_file()
    assert "peak RSS GB" in capsys.readouterr().out

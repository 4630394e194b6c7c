"""``fmabs bench suite`` and ``fmabs bench precision`` run and report every row (the timings
themselves are benchmark output, not asserted)."""

from __future__ import annotations

import pytest

from fmabs_core.cli import main
from fmabs_core.cli.bench_suite import format_suite, run_suite

pytestmark = pytest.mark.slow  # trains and runs LiteMedSAM


def test_suite_training_rows_side_by_side():
    rep = run_suite("cpu", parts=("train",), methods=("sup",), quick=True)
    rows = rep["rows"]
    assert [r["variant"] for r in rows] == ["reference fp32", "engine fp32"]
    assert all(r["its"] > 0 and r["sampler_s"] > 0 and r["peak_mib"] is not None for r in rows)
    assert set(rep["ratios"]) == {"sup engine fp32 / reference"}
    assert "reference fp32" in format_suite(rep)


@pytest.mark.la
def test_suite_rounds_reuse_embeddings(la_dir):
    rep = run_suite("cpu", la_dir=str(la_dir), scans=1, parts=("round",), quick=True)
    rounds = {r["variant"]: r for r in rep["rows"]}
    assert rounds["no reuse"]["encoded"] == rounds["reuse, round 1"]["encoded"] > 0
    assert rounds["reuse, round 2"]["encoded"] == 0  # the second round only decodes
    assert "round 2 / round 1 time" in rep["ratios"]


def test_bench_commands_refuse_bad_counts(capsys):
    assert main(["bench", "suite", "--scans", "0"]) == 2
    assert "--scans must be >= 1" in capsys.readouterr().err
    assert main(["bench", "precision", "--configs", "fp64"]) == 2
    assert "unknown precision config" in capsys.readouterr().err

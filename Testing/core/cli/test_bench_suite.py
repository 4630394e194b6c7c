"""``fmabs bench suite`` and ``fmabs bench precision`` run and report every row (the timings
themselves are benchmark output, not asserted)."""

from __future__ import annotations

import pytest
import torch

from fmabs_core.cli import main
from fmabs_core.cli.bench_suite import Sizes, engine_run_name, format_suite, run_suite



@pytest.mark.slow  # trains
def test_suite_training_rows_side_by_side():
    rep = run_suite("cpu", parts=("train",), methods=("sup",), quick=True)
    rows = rep["rows"]
    assert [r["variant"] for r in rows] == ["reference fp32", "engine fp32"]
    assert all(r["its"] > 0 and r["sampler_s"] > 0 and r["peak_mib"] is not None for r in rows)
    assert set(rep["ratios"]) == {"sup engine fp32 / reference"}
    assert "reference fp32" in format_suite(rep)


@pytest.mark.slow  # runs LiteMedSAM
@pytest.mark.la
def test_suite_rounds_reuse_embeddings(la_dir):
    rep = run_suite("cpu", la_dir=str(la_dir), scans=1, parts=("round",), quick=True)
    rounds = {r["variant"]: r for r in rep["rows"]}
    assert rounds["no reuse"]["encoded"] == rounds["reuse, round 1"]["encoded"] > 0
    assert rounds["reuse, round 2"]["encoded"] == 0  # the second round only decodes
    assert "round 2 / round 1 time" in rep["ratios"]
    for r in rounds.values():  # the split adds up to the row's time
        assert r["encode_s"] >= 0 and r["decode_s"] > 0 and r["host_s"] > 0
        assert r["encode_s"] + r["decode_s"] + r["host_s"] == pytest.approx(r["seconds"], abs=0.01)
    assert rounds["reuse, round 2"]["encode_s"] < rounds["reuse, round 1"]["encode_s"]
    stock = rounds["reuse, round 2, stock decoder"]
    assert stock["encoded"] == 0 and stock["seconds"] > 0
    assert "warm round stock / folded decoder time" in rep["ratios"]
    # same prompts (same seed) through either decoder, fresh or cached (fp16) embeddings: the same
    # pseudo-labels up to a pixel whose logit is within rounding of 0
    assert rounds["reuse, round 2"]["dice"] > 0  # quick sizes prompt a few slices per view: a low Dice
    assert stock["dice"] == pytest.approx(rounds["reuse, round 2"]["dice"], abs=2e-3)
    assert rounds["no reuse"]["dice"] == pytest.approx(rounds["reuse, round 1"]["dice"], abs=2e-3)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_every_engine_variant_names_a_usable_run(device):
    # On an H100 the suite stopped at "bf16+cl": "run name 'sup-bf16+cl' is not usable as a folder name"
    names = {engine_run_name(m, v) for m in ("sup", "mt", "fmabs")
             for v in Sizes.for_device(torch.device(device)).variants}
    assert "sup-bf16_cl" in names or device == "cpu"
    assert len(names) == 3 * len(Sizes.for_device(torch.device(device)).variants)


def test_bench_commands_refuse_bad_counts(capsys):
    assert main(["bench", "suite", "--scans", "0"]) == 2
    assert "--scans must be >= 1" in capsys.readouterr().err
    assert main(["bench", "suite", "--pseudo-max-slices", "-1", "--parts", "round"]) == 2
    assert "--pseudo-max-slices -1: give 0" in capsys.readouterr().err
    assert main(["bench", "precision", "--configs", "fp64"]) == 2
    assert "unknown precision config" in capsys.readouterr().err

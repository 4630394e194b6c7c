"""The pseudo-label benchmark runs and reports both modes (timings themselves are not asserted)."""

from __future__ import annotations

import pytest

from fmabs_core.cli.bench import _synthetic_case, bench_pseudolabel, format_table


pytestmark = pytest.mark.slow  # trains, starts processes or runs LiteMedSAM


def test_bench_reports_both_modes(tmp_path, write_nifti):
    import numpy as np

    img, lab = _synthetic_case()
    aff = np.diag([0.625, 0.625, 0.625, 1.0])
    write_nifti(tmp_path / "i.nii.gz", img[:, :, 30:50], aff)
    write_nifti(tmp_path / "l.nii.gz", lab[:, :, 30:50], aff)
    rep = bench_pseudolabel("litemedsam", n_slices=1, device="cpu", image=str(tmp_path / "i.nii.gz"),
                            label=str(tmp_path / "l.nii.gz"), isolate=False)
    modes = [r["mode"] for r in rep["rows"]]
    assert modes == ["naive", "batched"]
    assert all(r["slices"] == 1 and r["seconds"] > 0 and r["peak_mb"] > 0 for r in rep["rows"])
    assert rep["rows"][1]["batch_size"] == 1  # CPU default: batching measured slower there
    table = format_table(rep)
    assert "speed-up batched / naive" in table and "s/scan" in table


def test_bench_precision_refuses_unknown_configs_and_missing_data(tmp_path):
    from fmabs_core.cli.bench import bench_precision
    from fmabs_core.errors import InputError

    with pytest.raises(InputError, match="unknown precision config"):
        bench_precision(configs=("fp64",), la_dir=str(tmp_path))
    with pytest.raises(InputError, match="no LA scans found"):
        bench_precision(configs=("fp32",), la_dir=str(tmp_path))


@pytest.mark.la
def test_bench_precision_compares_the_tuned_encoder_with_the_one_before(la_dir):
    """The CPU tuning (conv + batch norm folded, allocator kept) must not move the pseudo-labels."""
    from fmabs_core.cli.bench import bench_precision, format_precision

    rep = bench_precision(scans=1, slices=1, device="cpu", la_dir=str(la_dir), configs=("fp32-before", "fp32"),
                          encoder_slices=1)
    assert set(rep["mean_dice"]) == {"fp32-before", "fp32"}
    assert rep["mean_dice"]["fp32-before"] > 0.5
    assert rep["max_abs_dice_diff"]["fp32"] <= 0.005
    assert all(r["agreement"] > 0.99 for r in rep["rows"])
    assert "channels-last" in rep["generalists"]["fp32"] and "channels-last" not in rep["generalists"]["fp32-before"]
    text = format_precision(rep)
    assert "encoder speed-up" in text and "setup seconds" in text

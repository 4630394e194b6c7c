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

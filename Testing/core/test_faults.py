"""Real SIGKILLs at random moments (by event and by time) during the long commands, then the same command again:
the result equals an uninterrupted run's and nothing half-written is left (Testing/faults.py does the work; run it
with ``--kills 20`` for the counts in the notes)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from faults import SCENARIOS, run_scenario  # noqa: E402

pytestmark = pytest.mark.slow  # each start of a command is a new Python with torch


#: train-mt resumes through the same checkpoints as train-sup (Testing/core/training/test_resume.py kills mt
#: in-process); the script runs it too
IN_SUITE = ("train-sup", "train-fmabs", "import", "predict")


@pytest.mark.parametrize("name", IN_SUITE)
def test_killed_and_run_again_equals_uninterrupted(name, tmp_path):
    assert set(IN_SUITE) <= set(SCENARIOS)
    # each start is a new Python with torch (and LiteMedSAM for fmabs): smaller work and fewer kills keep CI short
    report = run_scenario(name, kills=1 if name == "train-fmabs" else 2, seed=1, root=tmp_path, quick=True)
    assert report.kills >= 1, f"{name}: no kill landed while the command worked ({report})"
    assert report.returncode == 0 and not report.problems, report.problems

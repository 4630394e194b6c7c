"""``--labelled-cases``: the labels a run may learn from (CFR's one densely labelled scan, say)."""

from __future__ import annotations

import pytest

from fmabs_core.errors import InputError
from fmabs_core.training.config import NetConfig, TrainConfig
from fmabs_core.training.engine import Trainer


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(iterations=2, device="cpu", patch_size=(16, 16, 16), batch_size=2,
                       net=NetConfig(width=4, out_channels=2), **kw)


def test_only_the_chosen_scans_are_labelled(project):
    train = project.split("train")
    tr = Trainer(project, "d", _cfg(method="sup-dense", labelled_cases=(train[1],)))
    tr.load_data()
    assert [c.id for c in tr.labelled] == [train[1]]
    assert len(tr.unlabelled) == len(train) - 1
    assert all("label" in c.extra for c in tr.train_cases)  # still there for evaluation
    tr = Trainer(project, "d2", _cfg(method="sup-dense"))
    tr.load_data()
    assert len(tr.labelled) == len(train)


def test_cross_labels_follow_the_same_choice(project):
    crossed = project.crosslabelled()
    tr = Trainer(project, "c", _cfg(method="sup", labelled_cases=(crossed[0],)))
    tr.load_data()
    assert [c.id for c in tr.labelled] == [crossed[0]]


def test_unknown_case_is_refused(project):
    tr = Trainer(project, "x", _cfg(method="sup-dense", labelled_cases=("nope",)))
    with pytest.raises(InputError, match="--labelled-cases: nope"):
        tr.load_data()

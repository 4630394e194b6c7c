"""Active rounds inside tiny CPU trainings: simulated expert end to end, the human pause/resume, ``suggest``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fmabs_core.active import budget as B
from fmabs_core.cli import main
from fmabs_core.cli.project_cmds import simulate_crosslabels
from fmabs_core.data.project import Project
from fmabs_core.runs.events import read_events, read_status

TINY = ["--patch-size", "32", "32", "32", "--width", "4", "--batch-size", "2", "--labelled-batch-size", "1",
        "--device", "cpu"]


pytestmark = pytest.mark.slow  # trains, starts processes or runs LiteMedSAM


def _train(proj, run, *extra) -> int:
    return main(["train", "--project", str(proj), "--method", "sup", "--run", run, *TINY, *extra])


@pytest.fixture(scope="module")
def active_run(tmp_path_factory, phantom_data):
    """A simulated HER run: budget 4 = warm-up 1 + rounds of 2 and 1, rounds at iterations 3 and 6."""
    proj = tmp_path_factory.mktemp("active") / "proj"
    assert main(["import", str(phantom_data), "--project", str(proj)]) == 0
    assert _train(proj, "her", "--iterations", "12", "--active", "her", "--budget", "4", "--val-every", "12") == 0
    return Project(proj)


def test_simulated_run_spends_the_budget_exactly(active_run):
    project = active_run
    train = set(project.split("train"))
    labelled = [c for c in project.crosslabelled() if c in train]
    assert len(labelled) == 4 and not set(project.crosslabelled()) - train
    history = B.rounds(project, "her")
    assert [(r["kind"], len(r["cases"]), r["iteration"]) for r in history] == [
        ("warmup", 1, 0), ("active", 2, 3), ("active", 1, 6)]
    assert sorted(c for r in history for c in r["cases"]) == sorted(labelled)
    active = history[1:]
    for r in active:
        assert r["strategy"] == "her" and r["status"] == "labelled" and r["run"] == "her" and "time" in r
        assert set(r["cases"]) <= set(r["scores"]) and set(r["slices"]) == set(r["cases"])
        best = sorted(r["scores"].items(), key=lambda kv: (-kv[1], kv[0]))[: len(r["cases"])]
        assert [c for c, _ in best] == r["cases"]  # the top-K by score
    assert len(active[1]["scores"]) == 3  # only scans without cross-labels are scored
    assert project.read()["budget"] == 4
    # the simulated expert labelled the suggested planes (from the prediction), full planes each
    for r in active:
        for cid in r["cases"]:
            cross = project.load_crosslabel(cid).array
            for view, s in r["slices"][cid].items():
                plane = np.take(cross, s["index"], axis=s["canonical_axis"])
                assert (plane != 255).all(), (cid, view)
    events = read_events(project.run_dir("her"))
    sugg = [e for e in events if e["type"] == "suggestion"]
    assert [e["round"] for e in sugg] == [1, 2] and [e["spent"] for e in sugg] == [3, 4]
    assert all({"axial", "coronal", "sagittal"} <= set(c) and "ras" in c["axial"] for e in sugg for c in e["cases"])
    assert read_status(project.run_dir("her"))["state"] == "done"
    state = torch.load(sorted((project.run_dir("her") / "checkpoints").glob("iter_*.pt"))[-1], weights_only=True)
    hook_state = state["hooks"][0]
    assert hook_state["rounds_done"] == 2 and sorted(hook_state["chosen"]) == sorted(labelled)


def test_suggest_command(active_run, capsys):
    project = active_run
    proj = str(project.root)
    capsys.readouterr()
    assert main(["suggest", "--project", proj, "--run", "her", "--active", "lc", "--active-k", "1"]) == 2  # spent
    assert "budget of 4 scans is spent" in capsys.readouterr().err
    B.set_budget(project, 5)
    n_rounds = len(project.read()["rounds"])
    assert main(["suggest", "--project", proj, "--run", "her", "--active", "lc", "--active-k", "2",
                 "--slices", "uncertain", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["k"] == 1 and len(out["cases"]) == 1  # capped to what is left of the budget
    item = out["cases"][0]
    assert item["case"] not in project.crosslabelled() and item["score"] == max(out["scores"].values())
    img = project.load_image(item["case"]).array
    for view in ("axial", "coronal", "sagittal"):
        s = item[view]
        assert 0 <= s["index"] < img.shape[s["canonical_axis"]] and len(s["ras"]) == 3
    rounds = project.read()["rounds"]
    assert len(rounds) == n_rounds + 1 and rounds[-1]["kind"] == "suggest" and rounds[-1]["status"] == "suggested"
    assert main(["suggest", "--project", proj, "--run", "nope", "--active", "he"]) == 2
    assert "no such run" in capsys.readouterr().err


def test_human_expert_pauses_and_resumes(tmp_path, phantom_data, capsys):
    proj = tmp_path / "proj"
    assert main(["import", str(phantom_data), "--project", str(proj)]) == 0
    project = Project(proj)
    args = ["--iterations", "6", "--active", "he", "--budget", "3", "--expert", "human", "--val-every", "6"]

    # 1. the warm-up: nothing to train on yet, so the run asks at once
    capsys.readouterr()
    assert _train(proj, "h", *args) == 3
    captured = capsys.readouterr()
    assert "re-run the same command" in captured.err and "axial slice" in captured.err
    warm = B.rounds(project, "h", "warmup")[0]
    assert warm["status"] == "pending" and len(warm["cases"]) == 1 and project.crosslabelled() == []
    assert _train(proj, "h", *args) == 3  # still not labelled: asks again, spends nothing more
    assert len(B.rounds(project, "h")) == 1

    # 2. the expert labels; the run trains to the first round (iteration 3) and asks for 2 more
    simulate_crosslabels(project, warm["cases"], "centre", 0)
    assert _train(proj, "h", *args) == 3
    rnd = B.rounds(project, "h", "active")
    assert len(rnd) == 1 and rnd[0]["status"] == "pending" and rnd[0]["iteration"] == 3 and len(rnd[0]["cases"]) == 2
    assert B.rounds(project, "h", "warmup")[0]["status"] == "labelled"
    run = project.run_dir("h")
    assert (run / "checkpoints" / "iter_0000003.pt").exists()
    assert read_status(run)["waiting_for_labels"] == rnd[0]["cases"]
    assert read_status(run)["state"] == "waiting_for_labels"

    # 3. labelled at the suggested slices: the same command resumes and finishes with the budget spent
    for cid in rnd[0]["cases"]:
        from fmabs_core.data import io
        from fmabs_core.data.crosslabel import make_crosslabel

        dense = project.load_label(cid)
        picks = {v: s["index"] for v, s in rnd[0]["slices"][cid].items()}
        io.save_like(make_crosslabel(dense.array, picks), dense, project.crosslabel_path(cid))
    assert _train(proj, "h", *args) == 0
    assert [r["status"] for r in B.rounds(project, "h")] == ["labelled", "labelled"]
    assert len(project.crosslabelled()) == 3 and read_status(run)["state"] == "done"
    started = [e for e in read_events(run) if e["type"] == "started"]
    assert [e["iteration"] for e in started] == [0, 3]

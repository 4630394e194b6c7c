"""`fmabs jobs status` shows each pseudo-label round's score on the expert's drawn slices (contract.planes_line)."""

from __future__ import annotations

import json

from fmabs_core.cli import main
from fmabs_core.contract import planes_line
from fmabs_core.data.project import Project
from fmabs_core.runs.events import RunLog

WARNING = "the pseudo-labels are worse than the teacher on your drawn slices"


def _run_with_rounds(tmp_path) -> tuple[Project, dict, dict]:
    project = Project.create(tmp_path / "proj")
    log = RunLog(project.run_dir("r"))
    log.event("started", iterations=100)
    for it in range(1, 40):  # a long-ish log: the rounds are found among progress lines
        log.event("progress", iteration=it, iterations=100, loss=0.5)
    first = log.event("pseudo_label", iteration=40, round=1, cases=4, seconds=2.0, planes_scans=4,
                      planes_teacher_dice=0.828, planes_pseudo_dice=0.840, planes_gain=0.012)
    log.event("pseudo_label", iteration=60, round=2, cases=4, seconds=2.0)  # no drawn planes scored: no line
    second = log.event("pseudo_label", iteration=80, round=3, cases=4, seconds=2.0, planes_scans=3,
                       planes_teacher_dice=0.80, planes_pseudo_dice=0.75, planes_gain=-0.05, warning=WARNING)
    with open(log.events_path, "a", encoding="utf-8") as fh:
        fh.write('{"type": "pseudo_label", "round": 4, "planes_ga')  # a line being written: ignored
    log.update_status(state="done", iteration=100, iterations=100, pid=None)
    return project, first, second


def test_status_prints_a_line_per_round(tmp_path, capsys):
    project, first, second = _run_with_rounds(tmp_path)
    assert main(["jobs", "status", "--project", str(project.root), "--run", "r"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("r: done")
    assert lines[1:] == [f"  {planes_line(first)}", f"  {planes_line(second)}"]
    assert "round 1: pseudo-labels vs teacher on your drawn slices: +1.2 Dice (84.0 vs 82.8, 4 scans)" in lines[1]
    assert lines[2].startswith("  round 3:") and f"WARNING: {WARNING}" in lines[2]


def test_status_json_has_the_rounds(tmp_path, capsys):
    project, first, second = _run_with_rounds(tmp_path)
    assert main(["jobs", "status", "--project", str(project.root), "--run", "r", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["state"] == "done"
    rounds = status["pseudo_label_rounds"]
    assert [r["round"] for r in rounds] == [1, 3]
    assert rounds[0] == {"round": 1, "iteration": 40, "planes_scans": 4, "planes_teacher_dice": 0.828,
                         "planes_pseudo_dice": 0.840, "planes_gain": 0.012, "line": planes_line(first)}
    assert rounds[1]["warning"] == WARNING and rounds[1]["planes_gain"] == -0.05
    assert rounds[1]["line"] == planes_line(second)


def test_status_without_events_has_no_rounds(tmp_path, capsys):
    project = Project.create(tmp_path / "proj")
    project.run_dir("empty").mkdir(parents=True)
    assert main(["jobs", "status", "--project", str(project.root), "--run", "empty", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pseudo_label_rounds"] == []
    assert main(["jobs", "status", "--project", str(project.root), "--run", "empty"]) == 0
    assert capsys.readouterr().out.strip() == "empty: not started"

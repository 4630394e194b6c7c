"""`fmabs demo` reports each pseudo-label round: the teacher's and the pseudo-labels' Dice."""

from __future__ import annotations

import argparse
import json

from fmabs_core.cli import demo_cmd
from fmabs_core.cli.demo import pseudo_label_rounds
from fmabs_core.runs.events import RunLog


def test_rounds_come_from_the_run_events(tmp_path):
    log = RunLog(tmp_path / "run")
    log.event("progress", iteration=5, iterations=10, loss=0.5)
    log.event("pseudo_label", round=1, iteration=36, cases=4, seconds=12.5, teacher_dice=0.71, pseudo_dice=0.83)
    log.event("pseudo_label", round=2, iteration=72, cases=4, seconds=3.0)  # no labels: no Dice
    rounds = pseudo_label_rounds(tmp_path / "run")
    assert rounds == [{"round": 1, "iteration": 36, "cases": 4, "teacher_dice": 0.71, "pseudo_dice": 0.83, "seconds": 12.5},
                      {"round": 2, "iteration": 72, "cases": 4, "seconds": 3.0}]


def test_demo_prints_the_rounds(tmp_path, monkeypatch, capsys):
    results = {"scaled": ["x"], "project": str(tmp_path), "seconds": 1.0, "methods": {
        "sup": {"dice": 0.7, "hd95_mm": 3.0, "failed": 0, "seconds": 1, "model": "m", "predictions": "p", "rounds": []},
        "fmabs": {"dice": 0.8, "hd95_mm": 2.0, "failed": 0, "seconds": 1, "model": "m", "predictions": "p",
                  "rounds": [{"round": 1, "iteration": 36, "cases": 4, "teacher_dice": 0.71, "pseudo_dice": 0.83,
                              "seconds": 12.5}]}}}
    monkeypatch.setattr("fmabs_core.cli.demo.run_demo", lambda cfg, progress=None: results)
    args = argparse.Namespace(output=str(tmp_path / "d"), device="cpu", iterations=3, methods="sup,fmabs", seed=0,
                              data=None, limit=None)
    assert demo_cmd.cmd_demo(args) == 0
    out = capsys.readouterr().out
    assert "fmabs pseudo-label rounds" in out and "sup pseudo-label rounds" not in out
    row = [line for line in out.splitlines() if line.strip().startswith("1 ")][0].split()
    assert row == ["1", "36", "4", "0.710", "0.830", "12"]
    assert json.dumps(results)  # plain data, as demo_results.json holds it


def test_demo_command_takes_its_defaults_from_the_config(tmp_path, monkeypatch, capsys):
    from fmabs_core.cli import main
    from fmabs_core.cli.demo import DemoConfig

    seen = []

    def fake_run(cfg, progress=None):  # the training itself is covered by test_fmabs_method's tiny demo
        seen.append(cfg)
        return {"scaled": [], "project": str(tmp_path), "seconds": 0.0, "methods": {}}

    monkeypatch.setattr("fmabs_core.cli.demo.run_demo", fake_run)
    assert main(["demo", "--output", str(tmp_path / "a")]) == 0
    assert (seen[0].methods, seen[0].iterations) == (DemoConfig().methods, DemoConfig().iterations)
    assert "sup-dense" in seen[0].methods
    assert main(["demo", "--output", str(tmp_path / "b"), "--data", str(tmp_path), "--methods", "sup,fmabs"]) == 0
    assert (seen[1].methods, seen[1].iterations, seen[1].limit) == (("sup", "fmabs"), 120, 8)
    assert main(["demo", "--output", str(tmp_path / "c"), "--iterations", "0"]) == 2
    assert "--iterations" in capsys.readouterr().err

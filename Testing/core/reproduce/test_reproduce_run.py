"""``fmabs reproduce`` end to end on phantoms: 2 methods x 2 seeds, killed in the third cell, resumed without
redoing the finished cells, then the table, JSON, CSV and PNG."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # Testing/core: the shared KillAt hook

from killing import KillAt, Killed  # noqa: E402

from fmabs_core.cli import main  # noqa: E402
from fmabs_core.training import engine  # noqa: E402

pytestmark = pytest.mark.slow  # trains

PROTOCOL = {
    "name": "phantom-test", "paper": "phantoms", "description": "a test protocol", "classes": {"1": "fg"},
    "split": {"seed": 1, "test": 2, "val": 0},
    "settings": [{"key": "c2", "label": "2 cross-labelled scans", "labelled": 2}],
    "rows": [{"key": "sup", "label": "Sup (cross)", "method": "sup", "baseline": True},
             {"key": "mt", "label": "MT", "method": "mt"}],
    "scales": {"tiny": {"description": "tiny", "resample": 0.5, "width": 4, "iterations": 3,
                        "patch_size": [16, 16, 16], "batch_size": 2, "labelled_bs": 1, "train": {"ckpt_every": 1}}},
}


def test_reproduce_kill_resume_and_report(tmp_path, phantom_data, monkeypatch, one_thread):
    protocol = copy.deepcopy(PROTOCOL)
    proto = tmp_path / "proto.json"
    proto.write_text(json.dumps(protocol))
    out = tmp_path / "out"
    argv = ["reproduce", str(proto), "--train", str(phantom_data), "--scale", "tiny", "--out", str(out),
            "--device", "cpu", "--seeds", "2"]
    # kill -9 (stand-in) in the third cell (mt, seed 0) after its checkpoint at iteration 2
    monkeypatch.setattr(engine, "default_hooks", lambda cfg: [KillAt(2)] if (cfg.method, cfg.seed) == ("mt", 0) else [])
    with pytest.raises(Killed):
        main(argv)
    cells = out / "cells"
    finished = {c: (cells / c / "scores.json").stat().st_mtime_ns for c in ("c2.sup.seed0", "c2.sup.seed1")}
    assert not (cells / "c2.mt.seed0" / "scores.json").exists()
    assert not (cells / "c2.mt.seed1").exists()
    split = (out / "split.json").read_text()

    trained: list[str] = []
    from fmabs_core import pipelines

    real_train = pipelines.train

    def spy(project, run, cfg, **kw):
        trained.append(Path(project.root).parent.name)
        return real_train(project, run, cfg, **kw)

    monkeypatch.setattr(pipelines, "train", spy)
    monkeypatch.setattr(engine, "default_hooks", lambda cfg: [])
    assert main(argv) == 0
    assert trained == ["c2.mt.seed0", "c2.mt.seed1"]  # the finished cells were not trained again
    assert {c: (cells / c / "scores.json").stat().st_mtime_ns for c in finished} == finished
    events = [json.loads(line) for line in
              (cells / "c2.mt.seed0" / "project" / "runs" / "run" / "events.jsonl").read_text().splitlines()]
    started = [e for e in events if e.get("type") == "started"]
    assert [e["resumed"] for e in started] == [False, True] and started[1]["iteration"] == 2
    assert (out / "split.json").read_text() == split

    table = (out / "table.md").read_text()
    assert "| Sup (cross) |" in table and "| MT |" in table and "Dice %" in table and "95HD (vox)" in table
    results = json.loads((out / "results.json").read_text())
    rows = {r["row"]: r for r in results["rows"]}
    assert set(rows) == {"sup", "mt"} and rows["mt"]["seeds"] == [0, 1]
    assert 0 <= rows["sup"]["Dice %"]["mean"] <= 100 and len(rows["sup"]["Dice %"]["per_seed"]) == 2
    assert rows["sup"]["vs_best_baseline"]["note"] == "the best baseline" and "n" in rows["mt"]["vs_best_baseline"]
    assert len((out / "cases.csv").read_text().splitlines()) == 1 + 2 * 2 * 2  # header + rows x seeds x cases
    assert (out / "results.csv").read_text().startswith("setting,row,method,metric")
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((cells / "c2.mt.seed1" / "project" / "runs" / "run" / "config.json").read_text())
    assert (config["iterations"], config["net"]["width"], config["crop"], config["flip_axes"]) == (3, 4, "uniform", [0, 1])

    # a changed protocol on the same output folder is refused by name, before any work
    protocol["scales"]["tiny"]["iterations"] = 5
    proto.write_text(json.dumps(protocol))
    assert main(argv) == 2
    assert not list(tmp_path.rglob("*.tmp*"))


def test_reproduce_with_fewer_iterations_says_so(tmp_path, phantom_data, capsys, one_thread):
    proto = tmp_path / "proto.json"
    proto.write_text(json.dumps(PROTOCOL))
    out = tmp_path / "out"
    argv = ["reproduce", str(proto), "--train", str(phantom_data), "--scale", "tiny", "--out", str(out),
            "--device", "cpu", "--seeds", "1", "--methods", "sup", "--iterations", "2"]
    assert main(argv) == 0
    config = json.loads((out / "cells" / "c2.sup.seed0" / "project" / "runs" / "run" / "config.json").read_text())
    assert config["iterations"] == 2
    assert "scale `tiny-2it`" in (out / "table.md").read_text()
    capsys.readouterr()
    # the same folder with another count: refused by name, nothing trained
    assert main([*argv[:-1], "3"]) == 2
    assert "protocol or scale" in capsys.readouterr().err


def test_a_cfr_row_and_its_tuned_generalist_alone(tmp_path, phantom_data, one_thread):
    """A ``generalist_of`` row (CFR's "fine-tuned SAM alone", Table IX) trains nothing: it scores the CFR cell's
    LoRA adapter, prompt-free on the test scans, beside the CFR row's re-trained V-Net."""
    protocol = copy.deepcopy(PROTOCOL)
    protocol["rows"] = [{"key": "cfr-mt", "label": "CFR (MT)", "method": "cfr-mt"},
                        {"key": "cfr-ft", "label": "CFR tuned generalist alone", "method": "cfr-mt",
                         "generalist_of": "cfr-mt", "paper": {"c2": {"dice": 74.78}}}]
    protocol["scales"]["tiny"]["method_options"] = {"cfr-mt": {"labels": "cross", "finetune_iterations": 2,
                                                               "finetune_batch": 1, "grid": 6}}
    proto = tmp_path / "proto.json"
    proto.write_text(json.dumps(protocol))
    out = tmp_path / "out"
    assert main(["reproduce", str(proto), "--train", str(phantom_data), "--scale", "tiny", "--out", str(out),
                 "--device", "cpu", "--seeds", "1"]) == 0
    tuned = json.loads((out / "cells" / "c2.cfr-ft.seed0" / "scores.json").read_text())
    retrained = json.loads((out / "cells" / "c2.cfr-mt.seed0" / "scores.json").read_text())
    assert tuned["scored"] == "tuned generalist" and tuned["train_seconds_this_call"] == 0.0
    assert not (out / "cells" / "c2.cfr-ft.seed0" / "project").exists()  # nothing trained for it
    assert tuned["labelled"] == retrained["labelled"] and len(tuned["cases"]) == len(retrained["cases"]) == 2
    assert [c["dice"] for c in tuned["cases"]] != [c["dice"] for c in retrained["cases"]]  # another model scored
    table = (out / "table.md").read_text()
    assert "| CFR tuned generalist alone |" in table and "74.78" in table

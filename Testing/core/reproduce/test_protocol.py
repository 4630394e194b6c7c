"""Reproduction protocols: shipped files, the schema's round trip, refusals by name, the fixed split,
resampling, and the report's statistics (no training here)."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from fmabs_core.data import io
from fmabs_core.errors import InputError
from fmabs_core.reproduce import data as D
from fmabs_core.reproduce import protocol as P
from fmabs_core.reproduce.report import summarise_cells, wilcoxon_tests
from fmabs_core.reproduce.runner import plan, train_config


def test_shipped_protocols_round_trip(tmp_path):
    names = P.shipped()
    assert {"la-fmabs", "la-cfr"} <= set(names)
    for name in names:
        proto = P.load(name)
        again = P.Protocol.from_dict(json.loads(proto.to_json()), "again")
        assert again == proto and again.to_json() == proto.to_json()
        path = tmp_path / f"{name}.json"
        path.write_text(proto.to_json())
        assert P.load(str(path)) == proto
        assert {"paper", "cpu"} <= set(proto.scales)


def test_la_protocols_say_what_the_papers_did():
    fm = P.load("la-fmabs")
    assert fm.settings[0].labelled == 20 and fm.split.val == 0
    paper = fm.scale("paper")
    assert (paper.iterations, paper.width, tuple(paper.stride), paper.blend) == (20000, 16, (18, 18, 4), "constant")
    assert {r.key: r.active for r in fm.rows}["fmabs-her"] == "her"
    cfr = P.load("la-cfr")
    assert [s.labelled for s in cfr.settings] == [1, 16] and all(s.labels == "dense" for s in cfr.settings)
    assert cfr.scale("paper").iterations == 6000


def _base() -> dict:
    return json.loads(P.load("la-fmabs").to_json())


@pytest.mark.parametrize("change, words", [
    (lambda d: d.update(extra=1), "unknown key"),
    (lambda d: d["rows"][0].update(colour="red"), "colour"),
    (lambda d: d["scales"]["cpu"].update(resample=2.0), "scales.cpu.resample"),
    (lambda d: d["scales"]["cpu"].update(rows=["nope"]), "nope"),
    (lambda d: d["rows"][0].update(key="../evil"), "rows key"),
    (lambda d: d["rows"][0].update(active="guess"), "active 'guess'"),
    (lambda d: d["scales"]["cpu"].update(width="wide"), "width"),
    (lambda d: d.pop("scales"), "scales"),
    (lambda d: d["rows"].append(dict(d["rows"][0])), "share a key"),
])
def test_bad_protocols_are_refused_by_name(change, words):
    data = _base()
    change(data)
    with pytest.raises(InputError, match=words.replace(".", r"\.").replace("(", r"\(")):
        P.Protocol.from_dict(data, "my.json")


def test_bad_files_and_names(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="bad.json: not valid JSON"):
        P.load(str(bad))
    with pytest.raises(InputError, match="not shipped"):
        P.load("la-nothing")
    with pytest.raises(InputError, match="--scale gpu"):
        P.load("la-fmabs").scale("gpu")


def test_plan_and_train_config():
    proto = P.load("la-fmabs")
    cpu = proto.scale("cpu")
    cells = plan(proto, cpu, 2, None)
    assert [c.name for c in cells] == ["c20.sup.seed0", "c20.sup.seed1", "c20.mt.seed0", "c20.mt.seed1",
                                       "c20.fmabs.seed0", "c20.fmabs.seed1", "c20.fmabs-auto.seed0",
                                       "c20.fmabs-auto.seed1"]
    auto = train_config(proto, cpu, cells[-1], ["a", "b"], "cpu")
    assert auto.method_options["fusion"] == "auto" and auto.method_options["pseudo_max_slices"] == 6
    with pytest.raises(InputError, match="--methods bogus"):
        plan(proto, cpu, 1, ["bogus"])
    cfg = train_config(proto, cpu, cells[5], ["a", "b"], "cpu")
    assert (cfg.iterations, cfg.net.width, cfg.net.dropout, cfg.patch_size) == (400, 8, 0.5, (48, 48, 32))
    assert cfg.method_options["pseudo_max_slices"] == 6 and cfg.method_options["fusion"] == "mv"
    assert cfg.labelled_cases == ("a", "b") and cfg.active is None
    her = next(c for c in plan(proto, proto.scale("paper"), 1, ["fmabs-her"]))
    cfg = train_config(proto, proto.scale("paper"), her, None, "cpu")
    assert (cfg.active, cfg.budget, cfg.iterations) == ("her", 20, 20000)
    both = {c.row.key: c for c in plan(proto, cpu, 1, ["fmabs-no-override", "fmabs-her-suggested", "fmabs-teacher"])}
    teacher = train_config(proto, cpu, both["fmabs-teacher"], ["a"], "cpu").method_options
    assert teacher["pseudo_source"] == "teacher" and teacher.get("largest_component", True) is True  # as fmabs-auto
    assert auto.method_options.get("largest_component", True) is True
    # the paper's rows (majority vote) prompt with the uncut teacher, as the paper's code does
    paper_rows = [c for c in plan(proto, cpu, 1, None) if c.row.options.get("fusion") == "mv"
                  and c.row.options.get("pseudo_source") != "teacher"]
    assert paper_rows and all(c.row.options["largest_component"] is False for c in paper_rows)
    assert train_config(proto, cpu, both["fmabs-no-override"], ["a"], "cpu").method_options["crosslabel_overrides"] is False
    assert train_config(proto, cpu, both["fmabs-her-suggested"], None, "cpu").expert_slices == "suggested"
    proto.rows[0].train["crop"] = "corner"
    with pytest.raises(InputError, match="crop 'corner'"):
        train_config(proto, cpu, cells[0], ["a"], "cpu")
    proto.scales["cpu"].method_options["fmabs"]["no_such_option"] = 1
    with pytest.raises(InputError, match="row 'fmabs[a-z-]*'.*no_such_option"):
        train_config(proto, proto.scale("cpu"), cells[-1], ["a"], "cpu")


def test_the_tuned_generalist_row_scores_an_earlier_cfr_row():
    cfr = P.load("la-cfr")
    names = [c.name for c in plan(cfr, cfr.scale("cpu"), 1, None)]
    assert names.index("l1.cfr-ft.seed0") == names.index("l1.cfr-mt.seed0") + 1
    with pytest.raises(InputError, match="cfr-ft \\(needs cfr-mt\\).*needs that row too"):
        plan(cfr, cfr.scale("cpu"), 1, ["cfr-ft"])
    data = json.loads(json.dumps(cfr.to_dict()))
    for source, why in (("mt", "generalist_of 'mt'.*with a CFR method"), ("nope", "generalist_of 'nope'.*earlier row"),
                        ("cfr-acmt", "a generalist_of row takes the method and settings of row 'cfr-acmt'")):
        bad = copy.deepcopy(data)
        next(r for r in bad["rows"] if r["key"] == "cfr-ft")["generalist_of"] = source
        with pytest.raises(InputError, match=f"row 'cfr-ft': {why}"):
            P.Protocol.from_dict(bad, "p.json")


def test_a_scale_with_fewer_iterations_for_a_time_budget():
    proto = P.load("la-fmabs")
    short, name = proto.with_iterations("paper", 3000)
    assert name == "paper-3000it" and set(proto.scales) == {"paper", "cpu"}  # the original is untouched
    scale = short.scale(name)
    assert scale.description.endswith("here with 3000 iterations (the scale: 20000)")
    cell = plan(short, scale, 1, ["fmabs"])[0]
    cfg = train_config(short, scale, cell, ["a"], "cpu")
    assert (cfg.iterations, cfg.patch_size, cfg.net.width) == (3000, (112, 112, 80), 16)
    assert P.Protocol.from_dict(json.loads(short.to_json())).scale(name).iterations == 3000  # saved as it ran
    with pytest.raises(InputError, match="--iterations must be at least 1"):
        proto.with_iterations("paper", 0)
    with pytest.raises(InputError, match="--scale huge"):
        proto.with_iterations("huge", 10)


def _dataset(folder, ids):
    from fmabs_core.data.phantom import write_dataset

    write_dataset(folder, n_cases=len(ids), shape=(16, 16, 16), seed=0)
    return folder


def test_split_is_fixed_seeded_and_disjoint(tmp_path):
    data = _dataset(tmp_path / "d", range(10))
    proto = P.load("la-fmabs")
    proto.split.test, proto.split.val = 3, 1
    scale = P.Scale(n_train=4, n_test=2)
    a, pairs = D.make_split(proto, scale, data, None)
    b, _ = D.make_split(proto, scale, data, data)  # --test the same folder: held out, as without it
    assert a == b and a.held_out
    assert len(a.test) == 2 and len(a.train) == 3 and len(a.val) == 1
    assert not set(a.test) & set(a.train + a.val)
    assert set(pairs) == set(a.test + a.train + a.val)
    proto.split.seed = 7
    c, _ = D.make_split(proto, scale, data, None)
    assert (c.test, c.train) != (a.test, a.train)  # the seed decides
    assert D.choose_labelled(a.train, 2, 0, 0, 1) == D.choose_labelled(a.train, 2, 0, 0, 1)
    with pytest.raises(InputError, match="labels 9 scans"):
        D.choose_labelled(a.train, 9, 0, 0, 1)
    with pytest.raises(InputError, match="also in --train"):
        D.make_split(proto, scale, data, _dataset(tmp_path / "t", range(2)))


def test_resample_keeps_the_world_extent():
    arr = np.zeros((8, 6, 4), np.float32)
    arr[2:6, 1:5, 1:3] = 1
    affine = np.diag([0.5, 0.7, 2.0, 1.0])
    affine[:3, 3] = [10, -4, 3]
    vol = io.Volume(arr, affine, affine, arr.shape, None)
    small = D.resample(vol, 0.5, 0)
    assert small.array.shape == (4, 3, 2)
    edge = np.array([-0.5, -0.5, -0.5, 1.0])
    np.testing.assert_allclose(small.affine @ edge, affine @ edge)  # the first voxel's outer corner
    far_old = np.array([8 - 0.5, 6 - 0.5, 4 - 0.5, 1.0])
    far_new = np.array([4 - 0.5, 3 - 0.5, 2 - 0.5, 1.0])
    np.testing.assert_allclose(small.affine @ far_new, affine @ far_old)
    back = D.upsample_probabilities(np.stack([1 - small.array, small.array]), arr.shape)
    assert back.shape == (2, 8, 6, 4)
    assert D.resample(vol, 1.0, 1) is vol


def _result(setting, row, seed, dices):
    cases = [{"case": f"c{i}", "dice": d, "jaccard": d / (2 - d), "hd95_pooled_vox": 1.0, "asd_pred_vox": 0.5,
              "failed": False} for i, d in enumerate(dices)]
    return {"setting": setting, "row": row, "seed": seed, "cases": cases,
            "summary": {"n_failed": 0, "n_cases": len(cases)}}


def test_report_statistics_by_hand():
    setting = SimpleNamespace(key="s", label="S")
    rows = {k: SimpleNamespace(key=k, label=k.upper(), method=k, baseline=b, paper={})
            for k, b in (("b1", True), ("b2", True), ("m", False))}
    base = [0.70, 0.72, 0.68, 0.75, 0.71, 0.69]
    dices = {"b1": base, "b2": [d - 0.05 for d in base], "m": [d + 0.01 * (i + 1) for i, d in enumerate(base)]}
    cells, results = [], []
    for key in ("b1", "b2", "m"):
        for seed in (0, 1):
            cells.append(SimpleNamespace(setting=setting, row=rows[key], seed=seed))
            results.append(_result("s", key, seed, dices[key]))
    summary = summarise_cells(None, cells, results)
    wilcoxon_tests(summary)
    by = {r["row"]: r for r in summary}
    assert by["b1"]["Dice %"]["mean"] == pytest.approx(np.mean(base) * 100)
    assert by["b1"]["Dice %"]["std"] == 0.0  # both seeds identical here
    assert by["b1"]["vs_best_baseline"]["note"] == "the best baseline"
    # m beats b1 on all 6 cases: exact two-sided p = 2 / 2^6
    assert by["m"]["vs_best_baseline"]["p"] == pytest.approx(2 / 64)
    assert by["b2"]["vs_best_baseline"]["baseline"] == "b1" and by["b2"]["vs_best_baseline"]["p"] == pytest.approx(2 / 64)
    assert math.isnan(summarise_cells(None, cells[:1], [_result("s", "b1", 0, [])])[0]["Dice %"]["mean"])


def test_scans_are_prepared_on_threads_in_order_and_a_bad_scan_stops_with_its_error():
    from fmabs_core.errors import InputError
    from fmabs_core.reproduce.data import in_threads

    assert list(in_threads(str.upper, ["a", "b", "c", "d"])) == ["A", "B", "C", "D"]

    def bad(cid: str) -> str:
        if cid == "c":
            raise InputError("c.nii.gz: image and label grids differ")
        return cid

    with pytest.raises(InputError, match="c.nii.gz"):
        list(in_threads(bad, ["a", "b", "c", "d"]))


def test_a_cell_project_without_its_document_is_redone_only_when_nothing_ran(tmp_path):
    """A half-made cell (only the linked scans) is redone; one holding a run (or anything else) is never deleted.
    (Before: the whole folder, finished run included, was removed whenever fmabs.json was missing.)"""
    prepared = tmp_path / "prepared"
    for sub in ("images", "labels"):
        (prepared / sub).mkdir(parents=True)
    import nibabel as nib

    for cid in ("a", "b"):
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), prepared / "images" / f"{cid}.nii.gz")
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), prepared / "labels" / f"{cid}.nii.gz")
    split = D.Split(str(prepared), str(prepared), True, 0, ["a"], ["b"], ["c"], "by hand")
    root = tmp_path / "cell"
    project = D.cell_project(root, prepared, split, {"1": "x"})
    (root / "fmabs.json").unlink()  # interrupted before the document was written: only the scans are there
    project = D.cell_project(root, prepared, split, {"1": "x"})
    assert project.cases == ["a", "b"]
    run = root / "runs" / "run"
    run.mkdir(parents=True)
    (run / "model.pt").write_bytes(b"a finished model")
    (root / "fmabs.json").unlink()
    with pytest.raises(InputError, match="nothing here is deleted"):
        D.cell_project(root, prepared, split, {"1": "x"})
    assert (run / "model.pt").read_bytes() == b"a finished model"


def test_out_holding_a_users_files_is_refused(tmp_path):
    """--out at a folder of the user's (a table.md of theirs) is refused before anything is written; an empty
    folder and an earlier reproduction's folder (it has protocol.json) are accepted."""
    from fmabs_core.reproduce.runner import check_out

    data = tmp_path / "data"
    data.mkdir()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "table.md").write_text("my own table")
    with pytest.raises(InputError, match="table.md"):
        check_out(mine, data, None)
    assert (mine / "table.md").read_text() == "my own table"
    empty = tmp_path / "empty"
    empty.mkdir()
    check_out(empty, data, None)
    (mine / "protocol.json").write_text("{}")
    check_out(mine, data, None)  # an earlier reproduction's folder: resumed


def test_a_resample_that_leaves_too_few_voxels_is_refused_from_the_headers(tmp_path):
    """The scale's 'resample' is checked against every scan's header before anything is written (before: the
    error named a generated file in the cell's project, after protocol.json was written)."""
    data = _dataset(tmp_path / "d", range(2))  # 16^3 phantoms
    pairs = {p.name: (p, data / "labelsTr" / p.name) for p in sorted((data / "imagesTr").glob("*.nii.gz"))}
    D.check_resample(pairs, 0.5)  # 8 voxels per axis: enough
    with pytest.raises(InputError, match=r"'resample' 0.25 makes .*imagesTr.* \(16, 16, 16\) voxels \(4, 4, 4\)"):
        D.check_resample(pairs, 0.25)

"""FM-ABS inside the engine, with the real embedded LiteMedSAM (kept to a few generalist calls)."""

from __future__ import annotations

import pytest

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from fmabs_core.cli import main
from fmabs_core.data.project import Project
from fmabs_core.cli.demo import DemoConfig, run_demo
from fmabs_core.runs.events import read_events
from fmabs_core.generalist.fusion import AUTO_CANDIDATES


pytestmark = pytest.mark.slow  # trains, starts processes or runs LiteMedSAM


def test_fmabs_run_makes_pseudolabels_and_uses_them(tmp_path, phantom_data):
    proj = tmp_path / "proj"
    main(["import", str(phantom_data), "--project", str(proj)])
    main(["crosslabel", "simulate", "--project", str(proj), "--count", "2"])
    rc = main(["train", "--project", str(proj), "--method", "fmabs", "--iterations", "4", "--run", "f",
               "--patch-size", "32", "32", "32", "--width", "4", "--batch-size", "2", "--labelled-batch-size", "1",
               "--device", "cpu", "--pseudo-warmup", "0.25", "--pseudo-every", "0.5", "--pseudo-stop", "0.6", "--pseudo-max-cases", "8",
               "--pseudo-max-slices", "1", "--val-every", "4"])
    assert rc == 0
    run = Project(proj).run_dir("f")
    rounds = [e for e in read_events(run) if e["type"] == "pseudo_label"]
    assert [r["iteration"] for r in rounds] == [1]  # warm-up 0.25*4, every 0.5*4, stop before 0.6*4
    assert rounds[0]["cases"] == len(Project(proj).split("train")) and "pseudo_dice" in rounds[0]
    parts = rounds[0]["seconds_by_part"]  # where the round's time went
    assert set(parts) == {"teacher", "encode", "decode", "prompts_and_fusion", "save"}
    assert parts["encode"] > 0 and parts["decode"] > 0 and min(parts.values()) >= 0
    assert sum(parts.values()) <= rounds[0]["seconds"] + 0.05
    assert rounds[0]["generalist"] == "fp32+channels-last on cpu"  # 24 slices to encode: OpenVINO would not pay
    # the default fusion, auto: every candidate scored on the two cross-labelled scans' drawn planes, one kept
    assert set(rounds[0]["fusion_scores"]) == set(AUTO_CANDIDATES) and rounds[0]["fusion"] in AUTO_CANDIDATES
    assert rounds[0]["planes_scans"] == 2 and rounds[0]["planes_gain"] >= 0  # the teacher is a candidate
    best = max(v for v in rounds[0]["fusion_scores"].values() if v is not None)
    chosen = rounds[0]["fusion_scores"][rounds[0]["fusion"]]
    assert chosen == best or rounds[0]["fusion"] == "teacher"
    assert json.loads((run / "pseudo" / "round.json").read_text())["auto"] == rounds[0]["fusion"]
    written = sorted(p.name for p in (run / "pseudo").iterdir() if p.name not in ("round.json", "held"))
    held = sorted(p.name for p in (run / "pseudo" / "held").iterdir())  # what training reads (--scan-store disk)
    assert held == sorted(f"{c}.npy" for c in Project(proj).split("train"))
    assert len(written) == 5 * rounds[0]["cases"] and all(n.endswith(("_axial.nii.gz", "_coronal.nii.gz", "_sagittal.nii.gz",
                                                 "_fused.nii.gz", "_teacher.nii.gz")) for n in written)
    case = written[0].rsplit("_", 1)[0]
    img = nib.load(str(Project(proj).image_path(case)))
    fused = nib.load(str(run / "pseudo" / f"{case}_fused.nii.gz"))
    assert fused.shape == img.shape and np.allclose(fused.affine, img.affine)
    progress = [e for e in read_events(run) if e["type"] == "progress"]
    # L_sam enters the loss once the first round has produced pseudo-labels
    assert "loss_sam" not in progress[0]["losses"] and "loss_sam" in progress[-1]["losses"]
    assert json.loads((run / "config.json").read_text())["method_options"]["generalist"] == "litemedsam"


def _train_one_round(tmp_path, phantom_data, crosslabelled: int, *options: str) -> tuple[Project, Path]:
    """A 4-iteration fmabs run on phantoms with one pseudo-label round (at iteration 2) and 2 slices per view."""
    proj = tmp_path / "proj"
    main(["import", str(phantom_data), "--project", str(proj)])
    main(["crosslabel", "simulate", "--project", str(proj), "--count", str(crosslabelled)])
    rc = main(["train", "--project", str(proj), "--method", "fmabs", "--iterations", "4", "--run", "r",
               "--patch-size", "32", "32", "32", "--width", "4", "--batch-size", "2", "--labelled-batch-size", "1",
               "--device", "cpu", "--pseudo-warmup", "0.5", "--pseudo-every", "0.5", "--pseudo-stop", "0.9",
               "--pseudo-max-slices", "2", *options])
    assert rc == 0
    return Project(proj), Project(proj).run_dir("r")


def _replay_argv(project: Project, run, out, case: str, info: dict, rule: dict) -> list[str]:
    """`fmabs pseudo-label` with a round's inputs for ``case`` (round.json ``info``) and fusion options ``rule``."""
    return ["pseudo-label", "--image", str(project.image_path(case)),
            "--teacher-probs", str(run / "pseudo" / f"{case}_teacher.nii.gz"), "--output", str(out),
            "--seed", *map(str, info["seeds"][case]), "--pseudo-max-slices", str(info["max_slices"]),
            "--fusion", rule["fusion"], "--teacher-weight", str(rule["teacher_weight"]),
            "--box-jitter", str(info["box_jitter"]), "--device", "cpu"]


def _assert_replayed(run, out, case: str, keys=("fused",)) -> None:
    for key in keys:
        mine = np.asarray(nib.load(str(out / f"{case}_{key}.nii.gz")).dataobj)
        theirs = np.asarray(nib.load(str(run / "pseudo" / f"{case}_{key}.nii.gz")).dataobj)
        np.testing.assert_array_equal(mine, theirs)


def test_a_round_is_replayed_bit_for_bit_by_pseudo_label(tmp_path, phantom_data):
    """`fmabs pseudo-label` given a round's inputs (the teacher's probabilities it wrote, its generator key and
    options from round.json) writes the round's fused label again; the round scores the drawn planes."""
    project, run = _train_one_round(tmp_path, phantom_data, 3, "--fusion", "soft", "--teacher-weight", "0.4")
    rounds = [e for e in read_events(run) if e["type"] == "pseudo_label"]
    assert len(rounds) == 1
    info = json.loads((run / "pseudo" / "round.json").read_text())
    assert info["fusion"] == "soft" and info["teacher_weight"] == 0.4
    assert sorted(info["seeds"]) == sorted(project.split("train"))
    # the three cross-labelled scans are scored on their drawn planes
    assert rounds[0]["planes_scans"] == 3 == sum(project.crosslabel_path(c).exists() for c in info["seeds"])
    gain = rounds[0]["planes_pseudo_dice"] - rounds[0]["planes_teacher_dice"]
    assert 0 <= rounds[0]["planes_teacher_dice"] <= 1 and rounds[0]["planes_gain"] == pytest.approx(gain)
    case = sorted(info["seeds"])[0]
    out = tmp_path / "replay"
    argv = _replay_argv(project, run, out, case, info, info)
    assert main(argv) == 0
    _assert_replayed(run, out, case, ("fused", "axial", "coronal", "sagittal"))
    assert main(argv) != 0  # the files exist now: refused without --overwrite


def test_fusion_per_scan_fuses_a_scan_by_its_own_choice_and_replays(tmp_path, phantom_data, monkeypatch):
    """--fusion-per-scan (the default): a cross-labelled scan whose own planes chose another rule is fused by it;
    the event and the Train line name it, and round.json gives `fmabs pseudo-label` its options (bit for bit).
    The choice itself is forced here (the planes of 32^3 phantoms decide nothing interesting); fusion.choose_auto
    is tested on its own in Testing/core/generalist/test_fusion.py."""
    from fmabs_core.contract import planes_line
    from fmabs_core.generalist import fusion

    real = fusion.choose_auto

    def forced(samples, candidates=None, margin=fusion.AUTO_MARGIN, per_scan=False):
        choice = real(samples, candidates, margin, per_scan)
        assert per_scan  # the default
        choice.rule = "soft 0.5"
        choice.per_scan = ["ua"] + ["soft 0.5"] * (len(samples) - 1)
        return choice

    monkeypatch.setattr(fusion, "choose_auto", forced)
    project, run = _train_one_round(tmp_path, phantom_data, 2, "--pseudo-max-cases", "8")
    event = [e for e in read_events(run) if e["type"] == "pseudo_label"][0]
    info = json.loads((run / "pseudo" / "round.json").read_text())
    assert info["auto"] == "soft 0.5" == event["fusion"]
    (own, entry), = info["per_scan"].items()
    assert project.crosslabel_path(own).exists() and entry["auto"] == "ua" == entry["fusion"]
    assert event["fusion_per_scan"] == {own: "ua"} and f"{own}: ua" in planes_line(event)
    other = sorted(c for c in info["seeds"] if c != own)[0]
    for case, rule in ((own, entry), (other, info)):
        out = tmp_path / f"replay-{case}"
        assert main(_replay_argv(project, run, out, case, info, rule)) == 0
        _assert_replayed(run, out, case)


def test_demo_runs_end_to_end_tiny(tmp_path):
    cfg = DemoConfig(output=tmp_path / "demo", n_phantoms=6, phantom_shape=(32, 32, 32), crosslabelled=2,
                     methods=("sup", "mt"), iterations=3, patch_size=(32, 32, 32), width=4, device="cpu")
    results = run_demo(cfg)
    assert set(results["methods"]) == {"sup", "mt"}
    for r in results["methods"].values():
        assert 0.0 <= r["dice"] <= 1.0
        preds = list((tmp_path / "demo" / "project" / "runs").glob("*/predictions/*.nii.gz"))
        assert preds
    assert (tmp_path / "demo" / "demo_results.json").exists()
    assert any("papers: 20000" in line for line in results["scaled"])


def test_auto_runtime_converts_to_openvino_when_the_rounds_pay_for_it(tmp_path, phantom_data, monkeypatch):
    """The default runtime follows the expected work: the same run with the threshold lowered to 1
    slice runs its encoder on OpenVINO, and says so in the round's event (openvino is in the test extra: no
    skip without it)."""
    from fmabs_core.generalist import runtime

    monkeypatch.setattr(runtime, "OPENVINO_MIN_SLICES", 1)
    proj = tmp_path / "proj"
    main(["import", str(phantom_data), "--project", str(proj)])
    main(["crosslabel", "simulate", "--project", str(proj), "--count", "2"])
    rc = main(["train", "--project", str(proj), "--method", "fmabs", "--iterations", "2", "--run", "o",
               "--patch-size", "32", "32", "32", "--width", "4", "--batch-size", "2", "--labelled-batch-size", "1",
               "--device", "cpu", "--pseudo-warmup", "0.5", "--pseudo-max-cases", "2", "--pseudo-max-slices", "1"])
    assert rc == 0
    rounds = [e for e in read_events(Project(proj).run_dir("o")) if e["type"] == "pseudo_label"]
    assert len(rounds) == 1 and rounds[0]["generalist"] == "fp32 on cpu (openvino)"


@pytest.mark.parametrize("source", ["teacher", "generalist"])
def test_the_teachers_islands_are_cut_before_a_round_uses_it(tmp_path, phantom_data, monkeypatch, source):
    """--largest-component (the default): a teacher whose mask has an island far from the object prompts and
    labels with its largest part only; the round's event says how much was cut and what the uncut teacher
    scored; with false the island stays in the pseudo-label (the paper's rounds)."""
    from fmabs_core.data import io
    from fmabs_core.training.engine import Trainer

    from fmabs_core.data.intensity import zscore

    proj = tmp_path / "proj"
    main(["import", str(phantom_data), "--project", str(proj)])
    main(["crosslabel", "simulate", "--project", str(proj), "--count", "2"])
    scans = [(zscore(Project(proj).load_image(c).array), Project(proj).load_label(c).array)
             for c in Project(proj).cases]

    def teacher_with_an_island(self, model, image, overlap=None):
        """A teacher that is right about the object (the scan's truth) but has an island in a corner."""
        truth = next(lab for im, lab in scans if im.shape == image.shape and np.array_equal(im, image))
        probs = np.stack([truth == 0, truth == 1]).astype(np.float32)
        probs[:, :3, :3, :3] = 0.0
        probs[1, :3, :3, :3] = 1.0  # 27 voxels of class 1 in a corner, off the drawn planes
        return probs

    monkeypatch.setattr(Trainer, "predict", teacher_with_an_island)
    common = ["--method", "fmabs", "--iterations", "4", "--patch-size", "32", "32", "32", "--width", "4",
              "--batch-size", "2", "--labelled-batch-size", "1", "--device", "cpu", "--pseudo-warmup", "0.5",
              "--pseudo-every", "0.5", "--pseudo-stop", "0.9", "--pseudo-max-slices", "1", "--fusion", "mv",
              "--pseudo-source", source, "--pseudo-max-cases", "3"]
    for run, cut in (("cut", "true"), ("kept", "false")):
        assert main(["train", "--project", str(proj), "--run", run, *common, "--largest-component", cut]) == 0
    project = Project(proj)
    for run in ("cut", "kept"):
        folder = project.run_dir(run)
        (event,) = [e for e in read_events(folder) if e["type"] == "pseudo_label"]
        fused = sorted((folder / "pseudo").glob("*_fused.nii.gz"))
        assert len(fused) == event["cases"] == 3
        corners = [io.load_label(p, 1).array[:3, :3, :3] for p in fused]  # canonical, as the round made them
        if run == "cut":
            assert event["teacher_cut"] is True and event["teacher_voxels_removed"] >= 3 * 27
            assert event["planes_cut_teacher_dice"] >= event["planes_uncut_teacher_dice"]  # what let it cut
            assert event["teacher_raw_dice"] < event["teacher_dice"]  # the cut alone made the teacher better
            assert not any(c.any() for c in corners)
            for p in (folder / "pseudo").glob("*_teacher.nii.gz"):  # what prompted the generalist (and replays)
                assert not io.load_probabilities(p).array[:3, :3, :3, 1].any()
        else:
            assert "teacher_voxels_removed" not in event
            if source == "teacher":
                assert all((c == 1).all() for c in corners)
    options = json.loads((project.run_dir("kept") / "config.json").read_text())["method_options"]
    assert options["largest_component"] is False


def test_a_cut_that_loses_on_the_drawn_planes_is_not_made(tmp_path, phantom_data, monkeypatch):
    """A round cuts the teacher only when the drawn planes do not score the cut teacher lower: here the "largest
    part" is made wrong on purpose (nothing of the object kept), the planes see it, and the round keeps the
    teacher whole; the event and the user's line say so."""
    from fmabs_core.contract import planes_line
    from fmabs_core.data import components

    monkeypatch.setattr(components, "largest_component", lambda mask: np.zeros_like(mask))
    proj = tmp_path / "proj"
    main(["import", str(phantom_data), "--project", str(proj)])
    main(["crosslabel", "simulate", "--project", str(proj), "--count", "2"])
    assert main(["train", "--project", str(proj), "--run", "r", "--method", "fmabs", "--iterations", "4",
                 "--patch-size", "32", "32", "32", "--width", "4", "--batch-size", "2", "--labelled-batch-size", "1",
                 "--device", "cpu", "--pseudo-warmup", "0.5", "--pseudo-every", "0.5", "--pseudo-stop", "0.9",
                 "--pseudo-max-slices", "1", "--pseudo-source", "teacher"]) == 0
    (event,) = [e for e in read_events(Project(proj).run_dir("r")) if e["type"] == "pseudo_label"]
    assert event["teacher_cut"] is False and "teacher_voxels_removed" not in event
    assert event["planes_cut_teacher_dice"] < event["planes_uncut_teacher_dice"]
    assert event["pseudo_dice"] == event["teacher_dice"] > 0  # the whole teacher, not the emptied one
    assert "teacher kept whole" in planes_line(event)

"""The documentation's pictures, generated rather than drawn: the browser app on real LA scans.

A small project of LA scans (from ../shared/data/la2018, resampled by half per axis so that a CPU trains
on them in minutes) is cross-labelled by the simulated expert (the three planes through the atrium's
centre), trained with FM-ABS for real (pseudo-label rounds included), and shown in ``fmabs web`` in
headless chromium. One PNG per panel:

- ``label.png``: a scan loaded in the Label panel, its saved cross-label on the three drawn slices;
- ``train.png``: the Train panel following the run, with each pseudo-label round's line;
- ``review.png``: the Review panel with the last round's fused pseudo-label and the model's prediction;
- ``segment.png``: the Segment panel after segmenting a scan and exporting the label.

Regenerate the docs' pictures (about 10 minutes on 2 CPU cores)::

    python Testing/web/screenshots.py --out docs/screenshots

Testing/web/test_screenshots.py runs the same path, smaller, and checks each picture.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # web_helpers, when run as a script

from web_helpers import Server, chromium_page, choose, fill, shot, tab, wait_text  # noqa: E402

REPO = HERE.parents[1]
LA_DIR = REPO.parent / "shared" / "data" / "la2018"
#: the pictures, in the order of the clinician's loop
PANELS = ("label", "train", "review", "segment")


@dataclass
class ShotConfig:
    """How big the project and the run are: the docs' pictures (defaults) or the test's smaller path."""

    scans: int = 4
    factor: float = 0.5  # resampling per axis (the reproduction's CPU scale)
    iterations: int = 300
    width: int = 8
    pseudo_max_slices: int = 6
    run: str = "fmabs1"


def fmabs(*argv: str, timeout_s: float = 3600) -> str:
    """Run the command line as a user would; its output, or an error with it."""
    done = subprocess.run([sys.executable, "-m", "fmabs_core", *argv], capture_output=True, text=True,
                          timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"fmabs {' '.join(argv)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


def make_project(la: Path, work: Path, cfg: ShotConfig) -> tuple[Path, list[str]]:
    """The first ``cfg.scans`` LA scans (sorted ids), resampled, imported and cross-labelled by the simulated
    expert; returns the project folder and its training scans."""
    import numpy as np

    from fmabs_core.data import io
    from fmabs_core.reproduce.data import _pairs, resample

    pairs = _pairs(la, "--la")
    cases = sorted(pairs)[: cfg.scans]
    data = work / "data"
    for case in cases:
        image, label = pairs[case]
        small = resample(io.load_image(image), cfg.factor, 1)
        io.save_like(small.array.astype(np.float32), small, data / "imagesTr" / f"{case}.nii.gz", np.float32)
        small = resample(io.load_label(label, None), cfg.factor, 0)
        io.save_like(small.array.astype(np.uint8), small, data / "labelsTr" / f"{case}.nii.gz", np.uint8)
    project = work / "project"
    fmabs("import", str(data), "--project", str(project))
    fmabs("crosslabel", "simulate", "--project", str(project), "--count", str(cfg.scans))
    from fmabs_core.data.project import Project

    return project, Project(project).split("train")  # the cross-labelled ones (import keeps a validation scan)


def train(project: Path, case: str, cfg: ShotConfig) -> None:
    """A real FM-ABS run (rounds over every scan, so the shown scan has the last round's labels), then the
    prediction of ``case`` where the Review panel looks for it."""
    fmabs("train", "--project", str(project), "--run", cfg.run, "--method", "fmabs", "--device", "cpu",
          "--iterations", str(cfg.iterations), "--width", str(cfg.width), "--patch-size", "48", "48", "32",
          "--batch-size", "4", "--labelled-batch-size", "2", "--val-every", str(cfg.iterations),
          "--pseudo-warmup", "0.3", "--pseudo-every", "0.25", "--pseudo-stop", "0.9",
          "--pseudo-max-slices", str(cfg.pseudo_max_slices))
    run = project / "runs" / cfg.run
    fmabs("predict", "--model", str(run), "--input", str(project / "images" / f"{case}.nii.gz"),
          "--output", str(run / "predictions"), "--device", "cpu")


def take(project: Path, case: str, out: Path, cfg: ShotConfig, scratch: Path) -> dict[str, Path]:
    """The four panels in the browser app; returns panel -> PNG."""
    server = Server(project, scratch / "web.log")
    shots: dict[str, Path] = {}
    try:
        url = server.url_line()
        with chromium_page(scratch / "chromium-profile") as page:
            page.goto(url)
            page.wait_for_selector("#tab-project", timeout=60_000)
            wait_text(page, "#project-summary", rf"{cfg.scans} scans, [1-9]\d* cross-labelled")

            tab(page, "label")
            choose(page, "label-case", case)
            page.click("#btn-load")
            wait_text(page, "#label-status", r"Showing axial \d+, coronal \d+, sagittal \d+: the saved cross-label", 120)
            shots["label"] = shot(page, "label", out)

            tab(page, "train")
            fill(page, "#train-run", cfg.run)
            page.click("#btn-train-watch")
            wait_text(page, "#train-state", r"done", 120)
            wait_text(page, "#train-rounds", r"round \d+: pseudo-labels vs teacher", 60)
            shots["train"] = shot(page, "train", out)

            tab(page, "review")
            choose(page, "review-run", cfg.run)
            choose(page, "review-case", case)
            page.click("#btn-review")
            wait_text(page, "#review-status", r"Layers: .*fused.*prediction", 120)
            for view in ("axial", "coronal", "sagittal"):  # the fused label and the prediction only
                page.click(f"#layer-{view}")
                page.wait_for_timeout(300)
            shots["review"] = shot(page, "review", out)

            tab(page, "segment")
            choose(page, "segment-model", cfg.run)
            choose(page, "segment-scan", f"project: {case}")
            page.click("#btn-segment")
            wait_text(page, "#segment-status", r"Done", 600)
            page.click("#btn-export")
            page.wait_for_selector("#dl-nifti", timeout=60_000)
            shots["segment"] = shot(page, "segment", out)
            if page.errors:
                raise RuntimeError(f"the page reported errors: {page.errors}")
    finally:
        server.stop()
    return shots


def make_screenshots(out: Path, la: Path = LA_DIR, cfg: ShotConfig | None = None, work: Path | None = None
                     ) -> dict[str, Path]:
    """Project, run, pictures: panel -> PNG in ``out``."""
    cfg = cfg or ShotConfig()
    with tempfile.TemporaryDirectory(prefix="fmabs-shots-") as tmp:
        work = Path(work or tmp)
        project, cases = make_project(la, work, cfg)
        train(project, cases[0], cfg)
        return take(project, cases[0], Path(out), cfg, work)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for label.png, train.png, review.png, segment.png")
    p.add_argument("--la", type=Path, default=LA_DIR, help=f"imagesTr/labelsTr of LA 2018 (default {LA_DIR})")
    p.add_argument("--iterations", type=int, default=ShotConfig.iterations)
    args = p.parse_args(argv)
    started = time.time()
    shots = make_screenshots(args.out, args.la, ShotConfig(iterations=args.iterations))
    for panel in PANELS:
        print(f"{panel}: {shots[panel]}")
    print(f"{time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

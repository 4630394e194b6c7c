"""``fmabs bench teachers``: does the generalist make a teacher's pseudo-label better, at every teacher quality?

A round prompts the generalist with the teacher's mask and fuses the three views' answers. This
bench does the same on the *training* scans of a project (a reproduction cell's project is the
protocol's training split) with teachers of known quality and kind, and scores every fusion rule on
the same generalist answers (each slice is encoded once, in a disk cache that later runs reuse):

- made teachers, from the truth: grown and shrunk (over- and under-segmenting), shifted with holes,
  weak with false-positive blobs; their probabilities fall off with the distance to their boundary;
- real teachers: the mean teacher (EMA weights) of training checkpoints, e.g. ``--runs RUN`` with
  ``--iterations 50 200 400`` (the checkpoints must be on disk: ``--ckpt-every``/``--keep-last``).

Per scan and teacher it reports the teacher's Dice, each view's, each rule's, and the gain of each
rule over the teacher, then means by teacher band (below / at or above 0.85) and the Dice of each
candidate on the expert's drawn planes (the project's cross-label, or the centre planes that the
protocol's simulated expert draws). Never point it at test scans: choosing a rule on them is
choosing a model on test data.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from fmabs_core.contract import VIEWS
from fmabs_core.errors import InputError

#: bands of teacher quality the issue's targets are stated for
BAND_EDGE = 0.85
#: the column of --fusion auto (each teacher is one round: chosen on the drawn planes of the project's cross-labelled
#: scans among the bench's scans, or of all of them when none is cross-labelled)
AUTO = "auto"
#: the column of --fusion auto with --fusion-per-scan (the default): a scan of the choice keeps its own choice
AUTO_PER_SCAN = "auto/scan"
#: the column of the teacher cut to its largest part (--largest-component): the cut alone, no generalist
CUT = "cut"


def soft_teacher(mask: np.ndarray, num_classes: int, softness: float = 1.5) -> np.ndarray:
    """``(C+1, X, Y, Z)`` probabilities of a made teacher: sure far from its boundary, unsure near it."""
    from scipy import ndimage

    out = np.zeros((num_classes + 1, *mask.shape), np.float32)
    for c in range(1, num_classes + 1):
        m = mask == c
        if not m.any():
            continue
        signed = ndimage.distance_transform_edt(m) - ndimage.distance_transform_edt(~m)
        out[c] = 1.0 / (1.0 + np.exp(-signed / softness))
    out[0] = np.clip(1.0 - out[1:].sum(0), 0.0, 1.0)
    return out


def made_teachers(truth: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Label masks of teachers wrong in known ways (single foreground class: the truth's largest)."""
    from scipy import ndimage

    ball = ndimage.generate_binary_structure(3, 1)
    fg = truth > 0
    out = {
        "grown 1": ndimage.binary_dilation(fg, ball, iterations=1),
        "grown 3": ndimage.binary_dilation(fg, ball, iterations=3),
        "shrunk 1": ndimage.binary_erosion(fg, ball, iterations=1),
        "shrunk 3": ndimage.binary_erosion(fg, ball, iterations=3),
    }
    # shifted by 3 voxels and holed: a teacher that is misplaced and patchy
    shifted = np.roll(fg, 3, axis=int(rng.integers(0, 3)))
    pts = np.argwhere(shifted)
    for p in pts[rng.choice(len(pts), size=min(8, len(pts)), replace=False)] if len(pts) else []:
        sl = tuple(slice(max(0, int(q) - 3), int(q) + 4) for q in p)
        shifted[sl] = False
    out["shifted 3, holed"] = shifted
    # weak: the object eroded by 2 with false-positive blobs around it
    weak = ndimage.binary_erosion(fg, ball, iterations=2)
    ring = ndimage.binary_dilation(fg, ball, iterations=12) & ~ndimage.binary_dilation(fg, ball, iterations=3)
    cand = np.argwhere(ring)
    for p in cand[rng.choice(len(cand), size=min(4, len(cand)), replace=False)] if len(cand) else []:
        sl = tuple(slice(max(0, int(q) - 3), int(q) + 4) for q in p)
        weak[sl] = True
    out["weak, blobs"] = weak
    return {k: v.astype(np.uint8) for k, v in out.items()}


def real_teachers(runs: list[Path], iterations: list[int] | None) -> list[tuple[str, Path]]:
    """(name, checkpoint) of each run's checkpoints at ``iterations`` (None: every one on disk)."""
    found = []
    for run in runs:
        folder = Path(run) / "checkpoints"
        ckpts = {int(p.stem.split("_")[1]): p for p in sorted(folder.glob("iter_*.pt"))} if folder.is_dir() else {}
        if not ckpts:
            raise InputError(f"--runs {run}: no checkpoints/iter_*.pt in this run folder")
        want = sorted(ckpts) if iterations is None else iterations
        missing = [i for i in want if i not in ckpts]
        if missing:
            raise InputError(f"--runs {run}: no checkpoint for iteration(s) {', '.join(map(str, missing))} "
                             f"(on disk: {', '.join(map(str, sorted(ckpts)))}); train with --ckpt-every and "
                             "--keep-last to keep them")
        found += [(f"{Path(run).name} it {i}", ckpts[i]) for i in want]
    return found


def teacher_probs_for(image: np.ndarray, checkpoint: Path, device: str) -> np.ndarray:
    """What a round's teacher gives: sliding-window class probabilities of the EMA model on the z-scored scan."""
    from fmabs_core.inference.predict import load_model, predict_proba
    from fmabs_core.training.config import TrainConfig

    net, meta = load_model(checkpoint, device)
    overlap = TrainConfig.load(checkpoint.parent.parent / "config.json").val_overlap
    return predict_proba(net, image, meta["patch_size"], overlap, device, normalise=False)


def _cases(project, cases: list[str] | None, scans: int | None) -> list[str]:
    train = [c for c in project.split("train") if project.has_label(c)]
    if not train:
        raise InputError(f"{project.root}: no training scan with a label; the bench scores against labels.")
    if cases:
        unknown = sorted(set(cases) - set(train))
        if unknown:
            raise InputError(f"--cases: {', '.join(unknown)} not labelled training scans of {project.root}")
        return list(cases)
    return train[: scans or len(train)]


def bench_teachers(project_dir: str, cases: list[str] | None = None, scans: int | None = 6,
                   runs: list[str] | None = None, iterations: list[int] | None = None, made: bool = True,
                   generalist: str = "litemedsam", checkpoint: str | None = None, device: str = "cpu",
                   box_jitter: int = 10, max_slices: int | None = None, seed: int = 0,
                   cache_dir: str | None = None, progress=None, box_jitter_fraction: float | None = None,
                   largest_component: bool = False, adapter: str | None = None) -> dict[str, Any]:
    """Rows of (scan, teacher): the teacher's, each view's and each fusion rule's Dice; see the module doc.

    ``adapter``: a sam-lora run's LoRA adapter merged into the generalist's encoder, prompted as an fmabs run
    with ``--adapter`` prompts it (the lever "a generalist tuned on the drawn planes")."""
    from fmabs_core.data.components import keep_largest_probs
    from fmabs_core.data.crosslabel import simulate
    from fmabs_core.data.project import Project
    from fmabs_core.generalist.adapted import get_adapted
    from fmabs_core.generalist.embcache import EmbeddingCache
    from fmabs_core.generalist.fusion import (AUTO_CANDIDATES, choose_auto, combine, fill_unprompted,
                                              plane_dice, plane_sample)
    from fmabs_core.generalist.pseudolabel import dice, multiview_pseudolabel
    from fmabs_core.data.intensity import zscore

    project = Project(project_dir)
    ids = _cases(project, cases, scans)
    teachers_real = real_teachers([Path(r) for r in runs or []], iterations)
    if not made and not teachers_real:
        raise InputError("no teachers: give --runs, or leave out --no-made")
    nc = project.num_classes
    g = get_adapted(generalist, adapter, device=device, checkpoint=checkpoint)
    cache = EmbeddingCache(g.device, tier="disk" if cache_dir else "auto", folder=cache_dir,
                           name=f"bench-{g.identity[:16]}" if cache_dir else "embeddings")
    rules = {k: v for k, v in AUTO_CANDIDATES.items() if k != "teacher"}
    rows, samples = [], {}
    steps = progress(ids, desc="scans") if progress else ids
    for case in steps:
        t_scan = time.perf_counter()
        image = zscore(project.load_image(case).array)
        truth = project.load_label(case).array.astype(np.uint8)
        if project.crosslabel_path(case).exists():
            cross, planes = project.load_crosslabel(case).array, "drawn"
        else:
            cross, planes = simulate(truth, "centre")[0], "centre (simulated)"
        teachers: Iterator[tuple[str, np.ndarray]] = iter(())
        if made:
            rng = np.random.default_rng([seed, len(rows)])
            teachers = ((k, soft_teacher(m, nc)) for k, m in made_teachers(truth, rng).items())
        teachers = _chain(teachers, ((n, teacher_probs_for(image, p, str(g.device))) for n, p in teachers_real))
        for name, probs in teachers:
            t0 = time.perf_counter()
            raw = probs.argmax(0).astype(np.uint8)
            if largest_component:  # as a round does: the cut teacher prompts, takes part in the fusion, is "teacher"
                probs, _ = keep_largest_probs(probs)
            prompt = probs.argmax(0).astype(np.uint8)
            result = multiview_pseudolabel(g, image, prompt, np.random.default_rng(seed), fusion="mv",
                                           box_jitter=box_jitter, max_slices_per_view=max_slices, cache=cache,
                                           keep_probs=True, box_jitter_fraction=box_jitter_fraction)
            if max_slices is not None:
                fill_unprompted(result, probs)
            views = {v: result[v] for v in VIEWS}
            row = {"case": case, "teacher": name, "planes": planes, "teacher_dice": dice(raw, truth),
                   "teacher_planes": plane_dice(raw, cross), "seconds": 0.0, "prompts": result.prompts}
            if largest_component:
                row[CUT] = dice(prompt, truth)
                row[f"{CUT} planes"] = plane_dice(prompt, cross)
            row.update({v: dice(views[v], truth) for v in VIEWS})
            fused_by = {}
            for rule_name, rule in rules.items():
                fused_by[rule_name] = combine(views, probs, rule, result.probs)
                row[rule_name] = dice(fused_by[rule_name], truth)
                row[f"{rule_name} planes"] = plane_dice(fused_by[rule_name], cross)
            row["_drawn"] = planes == "drawn"
            samples.setdefault(name, []).append((len(rows), plane_sample(cross, probs, views, result.probs),
                                                 {k: dice(v, truth) for k, v in fused_by.items()}))
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
        cache.flush()
        for r in rows:
            if r["case"] == case:
                r["scan_seconds"] = time.perf_counter() - t_scan
    # auto: per teacher (one round), the rule chosen on the drawn planes pooled, as a round chooses it
    # auto per scan (--fusion-per-scan): each scan of the choice also chooses on its own planes and keeps that
    chosen = {}
    for name, items in samples.items():
        used = [(i, s) for i, s, _ in items if rows[i].pop("_drawn")] or [(i, s) for i, s, _ in items]
        choice = choose_auto([s for _, s in used], per_scan=True)
        pick = choice.rule
        own = {i: rule for (i, _), rule in zip(used, choice.per_scan)}
        chosen[name] = {"rule": pick, "heldout_gain": choice.heldout_gain, "scans": len(used),
                        "per_scan": {rows[i]["case"]: rule for i, rule in own.items() if rule != pick}}
        for i, _, scores in items:
            teacher = rows[i].get(CUT, rows[i]["teacher_dice"])
            rows[i][AUTO] = teacher if pick == "teacher" else scores[pick]
            mine = own.get(i, pick)
            rows[i][AUTO_PER_SCAN] = teacher if mine == "teacher" else scores[mine]
    cache.close()
    names = [*([CUT] if largest_component else []), *rules, AUTO, AUTO_PER_SCAN]
    return {"project": str(project.root), "generalist": repr(g), "device": str(g.device),
            "box_jitter": box_jitter if box_jitter_fraction is None else f"{box_jitter_fraction:g} of the box",
            "max_slices_per_view": max_slices, "seed": seed, "largest_component": largest_component,
            "adapter": str(adapter) if adapter else None, "generalist_identity": g.identity, "rules": names,
            "rows": rows,
            "auto": chosen, "summary": summarise(rows, names)}


def _chain(*its):
    for it in its:
        yield from it


def summarise(rows: list[dict], rules: list[str]) -> dict[str, dict[str, Any]]:
    """Means over rows by band of teacher quality: each rule's Dice, its gain over the teacher, the worst gain."""
    out = {}
    bands = {f"teacher < {BAND_EDGE}": lambda d: d < BAND_EDGE, f"teacher >= {BAND_EDGE}": lambda d: d >= BAND_EDGE,
             "all": lambda d: True}
    for band, keep in bands.items():
        sel = [r for r in rows if keep(r["teacher_dice"])]
        if not sel:
            continue
        entry = {"rows": len(sel), "teacher": float(np.mean([r["teacher_dice"] for r in sel]))}
        for k in (*VIEWS, *rules):
            gains = [r[k] - r["teacher_dice"] for r in sel if k in r]
            if gains:
                entry[k] = {"dice": float(np.mean([r[k] for r in sel if k in r])), "gain": float(np.mean(gains)),
                            "worst": float(np.min(gains))}
        out[band] = entry
    return out


def format_teachers(report: dict[str, Any]) -> str:
    rules = report["rules"]
    lines = [f"{report['generalist']}, box jitter 0-{report['box_jitter']} (px unless said), "
             f"{report['max_slices_per_view'] or 'every'} prompted slice(s) per view; Dice against the label; "
             "gain = rule - teacher" + (f"; adapter {report['adapter']}" if report.get("adapter") else "")]
    head = f"{'case':<22} {'teacher':<18} {'its Dice':>8} " + " ".join(f"{v[:8]:>8}" for v in (*VIEWS, *rules)) \
        + f" {'s':>6}"
    lines.append(head)
    for r in report["rows"]:
        lines.append(f"{r['case'][:22]:<22} {r['teacher'][:18]:<18} {r['teacher_dice']:8.4f} "
                     + " ".join(f"{r.get(v, float('nan')):8.4f}" for v in (*VIEWS, *rules)) + f" {r['seconds']:6.1f}")
    lines.append("")
    lines.append(f"{'band':<22} {'rows':>4} {'teacher':>8} " + " ".join(f"{v[:9]:>9}" for v in (*VIEWS, *rules)))
    for band, e in report["summary"].items():
        lines.append(f"{band:<22} {e['rows']:>4} {e['teacher']:8.4f} "
                     + " ".join(f"{e[v]['gain']:+9.4f}" if v in e else f"{'':>9}" for v in (*VIEWS, *rules)))
        lines.append(f"{'  worst gain':<22} {'':>4} {'':>8} "
                     + " ".join(f"{e[v]['worst']:+9.4f}" if v in e else f"{'':>9}" for v in (*VIEWS, *rules)))
    lines.append("auto: the rule chosen per teacher on the drawn planes (held-out gain on those planes): "
                 + "; ".join(f"{k}: {v['rule']} ({v['heldout_gain']:+.3f})" for k, v in report["auto"].items()))
    own = [f"{k}: " + ", ".join(f"{c} {r}" for c, r in v["per_scan"].items())
           for k, v in report["auto"].items() if v.get("per_scan")]
    lines.append("auto/scan: scans whose own drawn planes chose otherwise: " + ("; ".join(own) or "none"))
    return "\n".join(lines)

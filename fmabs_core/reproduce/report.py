"""The reproduction's report: a Markdown table like the papers' (mean (std) over seeds), JSON, CSV, a
Wilcoxon signed-rank test of each row against the best baseline, and a plot of Dice per method and case.

Metrics are medpy's (the papers'): Dice and Jaccard in %, 95HD with both directions pooled and ASD from
prediction to truth, in voxels of the test scans' own grid. A per-seed figure is the mean over test
scans (distances over the scans with a prediction; empty predictions are counted as failures).
"""

from __future__ import annotations

import csv
import io as _io
import json
import math
from typing import Any

import numpy as np

from fmabs_core.data import io
from fmabs_core.inference.metrics import METRIC_DEFINITIONS

#: table column -> (key in CaseScores, factor)
COLUMNS = {"Dice %": ("dice", 100.0), "Jaccard %": ("jaccard", 100.0), "95HD (vox)": ("hd95_pooled_vox", 1.0),
           "ASD (vox)": ("asd_pred_vox", 1.0)}
#: with several classes, each class's Dice % (named by class id in the table and JSON)
PER_CLASS = "Dice % per class"
PAPER_KEYS = {"Dice %": "dice", "Jaccard %": "jaccard", "95HD (vox)": "hd95", "ASD (vox)": "asd"}


def clean(obj: Any) -> Any:
    """JSON without NaN (null instead) and with plain types."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _nanmean(values: list[float]) -> float:
    v = np.array([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    return float(v.mean()) if len(v) else math.nan


def _std(values: list[float]) -> float:
    v = np.array([x for x in values if not math.isnan(x)], dtype=float)
    return float(v.std(ddof=1)) if len(v) > 1 else math.nan


def summarise_cells(protocol, cells, results) -> list[dict[str, Any]]:
    """One entry per (setting, row): per-seed means, mean and std over seeds, per-case Dice (seed mean)."""
    by = {}
    for cell, res in zip(cells, results):
        by.setdefault((cell.setting.key, cell.row.key), []).append((cell, res))
    rows = []
    for (skey, rkey), items in by.items():
        cell = items[0][0]
        entry: dict[str, Any] = {"setting": skey, "setting_label": cell.setting.label, "row": rkey,
                                 "label": cell.row.label, "method": cell.row.method, "baseline": cell.row.baseline,
                                 "seeds": [c.seed for c, _ in items], "paper": cell.row.paper.get(skey, {}),
                                 "failed": sum(int(r["summary"]["n_failed"]) for _, r in items),
                                 "n_cases": sum(int(r["summary"]["n_cases"]) for _, r in items)}
        for col, (key, factor) in COLUMNS.items():
            per_seed = [_nanmean([(c[key] * factor) if c[key] is not None else None for c in r["cases"]])
                        for _, r in items]
            entry[col] = {"per_seed": per_seed, "mean": _nanmean(per_seed), "std": _std(per_seed)}
        ids = sorted({k for _, r in items for c in r["cases"] for k in (c.get("classes") or {})}, key=int)
        if ids:  # several classes: each class's Dice, as the Dice column (per-seed means over the test scans)
            entry[PER_CLASS] = {}
            for k in ids:
                per_seed = [_nanmean([c["classes"][k]["dice"] * 100.0 for c in r["cases"] if k in (c.get("classes") or {})])
                            for _, r in items]
                entry[PER_CLASS][k] = {"per_seed": per_seed, "mean": _nanmean(per_seed), "std": _std(per_seed)}
        cases: dict[str, list[float]] = {}
        for _, r in items:
            for c in r["cases"]:
                cases.setdefault(c["case"], []).append(c["dice"])
        entry["case_dice"] = {k: float(np.mean(v)) for k, v in sorted(cases.items())}
        entry["train_seconds"] = [r.get("train_seconds_this_call") for _, r in items]
        entry["resumed"] = [bool(r.get("resumed")) for _, r in items]
        rows.append(entry)
    return rows


def wilcoxon_tests(rows: list[dict[str, Any]]) -> None:
    """Per setting: the baseline row with the best mean Dice, and each other row against it (per-case Dice,
    mean over seeds; two-sided Wilcoxon signed-rank, scipy). Adds ``vs_best_baseline`` to each row."""
    from scipy.stats import wilcoxon

    for setting in dict.fromkeys(r["setting"] for r in rows):
        group = [r for r in rows if r["setting"] == setting]
        baselines = [r for r in group if r["baseline"] and not math.isnan(r["Dice %"]["mean"])]
        if not baselines:
            for r in group:
                r["vs_best_baseline"] = {"note": "no baseline row ran in this setting"}
            continue
        best = max(baselines, key=lambda r: r["Dice %"]["mean"])
        for r in group:
            if r is best:
                r["vs_best_baseline"] = {"note": "the best baseline"}
                continue
            common = sorted(set(r["case_dice"]) & set(best["case_dice"]))
            diff = np.array([r["case_dice"][c] - best["case_dice"][c] for c in common])
            test: dict[str, Any] = {"baseline": best["row"], "n": len(common),
                                    "median_dice_difference": float(np.median(diff)) if len(diff) else math.nan}
            if len(diff) == 0 or not np.any(diff):
                test.update(p=math.nan, note="no case differs" if len(diff) else "no common case")
            else:
                stat = wilcoxon(diff)
                test.update(statistic=float(stat.statistic), p=float(stat.pvalue))
            r["vs_best_baseline"] = test


def _fmt(x: float, digits: int = 2) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def markdown(protocol, scale_name: str, rows: list[dict[str, Any]], split, seeds: int) -> str:
    lines = [f"# {protocol.paper}", "",
             f"Protocol `{protocol.name}`, scale `{scale_name}`: {protocol.scales[scale_name].description}", "",
             f"Split: {len(split.train) + len(split.val)} training scans ({len(split.val)} for validation), "
             f"{len(split.test)} test scans; {split.how}. Seeds: {seeds}.", "",
             "Mean (std over seeds) of the per-seed means over test scans. 95HD: "
             f"{METRIC_DEFINITIONS['hd95_pooled_vox']}; ASD: {METRIC_DEFINITIONS['asd_pred_vox']}. "
             "p: two-sided Wilcoxon signed-rank test of per-case Dice (mean over seeds) against the setting's "
             "best baseline (marked *). Paper: the figures the paper reports (its own data split and scale). "
             "train s: wall seconds of the call that trained the cell (r: resumed, so only that call's part).", ""]
    for setting in dict.fromkeys(r["setting"] for r in rows):
        group = [r for r in rows if r["setting"] == setting]
        per_class = any(PER_CLASS in r for r in group)
        extra = [PER_CLASS] if per_class else []
        lines += [f"## {group[0]['setting_label']}", "",
                  "| Method | " + " | ".join([*COLUMNS, *extra]) + " | failed | p vs best baseline | paper (Dice / Jacc / "
                  "95HD / ASD) | train s (per seed) |",
                  "|---|" + "---|" * (len(COLUMNS) + len(extra) + 4)]
        for r in group:
            cells = [f"{_fmt(r[c]['mean'])} ({_fmt(r[c]['std'])})" for c in COLUMNS]
            if per_class:
                cells.append(", ".join(f"{k}: {_fmt(v['mean'])}" for k, v in r.get(PER_CLASS, {}).items()) or "-")
            test = r.get("vs_best_baseline", {})
            p = "*" if test.get("note") == "the best baseline" else _fmt(test.get("p", math.nan), 3)
            paper = " / ".join(_fmt(r["paper"].get(PAPER_KEYS[c], math.nan)) for c in COLUMNS) if r["paper"] else "-"
            secs = " ".join(("-" if t is None else f"{t:.0f}") + ("r" if res else "")
                            for t, res in zip(r["train_seconds"], r["resumed"]))
            lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {r['failed']}/{r['n_cases']} | {p} | {paper} "
                         f"| {secs} |")
        lines.append("")
    return "\n".join(lines)


def write_csvs(rows: list[dict[str, Any]], results: list[dict], out) -> None:
    buf = _io.StringIO()
    w = csv.writer(buf)
    w.writerow(["setting", "row", "method", "metric", "mean", "std", "per_seed", "p_vs_best_baseline"])
    for r in rows:
        for col in COLUMNS:
            w.writerow([r["setting"], r["row"], r["method"], col, r[col]["mean"], r[col]["std"],
                        " ".join(_fmt(v, 4) for v in r[col]["per_seed"]), r.get("vs_best_baseline", {}).get("p", "")])
    io.atomic_write_text(out / "results.csv", buf.getvalue())
    buf = _io.StringIO()
    w = csv.writer(buf)
    keys = list(METRIC_DEFINITIONS)
    w.writerow(["setting", "row", "method", "seed", "case", *keys, "failed"])
    for res in results:
        for c in res["cases"]:
            w.writerow([res["setting"], res["row"], res["method"], res["seed"], c["case"],
                        *["" if c[k] is None else c[k] for k in keys], c["failed"]])
    io.atomic_write_text(out / "cases.csv", buf.getvalue())


def plot(rows: list[dict[str, Any]], path) -> None:
    """Dice per method (x) and test case (points, joined across methods), one panel per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["setting"] for r in rows))
    fig, axes = plt.subplots(1, len(settings), figsize=(max(4.0, 1.6 * max(len([r for r in rows if r["setting"] == s])
                                                                          for s in settings)) * len(settings), 4.2),
                             squeeze=False)
    for ax, setting in zip(axes[0], settings):
        group = [r for r in rows if r["setting"] == setting]
        cases = sorted({c for r in group for c in r["case_dice"]})
        for case in cases:
            ys = [r["case_dice"].get(case, math.nan) * 100 for r in group]
            ax.plot(range(len(group)), ys, color="0.75", linewidth=0.8, zorder=1)
        for x, r in enumerate(group):
            ys = [v * 100 for v in r["case_dice"].values()]
            ax.scatter([x] * len(ys), ys, s=14, zorder=2)
            ax.plot([x - 0.25, x + 0.25], [np.mean(ys)] * 2 if ys else [math.nan] * 2, color="k", zorder=3)
        ax.set_xticks(range(len(group)), [r["label"] for r in group], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("Dice % (per test case, mean over seeds)")
        ax.set_title(group[0]["setting_label"], fontsize=9)
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_report(protocol, scale_name: str, cells, results: list[dict], split, out) -> dict:
    """Write table.md, results.json, results.csv, cases.csv and plot.png into ``out``; returns the summary."""
    rows = summarise_cells(protocol, cells, results)
    wilcoxon_tests(rows)
    seeds = len({c.seed for c in cells})
    table = markdown(protocol, scale_name, rows, split, seeds)
    io.atomic_write_text(out / "table.md", table + "\n")
    report = {"protocol": protocol.name, "paper": protocol.paper, "scale": scale_name, "seeds": seeds,
              "split": json.loads(split.to_json()), "metrics": {c: METRIC_DEFINITIONS[k] for c, (k, _) in COLUMNS.items()},
              "rows": rows, "cells": [{k: v for k, v in r.items() if k != "cases"} for r in results]}
    io.atomic_write_text(out / "results.json", json.dumps(clean(report), indent=2))
    write_csvs(rows, results, out)
    plot(rows, out / "plot.png")
    report["table"] = table
    return report

"""``fmabs bench suite``: the speed figures of issue 15, measured side by side in one process.

Rows (each with its peak memory: CUDA ``max_memory_allocated`` since the row began, or on the CPU
the growth of the process's resident set, sampled every 10 ms):

- training iterations per second for sup, mt and fmabs, through the engine in fp32 and (CUDA) in
  bf16 with cuDNN's autotuner, with channels-last-3d and with torch.compile, against a plain fp32
  loop written the way the reference code (UA-MT / FM-ABS ``train_*.py``) writes it: sampling on
  the loop's thread, contiguous tensors, ``loss.item()`` every step. Rounds are kept out of the
  fmabs rows (their step is the mean teacher's plus the pseudo-label loss); the sampler's time per
  batch and the time the loop waited for it are reported beside the step time.
- a pseudo-label round over real LA scans (prompted by their labels, a perfect teacher) without
  embedding reuse, then twice with it (cold, then warm: only the box jitter changes).
- ``fmabs predict``'s sliding window over an LA scan (fp32, and bf16 on CUDA).

Sizes: the paper's patch 112 x 112 x 80 and batch 4 on CUDA; on a CPU a small patch, batch and
slice count, so the suite finishes in minutes there too. CUDA timings synchronise the device.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from fmabs_core.contract import check_name
from fmabs_core.errors import InputError
from fmabs_core.training.api import Hook

log = logging.getLogger(__name__)


@dataclass
class Sizes:
    patch: tuple[int, int, int]
    batch: int
    labelled_bs: int
    width: int
    warmup: int
    timed: int
    scan_shape: tuple[int, int, int]
    round_slices: int | None  # per view; None = every foreground slice
    infer_crop: tuple[int, int, int] | None  # CPU: predict a central crop, not the whole scan
    variants: list[str] = field(default_factory=list)

    @classmethod
    def for_device(cls, device: torch.device, quick: bool = False) -> "Sizes":
        if device.type == "cuda" and not quick:
            return cls((112, 112, 80), 4, 2, 16, 5, 30, (128, 128, 96), None, None,
                       ["fp32", "bf16", "bf16+cl", "bf16+compile"])
        return cls((48, 48, 32), 2, 1, 8, 1, 3, (56, 56, 40), 2, (160, 160, 88), ["fp32"])


# ------------------------------------------------------------------------------------------ clocks
class _Peak:
    """Peak memory of one row: CUDA allocator peak, or the CPU process's RSS growth (sampled)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._stop = threading.Event()
        self._peak = 0
        self._base = 0

    def __enter__(self) -> "_Peak":
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        import psutil

        proc = psutil.Process()
        self._base = self._peak = proc.memory_info().rss

        def sample() -> None:
            while not self._stop.wait(0.01):
                self._peak = max(self._peak, proc.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self._peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()

    @property
    def mib(self) -> float:
        return (self._peak if self.cuda else self._peak - self._base) / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def _row(rows: list[dict], device: torch.device, **facts: Any) -> Iterator[dict]:
    row = dict(facts)
    with _Peak(device) as peak:
        yield row
    row["peak_mib"] = round(peak.mib, 1)
    rows.append(row)
    log.info("bench row: %s", row)


# ------------------------------------------------------------------------------------------ data
def _training_project(folder: Path, sizes: Sizes):
    from fmabs_core.cli.project_cmds import simulate_crosslabels
    from fmabs_core.data.phantom import write_dataset
    from fmabs_core.data.project import import_folder

    data = write_dataset(folder / "phantoms", n_cases=6, shape=sizes.scan_shape, seed=0)
    project, problems = import_folder(data, folder / "project", val_fraction=0.0, seed=0)
    simulate_crosslabels(project, project.split("train")[:3], "centre", 0)
    return project


# ------------------------------------------------------------------------------------------ training
class _Clock(Hook):
    """A hook that times steps ``start`` .. ``stop`` (exclusive) of the engine's loop."""

    def __init__(self, start: int, stop: int, device: torch.device) -> None:
        self.start, self.stop, self.device = start, stop, device
        self.marks: dict[int, float] = {}

    def before_step(self, tr, it: int) -> None:
        if it in (self.start, self.stop):
            _sync(self.device)
            self.marks[it] = time.perf_counter()


def _engine_row(project, method: str, variant: str, sizes: Sizes, device: torch.device, run: str) -> dict:
    from fmabs_core.training.config import TrainConfig
    from fmabs_core.training.engine import Trainer
    from fmabs_core.training.nets import NetConfig

    total = sizes.warmup + sizes.timed + 1
    options = {"pseudo_warmup": 1.0, "embedding_cache": "off"} if method == "fmabs" else {}
    cfg = TrainConfig(method=method, method_options=options, iterations=total, seed=0, device=str(device),
                      patch_size=sizes.patch, batch_size=sizes.batch, labelled_bs=sizes.labelled_bs,
                      net=NetConfig(width=sizes.width), val_every=10**6, ckpt_every=10**6, amp=variant != "fp32")
    tr = Trainer(project, run, cfg)
    tr.cudnn_benchmark = variant != "fp32"
    tr.channels_last = "+cl" in variant
    tr.compile = "compile" in variant
    clock = _Clock(sizes.warmup, sizes.warmup + sizes.timed, device)
    tr.hooks.append(clock)
    tr.train().raise_for_failure()
    seconds = clock.marks[clock.stop] - clock.marks[clock.start]
    stats = tr._batches.stats() if tr._batches is not None else {}
    return {"its": sizes.timed / seconds, "step_s": seconds / sizes.timed, "sampler_s": stats.get("sample_s"),
            "wait_s": stats.get("wait_s")}


def _reference_row(project, method: str, sizes: Sizes, device: torch.device) -> dict:
    """A plain fp32 loop as the reference code writes it (same V-Net, losses and sampler)."""
    from fmabs_core.methods import losses
    from fmabs_core.training.nets import NetConfig, build_network
    from fmabs_core.data.intensity import zscore
    from fmabs_core.training.sampler import Case, PatchSampler

    torch.backends.cudnn.benchmark = False
    lab, unl = [], []
    for cid in project.split("train"):
        case = Case(cid, zscore(project.load_image(cid).array))
        if project.crosslabel_path(cid).exists():
            case.target = project.load_crosslabel(cid).array
        (lab if case.target is not None else unl).append(case)
    semi = method != "sup"
    sampler = PatchSampler(lab, unl if semi else [], sizes.patch, sizes.batch, sizes.labelled_bs, 0)
    torch.manual_seed(0)
    net = build_network(NetConfig(width=sizes.width)).to(device).train()
    ema = copy.deepcopy(net) if semi else None
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    lb = sampler.labelled_bs
    sample_s: list[float] = []

    def step() -> None:
        t0 = time.perf_counter()
        batch = sampler.next_batch()
        sample_s.append(time.perf_counter() - t0)
        x, y = batch["image"].to(device), batch["target"].to(device)
        out = net(x)
        loss = F.cross_entropy(out[:lb], y[:lb], ignore_index=255)
        if semi:
            noise = torch.clamp(torch.randn_like(x[lb:]) * 0.1, -0.2, 0.2)
            with torch.no_grad():
                ema_out = ema(x[lb:] + noise)
            loss = loss + 0.1 * torch.mean((torch.softmax(out[lb:], 1) - torch.softmax(ema_out, 1)) ** 2)
            if method == "fmabs":
                p = batch["pseudo"].to(device)
                valid = (p != 255).unsqueeze(1).float()
                onehot = losses.one_hot(p.masked_fill(p == 255, 0), out.shape[1])
                loss = loss + 0.5 * losses.noise_tolerant_dice(torch.softmax(out, 1) * valid, onehot * valid, gamma=1.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if semi:
            with torch.no_grad():
                for e, s in zip(ema.parameters(), net.parameters()):
                    e.mul_(0.99).add_(s, alpha=0.01)
        loss.item()

    for _ in range(sizes.warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(sizes.timed):
        step()
    _sync(device)
    seconds = time.perf_counter() - t0
    return {"its": sizes.timed / seconds, "step_s": seconds / sizes.timed,
            "sampler_s": float(np.mean(sample_s[sizes.warmup:])), "wait_s": float(np.mean(sample_s[sizes.warmup:]))}


# ------------------------------------------------------------------------------------------ rounds
def _round_rows(rows: list[dict], cases, sizes: Sizes, device: torch.device, folder: Path) -> None:
    from fmabs_core.generalist import get_generalist
    from fmabs_core.generalist.embcache import EmbeddingCache
    from fmabs_core.contract import VIEWS
    from fmabs_core.data.crosslabel import simulate
    from fmabs_core.generalist.fusion import (AUTO_CANDIDATES, FusionRule, choose_rule, combine, fill_unprompted,
                                              plane_sample, quantise_probs, teacher_probs_of)
    from fmabs_core.generalist.pseudolabel import dice, multiview_pseudolabel, prompted_slices_bound
    from fmabs_core.generalist.runtime import resolve_runtime
    from fmabs_core.methods.fmabs import FMABSConfig
    from fmabs_core.data.intensity import zscore

    # the runtime an FM-ABS run would choose for this many slices (OpenVINO on a CPU where it pays)
    expected = sum(prompted_slices_bound(img.shape, sizes.round_slices) for _c, img, _l in cases)
    g = get_generalist("litemedsam", device=device, runtime=resolve_runtime("auto", device, expected))
    prepared = [(cid, zscore(img), lab) for cid, img, lab in cases]
    g.encode(np.zeros((1, 64, 64), np.float32), (0.0, 1.0))  # warm-up: kernels, allocator

    teachers = [quantise_probs(teacher_probs_of(lab, 1)) for _c, _i, lab in prepared]  # made before the clock
    crosses = [simulate(lab, "centre")[0] for _c, _i, lab in prepared]

    def one_round(seed: int, cache: EmbeddingCache | None, row: dict, rule: FusionRule = FusionRule("mv")) -> None:
        enc0 = g.encoded_slices
        fused, split = [], {"encode": 0.0, "decode": 0.0}
        samples, kept = [], []
        _sync(device)
        t0 = time.perf_counter()
        for i, (_cid, img, lab) in enumerate(prepared):
            result = multiview_pseudolabel(g, img, lab, np.random.default_rng([seed, i]),
                                           max_slices_per_view=sizes.round_slices, cache=cache,
                                           keep_probs=rule.needs_probs)
            if rule.fusion != "mv":  # a round's own steps for a fusion with the teacher
                if sizes.round_slices is not None:
                    fill_unprompted(result, teachers[i])
                views = {v: result[v] for v in VIEWS}
                if rule.fusion == "auto":  # every scan cross-labelled (the simulated expert): its answers kept
                    samples.append(plane_sample(crosses[i], teachers[i], views, result.probs))
                    kept.append((views, result.probs))
                    result["fused"] = None
                else:
                    result["fused"] = combine(views, teachers[i], rule, result.probs)
            fused.append(result["fused"])
            for part in split:
                split[part] += result.timing[part]
        if samples:  # --fusion auto: the rule chosen on the drawn planes, then every scan fused with it
            row["fusion"] = choose_rule(samples)[0]
            chosen = AUTO_CANDIDATES[row["fusion"]]
            fused = [combine(views, teachers[i], chosen, probs) for i, (views, probs) in enumerate(kept)]
        _sync(device)
        row["seconds"], row["encoded"] = time.perf_counter() - t0, g.encoded_slices - enc0
        # where the time went: the encoder (cache look-ups included), the decoder, and the rest on the host
        # (prompts from the masks, per-slice labels, fusion): on a GPU the host part bounds a warm round
        row["encode_s"], row["decode_s"] = round(split["encode"], 3), round(split["decode"], 3)
        row["host_s"] = round(row["seconds"] - split["encode"] - split["decode"], 3)
        # the fused pseudo-labels against the labels that prompted them: equal rows must agree
        row["dice"] = round(float(np.mean([dice(f, lab) for f, (_c, _i, lab) in zip(fused, prepared)])), 4)

    base = dict(kind="round", scans=len(prepared), generalist=repr(g))
    with _row(rows, device, **base, variant="no reuse") as row:
        one_round(1, None, row)
    cache = EmbeddingCache(g.device, tier="auto", folder=folder / "embedding_cache", compute_dtype=g.amp_dtype)
    cache.expect(sum(sum(img.shape) for _c, img, _l in prepared))
    with _row(rows, device, **base, variant="reuse, round 1") as row:
        one_round(1, cache, row)
    with _row(rows, device, **base, variant="reuse, round 2") as row:
        one_round(2, cache, row)
        row["cache"] = cache.stats()
    default = FusionRule(FMABSConfig.fusion, FMABSConfig.teacher_weight, FMABSConfig.gate_confidence)
    if default.fusion != "mv":  # the same warm round fused as an FM-ABS run fuses by default, for the ratio
        with _row(rows, device, **base, variant=f"reuse, round 2, {default.fusion} fusion") as row:
            one_round(2, cache, row, default)
    g.folded_decoder = False  # the same warm round through SAM's stock decoder, for the ratio
    try:
        with _row(rows, device, **base, variant="reuse, round 2, stock decoder") as row:
            one_round(2, cache, row)
    finally:
        g.folded_decoder = True
    cache.close(remove=True)


def _inference_rows(rows: list[dict], cases, sizes: Sizes, device: torch.device) -> None:
    from fmabs_core.inference.predict import predict_proba
    from fmabs_core.training.nets import NetConfig, build_network

    net = build_network(NetConfig(width=16)).to(device).eval()
    _cid, image, _lab = cases[0]
    if sizes.infer_crop is not None:
        c = [max(0, (s - w) // 2) for s, w in zip(image.shape, sizes.infer_crop)]
        image = image[c[0]:c[0] + sizes.infer_crop[0], c[1]:c[1] + sizes.infer_crop[1], c[2]:c[2] + sizes.infer_crop[2]]
    variants = ["fp32", "bf16"] if device.type == "cuda" else ["fp32"]
    for variant in variants:
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if variant == "bf16" else contextlib.nullcontext()
        with amp:
            predict_proba(net, image[:112, :112, :80], (112, 112, 80), 0.5, device)  # warm-up
        with _row(rows, device, kind="inference", variant=variant, shape=list(image.shape)) as row, amp:
            _sync(device)
            t0 = time.perf_counter()
            predict_proba(net, image, (112, 112, 80), 0.5, device)
            _sync(device)
            row["seconds"] = time.perf_counter() - t0


# ------------------------------------------------------------------------------------------ suite
def engine_run_name(method: str, variant: str) -> str:
    """The run folder of one engine row: variants such as ``bf16+cl`` hold characters a run name may not."""
    return check_name(f"{method}-{variant}".replace("+", "_"))


def run_suite(device: str = "auto", la_dir: str | None = None, scans: int | None = None, quick: bool = False,
              parts: tuple[str, ...] = ("train", "round", "infer"), methods: tuple[str, ...] = ("sup", "mt", "fmabs"),
              progress: Callable[[str], None] | None = None, round_slices: int | None = None) -> dict:
    """Every row of the suite; ratios are taken between rows of this one run.

    ``round_slices``: slices per view and scan in the rounds (0: every slice with foreground, as the
    paper's rounds; default: the device's size)."""
    from fmabs_core.cli.bench import load_la_cases
    from fmabs_core.device import resolve_device

    dev = resolve_device(device)
    sizes = Sizes.for_device(dev, quick)
    if round_slices is not None:
        if round_slices < 0:
            raise InputError(f"--pseudo-max-slices {round_slices}: give 0 (every slice with foreground) or a positive count.")
        sizes = dataclasses.replace(sizes, round_slices=round_slices or None)
    say = progress or (lambda msg: log.info("%s", msg))
    rows: list[dict] = []
    t_start = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="fmabs-bench-"))
    try:
        if "train" in parts:
            project = _training_project(folder, sizes)
            for method in methods:
                say(f"training {method}: reference fp32 loop")
                with _row(rows, dev, kind="train", method=method, variant="reference fp32") as row:
                    row.update(_reference_row(project, method, sizes, dev))
                for variant in sizes.variants:
                    if "compile" in variant and method != "sup":
                        continue
                    say(f"training {method}: engine {variant}")
                    with _row(rows, dev, kind="train", method=method, variant=f"engine {variant}") as row:
                        row.update(_engine_row(project, method, variant, sizes, dev, engine_run_name(method, variant)))
        cases = load_la_cases(Path(la_dir) if la_dir else None, scans or (4 if dev.type == "cuda" else 1)) \
            if {"round", "infer"} & set(parts) else []
        if "round" in parts:
            say(f"pseudo-label rounds over {len(cases)} LA scan(s)")
            _round_rows(rows, cases, sizes, dev, folder)
        if "infer" in parts:
            say("inference on an LA scan")
            _inference_rows(rows, cases, sizes, dev)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"device": str(dev), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "sizes": {"patch": list(sizes.patch), "batch": sizes.batch, "width": sizes.width, "timed_steps": sizes.timed,
                      "round_slices_per_view": sizes.round_slices},
            "rows": rows, "ratios": ratios(rows), "seconds": time.perf_counter() - t_start}


def ratios(rows: list[dict]) -> dict[str, float]:
    """Speed-ups within the run: engine variants over the reference loop, warm over cold rounds."""
    out: dict[str, float] = {}
    train = [r for r in rows if r["kind"] == "train"]
    for r in train:
        ref = next((x for x in train if x["method"] == r["method"] and x["variant"] == "reference fp32"), None)
        if ref is not None and r is not ref:
            out[f"{r['method']} {r['variant']} / reference"] = round(r["its"] / ref["its"], 3)
    rounds = {r["variant"]: r for r in rows if r["kind"] == "round"}
    if {"reuse, round 1", "reuse, round 2"} <= set(rounds):
        out["round 2 / round 1 time"] = round(rounds["reuse, round 2"]["seconds"] / rounds["reuse, round 1"]["seconds"], 4)
    if {"reuse, round 2", "reuse, round 2, stock decoder"} <= set(rounds):
        out["warm round stock / folded decoder time"] = round(rounds["reuse, round 2, stock decoder"]["seconds"] /
                                                              rounds["reuse, round 2"]["seconds"], 3)
    fused = [v for v in rounds if v.startswith("reuse, round 2, ") and v.endswith(" fusion")]
    if fused and "reuse, round 2" in rounds:  # what the default fusion with the teacher costs over the vote
        out[f"warm round {fused[0][16:]} / mv fusion time"] = round(rounds[fused[0]]["seconds"] /
                                                                     rounds["reuse, round 2"]["seconds"], 3)
    if {"no reuse", "reuse, round 2"} <= set(rounds):
        out["round without reuse / warm round time"] = round(rounds["no reuse"]["seconds"] /
                                                             rounds["reuse, round 2"]["seconds"], 2)
    inf = {r["variant"]: r for r in rows if r["kind"] == "inference"}
    if {"fp32", "bf16"} <= set(inf):
        out["inference fp32 / bf16 time"] = round(inf["fp32"]["seconds"] / inf["bf16"]["seconds"], 3)
    return out


def format_suite(report: dict) -> str:
    s = report["sizes"]
    lines = [f"device {report['device']} {report['gpu'] or ''} | torch {report['torch']} | {report['threads']} threads, "
             f"load {report['load_avg_1min']} | patch {'x'.join(map(str, s['patch']))} batch {s['batch']} width "
             f"{s['width']}, {s['timed_steps']} timed steps | {report['seconds']:.0f} s in all"]
    lines.append(f"{'kind':<9} {'method':<6} {'variant':<30} {'it/s':>7} {'step s':>7} {'sampler s':>9} {'wait s':>7} "
                 f"{'seconds':>8} {'encode':>7} {'decode':>7} {'host':>6} {'dice':>6} {'peak MiB':>9}")
    for r in report["rows"]:
        def f(key: str, fmt: str) -> str:
            v = r.get(key)
            width = int(fmt.split(".")[0])
            return format(v, fmt) if isinstance(v, (int, float)) else "-".rjust(width)
        lines.append(f"{r['kind']:<9} {r.get('method', '-'):<6} {r['variant']:<30} {f('its', '7.2f')} "
                     f"{f('step_s', '7.3f')} {f('sampler_s', '9.4f')} {f('wait_s', '7.4f')} {f('seconds', '8.2f')} "
                     f"{f('encode_s', '7.2f')} {f('decode_s', '7.2f')} {f('host_s', '6.2f')} {f('dice', '6.4f')} "
                     f"{f('peak_mib', '9.0f')}")
    for k, v in report["ratios"].items():
        lines.append(f"  {k}: {v}")
    return "\n".join(lines)

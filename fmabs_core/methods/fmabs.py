"""FM-ABS (Xu et al., MICCAI 2024): mean teacher + multi-view generalist pseudo-labels.

Every few hundred iterations the teacher's prediction prompts a frozen SAM-family generalist on
the axial, coronal and sagittal slices of each training scan; the three 3D results are fused
(UA or MV) and the student learns from them with the noise-tolerant Dice, weighted 0.5 x (1 - ramp).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from fmabs_core.contract import FUSIONS, UNLABELLED, VIEW_AXIS, VIEWS
from fmabs_core.methods import losses, register
from fmabs_core.methods.base import option
from fmabs_core.methods.mean_teacher import MeanTeacher, MeanTeacherConfig
from fmabs_core.training.api import TrainContext

log = logging.getLogger(__name__)

#: how a --adapter is used in rounds (see FMABSConfig.adapter_mode)
ADAPTER_MODES = ("prompted", "tiled")
#: where the pseudo-labels come from (see FMABSConfig.pseudo_source)
PSEUDO_SOURCES = ("generalist", "teacher")


@dataclass
class FMABSConfig(MeanTeacherConfig):
    generalist: str = option("litemedsam", "SAM-family model: litemedsam (embedded), mobilesam, sam_vit_b, medsam")
    generalist_checkpoint: str | None = option(None, "weights file of the generalist (default: the cache)")
    adapter: str | None = option(None, "LoRA adapter of a sam-lora run (its model.pt) merged into the generalist's "
                                       "encoder; the prompts stay boxes")
    adapter_mode: str = option("prompted", "with --adapter: prompted (the teacher's boxes prompt the tuned encoder) "
                                           "or tiled (the tuned generalist labels each scan prompt-free from tiled "
                                           "axial slices, as CFR does; the same label every round)")
    generalist_dtype: str = option("auto", "encoder precision: auto (bf16 on GPUs, float32 on CPUs), float32, "
                                           "bfloat16 (CPUs with bf16 units: ~2x faster, Dice within ~0.04)")
    generalist_runtime: str = option("auto", "what runs the encoder: auto (openvino on a CPU when it is installed "
                                             "and the rounds will encode 200 slices or more, else torch), torch, "
                                             "openvino (CPU only, pip install openvino: 1.35x torch's fp32 speed "
                                             "here, the same pseudo-labels, ~8 s to convert once)")
    embedding_cache: str = option("auto", "where slice embeddings are kept between rounds so that each slice is "
                                          "encoded once: auto (by size), device, host, disk (run folder), off")
    embedding_cache_gb: float | None = option(None, "bound of the embedding cache in GB, least recently used "
                                                    "slices evicted (default: half the free memory of its tier)")
    embedding_dtype: str = option("auto", "stored embeddings: auto (bf16 if the encoder runs in bf16, else "
                                          "float16), bfloat16, float16, float32")
    fusion: str = option("mv", f"how the three views' pseudo-labels are fused: {', '.join(FUSIONS)}")
    sam_weight: float = option(0.5, "weight of the pseudo-label loss at the start (it decays to 0)")
    nt_gamma: float = option(1.5, "exponent of the noise-tolerant Dice (2 = plain Dice)")
    pseudo_warmup: float = option(0.06, "fraction of the iterations before the first pseudo-label round")
    pseudo_every: float = option(0.06, "fraction of the iterations between rounds")
    pseudo_stop: float = option(0.8, "no new round after this fraction of the iterations")
    pseudo_max_slices: int | None = option(None, "generalist calls per view and scan (CPU runs; default: all)")
    pseudo_max_cases: int | None = option(None, "scans pseudo-labelled per round (CPU runs; default: all)")
    box_jitter: int = option(10, "random enlargement of each box prompt, pixels per side")
    n_points: int | None = option(None, "positive points per box (default: the generalist's)")
    pseudo_source: str = option("generalist", "generalist (FM-ABS), or teacher: an ablation whose pseudo-label is "
                                              "the teacher's own mask (self-training, no generalist), to measure "
                                              "what the generalist adds")
    crosslabel_overrides: bool = option(True, "on a cross-labelled scan's labelled planes the pseudo-label loss "
                                        "uses the expert's label, not the fused pseudo-label")


@register
class FMABS(MeanTeacher):
    """FM-ABS: mean teacher + multi-view SAM-family pseudo-labels with the noise-tolerant Dice."""

    name = "fmabs"
    Config = FMABSConfig

    def setup(self, tr: TrainContext) -> None:
        super().setup(tr)
        cfg = self.config
        _check_options(cfg)
        n = tr.cfg.iterations
        self.warmup = int(round(cfg.pseudo_warmup * n))
        self.every = max(1, int(round(cfg.pseudo_every * n)))
        self.stop = int(round(cfg.pseudo_stop * n))
        self.rounds_done = getattr(self, "rounds_done", 0)
        #: the round under way when a cancel stopped it: {"iteration", "cases", "done": {case: scores}}
        self.partial = getattr(self, "partial", None)
        self._generalist = None
        self._cache = None
        self._digests: dict[str, tuple[np.ndarray, str]] = {}
        self._tuned = None
        self._tiled: dict[str, np.ndarray] = {}
        self._clock = _new_clock()
        if cfg.pseudo_source == "teacher":
            pass  # the ablation needs no generalist
        elif cfg.adapter_mode == "tiled":
            self._tuned = _load_tiled(cfg.adapter, tr)  # a bad adapter fails at start
        else:
            self.generalist(tr)  # fail at start, not at the first round, when weights are missing
            self._cache = self._build_cache(tr)
        if self.rounds_done or self.partial:
            tr.restore_pseudolabels()

    def round_due(self, it: int) -> bool:
        return it >= self.warmup and it < self.stop and (it - self.warmup) % self.every == 0

    def generalist(self, tr: TrainContext):
        if self._generalist is None:
            from fmabs_core.generalist import pseudolabel  # noqa: F401  (a round must not fail on import)
            from fmabs_core.generalist.adapted import get_adapted
            from fmabs_core.generalist.runtime import resolve_runtime

            cfg = self.config
            runtime = resolve_runtime(cfg.generalist_runtime, tr.device, self.expected_encodes(tr))
            self._generalist = get_adapted(cfg.generalist, cfg.adapter, device=tr.device,
                                           checkpoint=cfg.generalist_checkpoint, dtype=cfg.generalist_dtype,
                                           runtime=runtime)
            log.info("generalist for pseudo-labels: %r", self._generalist)
        return self._generalist

    def _slices_per_scan(self, tr: TrainContext) -> list[int]:
        """Upper bound of the slices one round prompts in each training scan (all three views)."""
        from fmabs_core.generalist.pseudolabel import prompted_slices_bound

        return [prompted_slices_bound(c.image.shape, self.config.pseudo_max_slices) for c in tr.train_cases]

    def expected_encodes(self, tr: TrainContext) -> int:
        """About how many slices this rank will encode over the run's rounds: what decides whether a
        runtime with a one-off conversion cost pays (an upper bound: only slices with an object are
        prompted). With the embedding cache, no slice is encoded twice."""
        cfg = self.config
        per_scan = self._slices_per_scan(tr)
        if not per_scan:
            return 0
        rounds = max(0, -(-(min(self.stop, tr.cfg.iterations) - self.warmup) // self.every))
        cases = min(len(per_scan), cfg.pseudo_max_cases or len(per_scan))
        total = rounds * cases * sum(per_scan) / len(per_scan)
        if cfg.embedding_cache != "off":
            total = min(total, sum(per_scan))
        return int(total) // max(1, tr.dist.world_size)

    def _build_cache(self, tr: TrainContext):
        """The run's embedding cache (None with ``embedding_cache='off'``), sized for every slice a round may prompt."""
        cfg = self.config
        if cfg.embedding_cache == "off":
            return None
        from fmabs_core.generalist.embcache import EmbeddingCache, default_folder, file_name

        g = self.generalist(tr)
        cache = EmbeddingCache(g.device, cfg.embedding_cache_gb, cfg.embedding_cache, cfg.embedding_dtype,
                               folder=default_folder(tr.run_dir), name=file_name(g.identity, tr.dist.rank),
                               compute_dtype=g.amp_dtype)
        cache.expect(sum(self._slices_per_scan(tr)))
        return cache

    def _scan_id(self, case) -> str:
        """Content hash of a training scan, computed once per run (the array is kept, so its id stays unique)."""
        from fmabs_core.generalist.embcache import scan_digest

        known = self._digests.get(case.id)
        if known is None or known[0] is not case.image:
            known = (case.image, scan_digest(case.image))
            self._digests[case.id] = known
        return known[1]

    def _round_cases(self, tr, it: int) -> list:
        """The scans of this round: all, or ``pseudo_max_cases`` drawn from the sampler's generator (a
        round resumed after a cancel keeps the ones it had drawn, without drawing again)."""
        cfg = self.config
        cases = tr.train_cases
        if self.partial is not None and self.partial["iteration"] == it:
            by_id = {c.id: c for c in cases}
            return [by_id[cid] for cid in self.partial["cases"]]
        if cfg.pseudo_max_cases is not None and len(cases) > cfg.pseudo_max_cases:
            # drawn before sharding: every rank's sampler has the same seed, so all pick the same scans
            idx = tr.sampler.rng.choice(len(cases), cfg.pseudo_max_cases, replace=False)
            cases = [cases[i] for i in sorted(idx)]
        self.partial = {"iteration": it, "cases": [c.id for c in cases], "done": {}}
        return cases

    def _label_case(self, tr, it: int, i: int, case) -> tuple[np.ndarray, tuple[float, float] | None]:
        """One scan of a round: teacher prompt -> three views -> fused pseudo-label (written to the run folder)."""
        if self._tuned is not None:
            return self._label_case_tiled(tr, case)
        from fmabs_core.inference.metrics import dice_jaccard

        cfg = self.config
        clock = self._clock
        t = time.perf_counter()
        prompt = tr.predict(self.teacher, case.image).argmax(0).astype(np.uint8)
        clock["teacher"] += time.perf_counter() - t
        label = case.extra.get("label")
        if cfg.pseudo_source == "teacher":
            tr.save_pseudolabels(case, {"fused": prompt})
            return prompt, None if label is None else (dice_jaccard(prompt, label)[0],) * 2
        from fmabs_core.generalist.pseudolabel import multiview_pseudolabel

        rng = np.random.default_rng([tr.cfg.seed, it, i])  # per scan: results do not depend on the rank count
        cache = self._cache
        result = multiview_pseudolabel(
            self.generalist(tr), case.image, prompt, rng, fusion=cfg.fusion, box_jitter=cfg.box_jitter,
            n_points=cfg.n_points, max_slices_per_view=cfg.pseudo_max_slices, cache=cache,
            scan_id=self._scan_id(case) if cache is not None else None)
        if cfg.pseudo_max_slices is not None:
            fill_unprompted(result, prompt, cfg.fusion)
        clock["encode"] += result.timing["encode"]
        clock["decode"] += result.timing["decode"]
        clock["prompts_and_fusion"] += result.seconds - result.timing["encode"] - result.timing["decode"]
        t = time.perf_counter()
        tr.save_pseudolabels(case, result)  # each rank writes the scans it labelled (distinct files)
        clock["save"] += time.perf_counter() - t
        scores = None if label is None else (dice_jaccard(prompt, label)[0], dice_jaccard(result["fused"], label)[0])
        return result["fused"].astype(np.uint8), scores

    def _label_case_tiled(self, tr, case) -> tuple[np.ndarray, tuple[float, float] | None]:
        """Prompt-free mode: the tuned generalist's label of the whole scan (tiled sliding windows). The scan and
        the adapter do not change between rounds, so it is computed (and written) once per scan and process."""
        from fmabs_core.contract import GENERALIST_LAYER
        from fmabs_core.inference.metrics import dice_jaccard

        label = self._tiled.get(case.id)
        if label is None:
            label = tr.predict(self._tuned, case.image).argmax(0).astype(np.uint8)
            self._tiled[case.id] = label
            tr.save_pseudolabels(case, {GENERALIST_LAYER: label, "fused": label})
        truth = case.extra.get("label")
        if truth is None:
            return label, None
        teacher = tr.predict(self.teacher, case.image).argmax(0).astype(np.uint8)
        return label, (dice_jaccard(teacher, truth)[0], dice_jaccard(label, truth)[0])

    def before_step(self, tr, it):
        if not self.round_due(it):
            return
        from fmabs_core.training import distributed

        fresh = self.partial is None or self.partial["iteration"] != it
        cases = self._round_cases(tr, it)
        if fresh:
            # The round rewrites pseudo/ files in place: a kill -9 during it must resume from a state that
            # knows the round had begun (and redoes it), not from an older checkpoint that would read a
            # mix of two rounds' labels. The drawn scans are in this checkpoint, so none is drawn again.
            tr.checkpoint(it)
        resumed = len(self.partial["done"])
        distributed.broadcast_module(self.teacher)  # BN statistics drift per rank: prompt from rank 0's teacher
        start = time.time()
        self._clock = _new_clock()
        mine: dict[str, tuple[np.ndarray, tuple[float, float] | None]] = {}
        shard = distributed.shard(list(enumerate(cases)))
        steps = -(-len(cases) // tr.dist.world_size)  # shares differ by one: every rank checks as often
        for n in tr.progress(range(steps), desc=f"pseudo-labels (round {self.rounds_done + 1})"):
            if n < len(shard):
                i, case = shard[n]
                done = self.partial["done"]
                if case.id in done:  # labelled before a cancel: its fused label is in the run folder (uint8, lossless)
                    mine[case.id] = (tr.load_pseudolabel(case), done[case.id])
                else:
                    mine[case.id] = self._label_case(tr, it, i, case)
                    done[case.id] = mine[case.id][1]
            # a cancel seen by any rank stops every rank after its current scan (a collective: all ranks call it)
            if n + 1 < steps and distributed.any_true(tr.cancel_requested()):
                self._stop_mid_round(tr, it, len(cases))
                return
        merged = {k: v for part in distributed.all_gather_object(mine) for k, v in part.items()}
        for case in cases:
            case.pseudo = merged[case.id][0]
        self.rounds_done += 1
        self.partial = None
        info = {"round": self.rounds_done, "iteration": it, "cases": len(cases), "seconds": time.time() - start,
                "seconds_by_part": {k: round(v, 3) for k, v in self._clock.items()}}  # this rank's scans
        if resumed:
            info["resumed_after"] = resumed
        dices = np.array([v[1] for v in merged.values() if v[1] is not None])
        if len(dices):
            info.update(teacher_dice=float(dices[:, 0].mean()), pseudo_dice=float(dices[:, 1].mean()))
        if self._generalist is not None:
            info["generalist"] = self._generalist.precision  # e.g. "fp32 on cpu (openvino)": what ran the encoder
        if self._cache is not None:
            self._cache.flush()
            info["embedding_cache"] = self._cache.stats()
        tr.runlog.event("pseudo_label", **info)
        log.info("pseudo-label round %d: %s", self.rounds_done, info)

    def _stop_mid_round(self, tr, it: int, total: int) -> None:
        """A cancel during a round: checkpoint what is done (the next start finishes the round) and stop.
        Collective under torchrun: rank 0's checkpoint holds the scans every rank has done."""
        from fmabs_core.training import distributed
        from fmabs_core.training.api import Outcome

        done = {k: v for part in distributed.all_gather_object(self.partial["done"]) for k, v in part.items()}
        self.partial["done"] = done
        log.warning("cancel during pseudo-label round %d: %d of %d scans done; checkpointing", self.rounds_done + 1,
                    len(done), total)
        if self._cache is not None:
            self._cache.flush()
        tr.checkpoint(it)
        tr.request_stop(Outcome.cancelled(it))

    def export(self, tr, path) -> None:
        super().export(tr, path)
        if self._cache is not None:  # the run is over: its embeddings are of no further use
            self._cache.close(remove=True)

    def loss(self, tr, batch, logits, it):
        total, logs = super().loss(tr, batch, logits, it)
        pseudo = batch["pseudo"]
        if self.config.crosslabel_overrides:  # the expert's planes are truth: never pull against them
            drawn = (batch["target"] != UNLABELLED) & (pseudo != UNLABELLED)
            pseudo = torch.where(drawn, batch["target"], pseudo)
        valid = pseudo != UNLABELLED
        if valid.any():
            probs = torch.softmax(logits.float(), 1)
            onehot = losses.one_hot(pseudo.masked_fill(~valid, 0), probs.shape[1])
            mask = valid.unsqueeze(1).float()
            l_sam = losses.noise_tolerant_dice(probs * mask, onehot * mask, gamma=self.config.nt_gamma)
            lam = losses.lambda_sam(it, tr.cfg.iterations, self.config.sam_weight)
            total = total + lam * l_sam
            logs.update(loss_sam=float(l_sam.detach()), lambda_sam=lam)
        return total, logs

    def state_dict(self) -> dict:
        partial = None
        if self.partial is not None:
            partial = {**self.partial, "done": {k: None if v is None else [float(x) for x in v]
                                                for k, v in self.partial["done"].items()}}
        return {**super().state_dict(), "rounds_done": self.rounds_done, "partial_round": partial}

    def load_state_dict(self, state: dict, tr) -> None:
        super().load_state_dict(state, tr)
        self.rounds_done = int(state.get("rounds_done", 0))
        self.partial = state.get("partial_round")


def _new_clock() -> dict[str, float]:
    """Seconds per part of a round on this rank: where a round's time goes, in its event."""
    return dict.fromkeys(("teacher", "encode", "decode", "prompts_and_fusion", "save"), 0.0)


def _check_options(cfg: FMABSConfig) -> None:
    """Refuse a bad value at the start of the run, naming the option as the command line spells it."""
    from fmabs_core.errors import InputError
    from fmabs_core.generalist.embcache import DTYPES as STORE_DTYPES, TIERS
    from fmabs_core.generalist.precision import DTYPES
    from fmabs_core.generalist.runtime import RUNTIMES

    choices = {"fusion": (cfg.fusion, FUSIONS), "generalist-dtype": (cfg.generalist_dtype, DTYPES),
               "generalist-runtime": (cfg.generalist_runtime, RUNTIMES),
               "embedding-cache": (cfg.embedding_cache, (*TIERS, "off")),
               "embedding-dtype": (cfg.embedding_dtype, STORE_DTYPES)}
    for flag, (value, allowed) in choices.items():
        if value not in allowed:
            raise InputError(f"--{flag} {value!r}: choose one of {', '.join(allowed)}")
    if cfg.pseudo_source not in PSEUDO_SOURCES:
        raise InputError(f"--pseudo-source {cfg.pseudo_source!r}: choose one of {', '.join(PSEUDO_SOURCES)}")
    if cfg.pseudo_source == "teacher" and cfg.adapter:
        raise InputError("--pseudo-source teacher uses no generalist: drop --adapter, or use --pseudo-source generalist")
    if cfg.adapter_mode not in ADAPTER_MODES:
        raise InputError(f"--adapter-mode {cfg.adapter_mode!r}: choose one of {', '.join(ADAPTER_MODES)}")
    if cfg.adapter_mode == "tiled" and not cfg.adapter:
        raise InputError("--adapter-mode tiled needs --adapter FILE (the model.pt of a sam-lora run)")
    if cfg.embedding_cache_gb is not None and not cfg.embedding_cache_gb > 0:
        raise InputError(f"--embedding-cache-gb must be a positive number of GB (got {cfg.embedding_cache_gb})")


def _load_tiled(adapter: str, tr: TrainContext):
    """The tuned prompt-free generalist of a sam-lora adapter, checked against the project's classes."""
    from fmabs_core.errors import InputError
    from fmabs_core.generalist.tiled import load_tuned

    net = load_tuned(adapter, tr.device)  # digest, base weights' sha256, weights only
    want = tr.project.num_classes + 1
    if net.num_classes != want:
        raise InputError(f"--adapter {adapter}: it segments {net.num_classes - 1} class(es), the project has "
                         f"{want - 1}; use an adapter tuned on this project's classes")
    return net


def fill_unprompted(result: dict, prompt: np.ndarray, fusion: str) -> None:
    """Where slices were skipped to save generalist calls, keep the teacher's own mask there, then re-fuse.

    Leaving skipped foreground slices empty would teach the student that the object stops there; the
    teacher's mask is the best guess we have for them (it is what the generalist would have been shown).
    """
    from fmabs_core.generalist.pseudolabel import fuse

    for view in VIEWS:
        axis = VIEW_AXIS[view]
        other = tuple(a for a in range(3) if a != axis)
        has_fg = np.flatnonzero((prompt > 0).any(axis=other))
        prompted = set(np.asarray(result.slices[view]).tolist()) if hasattr(result, "slices") else set()
        vol = np.moveaxis(result[view], axis, 0)  # a view: writes go through
        src = np.moveaxis(prompt, axis, 0)
        for k in has_fg:
            if int(k) not in prompted:
                vol[k] = src[k]
    result["fused"] = fuse([result[v] for v in VIEWS], fusion)

"""FM-ABS (Xu et al., MICCAI 2024): mean teacher + multi-view generalist pseudo-labels.

Every few hundred iterations the teacher's prediction prompts a frozen SAM-family generalist on
the axial, coronal and sagittal slices of each training scan; the three 3D results are fused
(UA or MV) and the student learns from them with the noise-tolerant Dice, weighted 0.5 x (1 - ramp).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch

from fmabs_core.contract import FUSIONS, UNLABELLED, VIEWS
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
                                           "bfloat16 (faster on CPUs with bf16 units, slightly different labels; "
                                           "see fmabs bench precision)")
    generalist_runtime: str = option("auto", "what runs the encoder: auto (openvino on a CPU when it is installed "
                                             "and the rounds will encode 200 slices or more, else torch), torch, "
                                             "openvino (CPU only, pip install openvino: faster than torch on CPUs, "
                                             "converted once per run; see fmabs bench precision)")
    embedding_cache: str = option("auto", "where slice embeddings are kept between rounds so that each slice is "
                                          "encoded once: auto (by size), device, host, disk (run folder), off")
    embedding_cache_gb: float | None = option(None, "bound of the embedding cache in GB, least recently used "
                                                    "slices evicted (default: half the free memory of its tier)",
                                              above=0)
    embedding_dtype: str = option("auto", "stored embeddings: auto (bf16 if the encoder runs in bf16, else "
                                          "float16), bfloat16, float16, float32")
    fusion: str = option("auto", "how the teacher and the three views' answers become one pseudo-label: auto "
                                 "(each round, the rule below, or the teacher's own mask, that scores best on the "
                                 "expert's drawn slices), mv (2 of 3 views, the paper's), ua (all 3), soft (the "
                                 "teacher's and the views' probabilities averaged, see --teacher-weight), gate (the "
                                 "teacher where it is confident, else mv), staple (SimpleITK's STAPLE over the "
                                 "teacher and the views); docs/pseudo-labels.md")
    fusion_per_scan: bool = option(True, "with --fusion auto: each cross-labelled scan also chooses on its own "
                                         "drawn slices (the same candidates and margin) and keeps its own choice, "
                                         "so a scan where the generalist helps gets it while the others keep the "
                                         "round's rule; docs/pseudo-labels.md")
    teacher_weight: float = option(0.5, "with --fusion soft: the teacher's share of the vote (0: the views alone, 1: "
                                        "the teacher alone)", low=0, high=1)
    gate_confidence: float = option(0.9, "with --fusion gate: the teacher's probability above which its label stands",
                                    low=0.5, high=1)
    sam_weight: float = option(0.5, "weight of the pseudo-label loss at the start (it decays to 0)", low=0)
    nt_gamma: float = option(1.5, "exponent of the noise-tolerant Dice (2 = plain Dice)", above=0)
    pseudo_warmup: float = option(0.06, "fraction of the iterations before the first pseudo-label round", low=0, high=1)
    pseudo_every: float = option(0.06, "fraction of the iterations between rounds", above=0, high=1)
    pseudo_stop: float = option(0.8, "no new round after this fraction of the iterations", low=0, high=1)
    pseudo_max_slices: int | None = option(None, "generalist calls per view and scan (CPU runs; default: all)", low=1)
    pseudo_max_cases: int | None = option(None, "scans pseudo-labelled per round (CPU runs; default: all)", low=1)
    box_jitter: int = option(10, "random enlargement of each box prompt, pixels per side", low=0)
    box_jitter_fraction: float | None = option(None, "random enlargement of each box prompt as a share of its longer "
                                                     "side, instead of --box-jitter pixels (e.g. 0.1)", above=0, high=1)
    n_points: int | None = option(None, "positive points per box (default: the generalist's)", low=0)
    pseudo_source: str = option("generalist", "generalist (FM-ABS), or teacher: an ablation whose pseudo-label is "
                                              "the teacher's own mask (self-training, no generalist), to measure "
                                              "what the generalist adds")
    largest_component: bool = option(True, "keep only the largest connected part of each class of the teacher's "
                                            "mask before it prompts the generalist and becomes a pseudo-label (the "
                                            "in-training teacher's islands of false positives go); false for a "
                                            "class drawn as several separate parts; docs/pseudo-labels.md")
    crosslabel_overrides: bool = option(True, "on a cross-labelled scan's labelled planes the pseudo-label loss "
                                        "uses the expert's label, not the fused pseudo-label")

    def check(self) -> None:
        """Options that are each in range but together mean no pseudo-label round would ever run."""
        from fmabs_core.errors import InputError

        if self.pseudo_warmup > self.pseudo_stop:
            raise InputError(f"--pseudo-warmup {self.pseudo_warmup:g} is after --pseudo-stop {self.pseudo_stop:g}: "
                             "no pseudo-label round would run; give a warm-up below the stop (fractions of the "
                             "iterations)")
        _check_options(self)  # the choices and the adapter, when the options are read (not at the first round)


@register
class FMABS(MeanTeacher):
    """FM-ABS: mean teacher + multi-view SAM-family pseudo-labels with the noise-tolerant Dice."""

    name = "fmabs"
    Config = FMABSConfig

    def setup(self, tr: TrainContext) -> None:
        super().setup(tr)
        cfg = self.config  # checked when the options were read (FMABSConfig.check)
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
        #: per scan of the round: voxels --largest-component removed from the teacher (and the raw teacher's Dice)
        self._cleaned: dict[str, dict] = {}
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

    def _generalist_views(self, tr, it: int, k: int, case, keep_probs: bool):
        """The teacher's (quantised) probabilities and the generalist's three views of one scan, as a round makes
        them; ``k``: the scan's place in the training scans (its generator key: the same in every phase and rank)."""
        from fmabs_core.data.components import keep_largest_probs
        from fmabs_core.generalist.fusion import fill_unprompted, quantise_probs
        from fmabs_core.generalist.pseudolabel import multiview_pseudolabel

        cfg = self.config
        clock = self._clock
        t = time.perf_counter()
        # quantised as they are written (pseudo/<case>_teacher.nii.gz), so `fmabs pseudo-label` replays a round exactly
        teacher = quantise_probs(tr.predict(self.teacher, case.image))
        if cfg.largest_component and self.partial.get("cut", {}).get("apply", True):
            # before it prompts: the generalist is not asked about the teacher's islands
            raw = teacher.argmax(0).astype(np.uint8)
            teacher, removed = keep_largest_probs(teacher)
            self._cleaned[case.id] = _cleaning_scores(case, raw, removed)
        clock["teacher"] += time.perf_counter() - t
        if cfg.pseudo_source == "teacher":
            return teacher, None
        rng = np.random.default_rng(round_seed(tr.cfg.seed, it, k))  # per scan: results do not depend on the ranks
        cache = self._cache
        t = time.perf_counter()
        result = multiview_pseudolabel(
            self.generalist(tr), case.image, teacher.argmax(0).astype(np.uint8), rng, fusion="mv",
            box_jitter=cfg.box_jitter, n_points=cfg.n_points, max_slices_per_view=cfg.pseudo_max_slices, cache=cache,
            scan_id=self._scan_id(case) if cache is not None else None, keep_probs=keep_probs,
            box_jitter_fraction=cfg.box_jitter_fraction)
        if cfg.pseudo_max_slices is not None:
            fill_unprompted(result, teacher)
        clock["encode"] += result.timing["encode"]
        clock["decode"] += result.timing["decode"]
        clock["prompts_and_fusion"] += time.perf_counter() - t - result.timing["encode"] - result.timing["decode"]
        return teacher, result

    def _label_case(self, tr, it: int, k: int, case) -> tuple[np.ndarray, dict | None]:
        """One scan of a round: teacher -> three views -> fused pseudo-label (written to the run folder), and its
        scores: Dice against the scan's label when it has one, counts on the expert's drawn planes when drawn."""
        if self._tuned is not None:
            return self._label_case_tiled(tr, case)
        from fmabs_core.generalist.fusion import combine

        rule = self._round_rule(case.id)
        teacher, result = self._unstash(tr, case) or self._generalist_views(tr, it, k, case, rule.needs_probs)
        prompt = teacher.argmax(0).astype(np.uint8)
        cleaned = self._cleaned.pop(case.id, None)
        if result is None:  # --pseudo-source teacher
            tr.save_pseudolabels(case, {"fused": prompt})
            return prompt, _round_scores(case, prompt, prompt, cleaned)
        t = time.perf_counter()
        result["fused"] = combine({v: result[v] for v in VIEWS}, teacher, rule, result.probs)
        tr.save_pseudolabels(case, result, teacher_probs=teacher)  # each rank writes the scans it labelled
        self._clock["save"] += time.perf_counter() - t
        return result["fused"].astype(np.uint8), _round_scores(case, prompt, result["fused"], cleaned)

    def _round_rule(self, case_id: str | None = None):
        """The fusion of this round: the option's, or the one ``--fusion auto`` chose for it (for ``case_id``: the
        scan's own choice when ``--fusion-per-scan`` made one)."""
        from fmabs_core.generalist.fusion import AUTO_CANDIDATES, FusionRule

        cfg = self.config
        if not cfg_uses_generalist(cfg):  # the ablation: the teacher's own mask
            return AUTO_CANDIDATES["teacher"]
        if cfg.fusion != "auto":
            return FusionRule(cfg.fusion, cfg.teacher_weight, cfg.gate_confidence)
        auto = self.partial["auto"]
        return AUTO_CANDIDATES[auto.get("per_scan", {}).get(case_id, auto["rule"])]

    def _choose_cut(self, tr) -> None:
        """``--largest-component``: this round cuts the teacher to its largest part per class unless, on the drawn
        planes of the cross-labelled training scans pooled, the cut teacher scores below the uncut one (an early
        teacher whose largest part is not all of the object). Islands away from the planes cannot count
        against the cut there, so a tie keeps it. With no drawn planes the option stands."""
        from fmabs_core.data.components import largest_component
        from fmabs_core.generalist.fusion import counts_dice, merge_counts, plane_counts
        from fmabs_core.training import distributed

        drawn = [c for c in tr.train_cases if c.target is not None and (c.target == UNLABELLED).any()]
        mine = []
        for case in distributed.shard(drawn):
            raw = tr.predict(self.teacher, case.image).argmax(0).astype(np.uint8)
            mine.append((plane_counts(raw, case.target), plane_counts(largest_component(raw), case.target)))
        pairs = [p for part in distributed.all_gather_object(mine) for p in part]
        if not pairs:
            self.partial["cut"] = {"apply": True, "scans": 0}
            return
        uncut = counts_dice(merge_counts([p[0] for p in pairs]))
        cut = counts_dice(merge_counts([p[1] for p in pairs]))
        apply = bool(np.isnan(uncut) or np.isnan(cut) or cut >= uncut)
        self.partial["cut"] = {"apply": apply, "scans": len(pairs), "planes_uncut": uncut, "planes_cut": cut}

    def _choose_fusion(self, tr, it: int) -> None:
        """``--fusion auto``: before a round labels its scans, score every candidate rule on the drawn planes of all
        cross-labelled training scans (sharded over the ranks) and keep the best (see fusion.choose_auto)."""
        from fmabs_core.generalist.fusion import choose_auto, plane_sample
        from fmabs_core.training import distributed

        t = time.perf_counter()
        position = {c.id: k for k, c in enumerate(tr.train_cases)}
        drawn = [c for c in tr.train_cases if c.target is not None and (c.target == UNLABELLED).any()]
        in_round = set(self.partial["cases"])
        mine = []
        for case in distributed.shard(drawn):
            teacher, result = self._generalist_views(tr, it, position[case.id], case, keep_probs=True)
            mine.append((case.id, plane_sample(case.target, teacher, {v: result[v] for v in VIEWS}, result.probs)))
            if case.id in in_round:  # labelled again below: keep its answers rather than decode them twice
                self._stash(tr, case, teacher, result)
        pairs = [p for part in distributed.all_gather_object(mine) for p in part]
        if not pairs:
            self.partial["auto"] = {"rule": "mv", "scans": 0, "why": "no drawn planes: the paper's majority vote"}
            return
        per_scan = self.config.fusion_per_scan
        choice = choose_auto([s for _, s in pairs], per_scan=per_scan)
        self.partial["auto"] = {"rule": choice.rule, "scans": len(pairs), "scores": choice.scores,
                                "teacher": choice.scores["teacher"], "chosen": choice.scores[choice.rule],
                                "heldout_gain": choice.heldout_gain, "seconds": time.perf_counter() - t}
        if per_scan:  # the scans whose own planes chose otherwise; what the round's labels score on the planes
            own = {cid: name for (cid, _), name in zip(pairs, choice.per_scan) if name != choice.rule}
            self.partial["auto"].update(per_scan=own, chosen=choice.per_scan_score)

    def _stash(self, tr, case, teacher: np.ndarray, result) -> None:
        """Keep a scan's answers of ``--fusion auto``'s pass for the round (on disk: memory stays one scan's)."""
        from fmabs_core.data.io import atomic_path
        from fmabs_core.generalist.fusion import probs_to_uint8

        arrays = {"teacher": probs_to_uint8(teacher), **{v: result[v] for v in VIEWS}}
        arrays.update({f"p_{v}_{c}": p for v, ps in result.probs.items() for c, p in ps.items()})
        with atomic_path(_stash_dir(tr) / f"{case.id}.npz") as tmp:
            np.savez(tmp, **arrays)

    def _unstash(self, tr, case):
        """``(teacher, result)`` that :meth:`_stash` kept for ``case`` in this round, or None (then recomputed)."""
        from fmabs_core.generalist.fusion import probs_from_uint8
        from fmabs_core.generalist.pseudolabel import PseudoLabels

        path = _stash_dir(tr) / f"{case.id}.npz"
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                result = PseudoLabels({v: z[v] for v in VIEWS})
                result.probs = {v: {} for v in VIEWS}
                for key in z.files:
                    if key.startswith("p_"):
                        _, view, c = key.split("_")
                        result.probs[view][int(c)] = z[key]
                teacher = probs_from_uint8(z["teacher"])
        except (OSError, ValueError, KeyError) as exc:  # torn by a kill: compute it again
            log.warning("%s: unreadable (%s); labelling the scan again", path, exc)
            return None
        return teacher, result

    def _label_case_tiled(self, tr, case) -> tuple[np.ndarray, dict | None]:
        """Prompt-free mode: the tuned generalist's label of the whole scan (tiled sliding windows). The scan and
        the adapter do not change between rounds, so it is computed (and written) once per scan and process."""
        from fmabs_core.contract import GENERALIST_LAYER

        label = self._tiled.get(case.id)
        if label is None:
            label = tr.predict(self._tuned, case.image).argmax(0).astype(np.uint8)
            self._tiled[case.id] = label
            tr.save_pseudolabels(case, {GENERALIST_LAYER: label, "fused": label})
        if case.extra.get("label") is None and case.target is None:
            return label, None
        teacher = tr.predict(self.teacher, case.image).argmax(0).astype(np.uint8)
        return label, _round_scores(case, teacher, label)

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
        self._cleaned = {}
        if self._tuned is None and self.config.largest_component and "cut" not in self.partial:
            self._choose_cut(tr)
        if self._uses_auto() and "auto" not in self.partial:
            self._choose_fusion(tr, it)
        mine: dict[str, tuple[np.ndarray | None, dict | None]] = {}
        position = {c.id: k for k, c in enumerate(tr.train_cases)}
        shard = distributed.shard([(position[c.id], c) for c in cases])
        steps = -(-len(cases) // tr.dist.world_size)  # shares differ by one: every rank checks as often
        for n in tr.progress(range(steps), desc=f"pseudo-labels (round {self.rounds_done + 1})"):
            if n < len(shard):
                i, case = shard[n]
                done = self.partial["done"]
                if case.id in done:  # labelled before a cancel: its fused label is in the run folder (uint8, lossless)
                    label, scores = tr.load_pseudolabel(case), done[case.id]
                else:
                    label, scores = self._label_case(tr, it, i, case)
                    done[case.id] = scores
                # held now (with --scan-store disk: on disk, so a round's labels are never all in memory)
                mine[case.id] = (tr.pseudolabel_to_send(tr.hold_pseudolabel(case, label)), scores)
            # a cancel seen by any rank stops every rank after its current scan (a collective: all ranks call it)
            if n + 1 < steps and distributed.any_true(tr.cancel_requested()):
                self._stop_mid_round(tr, it, len(cases))
                return
        merged = {k: v for part in distributed.all_gather_object(mine) for k, v in part.items()}
        for case in cases:
            case.pseudo = tr.pseudolabel_received(case, merged[case.id][0])
        if tr.dist.rank == 0 and self._tuned is None and cfg_uses_generalist(self.config):
            self._write_round_inputs(tr, it, cases)
        auto, cut = self.partial.get("auto"), self.partial.get("cut")
        if auto is not None and tr.dist.rank == 0:
            shutil.rmtree(_stash_dir(tr), ignore_errors=True)
        self.rounds_done += 1
        self.partial = None
        info = {"round": self.rounds_done, "iteration": it, "cases": len(cases), "seconds": time.time() - start,
                "seconds_by_part": {k: round(v, 3) for k, v in self._clock.items()}}  # this rank's scans
        if resumed:
            info["resumed_after"] = resumed
        info.update(round_summary([v[1] for v in merged.values()]))
        if cut is not None:  # --largest-component: applied this round, and why (the drawn planes, cut and uncut)
            info["teacher_cut"] = cut["apply"]
            if cut.get("scans") and np.isfinite([cut["planes_uncut"], cut["planes_cut"]]).all():  # JSON: no NaN
                info.update(planes_uncut_teacher_dice=round(float(cut["planes_uncut"]), 4),
                            planes_cut_teacher_dice=round(float(cut["planes_cut"]), 4))
        if self._uses_auto():
            info.update(auto_fields(auto))
        elif self._tuned is None and cfg_uses_generalist(self.config):
            info["fusion"] = self.config.fusion
        if info.get("planes_gain") is not None and info["planes_gain"] < -PLANES_WARN:
            info["warning"] = (f"the generalist made the pseudo-labels worse than the teacher on your drawn slices "
                               f"({info['planes_gain']:+.3f} Dice); use --fusion auto (the default), which falls back to the "
                               "teacher's own mask when the generalist does not help")
            log.warning("pseudo-label round %d: %s", self.rounds_done, info["warning"])
        if self._generalist is not None:
            info["generalist"] = self._generalist.precision  # e.g. "fp32 on cpu (openvino)": what ran the encoder
        if self._cache is not None:
            self._cache.flush()
            info["embedding_cache"] = self._cache.stats()
        tr.runlog.event("pseudo_label", **info)
        log.info("pseudo-label round %d: %s", self.rounds_done, info)

    def _uses_auto(self) -> bool:
        """Whether this run's rounds choose their fusion on the drawn planes."""
        return self.config.fusion == "auto" and self._tuned is None and cfg_uses_generalist(self.config)

    def _write_round_inputs(self, tr, it: int, cases: list) -> None:
        """``pseudo/round.json``: what ``fmabs pseudo-label`` needs, beside ``<case>_teacher.nii.gz``, to write a
        scan's label of this round again (its generator key and the round's options)."""
        import json

        from fmabs_core.contract import PSEUDO_DIR
        from fmabs_core.data.io import atomic_write_text

        cfg = self.config
        position = {c.id: k for k, c in enumerate(tr.train_cases)}  # the generator keys _label_case uses
        index = {c.id: position[c.id] for c in cases}
        rule = self._round_rule()
        doc = {"round": self.rounds_done + 1, "iteration": it, "fusion": rule.fusion,
               "teacher_weight": rule.teacher_weight, "gate_confidence": rule.confidence,
               "box_jitter": cfg.box_jitter, "box_jitter_fraction": cfg.box_jitter_fraction, "n_points": cfg.n_points,
               "max_slices": cfg.pseudo_max_slices,
               "generalist": cfg.generalist, "seeds": {cid: round_seed(tr.cfg.seed, it, i) for cid, i in index.items()}}
        if cfg.fusion == "auto":
            doc["auto"] = self.partial["auto"]["rule"]  # the rule chosen on the drawn planes (its options are above)
            # --fusion-per-scan: these scans were fused by their own choice (replay them with these options)
            doc["per_scan"] = {}
            for cid, name in self.partial["auto"].get("per_scan", {}).items():
                if cid in index:
                    own = self._round_rule(cid)
                    doc["per_scan"][cid] = {"auto": name, "fusion": own.fusion, "teacher_weight": own.teacher_weight,
                                            "gate_confidence": own.confidence}
        atomic_write_text(tr.run_dir / PSEUDO_DIR / "round.json", json.dumps(doc, indent=2))

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
            partial = {**self.partial, "done": dict(self.partial["done"])}  # scores: plain floats and lists
        return {**super().state_dict(), "rounds_done": self.rounds_done, "partial_round": partial}

    def load_state_dict(self, state: dict, tr) -> None:
        super().load_state_dict(state, tr)
        self.rounds_done = int(state.get("rounds_done", 0))
        self.partial = state.get("partial_round")
        if self.partial is not None:  # checkpoints of earlier versions kept [teacher Dice, pseudo Dice] per scan
            self.partial["done"] = {k: {"teacher": v[0], "pseudo": v[1]} if isinstance(v, (list, tuple)) else v
                                    for k, v in self.partial["done"].items()}


def _new_clock() -> dict[str, float]:
    """Seconds per part of a round on this rank: where a round's time goes, in its event."""
    return dict.fromkeys(("teacher", "encode", "decode", "prompts_and_fusion", "save"), 0.0)  # auto's pass included


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
    from fmabs_core.generalist.fusion import FusionRule
    from fmabs_core.generalist.prompts import check_jitter_fraction

    FusionRule(cfg.fusion, cfg.teacher_weight, cfg.gate_confidence).check()
    check_jitter_fraction(cfg.box_jitter_fraction)
    if cfg.adapter:  # readable, an adapter, and (tiled) one of a CFR fine-tuning run: before the run is written
        from pathlib import Path

        from fmabs_core.generalist import lora
        from fmabs_core.generalist.tiled import read_adapter_meta

        if cfg.adapter_mode == "tiled":
            read_adapter_meta(cfg.adapter)
        else:
            lora._read_adapter(Path(cfg.adapter))


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


#: a round whose pseudo-labels score this much below the teacher on the drawn planes gets a warning
PLANES_WARN = 0.005


def _stash_dir(tr) -> "Path":
    """Where ``--fusion auto``'s pass keeps the answers of the round's cross-labelled scans until they are fused."""
    from fmabs_core.contract import PSEUDO_DIR

    return tr.run_dir / PSEUDO_DIR / "auto-pass"


def cfg_uses_generalist(cfg: FMABSConfig) -> bool:
    """Whether the rounds prompt the generalist (not the teacher-only ablation)."""
    return cfg.pseudo_source == "generalist"


def round_seed(seed: int, it: int, i: int) -> list[int]:
    """The generator key of scan ``i`` in the round at iteration ``it`` (``fmabs pseudo-label --seed`` takes it)."""
    return [int(seed), int(it), int(i)]


def _cleaning_scores(case, raw: np.ndarray, removed: int) -> dict:
    """What ``--largest-component`` did to a scan's teacher: voxels removed, and the uncleaned teacher's Dice
    against the scan's dense label (evaluation projects), so the event shows the cleaning's own gain."""
    from fmabs_core.inference.metrics import dice_jaccard

    out = {"removed": int(removed)}
    label = case.extra.get("label")
    if label is not None:
        out["teacher_raw"] = float(dice_jaccard(raw, label)[0])
    return out


def _round_scores(case, teacher: np.ndarray, fused: np.ndarray, cleaned: dict | None = None) -> dict | None:
    """A scan's evidence for the round's event: Dice against its dense label (evaluation projects) and the
    overlap counts of the teacher and the fused label with the expert's drawn planes (what the user sees);
    with ``--largest-component``, what the cleaning removed (see :func:`_cleaning_scores`)."""
    from fmabs_core.generalist.fusion import plane_counts
    from fmabs_core.inference.metrics import dice_jaccard

    out: dict = dict(cleaned or {})
    label = case.extra.get("label")
    if label is not None:
        out.update(teacher=float(dice_jaccard(teacher, label)[0]), pseudo=float(dice_jaccard(fused, label)[0]))
        out.setdefault("teacher_raw", out["teacher"])  # resumed mid-round: the cleaning's figure is not kept
    if case.target is not None and (case.target == UNLABELLED).any():  # a cross-label (dense targets: no planes)
        out.update(planes_teacher=plane_counts(teacher, case.target), planes_pseudo=plane_counts(fused, case.target))
    return out or None


def auto_fields(auto: dict) -> dict:
    """The event fields of ``--fusion auto``: the rule chosen, every candidate's pooled Dice on the drawn planes,
    and the teacher's and the chosen rule's (which replace the round's own plane scores: they cover every
    cross-labelled scan, not only this round's), with the held-out estimate of the gain."""
    out = {"fusion": auto["rule"]}
    if not auto.get("scans"):
        out["fusion_note"] = auto.get("why", "")
        return out
    def finite(v: float) -> float | None:  # events are JSON: no NaN
        return None if v is None or np.isnan(v) else float(v)

    out.update(fusion_scores={k: finite(v) and round(v, 4) for k, v in auto["scores"].items()},
               planes_scans=auto["scans"], planes_teacher_dice=finite(auto["teacher"]),
               planes_pseudo_dice=finite(auto["chosen"]), planes_gain=finite(auto["chosen"] - auto["teacher"]),
               planes_gain_heldout=finite(auto["heldout_gain"]))
    if auto.get("per_scan"):  # --fusion-per-scan: the cross-labelled scans fused by their own choice
        out["fusion_per_scan"] = dict(sorted(auto["per_scan"].items()))
    return out


def round_summary(scores: list[dict | None]) -> dict:
    """The round's event fields: mean Dice against the labels, and the pooled Dice on the drawn planes."""
    from fmabs_core.generalist.fusion import counts_dice, merge_counts

    scores = [s for s in scores if s]
    out: dict = {}
    dense = [s for s in scores if "teacher" in s]
    if dense:
        out.update(teacher_dice=float(np.mean([s["teacher"] for s in dense])),
                   pseudo_dice=float(np.mean([s["pseudo"] for s in dense])))
    cleaned = [s for s in scores if "removed" in s]
    if cleaned:  # --largest-component: the teacher above is the cleaned one
        out["teacher_voxels_removed"] = int(sum(s["removed"] for s in cleaned))
        if dense:
            out["teacher_raw_dice"] = float(np.mean([s["teacher_raw"] for s in dense]))
    drawn = [s for s in scores if "planes_teacher" in s]
    if drawn:
        t = counts_dice(merge_counts([s["planes_teacher"] for s in drawn]))
        f = counts_dice(merge_counts([s["planes_pseudo"] for s in drawn]))
        if not (np.isnan(t) or np.isnan(f)):  # NaN: nothing of the classes was drawn
            out.update(planes_scans=len(drawn), planes_teacher_dice=t, planes_pseudo_dice=f, planes_gain=f - t)
    return out

"""Active cross-labelling rounds inside training (``fmabs train --active STRATEGY --budget N``).

- ``prepare`` (before the data is loaded, because training needs one cross-labelled scan): the
  warm-up, 20 % of the budget chosen at random. The simulated expert labels them from the dense
  label at the object's centre (as the reference code does); a human is asked and the run stops.
- ``before_step``: every ``active_every`` iterations a round scores the scans that have no
  cross-label with the in-training model, picks the top K and has them cross-labelled at the slices
  suggested from the *prediction* (a real expert has no ground truth to centre on); the simulated
  expert draws at the ground truth's centre (``expert_slices='truth'``, the reference code) or at
  those suggested slices (``'suggested'``).
- With ``--expert human`` a round checkpoints, records the request and asks the engine to stop with
  the outcome ``waiting_for_labels`` (exit code 3 from ``fmabs train``); re-running the same command
  resumes: a round whose cross-labels now exist continues.

The project's round history (``fmabs.json``) is the record of what was asked; cross-label files on
disk are the record of what was spent, so a crash between the two never overspends the budget.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import numpy as np

from fmabs_core.training import distributed
from fmabs_core.data import io
from fmabs_core.data.crosslabel import make_crosslabel, object_centre_slices
from fmabs_core.training.api import Hook, Outcome
from fmabs_core.errors import InputError
from fmabs_core.contract import EXPERTS, UNLABELLED
from fmabs_core.active import budget as B
from fmabs_core.active.strategies import STRATEGIES, get_strategy
from fmabs_core.active.expert import simulated_crosslabel
from fmabs_core.active.suggest import Selection, describe, format_request, select, slice_point, suggest_slices

if TYPE_CHECKING:
    from fmabs_core.training.api import TrainContext as Trainer

log = logging.getLogger(__name__)
T = TypeVar("T")

def expert_request(project_root: str, run: str, cases: list[dict[str, Any]], missing: list[str]) -> str:
    """What the expert is asked to do, as the run's outcome message."""
    wanted = [c for c in cases if c["case"] in missing]
    return (f"run '{run}' needs cross-labels before it can go on. Label these {len(wanted)} scan(s), one axial, "
            f"one coronal and one sagittal slice each (slice indices on the canonical RAS grid):\n"
            f"{format_request(wanted)}\n"
            f"Save each as {project_root}/crosslabels/<case>.nii.gz ({UNLABELLED} = not labelled), "
            "then re-run the same command: the run resumes where it stopped.")


def _on_main(tr: "Trainer", work: Callable[[], T]) -> T:
    """``work()`` on rank 0 only, its result shared with every rank (a plain call when not distributed).

    Only rank 0 reads and writes the project (cross-labels, fmabs.json, events); scoring on one rank
    keeps the selection identical everywhere. An error on rank 0 is passed on so no rank hangs.
    """
    dist = getattr(tr, "dist", None)
    if dist is None or not dist.enabled:
        return work()
    if dist.is_main:
        try:
            result = work()
        except Exception as exc:
            distributed.broadcast_object(("error", f"{type(exc).__name__}: {exc}"))
            raise
        distributed.broadcast_object(("ok", result))
        return result
    kind, value = distributed.broadcast_object(None)
    if kind == "error":
        raise RuntimeError(f"active learning failed on rank 0: {value}")
    return value


class ActiveLearningHook(Hook):
    """Warm-up and active rounds until the budget (in scans) is spent; state survives resumes."""

    def __init__(self) -> None:
        self.rounds_done = 0  # active rounds finished (cross-labels in the labelled pool)
        self.chosen: list[str] = []  # every scan this run chose, warm-up included
        self.every = 0
        self.pending: dict[str, Any] | None = None  # a round waiting for the human expert
        self._spent = False  # checked once per step otherwise

    # ---- configuration -----------------------------------------------------------------------------
    def _check(self, tr: "Trainer") -> None:
        cfg = tr.cfg
        if cfg.active not in STRATEGIES:
            raise InputError(f"unknown active strategy '{cfg.active}' (choose from {', '.join(sorted(STRATEGIES))})")
        B.check_budget(cfg.budget)
        if cfg.active_k < 1:
            raise InputError(f"active_k must be at least 1 (got {cfg.active_k})")
        if cfg.expert not in EXPERTS:
            raise InputError(f"unknown expert '{cfg.expert}' (choose from {', '.join(EXPERTS)})")
        if tr.method.supervision == "dense":
            raise InputError(f"method '{cfg.method}' trains on dense labels; active cross-labelling needs a "
                             "cross-label method (sup, mt, fmabs).")
        train = tr.project.split("train")
        if cfg.budget > len(train):
            raise InputError(f"--budget {cfg.budget} is more than the {len(train)} training scans of "
                             f"{tr.project.root}")

    def schedule(self, tr: "Trainer") -> int:
        """Iterations between rounds.

        Default: the rounds spread evenly over the first half of training. Not from iteration 0,
        because an untrained model's uncertainty says nothing; not in the second half, because the
        last cross-labels need enough iterations to be learnt from (the reference code's every-200
        of 10 000 iterations finishes even earlier).
        """
        cfg = tr.cfg
        if cfg.active_every is not None:
            if cfg.active_every < 1:
                raise InputError(f"active_every must be at least 1 iteration (got {cfg.active_every})")
            return int(cfg.active_every)
        n = B.active_round_count(cfg.budget, cfg.active_k)
        return max(1, (cfg.iterations // 2) // max(1, n))

    # ---- hook API -------------------------------------------------------------------------------
    def prepare(self, tr: "Trainer") -> None:
        self._check(tr)
        ask = _on_main(tr, lambda: self._warmup(tr))
        if ask is not None:
            self._ask(tr, *ask, iteration=0, checkpoint=False)  # the engine stops before loading the data

    def setup(self, tr: "Trainer") -> None:
        self.every = self.schedule(tr)
        history = _on_main(tr, lambda: B.rounds(tr.project, tr.run_name))
        self.chosen = sorted({c for r in history if r.get("kind") in ("warmup", "active") for c in r["cases"]}
                             | set(self.chosen))
        active = [r for r in history if r.get("kind") == "active"]
        done = sum(1 for r in active if r.get("status") == "labelled")
        if done != self.rounds_done:
            log.info("active rounds: the project records %d finished round(s), the checkpoint %d; using %d",
                     done, self.rounds_done, max(done, self.rounds_done))
        self.rounds_done = max(done, self.rounds_done)
        pending = [r for r in active if r.get("status") == "pending"]
        self.pending = pending[-1] if pending else None
        left = _on_main(tr, lambda: B.budget_state(tr.project, tr.cfg.budget, self._pending_cases()).remaining)
        log.info("active learning (%s, expert %s): a round every %d iterations, K=%d, %d of %d scans left",
                 tr.cfg.active, tr.cfg.expert, self.every, tr.cfg.active_k, left, tr.cfg.budget)

    def before_step(self, tr: "Trainer", it: int) -> None:
        if self.pending is not None and not self._resume_pending(tr, self.pending):
            return
        if self._spent:
            return
        if it == tr.cfg.iterations - 1:
            _on_main(tr, lambda: self._warn_unspent(tr))
        if it < self.every * (self.rounds_done + 1):
            return
        record = _on_main(tr, lambda: self._round(tr, it))
        if record is None:
            log.info("active learning: budget of %d scans spent at iteration %d", tr.cfg.budget, it)
            self._spent = True
            return
        self.chosen = sorted(set(self.chosen) | set(record["cases"]))
        if record["status"] == "pending":
            self.pending = record
            self._ask(tr, record, record["cases"], iteration=it, checkpoint=True)
            return
        tr.refresh_crosslabels(record["cases"])
        self.rounds_done = int(record["round"])
        self._spent = record["spent"] >= tr.cfg.budget

    def state_dict(self) -> dict:
        return {"rounds_done": self.rounds_done, "chosen": list(self.chosen), "every": self.every,
                "pending": self.pending}

    def load_state_dict(self, state: dict) -> None:
        self.rounds_done = int(state.get("rounds_done", 0))
        self.chosen = list(state.get("chosen", []))
        self.pending = state.get("pending")

    # ---- the work (rank 0 only in distributed runs) -------------------------------------------------
    def _warmup(self, tr: "Trainer") -> tuple[dict[str, Any], list[str]] | None:
        """Choose (and with the simulated expert, cross-label) the warm-up scans; returns a request or None."""
        cfg, project = tr.cfg, tr.project
        B.set_budget(project, cfg.budget)
        warm = B.rounds(project, tr.run_name, "warmup")
        if warm:  # done before for this run; a paused warm-up goes on once its labels exist
            record = warm[-1]
            if record.get("status") == "pending":
                missing = self._missing(tr, record)
                if missing:
                    return record, missing
                B.set_round_status(project, tr.run_name, record["round"], record["kind"], "labelled")
                log.info("warm-up: the expert's cross-labels of %s are here", ", ".join(record["cases"]))
            return None
        state = B.budget_state(project, cfg.budget)
        pool = sorted(set(project.split("train")) - set(state.labelled))
        n = max(0, min(B.warmup_count(cfg.budget) - len(state.labelled), len(pool)))
        rng = np.random.default_rng([cfg.seed, 0])
        cases = sorted(rng.choice(pool, size=n, replace=False).tolist()) if n else []
        slices: dict[str, dict] = {}
        for cid in cases:
            if cfg.expert == "simulated":
                dense = self._dense(tr, cid)
                picks = object_centre_slices(dense.array)
                io.save_like(make_crosslabel(dense.array, picks), dense, project.crosslabel_path(cid))
                slices[cid] = {view: slice_point(dense, view, idx) for view, idx in picks.items()}
            else:  # no model yet: the scan's centre
                slices[cid] = suggest_slices(None, project.load_image(cid))
        record = {"run": tr.run_name, "round": 0, "kind": "warmup", "strategy": "random", "iteration": 0,
                  "cases": cases, "scores": {}, "slices": slices, "expert": cfg.expert,
                  "already_labelled": sorted(state.labelled), "budget": cfg.budget,
                  "status": "pending" if cases and cfg.expert == "human" else "labelled"}
        B.record_round(project, record, budget=cfg.budget)
        log.info("active warm-up: %d scan(s) chosen at random (%s), %d already cross-labelled, budget %d",
                 len(cases), ", ".join(cases) or "none", len(state.labelled), cfg.budget)
        return (record, cases) if record["status"] == "pending" else None

    def _round(self, tr: "Trainer", it: int) -> dict[str, Any] | None:
        """Score, choose, suggest slices, record (and simulated: cross-label); None once the budget is spent."""
        cfg, project = tr.cfg, tr.project
        state = B.budget_state(project, cfg.budget, self._pending_cases())
        by_id = {c.id: c for c in tr.train_cases
                 if c.id not in set(state.labelled) and not project.crosslabel_path(c.id).exists()}
        n = min(state.next_round(cfg.active_k), len(by_id))
        if n <= 0:
            return None
        number = self.rounds_done + 1
        model = tr.method.eval_model(tr)
        progress = it / max(1, cfg.iterations)
        strategy = get_strategy(cfg.active, seed=[cfg.seed, number])
        sel: Selection = select(by_id, n, strategy, progress, lambda cid: tr.predict(model, by_id[cid].image),
                                show=tr.progress)
        slices = {}
        for cid in sel.cases:
            probs = sel.probs.get(cid)
            if probs is None:  # strategies that score without a prediction still place slices with one
                probs = tr.predict(model, by_id[cid].image)
            slices[cid] = suggest_slices(probs, project.load_image(cid), "centre")
        human = cfg.expert == "human"
        if not human:
            for cid in sel.cases:
                dense = self._dense(tr, cid)
                cross, picks = simulated_crosslabel(dense.array, {v: s["index"] for v, s in slices[cid].items()},
                                                    cfg.expert_slices)
                io.save_like(cross, dense, project.crosslabel_path(cid))
                slices[cid] = {view: slice_point(dense, view, idx) for view, idx in picks.items()}  # as drawn
        spent = B.budget_state(project, cfg.budget, sel.cases if human else []).spent
        record = {"run": tr.run_name, "round": number, "kind": "active", "strategy": cfg.active, "iteration": it,
                  "progress": progress, "cases": sel.cases, "scores": sel.scores, "slices": slices,
                  "expert": cfg.expert, "budget": cfg.budget, "spent": spent,
                  "status": "pending" if human else "labelled"}
        B.record_round(project, record, budget=cfg.budget)
        tr.runlog.event("suggestion", iteration=it, round=number, strategy=cfg.active, expert=cfg.expert,
                        cases=describe(sel, slices), scores=sel.scores, budget=cfg.budget, spent=spent)
        log.info("active round %d at iteration %d (%s): %s; %d of %d scans spent", number, it, cfg.active,
                 ", ".join(f"{c}={sel.scores[c]:.4f}" for c in sel.cases), spent, cfg.budget)
        return record

    def _resume_pending(self, tr: "Trainer", record: dict[str, Any]) -> bool:
        """A paused round: go on once every requested cross-label exists (True), else ask again (False)."""

        def check() -> list[str]:
            missing = self._missing(tr, record)
            if not missing:
                B.set_round_status(tr.project, tr.run_name, record["round"], record["kind"], "labelled")
                log.info("round %d: the expert's cross-labels of %s are here; going on", record["round"],
                         ", ".join(record["cases"]))
            return missing

        missing = _on_main(tr, check)
        if missing:
            self._ask(tr, record, missing, iteration=int(record.get("iteration", 0)), checkpoint=False)
            return False
        tr.refresh_crosslabels(record["cases"])
        self.rounds_done = max(self.rounds_done, int(record["round"]))
        self.pending = None
        return True

    def _ask(self, tr: "Trainer", record: dict[str, Any], missing: list[str], iteration: int,
             checkpoint: bool) -> None:
        """Stop for the human expert: every rank asks the engine to stop; rank 0 alone writes."""
        cases = [{"case": c, "score": record["scores"].get(c), **record["slices"][c]} for c in record["cases"]]
        if checkpoint:
            tr.checkpoint(iteration)  # resume starts at this iteration, with this round pending
        message = expert_request(str(tr.project.root), tr.run_name, cases, missing)
        tr.request_stop(Outcome.waiting(iteration, message, cases=cases, missing=list(missing)))

    # ---- helpers --------------------------------------------------------------------------------------
    def _warn_unspent(self, tr: "Trainer") -> None:
        left = B.budget_state(tr.project, tr.cfg.budget, self._pending_cases()).remaining
        if left:
            log.warning("active learning: training ends with %d of %d scans of the budget unspent; lower "
                        "active_every (now %d) or raise --iterations", left, tr.cfg.budget, self.every)

    @staticmethod
    def _missing(tr: "Trainer", record: dict[str, Any]) -> list[str]:
        return [c for c in record["cases"] if not tr.project.crosslabel_path(c).exists()]

    def _pending_cases(self) -> list[str]:
        return list(self.pending["cases"]) if self.pending else []

    @staticmethod
    def _dense(tr: "Trainer", cid: str) -> io.Volume:
        if not tr.project.has_label(cid):
            raise InputError(f"{tr.project.label_path(cid)}: no dense label for '{cid}', so the simulated expert "
                             "cannot cross-label it; use --expert human, or import its label.")
        return tr.project.load_label(cid)


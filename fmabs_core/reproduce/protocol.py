"""A reproduction protocol: the data split, the table's settings and rows, and its scales (paper, cpu).

A protocol is a JSON file, shipped in ``protocols/`` or given as a path. It is untrusted input: unknown
keys, wrong types and unusable values are refused naming the file and the key. Every knob a smaller run
turns (scans, resolution, network width, iterations, ...) is a field of a :class:`Scale`, so that a
reduced protocol is a file anyone can read, not code.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from fmabs_core.contract import LABEL_KINDS, STRATEGIES, check_name
from fmabs_core.errors import InputError
from fmabs_core.training.config import from_dict

BLENDS = ("constant", "gaussian")


@dataclass
class Split:
    """How train and test scans are chosen, fixed before any result is seen (written to ``split.json``)."""

    seed: int = 2024
    #: scans of ``--train`` held out as the test set when no ``--test`` folder is given (sorted ids, shuffled
    #: with ``seed``, the first ``test`` taken)
    test: int = 20
    #: training scans held out for validation; the papers train on every training scan and report the
    #: final model, so 0 (no validation, no model selection) is the faithful choice
    val: int = 0


@dataclass
class Setting:
    """A column group of the table: how many training scans are labelled, and how."""

    key: str
    label: str
    labelled: int
    labels: str = "cross"  # cross: three simulated slices per scan (ground-truth centre); dense: whole labels


@dataclass
class Row:
    """One method of the table."""

    key: str
    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)  # the method's options (fmabs methods)
    active: str | None = None  # an active strategy: the labelled scans are chosen during training
    all_labelled: bool = False  # every training scan labelled (the upper bound rows)
    labels: str | None = None  # cross or dense: overrides the setting's (e.g. Sup (dense) in a cross table)
    baseline: bool = False  # a candidate for the best baseline the Wilcoxon tests compare with
    settings: tuple[str, ...] | None = None  # run only in these settings (None: every one)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields for this row (over the scale's)
    paper: dict[str, dict[str, float]] = field(default_factory=dict)  # setting key -> the paper's figures
    #: the key of an earlier CFR row: this row trains nothing and scores that row's tuned generalist (its run's
    #: LoRA adapter, prompt-free on the test scans), e.g. CFR's "fine-tuned SAM alone"
    generalist_of: str | None = None


@dataclass
class Scale:
    """The knobs of one scale; ``paper`` sets the papers' values, ``cpu`` a reduced run on 2 cores."""

    description: str = ""
    n_train: int | None = None  # training scans used (a seeded subset of the training pool); None: all
    n_test: int | None = None  # test scans scored (a seeded subset); None: all
    resample: float = 1.0  # each axis scaled by this factor before training (0.5: half the voxels per axis)
    width: int = 16  # V-Net base filters
    dropout: float = 0.5
    iterations: int | None = None  # None: each method's paper's count
    patch_size: tuple[int, int, int] = (112, 112, 80)
    batch_size: int = 4
    labelled_bs: int = 2
    stride: tuple[int, int, int] | None = None  # sliding-window steps (the references: 18 18 4); None: overlap
    overlap: float = 0.5
    blend: str = "constant"
    labelled: dict[str, int] = field(default_factory=dict)  # setting key -> labelled scans at this scale
    rows: tuple[str, ...] | None = None  # rows run by default at this scale (None: every row)
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> options at this scale
    train: dict[str, Any] = field(default_factory=dict)  # other TrainConfig fields (e.g. active_every)


@dataclass
class Protocol:
    name: str
    paper: str
    description: str
    classes: dict[str, str]
    split: Split
    settings: tuple[Setting, ...]
    rows: tuple[Row, ...]
    scales: dict[str, Scale]
    source: str = field(default="", compare=False)  # where it was read from (not saved)

    # ---- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("source")
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Any, where: str = "protocol") -> "Protocol":
        if not isinstance(data, dict):
            raise InputError(f"{where}: expected a JSON object, found {type(data).__name__}")
        scales = data.get("scales")
        if not isinstance(scales, dict) or not scales:
            raise InputError(f"{where}: key 'scales' must be an object of named scales, e.g. {{\"paper\": {{...}}, "
                             "\"cpu\": {...}}")
        plain = {k: v for k, v in data.items() if k != "scales"}
        proto = from_dict(cls, {**plain, "scales": {}}, where)
        proto.scales = {name: from_dict(Scale, value, f"{where}: scales.{name}") for name, value in scales.items()}
        proto.source = where
        return proto.check()

    # ---- checks -----------------------------------------------------------------------------------
    def check(self) -> "Protocol":
        """Refuse what no reproduction can run, naming the key."""
        w = self.source or self.name

        def safe(value: str, key: str) -> None:
            try:
                check_name(value, key)
            except ValueError as exc:
                raise InputError(f"{w}: {exc}") from None

        safe(self.name, "name")
        if self.split.test < 0 or self.split.val < 0:
            raise InputError(f"{w}: split.test and split.val must not be negative")
        if not self.settings or not self.rows:
            raise InputError(f"{w}: 'settings' and 'rows' must each hold at least one entry")
        keys = [s.key for s in self.settings]
        for s in self.settings:
            safe(s.key, "settings key")
            if s.labels not in LABEL_KINDS or s.labelled < 1:
                raise InputError(f"{w}: setting '{s.key}': labels must be cross or dense and labelled at least 1")
        rows = [r.key for r in self.rows]
        for name, seen in (("settings", keys), ("rows", rows)):
            if len(set(seen)) != len(seen):
                raise InputError(f"{w}: two {name} share a key ({', '.join(sorted({k for k in seen if seen.count(k) > 1}))})")
        for r in self.rows:
            safe(r.key, "rows key")
            if r.active is not None and r.active not in STRATEGIES:
                raise InputError(f"{w}: row '{r.key}': active '{r.active}' (choose from {', '.join(STRATEGIES)})")
            if r.labels is not None and r.labels not in LABEL_KINDS:
                raise InputError(f"{w}: row '{r.key}': labels '{r.labels}' (cross or dense)")
            unknown = set(r.settings or ()) - set(keys) | (set(r.paper) - set(keys))
            if unknown:
                raise InputError(f"{w}: row '{r.key}' names unknown setting(s) {sorted(unknown)} (known: {keys})")
            if r.generalist_of is not None:
                source = next((s for s in self.rows[:self.rows.index(r)] if s.key == r.generalist_of), None)
                if source is None or source.generalist_of is not None or not source.method.startswith("cfr-"):
                    raise InputError(f"{w}: row '{r.key}': generalist_of '{r.generalist_of}' must be the key of an "
                                     "earlier row with a CFR method (cfr-mt, cfr-acmt, cfr-st), whose run holds the "
                                     "tuned generalist")
                if r.method != source.method or (r.settings or None) != (source.settings or None):
                    raise InputError(f"{w}: row '{r.key}': a generalist_of row takes the method and settings of "
                                     f"row '{source.key}' ({source.method})")
        for name, sc in self.scales.items():
            safe(name, "scale name")
            where = f"{w}: scales.{name}"
            if not 0 < sc.resample <= 1:
                raise InputError(f"{where}.resample must be in (0, 1] (got {sc.resample})")
            if sc.blend not in BLENDS:
                raise InputError(f"{where}.blend '{sc.blend}': choose {' or '.join(BLENDS)}")
            if not 0 <= sc.overlap < 1:
                raise InputError(f"{where}.overlap must be in [0, 1) (got {sc.overlap})")
            for key, value in (("n_train", sc.n_train), ("n_test", sc.n_test), ("iterations", sc.iterations)):
                if value is not None and value < 1:
                    raise InputError(f"{where}.{key} must be at least 1 (got {value})")
            bad = (set(sc.labelled) - set(keys)) | (set(sc.rows or ()) - set(rows))
            if bad:
                raise InputError(f"{where}: unknown setting or row key(s) {sorted(bad)}")
        return self

    def with_iterations(self, scale_name: str, iterations: int) -> tuple["Protocol", str]:
        """A copy with one more scale, ``scale_name`` trained for ``iterations``, and that scale's name.

        For a fixed time budget (a GPU machine rented by the hour): the paper's scale with the most iterations
        that fit. The new scale is named (``paper-3000it``) so that its cells, protocol.json and table say so.
        """
        if iterations < 1:
            raise InputError(f"--iterations must be at least 1 (got {iterations})")
        base = self.scale(scale_name)
        name = f"{scale_name}-{iterations}it"
        was = f"{base.iterations}" if base.iterations else "each method's paper's count"
        scale = replace(base, iterations=iterations,
                        description=f"{base.description} -- here with {iterations} iterations (the scale: {was})")
        return replace(self, scales={**self.scales, name: scale}).check(), name

    def scale(self, name: str) -> Scale:
        if name not in self.scales:
            raise InputError(f"--scale {name}: protocol '{self.name}' has the scales {', '.join(self.scales)}")
        return self.scales[name]


def shipped() -> dict[str, str]:
    """Name -> first line of the description of every protocol shipped with the package."""
    out = {}
    for entry in sorted(resources.files(__package__).joinpath("protocols").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            data = json.loads(entry.read_text(encoding="utf-8"))
            out[entry.name[:-5]] = str(data.get("paper", ""))
    return out


def load(name_or_path: str) -> Protocol:
    """A shipped protocol by name (``la-fmabs``), or a protocol file by path."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise InputError(f"{path}: no such protocol file (shipped protocols: {', '.join(shipped())})")
        try:
            text, where = path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError as exc:
            raise InputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the protocol as "
                             "UTF-8 JSON") from None
        except OSError as exc:
            raise InputError(f"{path}: cannot be read ({exc.strerror})") from None
    else:
        names = shipped()
        if name_or_path not in names:
            raise InputError(f"protocol '{name_or_path}': not shipped (choose from {', '.join(names)}) and no such file")
        entry = resources.files(__package__).joinpath("protocols", f"{name_or_path}.json")
        text, where = entry.read_text(encoding="utf-8"), f"protocol {name_or_path} ({entry})"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: not valid JSON ({exc})") from None
    except RecursionError:
        raise InputError(f"{where}: nested too deeply to be a protocol; start from `fmabs reproduce "
                         "la-fmabs --show`") from None
    return Protocol.from_dict(data, where)

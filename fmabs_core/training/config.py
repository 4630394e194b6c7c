"""Run configuration: dataclasses saved as ``config.json`` in every run folder, checked when read back.

A saved configuration is untrusted input (a user may edit it, an older version may have written
it): :func:`from_dict` reports unknown keys and wrong types by name instead of dropping or
crashing on them. The method's own options live in ``method_options`` and are checked by the
method's ``Config`` dataclass (``fmabs_core.methods``).
"""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Mapping, TypeVar

from fmabs_core.errors import InputError

C = TypeVar("C")

#: options a resumed run may change; any other difference from the saved config is refused
MUTABLE_ON_RESUME = ("device", "val_every", "ckpt_every", "keep_last", "max_val_cases", "val_overlap", "scan_store")

#: A method's default number of iterations, as its paper trains it. Where paper and code disagree the paper
#: wins (docs: methods.md): FM-ABS's paper sets t_max = 20 000 (its authors' code runs 10 000), and the rows
#: of its table (sup, sup-dense, mt, ua-mt, cps) are trained under the same protocol; CFR's re-training runs
#: 6000 iterations (paper and code agree). A method not listed here gets ``FALLBACK_ITERATIONS``.
METHOD_ITERATIONS: dict[str, int] = {
    "sup": 20000, "sup-dense": 20000, "mt": 20000, "fmabs": 20000, "ua-mt": 20000, "cps": 20000,
    "cfr-mt": 6000, "cfr-acmt": 6000, "cfr-st": 6000, "sam-lora": 6000,
}
FALLBACK_ITERATIONS = 6000
#: the optimiser settings a run gets when none are given: the engine's SGD for the 3D networks (UA-MT, FM-ABS),
#: and for ``sam-lora`` AdamW at 1e-4 on 2 crops (CFR's authors: 1e-3). On one dense LA training scan and on
#: phantoms, AdamW at 1e-3 (and 3e-4) swung the tuned generalist's head to all background within 40 steps, 1e-4
#: learnt (docs/methods.md, CFR); SGD's 0.01, the default before, collapsed at once.
TRAIN_DEFAULTS: dict[str, Any] = {"lr": 0.01, "batch_size": 4}
METHOD_TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {"sam-lora": {"lr": 1e-4, "batch_size": 2}}
CROP_MODES = ("uniform", "anchored")
#: where training reads the scans from: ``disk`` (preprocessed once into the project's memory-mapped
#: ``preprocessed/`` files, memory bounded by the patch) or ``ram`` (every scan read into memory at start)
SCAN_STORES = ("disk", "ram")
#: the behaviour of runs whose saved config.json predates a key (the paper-faithful defaults came later):
#: such a run resumes with these values, so that a resume never changes what the run does mid-way
LEGACY_DEFAULTS: dict[str, Any] = {"flip_axes": [0, 1, 2], "crop": "anchored", "expert_slices": "suggested"}
#: method options whose default changed in the same commit (such a run's config.json has no "crop")
LEGACY_METHOD_OPTIONS: dict[str, dict[str, Any]] = {"fmabs": {"crosslabel_overrides": False}}
#: method options added later whose default changes what a run does: option -> (the behaviour before it, its
#: default now). A new run's config names the option (so it resumes as it started); a run saved without it
#: resumes with the behaviour before it. The defaults now equal the methods' Config defaults (a test ties them).
ADDED_METHOD_OPTIONS: dict[str, dict[str, tuple[Any, Any]]] = {
    "fmabs": {"largest_component": (False, True), "fusion_per_scan": (False, True)},
    **{m: {"gradient_checkpointing": (False, True)} for m in ("sam-lora", "cfr-mt", "cfr-acmt", "cfr-st")}}
EXPERT_SLICES = ("truth", "suggested")


def default_iterations(method: str) -> int:
    """Iterations a run of ``method`` gets when none are given (see ``METHOD_ITERATIONS``)."""
    return METHOD_ITERATIONS.get(method, FALLBACK_ITERATIONS)


def method_default(method: str, key: str) -> Any:
    """``lr`` or ``batch_size`` of a run of ``method`` when none is given (see ``METHOD_TRAIN_DEFAULTS``)."""
    return METHOD_TRAIN_DEFAULTS.get(method, {}).get(key, TRAIN_DEFAULTS[key])


@dataclass
class NetConfig:
    """Saved with every run so that ``predict`` can rebuild the network."""

    name: str = "vnet"
    in_channels: int = 1
    out_channels: int = 2
    width: int = 16
    #: Dropout3d at the bottleneck and before the head, as in UA-MT, GM-ABS and CFR's V-Net (0.5); the
    #: mean teacher runs its teacher in train mode, so this is also one of its perturbations
    dropout: float = 0.5
    norm: str = "batch"


@dataclass
class TrainConfig:
    method: str = "sup"
    method_options: dict[str, Any] = field(default_factory=dict)  # checked by the method's Config
    iterations: int | None = None  # None: the method's paper's count (default_iterations), set on creation
    seed: int = 1337
    device: str = "auto"
    # data
    patch_size: tuple[int, int, int] = (112, 112, 80)
    batch_size: int | None = None  # None: the method's default (method_default), set on creation
    labelled_bs: int = 2  # of batch_size, from cross-labelled scans (semi-supervised methods)
    augment: bool = True
    #: axes (canonical RAS: 0 = R-L, 1 = A-P, 2 = S-I) a patch may be flipped on; the references flip in-plane
    #: only (UA-MT's RandomRotFlip: rot90 and a flip in the axial plane), never superior-inferior
    flip_axes: tuple[int, ...] = (0, 1)
    #: how labelled crops are placed: ``uniform`` (the references: uniform starts, redrawn until the crop holds
    #: a labelled voxel) or ``anchored`` (on a random labelled voxel: starts pile up at the borders)
    crop: str = "uniform"
    labelled_cases: tuple[str, ...] | None = None  # train on these scans' labels only (None: every labelled scan)
    #: where the scans are read from (SCAN_STORES); the same voxels either way, so a resume may change it
    scan_store: str = "disk"
    # optimiser: SGD with poly decay, as in UA-MT / FM-ABS
    lr: float | None = None  # None: the method's default (method_default), set on creation
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    lr_schedule: str = "poly"  # poly | step (CFR's re-training: x lr_gamma every lr_step iterations)
    lr_step: int = 2500
    lr_gamma: float = 0.1
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    # network
    net: NetConfig = field(default_factory=NetConfig)
    # validation and checkpoints
    val_every: int = 500
    val_overlap: float = 0.25
    max_val_cases: int | None = None
    ckpt_every: int = 500
    keep_last: int = 3
    # active cross-labelling (a hook, whatever the method)
    active: str | None = None
    budget: int | None = None
    active_k: int = 2
    active_every: int | None = None
    expert: str = "simulated"
    #: where the simulated expert draws its three slices: ``truth`` (the ground truth's bounding-box centre, as
    #: the reference code does) or ``suggested`` (the slices suggested from the model's prediction)
    expert_slices: str = "truth"

    def __post_init__(self) -> None:
        if self.iterations is None:
            self.iterations = default_iterations(self.method)
        if self.lr is None:
            self.lr = float(method_default(self.method, "lr"))
        if self.batch_size is None:
            self.batch_size = int(method_default(self.method, "batch_size"))
        added = ADDED_METHOD_OPTIONS.get(self.method, {})
        if added and any(k not in self.method_options for k in added):  # named, so that a resume keeps it
            self.method_options = {**{k: v[1] for k, v in added.items()}, **self.method_options}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: Any, where: str = "config") -> "TrainConfig":
        return from_dict(cls, data, where)

    @classmethod
    def load(cls, path: Path) -> "TrainConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{path}: cannot read the run's configuration ({exc}); "
                             "restore it or start a new --run.") from None
        if isinstance(data, dict):
            # a run saved before a default changed resumes as it started, not with today's default
            options = data.get("method_options")
            if "crop" not in data and isinstance(options, dict):
                legacy = LEGACY_METHOD_OPTIONS.get(str(data.get("method")), {})
                data = {**data, "method_options": {**legacy, **options}}
                options = data["method_options"]
            if isinstance(options, dict):
                before = {k: v[0] for k, v in ADDED_METHOD_OPTIONS.get(str(data.get("method")), {}).items()}
                data = {**data, "method_options": {**before, **options}}
            data = {**{k: v for k, v in LEGACY_DEFAULTS.items() if k not in data}, **data}
        return from_dict(cls, data, str(path))

    def check(self) -> "TrainConfig":
        """Refuse values no run can use, naming the option (the command line's spelling)."""
        positive = {"iterations": self.iterations, "batch-size": self.batch_size, "val-every": self.val_every,
                    "ckpt-every": self.ckpt_every, "keep-last": self.keep_last, "width": self.net.width}
        for option, value in positive.items():
            if value < 1:
                raise InputError(f"--{option} must be at least 1 (got {value})")
        if not 0 <= self.seed < 2**32:
            raise InputError(f"--seed must be between 0 and 2^32 - 1 (got {self.seed})")
        if not 0 <= self.labelled_bs <= self.batch_size:
            raise InputError(f"--labelled-batch-size must be between 0 and --batch-size {self.batch_size} "
                             f"(got {self.labelled_bs})")
        if any(p < 1 for p in self.patch_size):
            raise InputError(f"--patch-size must be positive (got {' '.join(map(str, self.patch_size))})")
        if self.lr_schedule not in ("poly", "step"):
            raise InputError(f"lr_schedule '{self.lr_schedule}': choose poly or step")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"--lr must be a positive number (got {self.lr})")
        if not 0 <= self.net.dropout < 1:
            raise InputError(f"--dropout must be in [0, 1) (got {self.net.dropout})")
        if self.crop not in CROP_MODES:
            raise InputError(f"crop '{self.crop}': choose {' or '.join(CROP_MODES)}")
        if self.scan_store not in SCAN_STORES:
            raise InputError(f"scan_store '{self.scan_store}': choose {' or '.join(SCAN_STORES)}")
        if not self.flip_axes == tuple(sorted(set(self.flip_axes))) or not set(self.flip_axes) <= {0, 1, 2}:
            raise InputError(f"flip_axes {list(self.flip_axes)}: give distinct axes among 0, 1, 2 in increasing order")
        if self.expert_slices not in EXPERT_SLICES:
            raise InputError(f"expert_slices '{self.expert_slices}': choose {' or '.join(EXPERT_SLICES)}")
        if not 0 <= self.val_overlap < 1:
            raise InputError(f"--val-overlap must be in [0, 1) (got {self.val_overlap})")
        if self.max_val_cases is not None and self.max_val_cases < 0:
            raise InputError(f"--max-val-cases must not be negative (got {self.max_val_cases})")
        return self

    def differences(self, other: "TrainConfig") -> dict[str, tuple[Any, Any]]:
        """``{dotted key: (mine, other's)}`` for every value that differs."""
        return _diff(asdict(self), asdict(other))


def _diff(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    out: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, Mapping) and isinstance(y, Mapping):
            out.update(_diff(x, y, f"{prefix}{key}."))
        elif _norm(x) != _norm(y):
            out[f"{prefix}{key}"] = (x, y)
    return out


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def from_dict(cls: type[C], data: Any, where: str = "config") -> C:
    """``cls(**data)`` for a dataclass, refusing unknown keys and values of the wrong type by name."""
    if not isinstance(data, Mapping):
        raise InputError(f"{where}: expected a JSON object, found {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise InputError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} for {cls.__name__} "
                         f"(known: {', '.join(known)})")
    hints = typing.get_type_hints(cls)
    values = {name: _coerce(hints[name], value, f"{where}: '{name}'") for name, value in data.items()}
    return cls(**values)


def _coerce(tp: Any, value: Any, what: str) -> Any:
    """``value`` as type ``tp`` (the JSON forms of the types dataclass configs use), else InputError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, what)
            except InputError as exc:
                errors.append(str(exc))
        raise InputError(errors[0] if errors else f"{what}: must not be null")
    if is_dataclass(tp):
        return from_dict(tp, value, what)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or (args and args[-1] is not Ellipsis and len(value) != len(args)):
            raise InputError(f"{what}: expected a list of {len(args)} values, found {value!r}")
        item_types = args if args and args[-1] is not Ellipsis else [args[0] if args else Any] * len(value)
        return tuple(_coerce(t, v, what) for t, v in zip(item_types, value))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise InputError(f"{what}: expected an object, found {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise InputError(f"{what}: expected true or false, found {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise InputError(f"{what}: expected an integer, found {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"{what}: expected a finite number, found {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise InputError(f"{what}: expected a string, found {value!r}")
        return value
    return value

"""Run configuration: one dataclass, saved as ``config.json`` in every run folder."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path



METHOD_NAMES = ("sup", "sup-dense", "mt", "fmabs")  # kept here so the CLI can list them without torch


@dataclass
class NetConfig:
    """Saved with every run so that ``predict`` can rebuild the network."""

    name: str = "vnet"
    in_channels: int = 1
    out_channels: int = 2
    width: int = 16
    dropout: float = 0.0
    norm: str = "batch"


@dataclass
class TrainConfig:
    method: str = "sup"
    iterations: int = 6000
    seed: int = 1337
    device: str = "auto"
    # data
    patch_size: tuple[int, int, int] = (112, 112, 80)
    batch_size: int = 4
    labelled_bs: int = 2  # of batch_size, from cross-labelled scans (semi-supervised methods)
    augment: bool = True
    # optimiser: SGD with poly decay, as in UA-MT / FM-ABS
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    # network
    net: NetConfig = field(default_factory=NetConfig)
    # validation and checkpoints
    val_every: int = 500
    val_overlap: float = 0.25
    max_val_cases: int | None = None
    ckpt_every: int = 500
    keep_last: int = 3
    # mean teacher (mt, fmabs)
    ema: float = 0.99
    consistency: float = 0.1  # lambda_c scale
    noise_std: float = 0.1
    noise_clip: float = 0.2
    log_gamma: float = 0.3  # contrast perturbation: gamma = exp(U(-log_gamma, log_gamma))
    # FM-ABS generalist pseudo-labels
    generalist: str = "litemedsam"
    generalist_checkpoint: str | None = None
    fusion: str = "mv"  # mv | ua
    sam_weight: float = 0.5  # lambda_sam scale
    nt_gamma: float = 1.5  # noise-tolerant Dice exponent
    pseudo_warmup: float = 0.06  # fraction of iterations before the first pseudo-label round
    pseudo_every: float = 0.06  # fraction of iterations between rounds
    pseudo_stop: float = 0.8  # no new round after this fraction
    pseudo_max_slices: int | None = None  # per view and scan; None = every slice with foreground
    pseudo_max_cases: int | None = None  # scans pseudo-labelled per round (None = all training scans)
    box_jitter: int = 10
    n_points: int | None = None  # positive points per box; None: the generalist's default
    # active cross-labelling
    active: str | None = None
    budget: int | None = None
    active_k: int = 2
    active_every: int | None = None
    expert: str = "simulated"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        if "net" in data and isinstance(data["net"], dict):
            data["net"] = NetConfig(**data["net"])
        if "patch_size" in data:
            data["patch_size"] = tuple(data["patch_size"])
        return cls(**data)

    @classmethod
    def load(cls, path: Path) -> "TrainConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

"""Run configuration: dataclasses, JSON files, ``KEY=VALUE`` overrides and validation.

Precedence: defaults < ``--config FILE`` (JSON, nested like :meth:`Config.to_dict`) <
command-line flags < ``--set section.key=value``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

from tmt_train.models import ModelConfig

METHODS = ("source_only", "finetune", "tmt", "dacs", "mrm", "tmt_mrm")
# methods that adapt with an unlabeled target domain (DACS self-training)
UDA_METHODS = ("dacs", "mrm", "tmt_mrm")
# methods with MRM's Rebuilder / with ACTE + TMA
MRM_METHODS = ("mrm", "tmt_mrm")
TMT_METHODS = ("tmt", "tmt_mrm")
# the ratio of MRM's Rebuilder learning rate (2e-4) to DAFormer's base learning rate (6e-5)
REBUILDER_LR_RATIO = 2e-4 / 6e-5
INTERNAL_METHODS = METHODS + ("pretrain",)
REAL_DATASETS = ("cityscapes", "gta5", "synthia", "acdc", "darkzurich")
DATASETS = ("materials",) + REAL_DATASETS
# Folder names the UDA community uses under a common data root (DAFormer/MIC layouts).
DATA_DIRS = {"cityscapes": ("cityscapes",), "gta5": ("gta", "gta5", "GTA5"),
             "synthia": ("synthia", "SYNTHIA", "RAND_CITYSCAPES"),
             "acdc": ("acdc", "ACDC"), "darkzurich": ("dark_zurich", "darkzurich", "DarkZurich")}
ALIASES = {"gta": "gta5", "dark_zurich": "darkzurich", "dark-zurich": "darkzurich"}


class ConfigError(ValueError):
    """A configuration or command-line value is not usable (message is one clear line)."""


@dataclass
class DataConfig:
    """Data sets. ``dataset="materials"`` is the embedded two-domain benchmark; a real pair is
    ``source``/``target`` names with ``data_root`` (the folder holding e.g. ``gta/`` and
    ``cityscapes/``) or explicit ``source_root``/``target_root``."""

    dataset: str = "materials"
    source: Optional[str] = None
    target: Optional[str] = None
    data_root: Optional[str] = None
    source_root: Optional[str] = None
    target_root: Optional[str] = None
    image_size: int = 128                 # materials: generated image size
    num_classes: Optional[int] = None     # real data: class protocol (19 / 16 / 13)
    target_labels: float = 0.1            # labeled fraction of the target train split
    batch_size: int = 4                   # images per domain per step and process
    eval_batch_size: int = 8
    num_workers: int = 0
    source_options: Dict[str, Any] = field(default_factory=dict)   # extra build_dataset options
    target_options: Dict[str, Any] = field(default_factory=dict)
    eval_options: Dict[str, Any] = field(default_factory=dict)
    source_eval_split: Optional[str] = "test"   # None: no source evaluation
    target_eval_split: str = "test"
    max_eval_images: int = 0              # 0 = the whole split


@dataclass
class TMTConfig:
    """ACTE + TMA (used by ``method="tmt"``)."""

    tma_blocks: int = 2
    partition: str = "kmeans"
    num_regions: int = 16
    gamma: float = 1.0
    kmeans_iters: int = 10
    cell: int = 4
    lsc_iters: int = 3
    kappa: float = 10.0
    restrict: Optional[str] = None
    neighbors: int = 4
    lambda_init: float = 0.1
    # λ's learning rate is optim.lr × this: λ = softplus(θ) moves at most ~lr per step under
    # AdamW, so at short schedules it stays at lambda_init unless its rate is raised
    lambda_lr_mult: float = 1.0
    disc_hidden: int = 256
    grl_coeff: float = 1.0
    beta: float = 0.1
    use_uncertainty: bool = True


@dataclass
class UDATrainConfig:
    """DACS self-training and MRM (``method`` = ``dacs`` / ``mrm`` / ``tmt_mrm``).

    The Rebuilder's size: ``rebuilder_size="auto"`` is ``"tiny"`` for the ``tiny`` preset
    (``E = 128``, 4 heads, grid = the deepest decoder input's size, sized for CPU training)
    and ``"paper"`` otherwise (``E = 512``, 16 heads, grid 16); ``rebuilder_dim`` /
    ``rebuilder_heads`` / ``rebuilder_grid`` override single values. ``rebuilder_lr`` (None:
    ``optim.lr × 2e-4 / 6e-5``, the paper's Rebuilder / encoder learning-rate ratio, i.e.
    2e-4 at DAFormer's base lr 6e-5) is the Rebuilder's own parameter group.
    """

    alpha: float = 0.999                 # EMA teacher momentum
    pseudo_threshold: float = 0.968      # confidence-weight threshold
    jitter_strength: float = 0.2         # ClassMix strong augmentation (DACS)
    jitter_p: float = 0.2
    blur: bool = True
    avg_non_ignore: bool = False         # CE mean over all pixels (mmseg's default) or labeled
    mrm_weight: float = 1.0              # MRM's λ
    mask_ratio: float = 0.4
    rebuilder_size: str = "auto"         # auto / tiny / paper
    rebuilder_dim: Optional[int] = None
    rebuilder_heads: Optional[int] = None
    rebuilder_depth: int = 2
    rebuilder_grid: Optional[int] = None
    rebuilder_lr: Optional[float] = None

    def rebuilder_shape(self, preset: str) -> Dict[str, Optional[int]]:
        """``embed_dim``, ``num_heads``, ``depth`` and ``grid`` (None: the deepest stage's size)."""
        size = self.rebuilder_size
        if size == "auto":
            size = "tiny" if preset == "tiny" else "paper"
        base = {"tiny": dict(embed_dim=128, num_heads=4, grid=None),
                "paper": dict(embed_dim=512, num_heads=16, grid=16)}[size]
        return {"embed_dim": self.rebuilder_dim or base["embed_dim"],
                "num_heads": self.rebuilder_heads or base["num_heads"],
                "depth": self.rebuilder_depth,
                "grid": self.rebuilder_grid if self.rebuilder_grid else base["grid"]}

    def rebuilder_learning_rate(self, base_lr: float) -> float:
        return float(self.rebuilder_lr) if self.rebuilder_lr else base_lr * REBUILDER_LR_RATIO


@dataclass
class OptimConfig:
    """AdamW with linear warmup then ``poly`` / ``cosine`` / ``constant`` decay."""

    lr: float = 5e-4
    weight_decay: float = 0.01
    betas: Tuple[float, float] = (0.9, 0.999)
    schedule: str = "poly"
    poly_power: float = 1.0
    warmup_steps: int = -1               # -1: min(steps // 10, 1500)
    warmup_start: float = 1e-3           # lr factor at step 0
    min_lr_ratio: float = 0.0
    head_lr_mult: float = 1.0            # decoder / discriminator learning-rate factor
    grad_clip: float = 0.0               # 0: off


@dataclass
class TrainConfig:
    method: str = "finetune"
    steps: int = 1000
    pretrain_steps: Optional[int] = None  # source pre-training; None: same as steps
    seed: int = 0
    out: str = "runs/default"
    cache_dir: Optional[str] = None       # pre-training cache; None: <parent of out>/pretrain
    # start from these weights (a whole segmentation model, e.g. another run's
    # model.safetensors) instead of the cached source pre-training
    init_from: Optional[str] = None
    device: str = "auto"
    precision: str = "fp32"               # or "bf16" (autocast)
    eval_every: int = 0                   # 0: evaluate at the end only
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    figures: bool = True
    figure_images: int = 3
    eval_mode: str = "whole"              # or "slide" (sliding window)
    eval_crop: int = 512
    eval_stride: int = 341
    progress: bool = True


SECTIONS = {"model": ModelConfig, "data": DataConfig, "tmt": TMTConfig, "uda": UDATrainConfig,
            "optim": OptimConfig, "train": TrainConfig}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tmt: TMTConfig = field(default_factory=TMTConfig)
    uda: UDATrainConfig = field(default_factory=UDATrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping) -> "Config":
        return merge(cls(), data)

    def copy(self) -> "Config":
        return copy.deepcopy(self)


def _coerce(section: str, name: str, current: Any, value: Any, ftype: Any) -> Any:
    text = str(ftype)
    if isinstance(value, list) and ("Tuple" in text or "tuple" in text):
        return tuple(value)
    if isinstance(current, bool) and not isinstance(value, bool):
        raise ConfigError(f"{section}.{name} must be true or false, got {value!r}")
    if isinstance(current, int) and not isinstance(current, bool) and isinstance(value, float) \
            and value.is_integer():
        return int(value)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def merge(cfg: Config, data: Mapping) -> Config:
    """A copy of ``cfg`` with the nested values of ``data`` applied (unknown keys raise)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"a config must be a JSON object, got {type(data).__name__}")
    cfg = copy.deepcopy(cfg)
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section {section!r}; known: {', '.join(SECTIONS)}")
        if not isinstance(values, Mapping):
            raise ConfigError(f"config section {section!r} must be an object")
        target = getattr(cfg, section)
        ftypes = {f.name: f.type for f in dataclasses.fields(target)}
        for name, value in values.items():
            if name not in ftypes:
                raise ConfigError(f"unknown config key {section}.{name}; known: "
                                  f"{', '.join(ftypes)}")
            current = getattr(target, name)
            setattr(target, name, _coerce(section, name, current, value, ftypes[name]))
    return cfg


def load_config_file(path: str, base: Optional[Config] = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
    return merge(base or Config(), data)


def apply_overrides(cfg: Config, assignments) -> Config:
    """Apply ``section.key=value`` strings (values parsed as JSON, else taken as strings)."""
    for item in assignments or ():
        key, sep, text = item.partition("=")
        if not sep or key.count(".") != 1:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        section, name = key.split(".")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        cfg = merge(cfg, {section: {name: value}})
    return cfg


def canonical_dataset(name: str) -> str:
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return key


def resolve_data_root(cfg: DataConfig, name: str, which: str) -> str:
    """The root folder of real data set ``name`` (``which`` = source/target)."""
    explicit = cfg.source_root if which == "source" else cfg.target_root
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            raise ConfigError(f"--{which}-root: directory not found: {path}")
        return str(path)
    base = cfg.data_root or os.environ.get("TMT_DATA")
    if not base:
        raise ConfigError(f"dataset {name!r} needs --data-root DIR (the folder holding "
                          f"{DATA_DIRS[name][0]}/), or TMT_DATA; nothing is downloaded")
    base = Path(base).expanduser()
    if not base.is_dir():
        raise ConfigError(f"--data-root: directory not found: {base}")
    for sub in DATA_DIRS[name]:
        if (base / sub).is_dir():
            return str(base / sub)
    raise ConfigError(f"no {name} data under {base} (looked for "
                      f"{', '.join(s + '/' for s in DATA_DIRS[name])})")


def validate(cfg: Config, *, check_paths: bool = True) -> Config:
    """Raise :class:`ConfigError` (one line) for an unusable configuration."""
    t, d, o, m = cfg.train, cfg.data, cfg.optim, cfg.tmt
    if t.method not in INTERNAL_METHODS:
        raise ConfigError(f"unknown method {t.method!r}; choose from {', '.join(METHODS)}")
    for name in ("steps",):
        value = getattr(t, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"--steps must be a positive integer, got {value!r}")
    if t.pretrain_steps is not None and (not isinstance(t.pretrain_steps, int)
                                         or t.pretrain_steps <= 0):
        raise ConfigError(f"--pretrain-steps must be a positive integer, got {t.pretrain_steps!r}")
    if not 0.0 < float(d.target_labels) <= 1.0:
        raise ConfigError(f"--target-labels must be a fraction in (0, 1], got {d.target_labels!r}")
    for name in ("batch_size", "eval_batch_size"):
        if not isinstance(getattr(d, name), int) or getattr(d, name) < 1:
            raise ConfigError(f"data.{name} must be a positive integer")
    if t.ckpt_every < 1:
        raise ConfigError(f"train.ckpt_every must be >= 1, got {t.ckpt_every}")
    if t.eval_every < 0:
        raise ConfigError(f"train.eval_every must be >= 0, got {t.eval_every}")
    if t.device not in ("auto", "cpu", "cuda") and not str(t.device).startswith("cuda:"):
        raise ConfigError(f"--device must be cpu, cuda or auto, got {t.device!r}")
    if t.precision not in ("fp32", "bf16"):
        raise ConfigError(f"train.precision must be fp32 or bf16, got {t.precision!r}")
    if t.eval_mode not in ("whole", "slide"):
        raise ConfigError(f"train.eval_mode must be whole or slide, got {t.eval_mode!r}")
    if o.schedule not in ("poly", "cosine", "constant"):
        raise ConfigError(f"optim.schedule must be poly, cosine or constant, got {o.schedule!r}")
    if not o.lr > 0:
        raise ConfigError(f"--lr must be positive, got {o.lr!r}")
    if m.partition not in ("kmeans", "local"):
        raise ConfigError(f"tmt.partition must be kmeans or local, got {m.partition!r}")
    if check_paths and t.init_from is not None and not os.path.isfile(t.init_from):
        raise ConfigError(f"train.init_from: no weights file at {t.init_from}")
    if not float(m.lambda_lr_mult) >= 0:
        raise ConfigError(f"tmt.lambda_lr_mult must be >= 0, got {m.lambda_lr_mult!r}")
    if m.restrict not in (None, "none", "neighbors"):
        raise ConfigError(f"tmt.restrict must be none or neighbors, got {m.restrict!r}")
    if t.method in TMT_METHODS and not 1 <= m.tma_blocks:
        raise ConfigError(f"tmt.tma_blocks must be >= 1 for method {t.method}, got "
                          f"{m.tma_blocks}")
    try:
        cfg.model.check()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if t.method in TMT_METHODS and not cfg.model.is_vit:
        raise ConfigError(f"method {t.method} needs the ViT backbone (TMA lives in its "
                          f"blocks), got model.backbone={cfg.model.backbone!r}")
    u = cfg.uda
    if u.rebuilder_size not in ("auto", "tiny", "paper"):
        raise ConfigError(f"uda.rebuilder_size must be auto, tiny or paper, got "
                          f"{u.rebuilder_size!r}")
    if not 0.0 <= float(u.mask_ratio) < 1.0:
        raise ConfigError(f"uda.mask_ratio must lie in [0, 1), got {u.mask_ratio!r}")
    if not 0.0 <= float(u.alpha) <= 1.0:
        raise ConfigError(f"uda.alpha must lie in [0, 1], got {u.alpha!r}")
    if not 0.0 <= float(u.pseudo_threshold) <= 1.0:
        raise ConfigError(f"uda.pseudo_threshold must lie in [0, 1], got {u.pseudo_threshold!r}")
    if u.rebuilder_lr is not None and not float(u.rebuilder_lr) > 0:
        raise ConfigError(f"uda.rebuilder_lr must be positive, got {u.rebuilder_lr!r}")
    if d.source or d.target:
        if not (d.source and d.target):
            raise ConfigError("a real domain pair needs both --source and --target")
        d.source, d.target = canonical_dataset(d.source), canonical_dataset(d.target)
        for which, name in (("source", d.source), ("target", d.target)):
            if name == "materials":
                raise ConfigError(f"--{which} materials: use --dataset materials instead")
            if check_paths:
                resolve_data_root(d, name, which)
        d.dataset = f"{d.source}->{d.target}"
    else:
        d.dataset = canonical_dataset(d.dataset)
        if d.dataset != "materials":
            raise ConfigError(f"--dataset {d.dataset} is a single domain; give a pair with "
                              f"--source NAME --target NAME --data-root DIR")
    return cfg


def pretrain_key(cfg: Config) -> str:
    """Hash of everything that determines the source pre-training (shared by methods)."""
    model = cfg.model.to_dict()
    model["tma_blocks"] = 0
    d = cfg.data
    data = {"dataset": d.dataset, "source": d.source, "image_size": d.image_size,
            "num_classes": d.num_classes, "batch_size": d.batch_size,
            "source_options": d.source_options,
            "source_root": None if d.dataset == "materials" else
            (d.source_root or str(d.data_root))}
    payload = {"model": model, "data": data, "optim": dataclasses.asdict(cfg.optim),
               "steps": cfg.train.pretrain_steps or cfg.train.steps, "seed": cfg.train.seed,
               "precision": cfg.train.precision, "format": 1}
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]

"""Training engine: source pre-training, vanilla fine-tuning, TMT, DACS and MRM.

Protocol:

1. **Pre-training** (cached): the segmentor is trained on the labeled source domain only.
   The result lives under ``<cache_dir>/<dataset>-<hash>/model.safetensors``, keyed by
   everything that determines it (model, source data, optimizer, steps, seed), so all
   methods with the same seed and model start from the same weights (the UDA methods
   included) and it is computed once.
2. Each method starts from it and trains ``steps`` more steps:

   * ``source_only``: source batches only (the no-adaptation baseline with equal compute);
   * ``finetune``: source batch + labeled target batch, ``CE_src + CE_tgt`` (vanilla
     fine-tuning; a fraction ``target_labels`` of the target train split is labeled);
   * ``tmt``: the same plus ACTE and TMA in the last ``tma_blocks`` blocks, loss
     ``CE_src + CE_tgt + β·L_dom``;
   * ``dacs`` (unsupervised: the target train split is used *unlabeled*, its labels are
     never read): an EMA teacher (α = 0.999, updated before each step, a plain copy at the
     first) predicts target pseudo-labels, weighted per image by the fraction of pixels
     with confidence > 0.968; ClassMix pastes half of each source image's classes onto the
     target image, then colour jitter and Gaussian blur; loss ``CE_src + CE_mix`` (the
     mixed image's CE weighted 1 on source pixels, the confidence weight elsewhere);
   * ``mrm``: ``dacs`` + MRM: the Rebuilder masks the deepest decoder input of the
     (unmixed) target images in latent space and rebuilds every decoder input; the shared
     decoder's CE on the rebuilt features against the same pseudo-labels and weight, ×λ = 1.
     The Rebuilder has its own parameter group (``uda.rebuilder_lr``);
   * ``tmt_mrm``: ``mrm`` with ACTE + TMA in the student: every student pass (source,
     mixed, target) runs TMA with ACTE's regions; the discriminator sees source regions
     (source pass) vs target regions (the unmixed target pass of the MRM loss); ``u_r``
     comes from the student's own vanilla-head posteriors, as in ``tmt``. The teacher (an
     EMA of the student) predicts with TMA off, like the inference model. Loss
     ``CE_src + CE_mix + λ·L_mrm + β·L_dom``.

ACTE's uncertainty needs class posteriors before the TMA blocks have run: they come from a
no-grad pass of the vanilla head (TMA off, dropout off) on the same intermediate tokens,
which costs the last ``tma_blocks`` blocks and the decoder once more, without gradients.

The UDA losses are summed and back-propagated once (one DDP forward per step); DAFormer
back-propagates each loss on its own to save memory, which gives the same gradients
(``tmt_train.uda.uda_step`` is that form; a test checks that both agree). Randomness of the
UDA step (ClassMix classes, augmentation, Rebuilder masks) comes from a per-rank generator
whose state is checkpointed with the teacher, so ``--resume`` stays bit-for-bit.

Evaluation always runs the inference model (the student): TMA off (no region partition,
no discriminator), no Rebuilder, no teacher, which is what
:func:`tmt_train.engine.export.export_model` writes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from tmt_train.models import ModelConfig, Segmentor, build_model, eval_mode, load_weights
from tmt_train.models.rebuilder import Rebuilder
from tmt_train.uda import (EMATeacher, UDAConfig, classmix, pseudo_label, strong_augment,
                           weighted_cross_entropy)

from . import checkpoint as ckpt
from . import datasets as data
from . import distributed as distr
from .config import (MRM_METHODS, TMT_METHODS, UDA_METHODS, Config, ConfigError, pretrain_key,
                     validate)

IGNORE_INDEX = 255
# training statistics averaged between evaluations (the UDA ones are 0 for other methods)
LOSS_KEYS = ["loss", "ce_src", "ce_tgt", "loss_dom", "loss_mix", "loss_mrm", "pseudo_weight"]
LOG_FIELDS = ["step", "lr"] + LOSS_KEYS + ["lambda_mean", "target_miou", "source_miou",
                                           "target_acc", "source_acc", "elapsed_s"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labeled pixels; 0 (not NaN) when every pixel is ignored."""
    total = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp_min(1)


class TrainModule(nn.Module):
    """Segmentor (+ ACTE for TMT, + MRM's Rebuilder) with the training loss in ``forward``
    (one DDP unit).

    ``forward(src_img, src_lbl)``: source CE; ``forward(src_img, src_lbl, tgt_img, tgt_lbl)``:
    labeled fine-tuning (+ TMT); ``forward(src_img, src_lbl, uda=batch)`` with a batch from
    :func:`prepare_uda_batch`: the DACS / MRM loss. Returns ``(loss, stats)``.
    """

    def __init__(self, model: Segmentor, acte: Optional[nn.Module] = None, beta: float = 0.1,
                 use_uncertainty: bool = True, rebuilder: Optional[nn.Module] = None,
                 uda: Optional[UDAConfig] = None):
        super().__init__()
        self.model = model
        self.acte = acte
        self.rebuilder = rebuilder
        self.beta = beta
        self.use_uncertainty = use_uncertainty
        self.uda = uda or UDAConfig(ignore_index=IGNORE_INDEX)

    def _stats(self, zero, **values):
        stats = {k: zero for k in LOSS_KEYS[1:]}
        stats.update({k: v.detach() for k, v in values.items()})
        return stats

    def forward(self, src_img, src_lbl, tgt_img=None, tgt_lbl=None, uda: Optional[dict] = None):
        zero = src_img.new_zeros((), dtype=torch.float32)
        if uda is not None:
            return self._uda_forward(src_img, src_lbl, **uda)
        if tgt_img is None:
            ce_src = masked_cross_entropy(self.model(src_img), src_lbl)
            return ce_src, self._stats(zero, ce_src=ce_src)
        Bs = src_img.shape[0]
        same_size = src_img.shape[1:] == tgt_img.shape[1:]
        groups = [(torch.cat([src_img, tgt_img]), None)] if same_size else \
            [(src_img, 1), (tgt_img, 0)]
        logits, doms = [], []
        for images, dom in groups:
            out, loss_dom = self._logits(images, Bs if dom is None else None, dom)
            logits.append(out)
            if loss_dom is not None:
                doms.append(loss_dom)
        if same_size:
            src_logits, tgt_logits = logits[0][:Bs], logits[0][Bs:]
        else:
            src_logits, tgt_logits = logits
        ce_src = masked_cross_entropy(src_logits, src_lbl)
        ce_tgt = masked_cross_entropy(tgt_logits, tgt_lbl)
        loss = ce_src + ce_tgt
        loss_dom = torch.stack(doms).mean() if doms else zero
        if self.acte is not None:
            loss = loss + self.beta * loss_dom
        return loss, self._stats(zero, ce_src=ce_src, ce_tgt=ce_tgt, loss_dom=loss_dom)

    def _uda_forward(self, src_img, src_lbl, mix_img, mix_label, mix_weight, tgt_img=None,
                     pl_label=None, pl_weight=None, keep=None):
        c = self.uda
        zero = src_img.new_zeros((), dtype=torch.float32)

        def ce(logits, label, weight=None):
            return weighted_cross_entropy(logits, label, weight, ignore_index=c.ignore_index,
                                          avg_non_ignore=c.avg_non_ignore)

        src_logits, dom_src = self._logits(src_img, None, 1.0)
        ce_src = ce(src_logits, src_lbl)
        mix_logits, _ = self._logits(mix_img, None, None)
        loss_mix = ce(mix_logits, mix_label, mix_weight)
        loss = ce_src + loss_mix
        doms = [dom_src]
        loss_mrm = zero
        if self.rebuilder is not None:
            if tgt_img is None or pl_label is None:
                raise ValueError("MRM needs the target images and their pseudo-labels")
            rebuilt_logits, dom_tgt = self._logits(tgt_img, None, 0.0, rebuilder=self.rebuilder,
                                                   keep=keep)
            loss_mrm = c.mrm_weight * ce(rebuilt_logits, pl_label, pl_weight)
            loss = loss + loss_mrm
            doms.append(dom_tgt)
        doms = [d for d in doms if d is not None]
        loss_dom = torch.stack(doms).mean() if doms else zero
        if self.acte is not None:
            loss = loss + self.beta * loss_dom
        pseudo = pl_weight.float().mean() if pl_weight is not None else zero
        return loss, self._stats(zero, ce_src=ce_src, loss_mix=loss_mix, loss_mrm=loss_mrm,
                                 loss_dom=loss_dom, pseudo_weight=pseudo)

    def _logits(self, images, n_source, domain_value, rebuilder=None, keep=None):
        """Logits of ``images`` (+ ACTE's ``L_dom`` when ACTE runs and domains are known:
        the first ``n_source`` images are source, or all are ``domain_value``; None: no
        domain loss). ``rebuilder``: decode MRM-rebuilt features with keep-mask ``keep``."""
        if self.acte is None:
            return self.model(images, rebuilder=rebuilder, mask=keep), None
        state = self.model.stem(images)
        posteriors = self.model.token_posteriors(state) if self.use_uncertainty else None
        B = images.shape[0]
        if n_source is not None:
            domain = torch.zeros(B, device=images.device)
            domain[:n_source] = 1.0
        elif domain_value is not None:
            domain = torch.full((B,), float(domain_value), device=images.device)
        else:
            domain = None
        out = self.acte(state.patch_tokens, state.grid, posteriors, domain)
        logits = self.model.head(state, out.region, out.region_bias, rebuilder=rebuilder,
                                 mask=keep)
        return logits, out.loss_dom


class TMAPredictor(nn.Module):
    """Inference *with* ACTE + TMA (regions and bias computed on the test image itself, no
    labels): the alternative to the TMA-off inference model, reported beside it as
    ``target_miou_tma`` so both readings of the method are measured on the same weights."""

    def __init__(self, module: TrainModule):
        super().__init__()
        self.module = module

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.module._logits(images, None, None)[0]


def uda_step_config(cfg: Config) -> UDAConfig:
    """The :class:`tmt_train.uda.UDAConfig` of a run's ``uda`` section."""
    u = cfg.uda
    return UDAConfig(alpha=u.alpha, pseudo_threshold=u.pseudo_threshold,
                     ignore_index=IGNORE_INDEX, mrm_weight=u.mrm_weight,
                     jitter_strength=u.jitter_strength, jitter_p=u.jitter_p, blur=u.blur,
                     avg_non_ignore=u.avg_non_ignore)


@torch.no_grad()
def prepare_uda_batch(teacher: EMATeacher, student: nn.Module, src_img: torch.Tensor,
                      src_lbl: torch.Tensor, tgt_img: torch.Tensor, *, iteration: int,
                      config: UDAConfig, rebuilder: Optional[Rebuilder] = None,
                      generator: Optional[torch.Generator] = None,
                      precision_context=nullcontext) -> Tuple[dict, dict]:
    """The DACS inputs of one step, in DAFormer's order: teacher EMA update (iteration 0
    copies), teacher pseudo-labels + confidence weight on ``tgt_img``, ClassMix of source
    into target, strong augmentation, and (with a ``rebuilder``) the keep-mask of the MRM
    pass. Random draws come from ``generator`` in the order of
    :func:`tmt_train.uda.uda_step`. Returns ``(batch for TrainModule(uda=...), stats)``."""
    alpha = teacher.update(student, iteration)
    with precision_context():
        teacher_logits = teacher(tgt_img)
    pl = pseudo_label(teacher_logits, threshold=config.pseudo_threshold,
                      ignore_index=config.ignore_index, size=tgt_img.shape[-2:])
    mix = classmix(src_img, src_lbl.long(), tgt_img, pl.label, pl.weight,
                   ignore_index=config.ignore_index, generator=generator)
    mixed = strong_augment(mix.image, generator=generator, mean=config.mean, std=config.std,
                           jitter_strength=config.jitter_strength, jitter_p=config.jitter_p,
                           blur=config.blur)
    batch = {"mix_img": mixed, "mix_label": mix.label, "mix_weight": mix.weight,
             "pl_weight": pl.weight}
    if rebuilder is not None:
        keep = rebuilder.sample_mask(tgt_img.shape[0], generator=generator,
                                     device=tgt_img.device)
        batch.update(tgt_img=tgt_img, pl_label=pl.label, keep=keep)
    return batch, {"ema_alpha": alpha, "mix_fraction": mix.mask.mean()}


def _power_of_two_at_least_one(ratio: float) -> int:
    return 2 ** max(0, int(round(math.log2(max(ratio, 1.0)))))


def build_rebuilder(cfg: Config, model: Segmentor, image_size: Sequence[int]) -> Rebuilder:
    """MRM's Rebuilder for ``model``'s decoder inputs at training image size ``image_size``.

    The stage sizes come from a no-grad probe of the model; ``grid`` defaults to the deepest
    stage's size, and each stage's projector upsamples by the power of two closest to
    ``stage size / grid`` (the Rebuilder resizes whatever is left)."""
    H, W = int(image_size[0]), int(image_size[1])
    param = next(model.parameters())
    with torch.no_grad(), eval_mode(model):
        probe = torch.zeros(1, model.in_chans, H, W, device=param.device, dtype=param.dtype)
        feats = model.encoder_features(model.stem(probe))
    sides = [max(f.shape[-2:]) for f in feats]
    shape = cfg.uda.rebuilder_shape(cfg.model.preset)
    grid = int(shape["grid"] or sides[-1])
    scales = [_power_of_two_at_least_one(side / grid) for side in sides]
    return Rebuilder([f.shape[1] for f in feats], scales, embed_dim=shape["embed_dim"],
                     grid=grid, depth=shape["depth"], num_heads=shape["num_heads"],
                     mask_ratio=cfg.uda.mask_ratio)


def build_acte(cfg: Config, model: Segmentor):
    from tmt_ext.nn import ACTE

    m = cfg.tmt
    bb = model.backbone
    return ACTE(bb.embed_dim, bb.num_heads, num_regions=m.num_regions, partition=m.partition,
                gamma=m.gamma, kmeans_iters=m.kmeans_iters, cell=m.cell, lsc_iters=m.lsc_iters,
                kappa=m.kappa, restrict=m.restrict, neighbors=m.neighbors,
                lambda_init=m.lambda_init, disc_hidden=m.disc_hidden, grl_coeff=m.grl_coeff,
                num_prefix_tokens=bb.num_prefix_tokens, seed=cfg.train.seed)


PART_NAMES = ("backbone", "head", "rebuilder", "lambda")


def param_groups(module: TrainModule, cfg: Config) -> List[dict]:
    """AdamW groups: no weight decay on norms, biases, position/CLS embeddings, MRM's mask
    token and ``λ``; ``head_lr_mult`` for the decoder, the pyramid neck and ACTE's
    discriminator; TMA's ``λ`` at ``optim.lr × tmt.lambda_lr_mult``; the Rebuilder in groups
    of its own at ``uda.rebuilder_lr``."""
    o = cfg.optim
    no_decay = getattr(module.model.backbone, "no_weight_decay", None)
    skip = {f"model.backbone.{n}" for n in (no_decay() if no_decay else ())}
    groups: Dict[tuple, List[nn.Parameter]] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        is_lambda = name.endswith("lambda_param")
        decay = not (p.dim() <= 1 or name in skip or is_lambda or name.endswith("mask_token"))
        part = 3 if is_lambda else 2 if name.startswith("rebuilder.") else \
            0 if name.startswith("model.backbone.") else 1
        groups.setdefault((decay, part), []).append(p)
    lrs = [o.lr, o.lr * o.head_lr_mult, cfg.uda.rebuilder_learning_rate(o.lr),
           o.lr * cfg.tmt.lambda_lr_mult]
    return [{"params": params, "weight_decay": o.weight_decay if decay else 0.0,
             "lr": lrs[part], "name": f"{PART_NAMES[part]}/{'decay' if decay else 'no_decay'}"}
            for (decay, part), params in sorted(groups.items())]


def lr_factor(step: int, total: int, cfg: Config) -> float:
    o = cfg.optim
    warm = o.warmup_steps if o.warmup_steps >= 0 else min(total // 10, 1500)
    if step < warm:
        return o.warmup_start + (1.0 - o.warmup_start) * step / warm
    t = min(1.0, (step - warm) / max(1, total - warm))
    if o.schedule == "poly":
        f = (1.0 - t) ** o.poly_power
    elif o.schedule == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * t))
    else:
        f = 1.0
    return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * f


# ---- evaluation --------------------------------------------------------------------------------


def make_metric(num_classes: int, class_names, device):
    from tmt_train.metrics import SegMetric

    try:
        return SegMetric(num_classes, ignore_index=IGNORE_INDEX, device=device,
                         class_names=class_names)
    except TypeError:
        return SegMetric(num_classes, ignore_index=IGNORE_INDEX)


def slide_logits(model: Segmentor, image: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """Sliding-window logits ``[1, C, H, W]`` of one ``[1, 3, H, W]`` image (windows averaged)."""
    _, _, H, W = image.shape
    if H <= crop and W <= crop:
        return model(image)
    rows = max(1, math.ceil((H - crop) / stride)) + 1 if H > crop else 1
    cols = max(1, math.ceil((W - crop) / stride)) + 1 if W > crop else 1
    out = None
    count = image.new_zeros(1, 1, H, W)
    for r in range(rows):
        for c in range(cols):
            y0 = min(r * stride, max(H - crop, 0))
            x0 = min(c * stride, max(W - crop, 0))
            y1, x1 = min(y0 + crop, H), min(x0 + crop, W)
            logits = model(image[..., y0:y1, x0:x1]).float()
            if out is None:
                out = image.new_zeros(1, logits.shape[1], H, W, dtype=torch.float32)
            out[..., y0:y1, x0:x1] += logits
            count[..., y0:y1, x0:x1] += 1
    return out / count


@torch.no_grad()
def evaluate(model: Segmentor, dataset, *, num_classes: int, class_names, ctx: distr.DistContext,
             batch_size: int = 8, num_workers: int = 0, max_images: int = 0,
             mode: str = "whole", crop: int = 512, stride: int = 341,
             precision: str = "fp32") -> dict:
    """mIoU / per-class IoU / accuracy of ``model`` on ``dataset`` (sharded over ranks and
    all-reduced). Does not touch the global RNG."""
    indices = data.shard_indices(len(dataset), ctx.rank, ctx.world_size, max_images)
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=data.eval_collate)
    metric = make_metric(num_classes, class_names, ctx.device)
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []), \
            autocast(ctx.device, precision):
        for batch in loader:
            images, labels = batch["image"], batch["label"]
            if isinstance(images, torch.Tensor) and mode == "whole":
                logits = model(images.to(ctx.device))
                metric.update(logits.argmax(1), labels.to(ctx.device))
                continue
            for image, label in zip(images, labels):
                image = image.unsqueeze(0).to(ctx.device)
                logits = slide_logits(model, image, crop, stride) if mode == "slide" \
                    else model(image)
                metric.update(logits.argmax(1), label.unsqueeze(0).to(ctx.device))
    model.train(was_training)
    metric.all_reduce()
    result = metric.compute()
    iou = result["iou"]
    iou = iou.tolist() if isinstance(iou, torch.Tensor) else list(iou)
    iou = [None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
           for v in iou]
    return {"miou": float(result["miou"]), "acc": float(result.get("acc", float("nan"))),
            "iou": dict(zip(class_names, iou))}


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


# ---- the trainer -------------------------------------------------------------------------------


class Trainer:
    """One training run (a method, or the source pre-training) in ``cfg.train.out``."""

    def __init__(self, cfg: Config, ctx: Optional[distr.DistContext] = None,
                 init_weights: Optional[str] = None, log=print):
        self.cfg = validate(cfg.copy())
        self.ctx = ctx or distr.DistContext(device=distr.resolve_device(cfg.train.device))
        self.log = log if self.ctx.is_main else (lambda *a, **k: None)
        t = self.cfg.train
        self.method = t.method
        self.out = Path(t.out)
        self.uda_mode = self.method in UDA_METHODS
        # "labeled": a labeled fraction of the target train split (finetune, tmt);
        # "unlabeled": the whole target train split, images only (dacs, mrm, tmt_mrm)
        self.target_mode = "unlabeled" if self.uda_mode else \
            "labeled" if self.method in ("finetune", "tmt") else None
        self.uses_target = self.target_mode is not None
        self.total_steps = t.steps

        self.source = data.build_domain(self.cfg, "source")
        self.target = data.build_domain(self.cfg, "target", train=self.uses_target)
        self.num_classes, self.class_names = data.class_info(self.source.train)
        for domain in (self.target.train, self.target.eval):
            if domain is not None and data.class_info(domain)[0] != self.num_classes:
                raise ConfigError("source and target data sets have different class counts")
        self.labeled = data.labeled_subset(len(self.target.train), self.cfg.data.target_labels,
                                           t.seed) if self.target_mode == "labeled" else []
        use_rebuilder = self.method in MRM_METHODS
        # the Rebuilder is sized on the decoder inputs of a training image (a source item;
        # the RNG it may draw from is re-seeded just below)
        train_size = tuple(self.source.train[0]["image"].shape[-2:]) if use_rebuilder else None

        # identical initial weights on every rank; per-rank randomness after that
        seed_everything(t.seed)
        model_cfg = ModelConfig.from_dict({
            **self.cfg.model.to_dict(), "num_classes": self.num_classes,
            "tma_blocks": self.cfg.tmt.tma_blocks if self.method in TMT_METHODS else 0})
        self.model_config = model_cfg
        model = build_model(model_cfg, load_pretrained=init_weights is None,
                            verbose=self.ctx.is_main)
        if init_weights is not None:
            report = load_weights(model, init_weights)
            if report.missing or report.mismatched:
                raise RuntimeError(f"pre-trained weights {init_weights} do not fit the model: "
                                   f"{report}")
            self.log(f"initial weights from {init_weights}: {report}")
        acte = build_acte(self.cfg, model) if self.method in TMT_METHODS else None
        rebuilder = build_rebuilder(self.cfg, model, train_size) if use_rebuilder else None
        self.uda_config = uda_step_config(self.cfg)
        self.module = TrainModule(model, acte, self.cfg.tmt.beta, self.cfg.tmt.use_uncertainty,
                                  rebuilder=rebuilder, uda=self.uda_config).to(self.ctx.device)
        # the EMA teacher and the generator of the UDA step's random draws (per rank)
        self.teacher = EMATeacher(self.module.model, alpha=self.cfg.uda.alpha) \
            if self.uda_mode else None
        self.uda_generator = None
        if self.uda_mode:
            digest = hashlib.sha256(f"uda/{t.seed}/{self.ctx.rank}".encode()).digest()
            self.uda_generator = torch.Generator().manual_seed(
                int.from_bytes(digest[:8], "little") % (2 ** 63))
        if self.ctx.distributed:
            ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            bb = model.backbone
            # the final norm only feeds a neck-less ViT decoder when the last block is an output
            unused = model.is_vit and model.neck is None and (bb.depth - 1) not in bb.out_indices
            self.ddp = nn.parallel.DistributedDataParallel(self.module, device_ids=ids,
                                                           find_unused_parameters=unused)
        else:
            self.ddp = self.module
        self.optimizer = torch.optim.AdamW(param_groups(self.module, self.cfg),
                                           lr=self.cfg.optim.lr, betas=tuple(self.cfg.optim.betas))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, self.cfg))
        seed_everything(t.seed * 1000 + self.ctx.rank + 1)

    @property
    def model(self) -> Segmentor:
        return self.module.model

    # -- checkpoints ----------------------------------------------------------------------------

    def _save(self, step: int, consumed: Dict[str, int], running: Dict[str, float]) -> None:
        rng_state = ckpt.capture_rng_state()
        if self.uda_generator is not None:
            rng_state["uda"] = self.uda_generator.get_state()
        rng = distr.all_gather_object(self.ctx, rng_state)
        runnings = distr.all_gather_object(self.ctx, dict(running))
        if self.ctx.is_main:
            # "model" holds the student, ACTE and the Rebuilder; the optimizer their groups
            state = {"format": 1, "step": step, "method": self.method,
                     "config": self.cfg.to_dict(), "model": self.module.state_dict(),
                     "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "rng": rng,
                     "sampler": dict(consumed), "running": runnings,
                     "world_size": self.ctx.world_size, "num_classes": self.num_classes,
                     "class_names": list(self.class_names)}
            if self.teacher is not None:
                state["teacher"] = self.teacher.model.state_dict()
            ckpt.atomic_torch_save(state, self.out / ckpt.checkpoint_name(step))
            ckpt.prune_checkpoints(self.out, self.cfg.train.keep_checkpoints)
        distr.barrier(self.ctx)

    def _restore(self, state: dict) -> tuple:
        saved = state["config"]
        for key in ("method",):
            if saved["train"][key] != self.cfg.to_dict()["train"][key]:
                raise ConfigError(f"cannot resume: the checkpoint was written by "
                                  f"train.{key}={saved['train'][key]!r}")
        if saved["train"]["steps"] != self.total_steps:
            self.log(f"note: resuming a run planned for {saved['train']['steps']} steps with "
                     f"--steps {self.total_steps} (the schedule follows the new value)")
        self.module.load_state_dict(state["model"])
        if self.teacher is not None:
            if "teacher" not in state:
                raise ConfigError("cannot resume: the checkpoint has no EMA teacher")
            self.teacher.model.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"]
        if state.get("world_size") != self.ctx.world_size:
            self.log(f"note: checkpoint written by {state.get('world_size')} processes, "
                     f"resumed with {self.ctx.world_size}: data order is not reproduced")
        if self.ctx.rank < len(rng):
            ckpt.restore_rng_state(rng[self.ctx.rank])
            if self.uda_generator is not None and "uda" in rng[self.ctx.rank]:
                self.uda_generator.set_state(rng[self.ctx.rank]["uda"])
        runnings = state.get("running") or []
        running = dict(runnings[self.ctx.rank]) if self.ctx.rank < len(runnings) else {}
        return int(state["step"]), dict(state["sampler"]), running

    # -- logging ----------------------------------------------------------------------------------

    def _truncate_log(self, step: int) -> None:
        path = self.out / "log.csv"
        if not path.exists():
            return
        with open(path, newline="") as handle:
            rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= step]
        text = _csv_text(rows)
        ckpt.atomic_write_text(path, text)

    def _append_log(self, row: dict) -> None:
        path = self.out / "log.csv"
        new = not path.exists()
        with open(path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=LOG_FIELDS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({k: _fmt(row.get(k)) for k in LOG_FIELDS})

    # -- the loop ---------------------------------------------------------------------------------

    def fit(self, resume: bool = False, stop_at: Optional[int] = None) -> Optional[dict]:
        """Train to ``cfg.train.steps`` (or stop, checkpointed, after ``stop_at`` steps).
        Returns the final metrics (None when stopped early)."""
        t = self.cfg.train
        if self.ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temp_files(self.out)
        distr.barrier(self.ctx)
        latest = ckpt.load_latest(self.out)
        if latest is not None and not resume:
            raise ConfigError(f"{self.out} already holds checkpoints: pass --resume to continue "
                              "that run, or choose another --out")
        step, consumed, running = 0, {"source": 0, "target": 0}, {}
        if latest is not None:
            path, state = latest
            step, consumed, running = self._restore(state)
            self.log(f"resumed from {path} at step {step}")
            if self.ctx.is_main:
                self._truncate_log(step)
        elif self.ctx.is_main:
            for stale in ("log.csv", "metrics.json"):
                if (self.out / stale).exists():
                    (self.out / stale).unlink()
            ckpt.atomic_write_text(self.out / "config.json",
                                   json.dumps(self.cfg.to_dict(), indent=1) + "\n")
            if self.target_mode == "labeled":
                ckpt.atomic_write_text(self.out / "target_labeled.json",
                                       json.dumps({"fraction": self.cfg.data.target_labels,
                                                   "indices": self.labeled}) + "\n")
        distr.barrier(self.ctx)

        d = self.cfg.data
        pin = self.ctx.device.type == "cuda"
        src_stream = data.DataStream(self.source.train, range(len(self.source.train)),
                                     batch_size=d.batch_size, seed=t.seed, rank=self.ctx.rank,
                                     world_size=self.ctx.world_size, num_workers=d.num_workers,
                                     consumed=consumed["source"], pin_memory=pin)
        tgt_stream = None
        if self.uses_target:
            unlabeled = self.target_mode == "unlabeled"
            tgt_stream = data.DataStream(self.target.train,
                                         range(len(self.target.train)) if unlabeled
                                         else self.labeled,
                                         batch_size=d.batch_size, seed=t.seed + 1,
                                         rank=self.ctx.rank, world_size=self.ctx.world_size,
                                         num_workers=d.num_workers, consumed=consumed["target"],
                                         pin_memory=pin,
                                         keys=("image",) if unlabeled else ("image", "label"))

        end = self.total_steps if stop_at is None else min(stop_at, self.total_steps)
        progress = None
        if self.ctx.is_main and t.progress and step < end:
            from tqdm.auto import tqdm

            progress = tqdm(total=self.total_steps, initial=step, desc=self.method,
                            dynamic_ncols=True, mininterval=1.0)
        self.module.train()
        start_time = time.time() - float(running.get("elapsed_s", 0.0))
        result = None
        try:
            while step < end:
                batch = next(src_stream)
                target_batch = next(tgt_stream) if tgt_stream is not None else None
                loss, stats = self.train_step(step, batch, target_batch)
                step += 1
                consumed = {"source": src_stream.consumed,
                            "target": tgt_stream.consumed if tgt_stream else 0}
                for key, value in (("loss", loss.detach()), *stats.items()):
                    running[key] = running.get(key, 0.0) + float(value)
                running["n"] = running.get("n", 0) + 1
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{float(loss):.3f}", refresh=False)

                final = step == self.total_steps
                if step % t.ckpt_every == 0 or final or step == end:
                    running["elapsed_s"] = time.time() - start_time
                    self._save(step, consumed, running)
                if final or (t.eval_every and step % t.eval_every == 0):
                    result = self._evaluate_and_log(step, running, time.time() - start_time,
                                                    final=final)
                    running = {"elapsed_s": time.time() - start_time}
        finally:
            if progress is not None:
                progress.close()
        if step == self.total_steps and result is None:
            # resumed a finished run: reuse its final metrics, or evaluate when the process
            # died between the last checkpoint and the end of the final evaluation
            result = self._final_metrics() if self.ctx.is_main else None
            result = distr.broadcast_object(self.ctx, result)
            if result is None:
                if self.ctx.is_main:
                    self._truncate_log(step - 1)   # a row the interrupted evaluation wrote
                result = self._evaluate_and_log(step, running, time.time() - start_time,
                                                final=True)
            else:
                self.log(f"{self.out} already finished at step {step}")
        return result if step == self.total_steps else None

    def train_step(self, step: int, batch: dict, target_batch: Optional[dict] = None
                   ) -> Tuple[torch.Tensor, dict]:
        """One optimizer step at (0-based) ``step`` on a source batch and, for methods that
        use the target domain, a target batch (images only for the UDA methods). Returns
        the detached loss and the statistics."""
        t = self.cfg.train
        dev = self.ctx.device
        src_img = batch["image"].to(dev, non_blocking=True)
        src_lbl = batch["label"].to(dev, non_blocking=True)
        if self.uda_mode:
            tgt_img = target_batch["image"].to(dev, non_blocking=True)
            uda_batch, _ = prepare_uda_batch(
                self.teacher, self.module.model, src_img, src_lbl, tgt_img, iteration=step,
                config=self.uda_config, rebuilder=self.module.rebuilder,
                generator=self.uda_generator,
                precision_context=lambda: autocast(dev, t.precision))
            with autocast(dev, t.precision):
                loss, stats = self.ddp(src_img, src_lbl, uda=uda_batch)
        else:
            args = [src_img, src_lbl]
            if target_batch is not None:
                args += [target_batch["image"].to(dev, non_blocking=True),
                         target_batch["label"].to(dev, non_blocking=True)]
            with autocast(dev, t.precision):
                loss, stats = self.ddp(*args)
        if not torch.isfinite(loss):
            raise RuntimeError(f"the loss became {float(loss)} at step {step + 1} "
                               "(try a lower --lr)")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.optim.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach(), stats

    def _final_metrics(self) -> Optional[dict]:
        path = self.out / "metrics.json"
        if not (path.exists() and (self.out / "model.safetensors").exists()):
            return None
        metrics = json.loads(path.read_text())
        if metrics.get("final") and metrics.get("step") == self.total_steps:
            return metrics
        return None

    def _evaluate_and_log(self, step: int, running: dict, elapsed: float, final: bool) -> dict:
        t, d = self.cfg.train, self.cfg.data
        common = dict(num_classes=self.num_classes, class_names=self.class_names, ctx=self.ctx,
                      batch_size=d.eval_batch_size, num_workers=d.num_workers,
                      max_images=d.max_eval_images, mode=t.eval_mode, crop=t.eval_crop,
                      stride=t.eval_stride, precision=t.precision)
        tgt = evaluate(self.model, self.target.eval, **common) if self.target.eval else None
        src = evaluate(self.model, self.source.eval, **common) if self.source.eval else None
        tgt_tma = None
        if self.module.acte is not None and self.target.eval:
            tgt_tma = evaluate(TMAPredictor(self.module), self.target.eval, **common)
        # mean training losses since the last evaluation (all ranks)
        keys = LOSS_KEYS + ["n"]
        sums = torch.tensor([float(running.get(k, 0.0)) for k in keys], dtype=torch.float64)
        if self.ctx.distributed:
            sums = sums.to(self.ctx.device)
        sums = distr.all_reduce_sum(self.ctx, sums).cpu()
        n = max(float(sums[-1]), 1.0)
        losses = {k: float(v) / n for k, v in zip(keys[:-1], sums[:-1])}
        lam = None
        if self.module.acte is not None:
            lam = self.module.acte.lambdas.detach().cpu().tolist()
        metrics = {
            "method": self.method, "step": step, "steps": self.total_steps,
            "seed": t.seed, "dataset": d.dataset, "target_train": self.target_mode,
            "target_labels": d.target_labels if self.target_mode == "labeled" else None,
            "num_target_labeled": len(self.labeled),
            "num_target_unlabeled": len(self.target.train)
            if self.target_mode == "unlabeled" else 0,
            "target_miou": tgt["miou"] if tgt else None,
            "source_miou": src["miou"] if src else None,
            "target_acc": tgt["acc"] if tgt else None,
            "source_acc": src["acc"] if src else None,
            "target_iou": tgt["iou"] if tgt else None,
            "source_iou": src["iou"] if src else None,
            # TMT methods: the same weights evaluated with ACTE + TMA at test time
            "target_miou_tma": tgt_tma["miou"] if tgt_tma else None,
            "target_iou_tma": tgt_tma["iou"] if tgt_tma else None,
            "class_names": list(self.class_names),
            "train_losses": losses, "lr": self.scheduler.get_last_lr()[0],
            "tma_lambda": lam, "elapsed_s": elapsed, "final": final,
        }
        if self.ctx.is_main:
            ckpt.atomic_write_text(self.out / "metrics.json",
                                   json.dumps(metrics, indent=1, allow_nan=False) + "\n")
            self._append_log({"step": step, "lr": metrics["lr"], **losses,
                              "lambda_mean": None if lam is None else sum(lam) / len(lam),
                              "target_miou": metrics["target_miou"],
                              "source_miou": metrics["source_miou"],
                              "target_acc": metrics["target_acc"],
                              "source_acc": metrics["source_acc"], "elapsed_s": elapsed})
            tm = "n/a" if tgt is None else f"{tgt['miou']:.2f}"
            sm = "n/a" if src is None else f"{src['miou']:.2f}"
            tma = "" if tgt_tma is None else f" (TMA at test time: {tgt_tma['miou']:.2f})"
            self.log(f"[{self.method}] step {step}/{self.total_steps}: target mIoU {tm}{tma}, "
                     f"source mIoU {sm}")
            if final:
                self._finish()
        distr.barrier(self.ctx)
        return metrics

    def _finish(self) -> None:
        """Rank 0, after the last step: the inference model and the figures."""
        from .export import save_inference_model

        save_inference_model(self.module.state_dict(), self.cfg, self.num_classes,
                             self.class_names, self.total_steps, self.out / "model.safetensors")
        if not self.cfg.train.figures or self.target.eval is None:
            return
        try:
            from . import figures

            n = min(self.cfg.train.figure_images, len(self.target.eval))
            images = [self.target.eval[i] for i in range(n)]
            palette = getattr(self.target.eval, "palette", None)
            figures.save_predictions(self.model, images, self.out / "predictions.png",
                                     self.class_names, palette, self.ctx.device,
                                     title=f"{self.method}: target test images")
            if self.module.acte is not None:
                figures.save_tma_figure(self.model, self.module.acte, images,
                                        self.out / "tma_regions.png", self.ctx.device)
            if self.module.rebuilder is not None:
                figures.save_mrm_figure(self.model, self.teacher, self.module.rebuilder, images,
                                        self.out / "mrm_masks.png", self.class_names, palette,
                                        self.ctx.device, threshold=self.uda_config.pseudo_threshold,
                                        seed=self.cfg.train.seed)
        except Exception as exc:  # figures are a by-product: report, keep the trained run
            warnings.warn(f"figures could not be drawn: {type(exc).__name__}: {exc}",
                          stacklevel=2)


def _fmt(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def _csv_text(rows: List[dict]) -> str:
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LOG_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


# ---- pre-training cache and the entry point -----------------------------------------------------


def pretrain_dir(cfg: Config) -> Path:
    cache = Path(cfg.train.cache_dir) if cfg.train.cache_dir else \
        Path(cfg.train.out).resolve().parent / "pretrain"
    name = cfg.data.dataset.replace("->", "-")
    return cache / f"{name}-seed{cfg.train.seed}-{pretrain_key(cfg)}"


@contextmanager
def _file_lock(path: Path, enabled: bool):
    if not enabled:
        yield
        return
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_pretrained(cfg: Config, ctx: distr.DistContext, log=print) -> Path:
    """Path of the cached source-pre-trained model, training it first when missing."""
    directory = pretrain_dir(cfg)
    final = directory / "model.safetensors"
    with _file_lock(directory.parent / f".{directory.name}.lock", ctx.is_main):
        distr.barrier(ctx)
        if not final.exists():
            pcfg = cfg.copy()
            pcfg.train.method = "pretrain"
            pcfg.train.steps = cfg.train.pretrain_steps or cfg.train.steps
            pcfg.train.out = str(directory)
            pcfg.train.eval_every = 0
            pcfg.train.figures = False
            if ctx.is_main:
                log(f"source pre-training ({pcfg.train.steps} steps) -> {directory}")
            Trainer(pcfg, ctx, log=log).fit(resume=True)
        distr.barrier(ctx)
    return final


def run(cfg: Config, *, resume: bool = False, stop_at: Optional[int] = None,
        log=print) -> Optional[dict]:
    """Train ``cfg.train.method`` (pre-training first when not cached); under torchrun every
    process calls this. Returns the final metrics (None when stopped at ``stop_at``)."""
    cfg = validate(cfg.copy())
    ctx = distr.setup(cfg.train.device)
    try:
        if ctx.distributed and ctx.device.type == "cpu":
            # every process gets its share of the cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.world_size))
        init = None
        if cfg.train.init_from:
            init = cfg.train.init_from
        elif cfg.train.method != "pretrain":
            init = str(ensure_pretrained(cfg, ctx, log=log))
        trainer = Trainer(cfg, ctx, init_weights=init, log=log)
        return trainer.fit(resume=resume, stop_at=stop_at)
    finally:
        distr.cleanup(ctx)

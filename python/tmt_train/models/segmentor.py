"""Encoder-decoder segmentation model, its configuration, factory and weight loading.

Backbones: the plain ViT (``backbone="vit"``; TMT's region attention lives in its last blocks),
optionally with a ViTDet simple feature pyramid (``neck="pyramid"``: strides 4/8/16/32 from the
last block), or a hierarchical MiT encoder (``backbone="mit_b0"`` ... ``"mit_b5"``), the
SegFormer/DAFormer encoder MRM was published with. Decoders: the SegFormer all-MLP head or
DAFormer's context-aware fusion head (``decoder="auto"``: DAFormer for MiT, SegFormer for
the ViT).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .daformer_head import DAFormerHead
from .decoder import SegFormerHead
from .mit import MIT_CONFIGS, MixVisionTransformer, build_mit
from .pyramid import SimpleFeaturePyramid
from .vit import VisionTransformer, ViTConfig, resample_pos_embed, vit_config

BACKBONES = ("vit",) + tuple(f"mit_{k}" for k in MIT_CONFIGS)
NECKS = ("none", "pyramid")
DECODERS = ("auto", "segformer", "daformer")


@dataclass
class ModelConfig:
    """What :func:`build_model` builds.

    ``preset`` names a ViT size (``tiny``/``small``/``base``); ``vit`` overrides single fields
    of it (e.g. ``{"patch_size": 16}``). ``tma_blocks``: number of last blocks with region
    attention (0 = vanilla ViT; TMT training sets it). ``pretrained``: optional backbone
    weights (timm names for the ViT, official ``mit_b*.pth`` for MiT; safetensors or torch
    file) loaded at build time.

    ``backbone``: ``"vit"`` or ``"mit_b0"`` ... ``"mit_b5"`` (``mit`` overrides fields of the
    MiT preset, e.g. ``{"drop_path_rate": 0.0}``). ``neck``: ``"pyramid"`` gives the ViT a
    simple feature pyramid (strides 4/8/16/32 from the last block) instead of the multi-level
    block outputs (``"none"``). ``decoder``: ``"segformer"``, ``"daformer"`` or ``"auto"``
    (DAFormer for MiT, SegFormer for the ViT); ``decoder_dim`` is the head's width (DAFormer:
    embedding and fusion width), ``decoder_norm`` (``ln``/``bn``) applies to the SegFormer
    head, DAFormer's head keeps its BatchNorm.
    """

    preset: str = "tiny"
    vit: Dict[str, object] = field(default_factory=dict)
    num_classes: int = 0
    decoder_dim: int = 128
    decoder_dropout: float = 0.1
    decoder_norm: str = "ln"
    tma_blocks: int = 0
    pretrained: Optional[str] = None
    backbone: str = "vit"
    mit: Dict[str, object] = field(default_factory=dict)
    neck: str = "none"
    decoder: str = "auto"

    @property
    def is_vit(self) -> bool:
        return self.backbone == "vit"

    def decoder_kind(self) -> str:
        if self.decoder != "auto":
            return self.decoder
        return "segformer" if self.is_vit else "daformer"

    def check(self) -> "ModelConfig":
        """Raise ``ValueError`` for an unknown backbone / neck / decoder or a bad combination."""
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose from "
                             f"{', '.join(BACKBONES)}")
        if self.neck not in NECKS:
            raise ValueError(f"unknown neck {self.neck!r}; choose from {', '.join(NECKS)}")
        if self.decoder not in DECODERS:
            raise ValueError(f"unknown decoder {self.decoder!r}; choose from "
                             f"{', '.join(DECODERS)}")
        if not self.is_vit and self.neck != "none":
            raise ValueError(f"neck={self.neck!r} is for the ViT backbone; {self.backbone} is "
                             "hierarchical already")
        if not self.is_vit and self.tma_blocks:
            raise ValueError(f"region attention (tma_blocks={self.tma_blocks}) needs the ViT "
                             f"backbone, not {self.backbone}")
        return self

    def vit_config(self) -> ViTConfig:
        return vit_config(self.preset, tma_blocks=self.tma_blocks, **self.vit)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config field(s): {', '.join(unknown)}")
        return cls(**dict(data))


@dataclass
class SegState:
    """Intermediate state of a forward pass, at the input of the first TMA block (a MiT
    backbone: the images themselves, in ``tokens``)."""

    tokens: torch.Tensor                 # [B, T, C], CLS first when the backbone has one
    feats: Dict[int, torch.Tensor]       # recorded block outputs so far
    grid: Tuple[int, int]                # token grid (h, w)
    input_size: Tuple[int, int]          # image size before padding
    padded_size: Tuple[int, int]

    @property
    def patch_tokens(self) -> torch.Tensor:
        n = self.grid[0] * self.grid[1]
        return self.tokens[:, self.tokens.shape[1] - n:]


@contextlib.contextmanager
def eval_mode(*modules: nn.Module):
    """Temporarily put modules in eval mode (dropout off, BN running stats frozen)."""
    states = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for m, training in states:
            m.training = training


class Segmentor(nn.Module):
    """``backbone`` (+ optional ``neck``) + ``decoder``; logits at input size.

    ``forward(images)`` is the inference path. Training with TMT uses the two halves:
    ``state = stem(images)`` (up to the first TMA block), then ``head(state, region, bias)``;
    ``token_posteriors(state)`` is a no-grad pass of the vanilla head that gives per-token
    class posteriors (ACTE's uncertainty) without touching the graph. For a hierarchical (MiT)
    backbone, ``stem`` only records the sizes and ``head`` runs the whole encoder.

    MRM: ``forward(images, rebuilder=r, mask=m)`` (or ``head(state, ..., rebuilder=r)``)
    passes the decoder inputs through MRM's Rebuilder before decoding. The Rebuilder is a
    separate module, never a submodule: the segmentor's weights are the inference model.
    """

    def __init__(self, backbone: nn.Module, decoder: nn.Module,
                 config: Optional[ModelConfig] = None, neck: Optional[nn.Module] = None):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.decoder = decoder
        self.config = config
        self.is_vit = isinstance(backbone, VisionTransformer)

    @property
    def num_classes(self) -> int:
        return self.decoder.num_classes

    @property
    def num_prefix_tokens(self) -> int:
        return self.backbone.num_prefix_tokens if self.is_vit else 0

    @property
    def feature_channels(self) -> List[int]:
        """Channels of the decoder inputs (shallowest first)."""
        if self.neck is not None:
            return list(self.neck.out_channels)
        return list(self.backbone.out_channels)

    @property
    def in_chans(self) -> int:
        if self.is_vit:
            return self.backbone.config.in_chans
        return self.backbone.patch_embed1.proj.in_channels

    def stem(self, images: torch.Tensor) -> SegState:
        if images.dim() != 4 or images.shape[1] != self.in_chans:
            raise ValueError(f"images must be [B, {self.in_chans}, H, W], "
                             f"got shape {tuple(images.shape)}")
        H, W = images.shape[-2:]
        if not self.is_vit:
            # the MiT encoder takes any size; its stages run in head()
            return SegState(images, {}, (H, W), (H, W), (H, W))
        p = self.backbone.patch_size
        pad_h, pad_w = (-H) % p, (-W) % p
        if pad_h or pad_w:
            # zero = the mean colour of normalized images
            images = F.pad(images, (0, pad_w, 0, pad_h))
        tokens, grid = self.backbone.embed(images)
        feats: Dict[int, torch.Tensor] = {}
        tokens = self.backbone.run_blocks(tokens, 0, self.backbone.first_tma_block, feats)
        return SegState(tokens, feats, grid, (H, W), (H + pad_h, W + pad_w))

    def encoder_features(self, state: SegState, region: Optional[torch.Tensor] = None,
                         region_bias: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """The decoder inputs ``[B, C_i, h_i, w_i]`` (shallowest first) of a stem state."""
        if not self.is_vit:
            if region is not None or region_bias is not None:
                raise ValueError("region ids given, but the MiT backbone has no region attention")
            return self.backbone(state.tokens)
        feats = dict(state.feats)
        bb = self.backbone
        if region is not None and bb.first_tma_block == bb.depth:
            raise ValueError("region ids given, but the model has no region attention blocks "
                             "(build it with tma_blocks >= 1)")
        tokens = bb.run_blocks(state.tokens, bb.first_tma_block, bb.depth, feats, region,
                               region_bias)
        if self.neck is None:
            return bb.feature_maps(feats, state.grid)
        last = feats.get(bb.depth - 1)
        if last is None:
            last = bb.norm(tokens)
        last = last[:, bb.num_prefix_tokens:]
        fmap = last.transpose(1, 2).reshape(last.shape[0], last.shape[2], *state.grid)
        return self.neck(fmap)

    def decode(self, features: List[torch.Tensor], state: SegState,
               upsample: bool = True) -> torch.Tensor:
        """Decoder logits of ``features``, resized to the input image (cropped off padding)."""
        logits = self.decoder(features)
        if not upsample:
            return logits
        logits = F.interpolate(logits, size=state.padded_size, mode="bilinear",
                               align_corners=False)
        H, W = state.input_size
        return logits[..., :H, :W]

    def head(self, state: SegState, region: Optional[torch.Tensor] = None,
             region_bias: Optional[torch.Tensor] = None, upsample: bool = True, *,
             rebuilder: Optional[nn.Module] = None, mask: Optional[torch.Tensor] = None,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
        feats = self.encoder_features(state, region, region_bias)
        if rebuilder is not None:
            feats = rebuilder(feats, mask, generator=generator)
        return self.decode(feats, state, upsample)

    @torch.no_grad()
    def token_posteriors(self, state: SegState) -> torch.Tensor:
        """``[B, h*w, classes]`` softmax of the vanilla (TMA-off) head at token resolution
        (averaged over each token's pixels when the decoder works at a finer stride)."""
        if not self.is_vit:
            raise ValueError("token posteriors need the ViT backbone")
        frozen = SegState(state.tokens.detach(), {k: v.detach() for k, v in state.feats.items()},
                          state.grid, state.input_size, state.padded_size)
        with eval_mode(self):
            logits = self.head(frozen, upsample=False)
        probs = logits.float().softmax(dim=1)
        if tuple(probs.shape[-2:]) != tuple(state.grid):
            probs = F.adaptive_avg_pool2d(probs, state.grid)
        return probs.flatten(2).transpose(1, 2)

    def features(self, images: torch.Tensor) -> Dict[str, object]:
        """What ACTE looks at: ``tokens`` (patch tokens entering the TMA blocks ``[B, N, C]``),
        ``grid`` and the full ``state``."""
        state = self.stem(images)
        return {"tokens": state.patch_tokens, "grid": state.grid, "state": state}

    def forward(self, images: torch.Tensor, region: Optional[torch.Tensor] = None,
                region_bias: Optional[torch.Tensor] = None, *,
                rebuilder: Optional[nn.Module] = None, mask: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self.head(self.stem(images), region, region_bias, rebuilder=rebuilder, mask=mask,
                         generator=generator)


def build_model(config: Union[ModelConfig, Mapping], num_classes: Optional[int] = None,
                *, load_pretrained: bool = True, verbose: bool = True) -> Segmentor:
    """Build a :class:`Segmentor` from a :class:`ModelConfig` (or its dict form).

    ``num_classes`` overrides ``config.num_classes``. The backbone's ``pretrained`` weights
    are loaded (with a report of missing/unexpected keys) unless ``load_pretrained=False``.
    """
    if not isinstance(config, ModelConfig):
        config = ModelConfig.from_dict(config)
    if num_classes is not None:
        config = ModelConfig.from_dict({**config.to_dict(), "num_classes": int(num_classes)})
    if config.num_classes < 1:
        raise ValueError("build_model needs num_classes >= 1 (from the config or the argument)")
    config.check()
    neck = None
    if config.is_vit:
        backbone = VisionTransformer(config.vit_config())
        channels = backbone.out_channels
        if config.neck == "pyramid":
            neck = SimpleFeaturePyramid(backbone.embed_dim, backbone.patch_size)
            channels = neck.out_channels
    else:
        backbone = build_mit(config.backbone, **config.mit)
        channels = backbone.out_channels
    if config.decoder_kind() == "segformer":
        decoder = SegFormerHead(channels, config.num_classes, config.decoder_dim,
                                config.decoder_dropout, config.decoder_norm)
    else:
        decoder = DAFormerHead(channels, config.num_classes, embed_dim=config.decoder_dim,
                               channels=config.decoder_dim, dropout=config.decoder_dropout)
    model = Segmentor(backbone, decoder, config, neck=neck)
    if load_pretrained and config.pretrained:
        if config.is_vit:
            state = backbone_part(read_state_dict(config.pretrained))
            report = load_weights(backbone, state, ignore=("head.", "fc_norm.", "head_drop."))
        else:
            missing, unexpected = backbone.load_pretrained(config.pretrained)
            report = f"{len(missing)} missing, {len(unexpected)} unexpected"
        if verbose:
            print(f"backbone weights from {config.pretrained}: {report}")
    return model


# ---- weight loading ----------------------------------------------------------------------


@dataclass
class LoadReport:
    """What :func:`load_weights` did. ``ok`` when nothing was missing, unexpected or skipped."""

    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[str] = field(default_factory=list)   # "name: file shape vs model shape"
    resized: List[str] = field(default_factory=list)      # position embeddings interpolated
    ignored: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        def listed(name, keys, limit=8):
            if not keys:
                return ""
            more = f", ... (+{len(keys) - limit})" if len(keys) > limit else ""
            return f"; {len(keys)} {name}: {', '.join(keys[:limit])}{more}"

        return (f"{len(self.loaded)} tensors loaded" + listed("missing", self.missing)
                + listed("unexpected", self.unexpected) + listed("shape mismatch", self.mismatched)
                + listed("resized", self.resized) + listed("ignored", self.ignored))


def read_state_dict(source: Union[str, os.PathLike, Mapping]) -> Dict[str, torch.Tensor]:
    """A flat ``name -> tensor`` dict from a safetensors file, a torch checkpoint (raw state
    dict or one under ``model``/``state_dict``/``module``) or a mapping."""
    if isinstance(source, Mapping):
        state = dict(source)
    else:
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights file not found: {path}")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "module"):
        if key in state and isinstance(state[key], Mapping):
            state = dict(state[key])
            break
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def backbone_part(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The backbone's tensors when ``state`` is a whole segmentation model (keys under
    ``backbone.`` or ``model.backbone.``, e.g. an exported run), with that prefix removed;
    ``state`` itself otherwise (a bare backbone or ImageNet checkpoint)."""
    for prefix in ("model.backbone.", "backbone."):
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if part:
            return part
    return dict(state)


def load_weights(module: nn.Module, source, *, strict: bool = False,
                 ignore: Tuple[str, ...] = ()) -> LoadReport:
    """Load weights into ``module`` by name and report what matched.

    Position embeddings of another grid size are interpolated; tensors of another shape are
    skipped (reported as mismatched); keys starting with a prefix in ``ignore`` are skipped
    quietly. ``strict=True`` raises ``ValueError`` with the report unless every key matched.
    """
    state = read_state_dict(source)
    own = module.state_dict()
    report = LoadReport()
    to_load = {}
    for name, tensor in state.items():
        if any(name.startswith(prefix) for prefix in ignore):
            report.ignored.append(name)
            continue
        if name not in own:
            report.unexpected.append(name)
            continue
        target = own[name]
        if tensor.shape != target.shape and name.endswith("pos_embed") and tensor.dim() == 3:
            prefix = getattr(module, "num_prefix_tokens", None)
            if prefix is None:
                prefix = getattr(getattr(module, "backbone", None), "num_prefix_tokens", 0)
            n_target = target.shape[1] - prefix
            grid = _grid_of(module, n_target)
            try:
                tensor = resample_pos_embed(tensor, grid, prefix)
                report.resized.append(name)
            except ValueError:
                pass
        if tensor.shape != target.shape:
            report.mismatched.append(f"{name}: {tuple(tensor.shape)} vs {tuple(target.shape)}")
            continue
        to_load[name] = tensor.to(dtype=target.dtype)
        report.loaded.append(name)
    report.missing = [k for k in own if k not in to_load]
    if strict and not report.ok:
        raise ValueError(f"weights do not match the model: {report}")
    module.load_state_dict(to_load, strict=False)
    return report


def _grid_of(module: nn.Module, n: int) -> Tuple[int, int]:
    backbone = module if isinstance(module, VisionTransformer) else getattr(module, "backbone",
                                                                           None)
    if isinstance(backbone, VisionTransformer) and \
            backbone.base_grid[0] * backbone.base_grid[1] == n:
        return backbone.base_grid
    side = int(round(n ** 0.5))
    return (side, side)

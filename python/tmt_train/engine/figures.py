"""Figures of a trained run (matplotlib PNGs next to ``metrics.json``).

* ``predictions.png``: target images, ground truth and predictions.
* ``tma_regions.png`` (TMT): per image, ACTE's region partition, transferability ``t_r``,
  uncertainty ``u_r`` and priority ``p_r`` maps, and the attention of one query token (★,
  the centre token) over all keys in the last TMA block, with the TMA bias and without it.
  The attention is recomputed from that block's q/k in plain PyTorch, for plotting only.
* ``mrm_masks.png`` (MRM): per target image, the Rebuilder's keep-mask on its ``grid x grid``
  cells (masked cells shaded), the EMA teacher's pseudo-label (low-confidence pixels
  dimmed; the image's confidence weight in the title), the student's prediction decoded
  from the *rebuilt* features under that mask, and its ordinary prediction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from tmt_train.models import Segmentor, eval_mode


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def display_image(image: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` normalized image -> ``[H, W, 3]`` in [0, 1]: the ImageNet normalization
    is undone, then a 0.5-99.5 % stretch over all channels (keeps hues) for other scalings."""
    arr = image.detach().float().cpu().permute(1, 2, 0).numpy()
    mean = np.array([0.485, 0.456, 0.406], dtype=np.float32)
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32)
    arr = arr * std + mean
    lo, hi = np.percentile(arr, 0.5), np.percentile(arr, 99.5)
    if lo >= -0.05 and hi <= 1.05:   # already a plausible 0..1 image
        lo, hi = 0.0, 1.0
    return np.clip((arr - lo) / max(hi - lo, 1e-6), 0, 1)


def label_colors(num_classes: int, palette=None) -> np.ndarray:
    """``[256, 3]`` colour table (ignore = 255 -> white)."""
    table = np.ones((256, 3), dtype=np.float32)
    if palette is not None and len(palette) >= num_classes:
        table[:num_classes] = np.asarray(palette[:num_classes], dtype=np.float32) / 255.0
    else:
        cmap = _plt().get_cmap("tab20")
        table[:num_classes] = [cmap(i % 20)[:3] for i in range(num_classes)]
    return table


def _clean(ax):
    ax.set_xticks([])
    ax.set_yticks([])


@torch.no_grad()
def save_predictions(model: Segmentor, items: List[dict], path, class_names: Sequence[str],
                     palette=None, device="cpu", title: str = "") -> Path:
    plt = _plt()
    from matplotlib.patches import Patch

    colors = label_colors(len(class_names), palette)
    n = len(items)
    legend_rows = -(-(len(class_names) + 1) // 4)
    fig, axes = plt.subplots(n, 3, figsize=(3 * 2.4, n * 2.4 + 0.5 + 0.25 * legend_rows),
                             squeeze=False)
    with eval_mode(model):
        for row, item in enumerate(items):
            image = item["image"].unsqueeze(0).to(device)
            pred = model(image).argmax(1)[0].cpu().numpy()
            label = item["label"].cpu().numpy()
            panels = [display_image(item["image"]), colors[np.clip(label, 0, 255)], colors[pred]]
            for col, (pic, name) in enumerate(zip(panels, ("image", "ground truth",
                                                           "prediction"))):
                ax = axes[row, col]
                ax.imshow(pic, interpolation="nearest")
                _clean(ax)
                if row == 0:
                    ax.set_title(name, fontsize=10)
    handles = [Patch(facecolor=colors[i], edgecolor="black", label=str(name))
               for i, name in enumerate(class_names)]
    handles.append(Patch(facecolor="white", edgecolor="black", label="ignore"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8,
               frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    bottom = (0.1 + 0.25 * legend_rows) / fig.get_figheight()
    fig.tight_layout(rect=(0, bottom, 1, 1 - 0.4 / fig.get_figheight()))
    return _save(fig, path)


@torch.no_grad()
def tma_analysis(model: Segmentor, acte, image: torch.Tensor,
                 query: Optional[tuple] = None) -> Dict[str, np.ndarray]:
    """ACTE maps and last-TMA-block attention of one ``[3, H, W]`` image.

    Returns grid-resolution arrays ``regions``, ``transferability``, ``uncertainty``,
    ``priority``, ``attention`` (TMA, mean over heads), ``attention_plain`` (same q/k, no
    bias) and ``query`` (row, col) of the query token."""
    bb = model.backbone
    if bb.first_tma_block >= bb.depth:
        raise ValueError("the model has no TMA blocks")
    with eval_mode(model, acte):
        state = model.stem(image.unsqueeze(0))
        out = acte(state.patch_tokens, state.grid, model.token_posteriors(state), None)
        last = bb.depth - 1
        tokens = bb.run_blocks(state.tokens, bb.first_tma_block, last, None, out.region,
                               out.region_bias)
        block = bb.blocks[last]
        B, T, C = tokens.shape
        heads = bb.num_heads
        qkv = block.attn.qkv(block.norm1(tokens)).reshape(B, T, 3, heads, C // heads)
        q, k = qkv[:, :, 0].transpose(1, 2).float(), qkv[:, :, 1].transpose(1, 2).float()
        scores = q @ k.transpose(-1, -2) * (C // heads) ** -0.5            # [1, H, T, T]
        region = out.region[0]
        bias = out.region_bias[0][:, region][:, :, region]                   # [H, T, T]
    h, w = state.grid
    prefix = bb.num_prefix_tokens
    qy, qx = query if query is not None else (h // 2, w // 2)
    qi = prefix + qy * w + qx
    tma = torch.softmax(scores[0] + bias, dim=-1)[:, qi, prefix:].mean(0)
    plain = torch.softmax(scores[0], dim=-1)[:, qi, prefix:].mean(0)
    labels = out.labels[0]

    def regional(values):
        return values[0][labels].reshape(h, w).cpu().numpy()

    return {"regions": labels.reshape(h, w).cpu().numpy(),
            "transferability": regional(out.transferability),
            "uncertainty": regional(out.uncertainty),
            "priority": out.priority_map[0].reshape(h, w).cpu().numpy(),
            "attention": tma.reshape(h, w).cpu().numpy(),
            "attention_plain": plain.reshape(h, w).cpu().numpy(),
            "query": np.array([qy, qx])}


def _boundaries(regions: np.ndarray) -> np.ndarray:
    edge = np.zeros(regions.shape, dtype=bool)
    edge[:, 1:] |= regions[:, 1:] != regions[:, :-1]
    edge[1:, :] |= regions[1:, :] != regions[:-1, :]
    return edge


def save_tma_figure(model: Segmentor, acte, items: List[dict], path, device="cpu") -> Path:
    plt = _plt()
    columns = [("image (★ query)", None), ("ACTE regions", None),
               ("transferability $t_r$", "viridis"), ("uncertainty $u_r$", "magma"),
               ("priority $p_r$", "inferno"), ("attention (TMA)", "Blues"),
               ("TMA vs no bias, log$_2$", "RdBu_r")]
    n = len(items)
    fig, axes = plt.subplots(n, len(columns), figsize=(len(columns) * 2.2, n * 1.95 + 0.6),
                             squeeze=False)
    region_cmap = plt.get_cmap("tab20")
    images = {}
    for row, item in enumerate(items):
        maps = tma_analysis(model, acte, item["image"].to(device))
        pic = display_image(item["image"])
        H, W = pic.shape[:2]
        h, w = maps["regions"].shape
        extent = (0, W, H, 0)
        qy, qx = maps["query"]
        star = ((qx + 0.5) * W / w, (qy + 0.5) * H / h)
        ratio = np.log2(np.maximum(maps["attention"], 1e-12)
                        / np.maximum(maps["attention_plain"], 1e-12))
        ratio_lim = max(float(np.abs(ratio).max()), 1e-3)
        for col, (name, cmap) in enumerate(columns):
            ax = axes[row, col]
            _clean(ax)
            if row == 0:
                ax.set_title(name, fontsize=9)
            if col == 0:
                ax.imshow(pic)
            elif col == 1:
                rows = np.minimum(np.arange(H) * h // H, h - 1)
                cols = np.minimum(np.arange(W) * w // W, w - 1)
                up = maps["regions"][rows][:, cols]
                colors = np.asarray([region_cmap(i % 20)[:3] for i in range(up.max() + 1)])
                blend = 0.45 * pic + 0.55 * colors[up]
                blend[_boundaries(up)] = 0.0
                ax.imshow(blend)
            else:
                key = ["transferability", "uncertainty", "priority", "attention",
                       "ratio"][col - 2]
                if key == "ratio":
                    values, lo, hi = ratio, -ratio_lim, ratio_lim
                elif key == "attention":
                    values, lo, hi = maps[key], 0.0, float(maps[key].max())
                else:
                    values, lo, hi = maps[key], 0.0, 1.0
                images[col] = ax.imshow(values, cmap=cmap, vmin=lo, vmax=hi, extent=extent,
                                        interpolation="nearest")
            if col in (0, 5, 6):
                ax.plot(*star, marker="*", color="red", markersize=11, markeredgecolor="white")
        for col in range(2, len(columns)):
            fig.colorbar(images[col], ax=axes[row, col], fraction=0.046, pad=0.03).ax.tick_params(
                labelsize=7)
    lam = acte.lambdas.detach().cpu().numpy()
    fig.suptitle("ACTE regions and scores; attention of the ★ token in the last TMA block "
                 f"(mean over heads); λ per head = {np.array2string(lam, precision=3)}",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return _save(fig, path)


@torch.no_grad()
def mrm_analysis(model: Segmentor, teacher, rebuilder, image: torch.Tensor, *,
                 threshold: float = 0.968,
                 generator: Optional[torch.Generator] = None) -> Dict[str, np.ndarray]:
    """Maps of one ``[3, H, W]`` image: ``keep`` (grid keep-mask, 1 = kept), ``keep_pixels``
    (nearest upsampling to the image), ``pseudo_label``, ``confidence`` and ``weight`` (the
    teacher's), ``rebuilt_pred`` (student on rebuilt features) and ``pred`` (intact)."""
    from tmt_train.uda import pseudo_label

    x = image.unsqueeze(0)
    keep = rebuilder.sample_mask(1, generator=generator, device=x.device)
    with eval_mode(model, rebuilder):
        rebuilt = model(x, rebuilder=rebuilder, mask=keep).argmax(1)[0]
        plain = model(x).argmax(1)[0]
    teacher_model = getattr(teacher, "model", teacher)
    with eval_mode(teacher_model):
        pl = pseudo_label(teacher_model(x), threshold=threshold, size=x.shape[-2:])
    H, W = x.shape[-2:]
    up = torch.nn.functional.interpolate(keep, size=(H, W), mode="nearest")[0, 0]
    return {"keep": keep[0, 0].cpu().numpy(), "keep_pixels": up.cpu().numpy(),
            "pseudo_label": pl.label[0].cpu().numpy(),
            "confidence": pl.confidence[0].cpu().numpy(), "weight": float(pl.weight[0]),
            "rebuilt_pred": rebuilt.cpu().numpy(), "pred": plain.cpu().numpy()}


def save_mrm_figure(model: Segmentor, teacher, rebuilder, items: List[dict], path,
                    class_names: Sequence[str], palette=None, device="cpu", *,
                    threshold: float = 0.968, seed: int = 0) -> Path:
    """The Rebuilder's masks on target images (see the module doc); masks drawn from a
    generator seeded with ``seed`` (the figure does not touch the global RNG)."""
    plt = _plt()
    generator = torch.Generator().manual_seed(int(seed))
    colors = label_colors(len(class_names), palette)
    columns = ["target image", "keep-mask (masked: red)", "teacher pseudo-label",
               "prediction, rebuilt features", "prediction"]
    n = len(items)
    legend_height = 0.25 * -(-len(class_names) // 5) + 0.2
    fig, axes = plt.subplots(n, len(columns),
                             figsize=(len(columns) * 2.3, n * 2.45 + 0.6 + legend_height),
                             squeeze=False)
    for row, item in enumerate(items):
        maps = mrm_analysis(model, teacher, rebuilder, item["image"].to(device),
                            threshold=threshold, generator=generator)
        pic = display_image(item["image"])
        masked = maps["keep_pixels"] < 0.5
        shaded = pic.copy()
        shaded[masked] = 0.45 * shaded[masked] + 0.55 * np.array([0.85, 0.1, 0.1])
        pseudo = colors[np.clip(maps["pseudo_label"], 0, 255)]
        dim = maps["confidence"] <= threshold
        pseudo[dim] = 0.35 * pseudo[dim] + 0.65
        panels = [pic, shaded, pseudo, colors[maps["rebuilt_pred"]], colors[maps["pred"]]]
        grid = maps["keep"].shape[0]
        for col, (panel, name) in enumerate(zip(panels, columns)):
            ax = axes[row, col]
            ax.imshow(panel, interpolation="nearest")
            _clean(ax)
            if row == 0:
                ax.set_title(name, fontsize=8)
            # per-image facts under the panel (a title would run into the row above)
            if col == 1:
                ax.set_xlabel(f"{grid}x{grid} cells, {100 * (1 - maps['keep'].mean()):.0f}% "
                              "masked", fontsize=8)
            elif col == 2:
                ax.set_xlabel(f"weight {maps['weight']:.2f}", fontsize=8)
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=colors[i], edgecolor="black", label=str(name))
               for i, name in enumerate(class_names)]
    legend_rows = -(-len(handles) // 5)
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8,
               frameon=False)
    fig.suptitle(f"MRM: Rebuilder masks (ratio {rebuilder.mask_ratio:g}) and predictions from "
                 "rebuilt features; dimmed pseudo-label pixels are below the confidence "
                 "threshold", fontsize=9)
    bottom = (0.1 + 0.25 * legend_rows) / fig.get_figheight()
    fig.tight_layout(rect=(0, bottom, 1, 1 - 0.45 / fig.get_figheight()))
    return _save(fig, path)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path

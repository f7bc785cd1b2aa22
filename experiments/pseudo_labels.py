"""How good are the pseudo-labels of a UDA run? (a diagnostic; target labels are read here only
to score predictions, never for training)

For every run folder given (``dacs`` / ``mrm`` / ``tmt_mrm``), loads the final checkpoint's EMA
teacher and student and scores them on the target train split (the images whose pseudo-labels
drive self-training) and test split: pixel accuracy, mIoU, the share of pixels above the
confidence threshold (0.968, the DACS weight) and the accuracy on those pixels. The source
pre-training the runs started from (or their ``train.init_from`` model) is scored the same way
(``start``).

    python experiments/pseudo_labels.py runs/experiments/mrm/dacs-s0 runs/experiments/mrm/mrm-s0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from tmt_train.engine import datasets as data
from tmt_train.engine.checkpoint import load_latest
from tmt_train.engine.config import Config
from tmt_train.engine.trainer import IGNORE_INDEX, make_metric, pretrain_dir
from tmt_train.models import build_model


@torch.no_grad()
def score(model, dataset, num_classes, class_names, threshold: float, max_images: int) -> dict:
    model.eval()
    indices = range(min(len(dataset), max_images) if max_images else len(dataset))
    loader = DataLoader(torch.utils.data.Subset(dataset, list(indices)), batch_size=8,
                        collate_fn=data.eval_collate)
    metric = make_metric(num_classes, class_names, torch.device("cpu"))
    correct = confident = confident_correct = total = 0
    for batch in loader:
        images, labels = batch["image"], batch["label"].long()
        prob = torch.softmax(model(images).float(), dim=1)
        conf, pred = prob.max(dim=1)
        metric.update(pred, labels)
        valid = labels != IGNORE_INDEX
        sure = valid & (conf > threshold)
        total += int(valid.sum())
        correct += int((valid & (pred == labels)).sum())
        confident += int(sure.sum())
        confident_correct += int((sure & (pred == labels)).sum())
    result = metric.compute()
    return {"miou": float(result["miou"]), "acc": 100.0 * correct / max(total, 1),
            "confident_share": 100.0 * confident / max(total, 1),
            "confident_acc": 100.0 * confident_correct / max(confident, 1)}


def load(cfg: Config, state: dict, num_classes: int):
    model = build_model(cfg.model, num_classes=num_classes, load_pretrained=False, verbose=False)
    model.load_state_dict(state)
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="UDA run folders")
    parser.add_argument("--max-images", type=int, default=0, help="per split (0: all)")
    parser.add_argument("--out", default=None, help="write the table as JSON here")
    args = parser.parse_args(argv)
    rows = {}
    for run in map(Path, args.runs):
        found = load_latest(run)
        if found is None:
            print(f"{run}: no checkpoint", file=sys.stderr)
            return 2
        _, ckpt = found
        cfg = Config.from_dict(ckpt["config"])
        cfg.model.tma_blocks = 0  # teacher and inference model run without TMA
        threshold = cfg.uda.pseudo_threshold
        num_classes, class_names = ckpt["num_classes"], ckpt["class_names"]
        target = data.build_domain(cfg, "target")
        splits = {"train": target.train, "test": target.eval}
        student_state = {k[len("model."):]: v for k, v in ckpt["model"].items()
                         if k.startswith("model.")}
        # the weights the run started from: another model (train.init_from) or the source
        # pre-training
        start = Path(cfg.train.init_from) if cfg.train.init_from else \
            pretrain_dir(cfg) / "model.safetensors"
        from safetensors.torch import load_file

        models = {"start": load(cfg, load_file(str(start)), num_classes),
                  "teacher": load(cfg, ckpt["teacher"], num_classes),
                  "student": load(cfg, student_state, num_classes)}
        for who, model in models.items():
            for split, dataset in splits.items():
                rows[f"{run.name} {who} {split}"] = score(model, dataset, num_classes,
                                                          class_names, threshold, args.max_images)
    print("| run | model | target split | mIoU | pixel acc | confident share (> thr) | "
          "acc on confident |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for key, r in rows.items():
        run, who, split = key.split(" ")
        print(f"| {run} | {who} | {split} | {r['miou']:.1f} | {r['acc']:.1f} | "
              f"{r['confident_share']:.1f} | {r['confident_acc']:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Model selection without the test split: score finished runs on held-out *target train* images.

The fine-tuning protocol labels a fraction of the target train split (``target_labeled.json``
in each run); the other images of that split are never trained on, so their labels can serve as
a validation set (the materials benchmark ships train and test splits only). For every run of a
study this scores the final weights on the first ``--images`` unlabeled target train images of
the run's seed: TMA off (the inference model), and for TMT runs also with ACTE + TMA at test
time. It then picks the setting (and inference mode) with the best mean validation mIoU and
reports that choice's *test* mIoU against the baseline's, so the reported gain is not selected
on the test split.

    python experiments/validate.py tmt      # after experiments/grid.py tmt
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from tmt_train.engine import datasets as data
from tmt_train.engine import distributed as distr
from tmt_train.engine.checkpoint import load_latest
from tmt_train.engine.config import TMT_METHODS, Config
from tmt_train.engine.trainer import TMAPredictor, TrainModule, build_acte, evaluate
from tmt_train.models import build_model

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import grid  # noqa: E402  (experiments/grid.py: the studies and their run folders)


def validation_set(cfg: Config, run: Path, images: int):
    """The first ``images`` target train images that the run did not train on."""
    # the target train split as training reads it, without the random training transforms
    dataset = data.build_dataset("materials", cfg.data.data_root, "train", domain="target",
                                 size=cfg.data.image_size, augment=False)
    labeled = set(json.loads((run / "target_labeled.json").read_text())["indices"])
    held_out = [i for i in range(len(dataset)) if i not in labeled][:images]
    return torch.utils.data.Subset(dataset, held_out)


def score_run(run: Path, images: int) -> dict:
    found = load_latest(run)
    if found is None:
        raise SystemExit(f"{run}: no checkpoint")
    _, ckpt = found
    cfg = Config.from_dict(ckpt["config"])
    tmt = cfg.train.method in TMT_METHODS
    cfg.model.tma_blocks = cfg.tmt.tma_blocks if tmt else 0
    model = build_model(cfg.model, num_classes=ckpt["num_classes"], load_pretrained=False,
                        verbose=False)
    acte = build_acte(cfg, model) if tmt else None
    module = TrainModule(model, acte, cfg.tmt.beta, cfg.tmt.use_uncertainty)
    module.load_state_dict({k: v for k, v in ckpt["model"].items()
                            if k.startswith(("model.", "acte."))})
    dataset = validation_set(cfg, run, images)
    common = dict(num_classes=ckpt["num_classes"], class_names=ckpt["class_names"],
                  ctx=distr.DistContext(), batch_size=8)
    result = {"val_miou": evaluate(model, dataset, **common)["miou"]}
    if tmt:
        result["val_miou_tma"] = evaluate(TMAPredictor(module), dataset, **common)["miou"]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=["tmt"])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--images", type=int, default=100, help="validation images per run")
    parser.add_argument("--runs", default=str(grid.ROOT / "runs" / "experiments"))
    args = parser.parse_args(argv)
    study = grid.STUDIES[args.study]
    seeds = [int(s) for s in args.seeds.split(",")]
    base = Path(args.runs) / study.name
    candidates = {}   # (setting, inference) -> per-seed (val, test)
    for setting in study.settings:
        if setting.method == "source_only":
            continue
        for seed in seeds:
            run = grid.run_dir(base, setting, seed)
            metrics = grid.finished(run, study.steps)
            if metrics is None:
                continue
            scores = score_run(run, args.images)
            candidates.setdefault((setting.name, "TMA off"), []).append(
                (scores["val_miou"], metrics["target_miou"]))
            if "val_miou_tma" in scores:
                candidates.setdefault((setting.name, "ACTE+TMA"), []).append(
                    (scores["val_miou_tma"], metrics["target_miou_tma"]))
            print(f"{run.name}: {scores}", file=sys.stderr)
    complete = {key: v for key, v in candidates.items() if len(v) == len(seeds)}
    lines = ["| setting | inference | validation mIoU (mean ± std) | test mIoU (mean ± std) |",
             "| --- | --- | ---: | ---: |"]
    for (name, mode), values in complete.items():
        val = [v for v, _ in values]
        test = [t for _, t in values]
        lines.append(f"| {name} | {mode} | {statistics.fmean(val):.2f} ± "
                     f"{statistics.stdev(val) if len(val) > 1 else 0:.2f} | "
                     f"{statistics.fmean(test):.2f} ± "
                     f"{statistics.stdev(test) if len(test) > 1 else 0:.2f} |")
    methods = [key for key in complete if key[0] != study.baseline]
    best = max(methods, key=lambda key: statistics.fmean(v for v, _ in complete[key]))
    baseline = complete[(study.baseline, "TMA off")]
    deltas = [t - b for (_, t), (_, b) in zip(complete[best], baseline)]
    lines += ["", f"Selected on validation: **{best[0]} ({best[1]})**; its test mIoU minus "
              f"{study.baseline}'s, per seed: {' / '.join(f'{d:+.2f}' for d in deltas)}, mean "
              f"{statistics.fmean(deltas):+.2f}."]
    text = "\n".join(lines)
    print(text)
    (HERE / f"{study.name}_validation.md").write_text(text + "\n")
    (HERE / f"{study.name}_validation.json").write_text(json.dumps(
        {f"{name} | {mode}": values for (name, mode), values in complete.items()}, indent=1)
        + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

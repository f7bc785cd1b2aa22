"""Seeds × methods × settings on the materials benchmark, aggregated as mean ± std.

Each run is one ``python -m tmt_train train`` command (printed in the report, so every number
can be reproduced on its own); runs share the cached source pre-training of their seed.
Finished runs are skipped and interrupted ones resume from their last checkpoint, so a killed
study continues where it stopped when started again.

    python experiments/grid.py tmt --jobs 2      # experiments/tmt_results.{json,md,png}
    python experiments/grid.py mrm --jobs 2
    python experiments/grid.py mrm_start --jobs 2   # diagnostic: UDA from the finetune models
    python experiments/grid.py tmt --only finetune,tmt --seeds 0   # a subset
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@dataclass(frozen=True)
class Setting:
    """One row of a study: a method plus ``--set`` overrides."""

    name: str
    method: str
    overrides: Tuple[str, ...] = ()
    group: str = "main"
    note: str = ""


@dataclass
class Study:
    name: str
    title: str
    steps: int
    pretrain_steps: int
    settings: List[Setting] = field(default_factory=list)
    baseline: str = ""          # the row every other row is compared against
    overrides: Tuple[str, ...] = ()   # ``--set`` items of every run ("{seed}": the seed)
    needs: Optional[Tuple[str, str]] = None   # (study, setting) whose run of each seed comes first


# settings that more than one study runs
FINETUNE = Setting("finetune", "finetune", note="vanilla fine-tuning, TMA/ACTE off")
TMT_LAM3_LAMLR = Setting("tmt_lam3_lamlr", "tmt", ("tmt.lambda_init=3.0", "tmt.lambda_lr_mult=20"),
                         "ablation", "λ_init = 3, λ learning rate × 20")
DACS = Setting("dacs", "dacs", note="DACS self-training")
MRM = Setting("mrm", "mrm", note="DACS + MRM, mask ratio 0.4")
MRM_NO_MASK = Setting("mrm_r0", "mrm", ("uda.mask_ratio=0.0",), "mask ratio",
                      "mask ratio 0: nothing masked, the MRM loss is plain self-training on the "
                      "target image")

STUDIES: Dict[str, Study] = {
    "tmt": Study(
        "tmt", "TMT vs vanilla fine-tuning (10% target labels)", steps=400, pretrain_steps=600,
        baseline="finetune",
        settings=[
            Setting("source_only", "source_only", note="no target data"),
            FINETUNE,
            Setting("tmt", "tmt", note="defaults: k-means partition, L=2, λ_init=0.1"),
            Setting("tmt_local", "tmt", ("tmt.partition=local",), "ablation",
                    "partition = local soft clustering"),
            Setting("tmt_L1", "tmt", ("tmt.tma_blocks=1",), "ablation", "L = 1 TMA block"),
            Setting("tmt_L4", "tmt", ("tmt.tma_blocks=4",), "ablation", "L = 4 TMA blocks"),
            Setting("tmt_lam1", "tmt", ("tmt.lambda_init=1.0",), "ablation",
                    "bias strength λ_init = 1.0"),
            Setting("tmt_lam3", "tmt", ("tmt.lambda_init=3.0",), "ablation",
                    "bias strength λ_init = 3.0"),
            Setting("tmt_lam0.01", "tmt", ("tmt.lambda_init=0.01",), "ablation",
                    "bias strength λ_init = 0.01 (≈ ACTE's discriminator loss alone)"),
            Setting("tmt_lam10", "tmt", ("tmt.lambda_init=10.0",), "ablation",
                    "bias strength λ_init = 10 (close to masking out low-priority keys)"),
            Setting("tmt_lamlr", "tmt", ("tmt.lambda_lr_mult=20",), "ablation",
                    "λ_init = 0.1, λ learning rate × 20 (λ free to move)"),
            TMT_LAM3_LAMLR,
        ]),
    "tmt_long": Study(
        "tmt_long", "TMT vs vanilla fine-tuning, 3× longer fine-tuning (1200 steps)", steps=1200,
        pretrain_steps=600, baseline="finetune",
        settings=[
            FINETUNE,
            replace(TMT_LAM3_LAMLR, group="main",
                    note="the setting selected on validation in the tmt study"),
        ]),
    "mrm": Study(
        "mrm", "MRM vs the DACS baseline (no target labels)", steps=400, pretrain_steps=600,
        baseline="dacs",
        settings=[
            DACS,
            MRM,
            Setting("tmt_mrm", "tmt_mrm", note="MRM + ACTE/TMA"),
            Setting("mrm_r0.2", "mrm", ("uda.mask_ratio=0.2",), "mask ratio", "mask ratio 0.2"),
            Setting("mrm_r0.6", "mrm", ("uda.mask_ratio=0.6",), "mask ratio", "mask ratio 0.6"),
            Setting("mrm_r0.8", "mrm", ("uda.mask_ratio=0.8",), "mask ratio", "mask ratio 0.8"),
            MRM_NO_MASK,
        ]),
    "mrm_start": Study(
        "mrm_start", "Diagnostic: DACS vs MRM starting from a model whose pseudo-labels are mostly "
        "right (the seed's finetune run, which saw 10% target labels: not UDA)", steps=400,
        pretrain_steps=600, baseline="dacs", needs=("tmt", "finetune"),
        overrides=("train.init_from=runs/experiments/tmt/finetune-s{seed}/model.safetensors",),
        settings=[
            Setting("source_only", "source_only", note="source labels only from that start"),
            DACS,
            MRM,
            MRM_NO_MASK,
        ]),
}


def run_dir(base: Path, setting: Setting, seed: int) -> Path:
    return base / f"{setting.name}-s{seed}"


def _shown(path: Path) -> str:
    """``path`` relative to the repository root when inside it (commands are run from there)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def command(study: Study, setting: Setting, seed, base: Path) -> List[str]:
    """The run's command line; ``seed`` may be a placeholder text (for the report)."""
    cmd = ["python", "-m", "tmt_train", "train", "--method", setting.method,
           "--dataset", "materials", "--steps", str(study.steps),
           "--pretrain-steps", str(study.pretrain_steps), "--seed", str(seed),
           "--out", _shown(run_dir(base, setting, seed)), "--resume", "--no-progress",
           "--set", f"train.cache_dir={_shown(base.parent / 'pretrain')}"]
    for item in study.overrides:
        cmd += ["--set", item.replace("{seed}", str(seed))]
    for item in setting.overrides:
        cmd += ["--set", item]
    return cmd


def finished(path: Path, steps: int) -> Optional[dict]:
    metrics = path / "metrics.json"
    if not metrics.exists():
        return None
    data = json.loads(metrics.read_text())
    return data if data.get("step") == steps and data.get("final", True) else None


def run_one(study: Study, setting: Setting, seed: int, base: Path, threads: int) -> dict:
    out = run_dir(base, setting, seed)
    done = finished(out, study.steps)
    if done is not None:
        return done
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OMP_WAIT_POLICY="passive")
    cmd = command(study, setting, seed, base)
    start = time.time()
    with open(out / "stdout.log", "a") as log:
        proc = subprocess.run([sys.executable] + cmd[1:], cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"run failed ({proc.returncode}): {shlex.join(cmd)}; see "
                           f"{out / 'stdout.log'}")
    done = finished(out, study.steps)
    if done is None:
        raise RuntimeError(f"run ended without final metrics: {out}")
    (out / "wall_s.txt").write_text(f"{time.time() - start:.1f}\n")
    return done


def summarize(values: List[float]) -> Tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def report(study: Study, base: Path, seeds: List[int], results: Dict[Tuple[str, int], dict],
           out_prefix: Path) -> str:
    rows = []
    base_by_seed = {s: results[(study.baseline, s)]["target_miou"]
                    for s in seeds if (study.baseline, s) in results}
    lines = [f"### {study.title}", "",
             f"materials benchmark, tiny ViT, {study.pretrain_steps} source pre-training steps "
             f"(shared by every row of a seed) + {study.steps} steps per run, seeds "
             f"{', '.join(map(str, seeds))}; target = target test split.", "",
             "| setting | group | target mIoU (mean ± std) | per seed | Δ vs "
             f"{study.baseline} (mean ± std of paired Δ) | source mIoU | target mIoU, ACTE+TMA "
             "at test time |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: |"]
    for setting in study.settings:
        got = [(s, results[(setting.name, s)]) for s in seeds if (setting.name, s) in results]
        if not got:
            continue
        target = [m["target_miou"] for _, m in got]
        source = [m["source_miou"] for _, m in got if m.get("source_miou") is not None]
        mean, std = summarize(target)
        deltas = [m["target_miou"] - base_by_seed[s] for s, m in got if s in base_by_seed]
        if setting.name == study.baseline or not deltas:
            delta_text = "—"
        else:
            dm, ds = summarize(deltas)
            delta_text = f"{dm:+.2f} ± {ds:.2f}"
        src_text = f"{statistics.fmean(source):.1f}" if source else ""
        with_tma = [m["target_miou_tma"] for _, m in got if m.get("target_miou_tma") is not None]
        tma_text = ""
        if len(with_tma) == len(got):
            tma_mean, tma_std = summarize(with_tma)
            tma_text = f"{tma_mean:.2f} ± {tma_std:.2f}"
        lines.append(f"| {setting.name} ({setting.note}) | {setting.group} | {mean:.2f} ± "
                     f"{std:.2f} | {' / '.join(f'{v:.1f}' for v in target)} | {delta_text} | "
                     f"{src_text} | {tma_text} |")
        rows.append({"setting": setting.name, "method": setting.method, "group": setting.group,
                     "overrides": list(setting.overrides), "seeds": [s for s, _ in got],
                     "target_miou": target, "source_miou": source, "mean": mean, "std": std,
                     "delta_vs_baseline": deltas, "target_miou_tma": with_tma,
                     "target_iou": [m.get("target_iou") for _, m in got]})
    lines += ["", "Commands (one per seed; `{seed}` = " + ", ".join(map(str, seeds)) + "):", "",
              "```"]
    for setting in study.settings:
        if any((setting.name, s) in results for s in seeds):
            # a shell-safe stand-in, so shlex does not quote the placeholder
            text = shlex.join(command(study, setting, "SEED_PLACEHOLDER", base))
            lines.append(text.replace("SEED_PLACEHOLDER", "{seed}"))
    lines += ["```", ""]
    text = "\n".join(lines)
    out_prefix.with_suffix(".md").write_text(text)
    out_prefix.with_suffix(".json").write_text(json.dumps(
        {"study": study.name, "steps": study.steps, "pretrain_steps": study.pretrain_steps,
         "seeds": seeds, "baseline": study.baseline, "rows": rows}, indent=1) + "\n")
    plot(study, rows, out_prefix.with_suffix(".png"))
    return text


def plot(study: Study, rows: List[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(rows), 3.6))
    names = [r["setting"] for r in rows]
    colors = ["tab:gray" if r["group"] == "main" and r["setting"] != study.baseline else
              "tab:blue" if r["setting"] == study.baseline else "tab:orange" for r in rows]
    ax.bar(range(len(rows)), [r["mean"] for r in rows], yerr=[r["std"] for r in rows],
           color=colors, capsize=3)
    for i, r in enumerate(rows):
        ax.scatter([i] * len(r["target_miou"]), r["target_miou"], color="k", s=8, zorder=3)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(names, rotation=35, ha="right")
    ax.set_ylabel("target mIoU")
    # long titles wrap to the figure's width instead of running off it
    width = max(30, int(10 * (1.0 + 0.9 * len(rows))))
    ax.set_title("\n".join(textwrap.wrap(study.title, width)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=sorted(STUDIES))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--only", default=None, help="comma-separated setting names")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel")
    parser.add_argument("--threads", type=int, default=1, help="threads per run")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "experiments"),
                        help="folder of the run folders (pre-training cache beside them)")
    parser.add_argument("--report-only", action="store_true", help="aggregate finished runs")
    parser.add_argument("--suffix", default="",
                        help="a separate report of the --only settings: <study>_results<suffix>.{md,json,png}")
    args = parser.parse_args(argv)
    from tqdm.auto import tqdm

    study = STUDIES[args.study]
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {s.name for s in study.settings}
        if unknown:
            parser.error(f"--only: unknown setting(s) {', '.join(sorted(unknown))}")
        todo_settings = [s for s in study.settings if s.name in wanted]
    else:
        todo_settings = study.settings
    base = Path(args.runs) / study.name
    # the main rows of every seed first (the ablations after), seed-major within: the first run
    # of a seed builds its pre-training, the rest reuse it
    groups = list(dict.fromkeys(s.group for s in todo_settings))
    todo = [(setting, seed) for group in groups for seed in seeds for setting in todo_settings
            if setting.group == group]
    results: Dict[Tuple[str, int], dict] = {}
    failures = []
    if study.needs and not args.report_only:
        # runs of another study this one starts from (e.g. their weights), one per seed
        other = STUDIES[study.needs[0]]
        needed = next(s for s in other.settings if s.name == study.needs[1])
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            list(pool.map(lambda seed: run_one(other, needed, seed, base.parent / other.name,
                                               args.threads), seeds))
    if not args.report_only:
        bar = tqdm(total=len(todo), desc=f"{study.name} runs", unit="run")
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = {pool.submit(run_one, study, setting, seed, base, args.threads):
                       (setting, seed) for setting, seed in todo}
            for future in futures:
                setting, seed = futures[future]
                try:
                    results[(setting.name, seed)] = future.result()
                except RuntimeError as exc:
                    failures.append(str(exc))
                    tqdm.write(f"FAILED: {exc}")
                bar.update(1)
                bar.set_postfix_str(f"{setting.name} s{seed}")
        bar.close()
    # the report covers every finished run of the study, not only this invocation's (with
    # --suffix: of the --only settings, a separate report)
    for setting in todo_settings if args.suffix else study.settings:
        for seed in seeds:
            done = finished(run_dir(base, setting, seed), study.steps)
            if done is not None:
                results[(setting.name, seed)] = done
    text = report(study, base, seeds, results, HERE / f"{study.name}_results{args.suffix}")
    print(text)
    for line in failures:
        print("FAILED:", line, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

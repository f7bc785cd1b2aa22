"""Training engine: config, schedule, data streams, checkpoints and bit-for-bit resume,
export/eval, DDP on gloo, the CLI, and short end-to-end runs of every method."""

import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import _standins

from tmt_train.engine import checkpoint as ckpt
from tmt_train.engine import datasets as data
from tmt_train.engine.config import (Config, ConfigError, apply_overrides, merge, pretrain_key,
                                     validate)
from tmt_train.engine.trainer import Trainer, evaluate, lr_factor, run


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    _standins.install(monkeypatch)
    monkeypatch.delenv("TMT_DATA", raising=False)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One pre-training cache for the module: runs with equal settings share it."""
    return tmp_path_factory.mktemp("pretrain-cache")


def tiny(out, method="finetune", steps=4, cache=None, **sections):
    cfg = {
        "model": {"vit": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3,
                          "num_heads": 2, "out_indices": [0, 1, 2]},
                  "decoder_dim": 16, "decoder_dropout": 0.1},
        "data": {"image_size": 32, "batch_size": 2, "eval_batch_size": 8},
        "tmt": {"tma_blocks": 1, "num_regions": 4, "disc_hidden": 16},
        "uda": {},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "train": {"method": method, "steps": steps, "pretrain_steps": 2, "ckpt_every": 2,
                  "progress": False, "out": str(out), "figures": False,
                  "cache_dir": str(cache) if cache else None},
    }
    for section, values in sections.items():
        cfg[section].update(values)
    return Config.from_dict(cfg)


def quiet(*args, **kwargs):
    pass


# ---- configuration -------------------------------------------------------------------------------


def test_config_merge_overrides_and_roundtrip(tmp_path):
    cfg = merge(Config(), {"train": {"steps": 7}, "optim": {"betas": [0.8, 0.9], "lr": 1}})
    assert cfg.train.steps == 7 and cfg.optim.betas == (0.8, 0.9) and cfg.optim.lr == 1.0
    cfg = apply_overrides(cfg, ["tmt.restrict=neighbors", "tmt.neighbors=3",
                                "data.source_options={\"crop_size\": 16}"])
    assert cfg.tmt.restrict == "neighbors" and cfg.tmt.neighbors == 3
    assert cfg.data.source_options == {"crop_size": 16}
    assert Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown config key train.stepz"):
        merge(Config(), {"train": {"stepz": 1}})
    with pytest.raises(ConfigError, match="unknown config section"):
        merge(Config(), {"trian": {}})
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides(Config(), ["steps=3"])
    with pytest.raises(ConfigError, match="true or false"):
        merge(Config(), {"train": {"figures": "yes"}})


@pytest.mark.parametrize("change, message", [
    ({"train": {"method": "dann"}}, "unknown method 'dann'"),
    ({"train": {"steps": 0}}, "--steps must be a positive integer"),
    ({"train": {"steps": -3}}, "--steps must be a positive integer"),
    ({"data": {"target_labels": 0.0}}, "--target-labels"),
    ({"data": {"target_labels": 1.5}}, "--target-labels"),
    ({"data": {"dataset": "imagenet"}}, "unknown dataset 'imagenet'"),
    ({"data": {"dataset": "cityscapes"}}, "single domain"),
    ({"data": {"source": "gta5"}}, "both --source and --target"),
    ({"data": {"source": "gta5", "target": "cityscapes"}}, "needs --data-root"),
    ({"data": {"source": "gta5", "target": "cityscapes", "data_root": "/nonexistent/x"}},
     "directory not found"),
    ({"train": {"device": "tpu"}}, "--device"),
    ({"tmt": {"partition": "slic"}}, "tmt.partition"),
])
def test_validate_rejects(change, message):
    with pytest.raises(ConfigError, match=message):
        validate(merge(Config(), change))


def test_real_pair_roots(tmp_path):
    (tmp_path / "gta").mkdir()
    (tmp_path / "cityscapes").mkdir()
    cfg = validate(merge(Config(), {"data": {"source": "GTA", "target": "cityscapes",
                                             "data_root": str(tmp_path)}}))
    assert cfg.data.dataset == "gta5->cityscapes"
    from tmt_train.engine.config import resolve_data_root

    assert resolve_data_root(cfg.data, "gta5", "source") == str(tmp_path / "gta")
    with pytest.raises(ConfigError, match="no synthia data"):
        validate(merge(cfg, {"data": {"source": "synthia"}}))


def test_pretrain_key_ignores_method_and_finetune_settings():
    a = tiny("x", "finetune")
    b = tiny("y", "tmt", data={"target_labels": 0.5}, tmt={"tma_blocks": 2})
    assert pretrain_key(validate(a)) == pretrain_key(validate(b))
    c = tiny("x", "finetune", train={"seed": 1})
    assert pretrain_key(validate(c)) != pretrain_key(validate(a))


def test_lr_schedule():
    cfg = merge(Config(), {"optim": {"warmup_steps": 10, "warmup_start": 0.0, "schedule": "poly",
                                     "poly_power": 1.0, "min_lr_ratio": 0.1}})
    assert lr_factor(0, 110, cfg) == 0.0
    assert lr_factor(5, 110, cfg) == pytest.approx(0.5)
    assert lr_factor(10, 110, cfg) == pytest.approx(1.0)
    assert lr_factor(60, 110, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, 110, cfg) == pytest.approx(0.1)
    cfg.optim.schedule = "cosine"
    assert lr_factor(60, 110, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    cfg.optim.warmup_steps = -1   # auto: steps // 10
    assert lr_factor(5, 100, cfg) < lr_factor(10, 100, cfg) == pytest.approx(1.0)


# ---- data streams -----------------------------------------------------------------------------------


def test_labeled_subset():
    a = data.labeled_subset(50, 0.1, seed=0)
    assert len(a) == 5 and a == sorted(set(a)) and a == data.labeled_subset(50, 0.1, seed=0)
    assert a != data.labeled_subset(50, 0.1, seed=1)
    assert len(data.labeled_subset(3, 0.01, seed=0)) == 1
    assert data.labeled_subset(7, 1.0, seed=0) == list(range(7))


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


@pytest.mark.parametrize("world", [1, 2])
def test_sampler_resumes_exactly_and_shards(world):
    n, total = 7, 23   # crosses several epochs
    for rank in range(world):
        full = take(iter(data.ResumableSampler(n, seed=3, rank=rank, world_size=world)), total)
        for start in (0, 1, 4, 9, 15):
            resumed = take(iter(data.ResumableSampler(n, seed=3, rank=rank, world_size=world,
                                                      start=start)), total - start)
            assert resumed == full[start:]
    if world == 2:
        per_rank = [take(iter(data.ResumableSampler(n, seed=3, rank=r, world_size=2)), 4)
                    for r in range(2)]
        epoch0 = {i for r in per_rank for (e, i) in r if e == 0}
        assert epoch0 == set(range(n))   # one epoch of both ranks covers the data set


def test_stream_items_do_not_depend_on_the_global_rng():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return {"image": torch.rand(1, 2, 2), "label": torch.zeros(2, 2, dtype=torch.long)}

    def first_batches(consumed, n):
        torch.manual_seed(123 + consumed)   # a different global state each time
        stream = data.DataStream(Noisy(), range(5), batch_size=2, seed=0, rank=0, world_size=1,
                                 consumed=consumed)
        return [next(stream)["image"] for _ in range(n)]

    full = first_batches(0, 4)
    resumed = first_batches(4, 2)
    assert torch.equal(full[2], resumed[0]) and torch.equal(full[3], resumed[1])
    state = torch.get_rng_state()
    first_batches(0, 1)
    torch.manual_seed(0)  # DataStream must not draw from the global generator
    before = torch.get_rng_state()
    stream = data.DataStream(Noisy(), range(5), batch_size=2, seed=0, rank=0, world_size=1)
    next(stream)
    assert torch.equal(torch.get_rng_state(), before)
    torch.set_rng_state(state)


# ---- checkpoints -------------------------------------------------------------------------------------


def test_atomic_save_keeps_the_previous_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / ckpt.checkpoint_name(2)
    ckpt.atomic_torch_save({"step": 2}, path)
    real_save = torch.save

    def dying_save(obj, handle, *a, **k):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_torch_save({"step": 3}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert ckpt.load_checkpoint(path) == {"step": 2}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]   # the temp file is gone


def test_leftover_temp_and_damaged_files_are_ignored(tmp_path):
    ckpt.atomic_torch_save({"step": 2}, tmp_path / ckpt.checkpoint_name(2))
    (tmp_path / ".ckpt_00000004.pt.k3j2.tmp").write_bytes(b"\x80garbage")   # killed mid-write
    (tmp_path / "ckpt_00000006.pt").write_bytes(b"not a checkpoint")        # damaged
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [6, 2]
    with pytest.warns(UserWarning, match="unreadable checkpoint"):
        path, state = ckpt.load_latest(tmp_path)
    assert state["step"] == 2
    ckpt.remove_stale_temp_files(tmp_path)
    assert not list(tmp_path.glob(".*.tmp"))


def test_rng_state_roundtrip():
    import random

    import numpy as np

    state = ckpt.capture_rng_state()
    a = (random.random(), float(np.random.rand()), float(torch.rand(())))
    ckpt.restore_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == a


def final_state(run_dir):
    _, state = ckpt.load_latest(run_dir)
    return state


def assert_same_state(a, b):
    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in sa:
            assert torch.equal(sa[k], sb[k])
    assert a["sampler"] == b["sampler"]
    assert a.keys() == b.keys()
    if "teacher" in a:   # the UDA methods' EMA teacher and their random generator
        assert a["teacher"].keys() == b["teacher"].keys()
        for k in a["teacher"]:
            assert torch.equal(a["teacher"][k], b["teacher"][k]), k
        for ra, rb in zip(a["rng"], b["rng"]):
            assert torch.equal(ra["uda"], rb["uda"])


@pytest.mark.parametrize("method, workers", [("tmt", 0), ("finetune", 0), ("finetune", 2),
                                             ("dacs", 0), ("mrm", 0)])
def test_resume_is_bit_for_bit(tmp_path, method, workers):
    k = 3
    extra = dict(model={"vit": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3,
                                "num_heads": 2, "out_indices": [0, 1, 2],
                                "drop_path_rate": 0.2},
                        "decoder_dim": 16, "decoder_dropout": 0.3},
                 data={"num_workers": workers},
                 uda={"pseudo_threshold": 0.3},   # non-zero pseudo-label weights
                 train={"eval_every": 2, "ckpt_every": 2})
    straight = tiny(tmp_path / "straight", method, steps=2 * k, **extra)
    run(straight, log=quiet)
    split = tiny(tmp_path / "split", method, steps=2 * k, **extra)
    assert run(split, stop_at=k, log=quiet) is None
    assert final_state(tmp_path / "split")["step"] == k
    run(split, resume=True, log=quiet)
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "split")
    assert_same_state(a, b)
    ma = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "split" / "metrics.json").read_text())
    assert ma["target_miou"] == mb["target_miou"] and ma["step"] == mb["step"] == 2 * k
    with open(tmp_path / "split" / "log.csv") as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle)] == [2, 4, 6]


def test_killed_mid_write_loses_at_most_one_interval(tmp_path, monkeypatch, cache_dir):
    straight = tiny(tmp_path / "straight", "tmt", steps=4, cache=cache_dir)
    run(straight, log=quiet)
    crashed = tiny(tmp_path / "crashed", "tmt", steps=4, cache=cache_dir)
    real_save = torch.save

    def crash_at_step_4(obj, handle, *a, **k):
        if isinstance(obj, dict) and obj.get("step") == 4:
            handle.write(b"half")
            raise RuntimeError("power cut")
        return real_save(obj, handle, *a, **k)

    monkeypatch.setattr(torch, "save", crash_at_step_4)
    with pytest.raises(RuntimeError, match="power cut"):
        run(crashed, log=quiet)
    monkeypatch.setattr(torch, "save", real_save)
    # what a SIGKILL during the write would have left behind
    (tmp_path / "crashed" / ".ckpt_00000004.pt.x1y2.tmp").write_bytes(b"half")
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "crashed")] == [2]
    run(crashed, resume=True, log=quiet)
    assert_same_state(final_state(tmp_path / "straight"), final_state(tmp_path / "crashed"))
    assert not list((tmp_path / "crashed").glob(".*.tmp"))


def test_existing_run_needs_resume(tmp_path, cache_dir):
    cfg = tiny(tmp_path / "run", "finetune", steps=2, cache=cache_dir)
    run(cfg, log=quiet)
    with pytest.raises(ConfigError, match="pass --resume"):
        run(cfg, log=quiet)
    # resuming a finished run returns its final metrics without training or evaluating
    first = json.loads((tmp_path / "run" / "metrics.json").read_text())
    messages = []
    assert run(cfg, resume=True, log=messages.append) == first
    assert any("already finished" in m for m in messages)
    # ... and completes the final evaluation when the process died during it
    (tmp_path / "run" / "metrics.json").unlink()
    (tmp_path / "run" / "model.safetensors").unlink()
    again = run(cfg, resume=True, log=quiet)
    assert again["target_miou"] == first["target_miou"] and again["final"]
    assert (tmp_path / "run" / "model.safetensors").is_file()
    with open(tmp_path / "run" / "log.csv") as handle:
        assert [r["step"] for r in csv.DictReader(handle)] == ["2"]


# ---- export / eval ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["finetune", "tmt"])
def test_export_eval_roundtrip(tmp_path, method, cache_dir, capsys):
    from safetensors.torch import load_file

    from tmt_train.engine.cli import main
    from tmt_train.engine.export import export_model, load_exported
    from tmt_train.models import build_model

    cfg = tiny(tmp_path / "run", method, steps=2, cache=cache_dir)
    metrics = run(cfg, log=quiet)
    weights, meta_path = export_model(tmp_path / "run", tmp_path / "exp" / "m.safetensors")
    assert meta_path == tmp_path / "exp" / "m.json"
    tensors = load_file(str(weights))
    assert not any("acte" in k or "discriminator" in k or "lambda" in k for k in tensors)
    meta = json.loads(meta_path.read_text())
    assert meta["model"]["tma_blocks"] == 0 and meta["method"] == method and meta["step"] == 2
    # the end-of-run model equals the export of the last checkpoint
    end_of_run = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert end_of_run.keys() == tensors.keys()
    assert all(torch.equal(end_of_run[k], tensors[k]) for k in tensors)

    exported, _ = load_exported(weights)
    state = final_state(tmp_path / "run")
    trained = build_model({**state["config"]["model"], "num_classes": state["num_classes"],
                           "tma_blocks": 1 if method == "tmt" else 0}, load_pretrained=False)
    trained.load_state_dict({k[6:]: v for k, v in state["model"].items()
                             if k.startswith("model.")})
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        a, b = exported(x), trained.eval()(x)
    if method == "finetune":
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    capsys.readouterr()
    out_json = tmp_path / "eval.json"
    assert main(["eval", str(weights), "--domain", "both", "--device", "cpu",
                 "--out", str(out_json)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["target_miou"] == pytest.approx(metrics["target_miou"], abs=1e-9)
    assert printed["source_miou"] == pytest.approx(metrics["source_miou"], abs=1e-9)
    assert json.loads(out_json.read_text())["target_iou"] == metrics["target_iou"]

    assert main(["export", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()


# ---- DDP -------------------------------------------------------------------------------------------


def _ddp_worker(rank, world, port, cfg_dict, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    _standins.install()
    from tmt_train.engine import distributed as distr
    from tmt_train.engine.trainer import ensure_pretrained

    cfg = validate(Config.from_dict(cfg_dict))
    ctx = distr.setup(cfg.train.device)
    assert ctx.world_size == world and ctx.rank == rank
    init = ensure_pretrained(cfg, ctx, log=quiet)
    trainer = Trainer(cfg, ctx, init_weights=str(init), log=quiet)
    trainer.fit()
    torch.save(trainer.module.state_dict(), Path(result_dir) / f"rank{rank}.pt")
    distr.cleanup(ctx)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gloo_two_processes(tmp_path):
    import torch.multiprocessing as mp

    cfg = tiny(tmp_path / "run", "tmt", steps=3, cache=tmp_path / "cache",
               train={"device": "cpu", "ckpt_every": 2})
    context = mp.start_processes(_ddp_worker, args=(2, free_port(), cfg.to_dict(), str(tmp_path)),
                                 nprocs=2, join=False, start_method="spawn")
    deadline = time.time() + 120
    while not context.join(timeout=5):
        if time.time() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("DDP workers did not finish in time")
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(r0[k], r1[k]) for k in r0), "ranks diverged"
    state = final_state(tmp_path / "run")
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["sampler"] == {"source": 3 * 2, "target": 3 * 2}   # per rank
    assert all(torch.equal(state["model"][k], r0[k]) for k in r0)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # the all-reduced evaluation equals a single-process evaluation of the same model
    from tmt_train.engine.export import load_exported
    from tmt_train.engine.distributed import DistContext

    model, meta = load_exported(tmp_path / "run" / "model.safetensors")
    target = data.build_domain(validate(cfg), "target", train=False).eval
    single = evaluate(model, target, num_classes=meta["num_classes"],
                      class_names=meta["class_names"], ctx=DistContext())
    assert single["miou"] == pytest.approx(metrics["target_miou"], abs=1e-9)
    with open(tmp_path / "run" / "log.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 1   # rank 0 logs once


# ---- CLI ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["train", "--method", "dann", "--out", "x"], "unknown method 'dann'"),
    (["train", "--dataset", "mnist", "--out", "x"], "unknown dataset 'mnist'"),
    (["train", "--source", "gta5", "--target", "cityscapes", "--out", "x"], "--data-root"),
    (["train", "--source", "gta5", "--target", "cityscapes", "--data-root", "/no/such/dir",
      "--out", "x"], "directory not found"),
    (["train", "--steps", "0", "--out", "x"], "--steps must be a positive integer"),
    (["train", "--steps", "-5", "--out", "x"], "--steps must be a positive integer"),
    (["train", "--target-labels", "2", "--out", "x"], "--target-labels"),
    (["train", "--steps", "3"], "--out DIR is required"),
    (["train", "--config", "/no/such.json", "--out", "x"], "config file not found"),
    (["train", "--set", "train.nope=1", "--out", "x"], "unknown config key"),
    (["eval", "/no/model.safetensors"], "model file not found"),
    (["export", "/no/run"], "not a run folder or checkpoint"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
    from tmt_train.engine.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_argparse_errors_exit_nonzero(capsys):
    from tmt_train.engine.cli import main

    with pytest.raises(SystemExit) as info:
        main(["train", "--steps", "many"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "invalid int value" in err


def test_cli_subprocess_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tmt_train", "train", "--method",
                           "nope", "--out", str(tmp_path / "x")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("tmt_train train: error: unknown method 'nope'; choose from "
                                   "source_only, finetune, tmt, dacs, mrm, tmt_mrm")


# ---- end to end ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, tmt", [
    ("source_only", {}),
    ("finetune", {}),
    ("tmt", {}),
    ("tmt", {"partition": "local", "cell": 2, "restrict": "neighbors", "neighbors": 1}),
])
def test_end_to_end(tmp_path, method, tmt, cache_dir):
    figures = method == "tmt"
    cfg = tiny(tmp_path / "run", method, steps=3, cache=cache_dir, tmt=tmt,
               train={"figures": figures, "figure_images": 2})
    messages = []
    metrics = run(cfg, log=messages.append)
    out = tmp_path / "run"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    for key in ("method", "step", "target_miou", "source_miou", "target_iou", "source_iou"):
        assert key in saved
    assert saved["method"] == method and saved["step"] == 3
    assert 0.0 <= saved["target_miou"] <= 100.0 and 0.0 <= saved["source_miou"] <= 100.0
    assert set(saved["target_iou"]) == {"background", "disc", "square", "ring"}
    losses = saved["train_losses"]
    assert losses["ce_src"] > 0
    assert (losses["ce_tgt"] > 0) == (method != "source_only")
    assert (losses["loss_dom"] > 0) == (method == "tmt")
    if method == "tmt":
        assert saved["tma_lambda"] and min(saved["tma_lambda"]) >= 0
        assert 0.0 <= saved["target_miou_tma"] <= 100.0  # ACTE + TMA at test time
        assert set(saved["target_iou_tma"]) == set(saved["target_iou"])
    else:
        assert saved["target_miou_tma"] is None
    with open(out / "log.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["step"] for r in rows] == ["3"] and float(rows[0]["target_miou"]) >= 0
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert (out / "target_labeled.json").is_file() == (method != "source_only")
    assert (out / "predictions.png").is_file() == figures
    assert (out / "tma_regions.png").is_file() == figures
    # every method starts from the same cached pre-training
    pretrained = [p for p in Path(cache_dir).iterdir() if p.is_dir()]
    assert len(pretrained) == 1 and (pretrained[0] / "model.safetensors").is_file()
    assert any("initial weights from" in str(m) for m in messages)


def test_cli_train_with_config_file(tmp_path, cache_dir, capsys):
    from tmt_train.engine.cli import main

    cfg = tiny(tmp_path / "ignored", "finetune", steps=2, cache=cache_dir).to_dict()
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    rc = main(["train", "--config", str(tmp_path / "cfg.json"), "--method", "tmt", "--out",
               str(tmp_path / "run"), "--steps", "2", "--target-labels", "0.5",
               "--set", "tmt.restrict=neighbors", "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "tmt" and summary["step"] == 2
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["tmt"]["restrict"] == "neighbors" and saved["data"]["target_labels"] == 0.5
    labeled = json.loads((tmp_path / "run" / "target_labeled.json").read_text())
    assert len(labeled["indices"]) == 12   # half of the 24 stand-in target train images


def test_tma_predictor_is_the_tma_forward(tmp_path):
    # Inference with ACTE + TMA at test time: with λ ≈ 0 (and no restriction) the bias vanishes
    # and it gives the TMA-off model's logits; with a large λ it does not.
    from tmt_train.engine.trainer import TMAPredictor, TrainModule, build_acte
    from tmt_train.models import build_model

    cfg = tiny(tmp_path / "run", "tmt")
    cfg.model.tma_blocks = cfg.tmt.tma_blocks
    model = build_model(cfg.model, num_classes=4, verbose=False)
    acte = build_acte(cfg, model)
    predictor = TMAPredictor(TrainModule(model, acte)).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model.eval()(images)
        acte.lambda_param.fill_(-30.0)  # softplus: λ ≈ 1e-13
        torch.testing.assert_close(predictor(images), plain, atol=1e-5, rtol=1e-5)
        acte.lambda_param.fill_(3.0)
        assert (predictor(images) - plain).abs().max() > 1e-3


def test_lambda_has_its_own_learning_rate(tmp_path):
    # TMA's λ is a parameter group of its own at optim.lr × tmt.lambda_lr_mult, without weight
    # decay; the discriminator stays in the head group.
    from tmt_train.engine.trainer import TrainModule, build_acte, param_groups
    from tmt_train.models import build_model

    cfg = tiny(tmp_path / "run", "tmt")
    cfg.tmt.lambda_lr_mult = 20.0
    cfg.optim.head_lr_mult = 3.0
    cfg.model.tma_blocks = cfg.tmt.tma_blocks
    model = build_model(cfg.model, num_classes=4, verbose=False)
    module = TrainModule(model, build_acte(cfg, model))
    groups = {g["name"]: g for g in param_groups(module, cfg)}
    lam = groups["lambda/no_decay"]
    assert [id(p) for p in lam["params"]] == [id(module.acte.lambda_param)]
    assert lam["lr"] == pytest.approx(cfg.optim.lr * 20.0) and lam["weight_decay"] == 0.0
    assert groups["head/decay"]["lr"] == pytest.approx(cfg.optim.lr * 3.0)
    every = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in module.parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match="tmt.lambda_lr_mult"):
        validate(merge(cfg, {"tmt": {"lambda_lr_mult": -1.0}}))


def test_init_from_replaces_the_source_pretraining(tmp_path, cache_dir):
    # train.init_from: a run starts from another run's exported model, and no source
    # pre-training is built or read
    first = tiny(tmp_path / "first", "finetune", steps=2, cache=cache_dir)
    run(first, log=quiet)
    weights = tmp_path / "first" / "model.safetensors"
    assert weights.is_file()
    empty_cache = tmp_path / "unused-cache"
    cfg = tiny(tmp_path / "second", "finetune", steps=2, cache=empty_cache,
               train={"init_from": str(weights)})
    messages = []
    assert run(cfg, log=messages.append)["step"] == 2
    assert any(f"initial weights from {weights}" in m for m in messages)
    assert not any("pre-training" in m for m in messages)
    assert not empty_cache.exists() or not any(empty_cache.iterdir())
    with pytest.raises(ConfigError, match="train.init_from"):
        validate(merge(cfg, {"train": {"init_from": str(tmp_path / "missing.safetensors")}}))

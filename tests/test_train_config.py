"""Trainer pieces that need no data: config layering and validation, the CLI's one-line errors, the LR
schedule, optimizer groups, model building and fine-tuning, the train step, atomic checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pipeline.augment import MAGNITUDE_BINS
from training import checkpoint
from training.config import ConfigError, TrainConfig, build_config, from_dict, validate_environment
from training.model import build_model
from training.optim import build_optimizer, build_scheduler, lr_factor
from training.step import TrainStep

SYNTH = dict(backend="synthetic")


# --- config ---------------------------------------------------------------------------------------------
def test_defaults_are_the_resnet50_recipe():
    c = build_config(overrides=SYNTH)
    assert (c.arch, c.batch_size, c.base_lr, c.momentum, c.nesterov) == ("resnet50", 256, 0.256, 0.9, True)
    assert (c.label_smoothing, c.weight_decay, c.lr_schedule, c.warmup_epochs, c.epochs) == (
        0.1, 5e-5, "cosine", 5.0, 90)
    assert c.peak_lr(world_size=8) == pytest.approx(0.256 * 8)  # 256 per GPU x 8 = 2048 -> 2.048


def test_file_then_cli_layering_and_round_trip(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("epochs: 7\nbase-lr: 0.5\ncrop_area: [0.35, 1.0]\nbackend: synthetic\n")
    c = build_config(file=yaml_file, overrides={"epochs": "9", "compile": True})
    assert (c.epochs, c.base_lr, c.crop_area, c.compile) == (9, 0.5, (0.35, 1.0), True)
    toml_file = tmp_path / "run.toml"
    toml_file.write_text('backend = "synthetic"\nglobal_batch_size = 1024\nlr_milestones = [10, 20]\n')
    t = build_config(file=toml_file)
    assert (t.global_batch_size, t.lr_milestones, t.peak_lr(world_size=4)) == (1024, (10, 20), 0.256 * 4)
    assert from_dict(c.to_dict()) == c  # what checkpoints and config.json hold rebuilds the same config


RECIPES = Path(__file__).resolve().parents[1] / "training" / "recipes"


def test_every_recipe_loads_through_the_cli_and_names_its_source(tmp_path, capsys):
    """`saturate train --config training/recipes/<name>.yaml --print-config` for each recipe, on a machine
    without the data (no --data); each file starts with a comment giving its source and what it reports."""
    import json

    from tools.cli import main

    loaded = {}
    for recipe in sorted(RECIPES.glob("*.yaml")):
        header = recipe.read_text().split("\n")
        assert header[0].startswith("# ") and any(line.startswith("# Source: ") for line in header), recipe
        assert any(line.startswith("# Reported") for line in header), recipe
        assert main(["train", "--config", str(recipe), "--print-config"]) == 0
        loaded[recipe.stem] = json.loads(capsys.readouterr().out)
        assert loaded[recipe.stem]["data"] is None
    assert sorted(loaded) == ["convnext_tiny_timm_style", "rn50_dle_250ep", "rn50_dle_250ep_autoaugment",
                              "rn50_dle_90ep", "rn50_ffcv_16ep", "rn50_ffcv_88ep"]
    dle = loaded["rn50_dle_90ep"]
    assert (dle["momentum"], dle["nesterov"], dle["weight_decay"], dle["warmup_epochs"], dle["base_lr"] * 8) == (
        0.875, False, 1 / 32768, 8, 2.048)  # DLE's DGX A100 recipe: lr 2.048 at 8 x 256
    assert (loaded["rn50_dle_250ep"]["mixup"], loaded["rn50_dle_250ep"]["augment"]) == (0.2, "rrc-flip")
    assert loaded["rn50_dle_250ep_autoaugment"]["augment"] == "autoaugment-v0"  # DLE's policy is TF's v0
    # neither DLE (last_bn_0_init=False) nor FFCV (torchvision's default) zero-inits the residual branches
    assert {name: c["zero_init_residual"] for name, c in loaded.items() if c["arch"] == "resnet50"} == {
        name: False for name in loaded if name.startswith("rn50_")}
    for epochs, ramp in ((16, (11, 13)), (88, (65, 76))):
        ffcv = build_config(file=RECIPES / f"rn50_ffcv_{epochs}ep.yaml", overrides={"data": str(tmp_path)})
        assert ffcv.epochs == epochs and (ffcv.start_ramp, ffcv.end_ramp) == ramp and ffcv.eval_image_size == 256
        assert ffcv.peak_lr(world_size=8) == pytest.approx(1.7) and ffcv.lr_schedule == "linear"
        assert [ffcv.image_size_at(e) for e in (0, ramp[0], ramp[1], epochs - 1)] == [160, 160, 192, 192]
    convnext = build_config(file=RECIPES / "convnext_tiny_timm_style.yaml", overrides={"data": str(tmp_path)})
    assert (convnext.global_batch(8), convnext.per_process_batch(8), convnext.peak_lr(8)) == (4096, 128, 4e-3)
    assert (convnext.augment_policy().spec, convnext.mixup, convnext.cutmix, convnext.ema_decay) == (
        "randaugment(n=2,m=27)+random_erasing(0.25)", 0.8, 1.0, 0.9999)
    # timm's rand-m9 is 9 / _LEVEL_DENOM (10) of each op's range; our bins span the range in MAGNITUDE_BINS - 1 steps
    assert convnext.randaugment_m / (MAGNITUDE_BINS - 1) == 9 / 10


def test_gradient_accumulation_keeps_the_global_batch():
    c = build_config(overrides=dict(SYNTH, global_batch_size=4096, grad_accum_steps=4))
    assert (c.per_process_batch(8), c.global_batch(8), c.peak_lr(8)) == (128, 4096, 0.256 * 16)
    c = build_config(overrides=dict(SYNTH, batch_size=64, grad_accum_steps=2))
    assert (c.per_process_batch(2), c.global_batch(2)) == (64, 256)


def test_progressive_resizing_follows_ffcv_ramp():
    c = build_config(overrides=dict(SYNTH, image_size=128, min_res=64, start_ramp=2, end_ramp=6))
    # FFCV: linear in the epoch between start_ramp and end_ramp, rounded to a multiple of 32
    assert [c.image_size_at(e) for e in range(8)] == [64, 64, 64, 64, 96, 128, 128, 128]
    assert build_config(overrides=SYNTH).image_size_at(3) == 224  # off by default


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"base_lr": "-0.1"}, "--base-lr: must be > 0, got -0.1"),
        ({"backend": "tfrecord"}, "--backend: must be one of dali-gpu, dali-cpu, pytorch, synthetic"),
        ({"backend": "dali-cpu"}, "--data: is required with --backend dali-cpu"),
        ({"backend": "dali-cpu", "data": "/no/such/shards"}, "--data: directory does not exist"),
        ({"precision": "fp8"}, "--precision: must be one of bf16, fp16, fp32"),
        ({"epochs": "ten"}, "--epochs: cannot read 'ten'"),
        ({"crop_area": (0.5, 0.2)}, "--crop-area: must be two fractions"),
        ({"hw_decoder_load": 1.5}, "--hw-decoder-load: must be in [0, 1] or 'auto', got 1.5"),
        ({"num_threads": "some"}, "--num-threads: cannot read 'some'"),
        ({"num_threads": 0}, "--num-threads: must be > 0 or 'auto', got 0"),
        ({"prefetch_depth": 0}, "--prefetch-depth: must be > 0, got 0"),
        ({"hw_decoder_load": 0.5, "backend": "pytorch", "data": "."},
         "--hw-decoder-load: backend 'pytorch' has no such knob; it applies to dali-gpu (leave it unset), got 0.5"),
        ({"prefetch_depth": 2}, "--prefetch-depth: backend 'synthetic' has no such knob"),
        ({"evaluate_only": True}, "--evaluate-only: needs --resume PATH|auto or --pretrained PATH"),
        ({"resume": "/no/such.pt"}, "--resume: must be 'auto' or an existing checkpoint file"),
        ({"pretrained": "/no/such.pt"}, "--pretrained: file does not exist"),
        ({"batchsize": 3}, "unknown option 'batchsize'"),
        ({"augment": "autoaug"}, "--augment: unknown policy; choose one of rrc-flip, autoaugment, autoaugment-v0, "),
        ({"randaugment_m": 31}, "--randaugment-m: must be an integer magnitude bin in [0, 31), got 31"),
        ({"random_erasing": 1.5}, "--random-erasing: must be a probability in [0, 1], got 1.5"),
        ({"augment": "randaugment"}, "--augment: backend 'synthetic' yields random tensors"),
        ({"augment": "autoaugment-v0", "backend": "pytorch"},
         "--augment: backend 'pytorch': torchvision has no v0 policy"),
        ({"mixup": -0.2}, "--mixup: must be >= 0 (0: off), got -0.2"),
        ({"mixup_switch_prob": 2}, "--mixup-switch-prob: must be a probability in [0, 1], got 2.0"),
        ({"ema_decay": 1.0}, "--ema-decay: must be in (0, 1), got 1.0"),
        ({"ema_every": 0}, "--ema-every: must be >= 1, got 0"),
        ({"optimizer": "lamb"}, "--optimizer: must be one of sgd, adamw, got 'lamb'"),
        ({"adam_betas": (0.9,)}, "--adam-betas: must be two values in [0, 1)"),
        ({"clip_grad_norm": 0}, "--clip-grad-norm: must be > 0, got 0.0"),
        ({"grad_accum_steps": 0}, "--grad-accum-steps: must be >= 1, got 0"),
        ({"lr_schedule": "poly"}, "--lr-schedule: must be one of cosine, linear, step"),
        ({"image_size": 10**20}, "--image-size: is out of range"),
        ({"image_size": 9000}, "--image-size: must be <= 8192 pixels"),
        ({"num_threads": 5000}, "--num-threads: must be <= 1024"),
        ({"base_lr": "inf"}, "--base-lr: must be a finite number, got inf"),
        ({"weight_decay": "nan"}, "--weight-decay: must be a finite number"),
        ({"seed": -3}, "--seed: must be in [0, 2**32), got -3"),
        ({"start_ramp": -3}, "--start-ramp: must be >= 0, got -3"),
        ({"lr_milestones": (0, 5)}, "--lr-milestones: must be epochs >= 1"),
    ],
)
def test_bad_values_name_their_flag(overrides, message):
    with pytest.raises(ConfigError) as err:
        build_config(overrides={**SYNTH, **overrides})
    assert str(err.value).startswith(message)


@pytest.mark.parametrize(
    ("overrides", "world_size", "cuda", "message"),
    [
        ({"global_batch_size": 1000}, 3, False, "--global-batch-size: 1000 is not divisible by the world size 3"),
        ({"global_batch_size": 999, "grad_accum_steps": 2}, 3, False,
         "--global-batch-size: 999 is not divisible by the world size 3 x --grad-accum-steps 2"),
        ({"arch": "resnet5000"}, 1, False, "--arch: 'resnet5000' is not a torchvision classification model"),
        ({"precision": "fp16"}, 1, False, "--precision: fp16 needs a CUDA GPU"),
        ({"backend": "dali-gpu"}, 1, False, "--backend: dali-gpu needs a CUDA GPU"),
    ],
)
def test_environment_checks_name_their_flag(tmp_path, overrides, world_size, cuda, message):
    config = build_config(overrides={**SYNTH, "data": str(tmp_path), **overrides})
    with pytest.raises(ConfigError) as err:
        validate_environment(config, world_size=world_size, cuda=cuda)
    assert str(err.value).startswith(message)
    validate_environment(build_config(overrides={**SYNTH, "global_batch_size": 999}), world_size=3, cuda=False)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--backend", "synthetic", "--base-lr", "-1"], "saturate train: error: --base-lr: must be > 0, got -1.0"),
        (["--backend", "synthetic", "--arch", "resnet5000"], "saturate train: error: --arch: 'resnet5000' is not"),
        (["--backend", "dali-cpu", "--data", "/no/such/shards"], "saturate train: error: --data: directory does not"),
        (["--backend", "nope"], "saturate train: error: --backend: must be one of"),
        (["--backend", "synthetic", "--evaluate-only", "--resume", "auto"],
         "saturate train: error: --evaluate-only: --resume auto found no checkpoint"),
    ]
    + ([] if torch.cuda.is_available() else [
        (["--backend", "synthetic", "--precision", "fp16"],
         "saturate train: error: --precision: fp16 needs a CUDA GPU"),
        (["--backend", "dali-gpu", "--data", "."], "saturate train: error: --backend: dali-gpu needs a CUDA GPU"),
    ]),
)
def test_cli_fails_at_start_with_one_line(argv, message, capsys, tmp_path):
    from tools.train_cmd import main

    assert main([*argv, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message), err
    assert err.count("\n") == 1
    assert not (tmp_path / "run").exists()  # nothing written before the config is known to be good


@pytest.mark.parametrize(("name", "text", "problem"), [
    ("bad.yaml", "epochs: [1\n", "not valid YAML (line 2, column 1: expected ',' or ']', but got '<stream end>')"),
    ("bad.yml", "epochs: 1\n\tbase_lr: 2\n", "not valid YAML (line 2, column 1: found character '\\t' that "
                                                "cannot start any token)"),
    ("bad.json", '{"epochs": 1,\n', "not valid JSON (Expecting property name enclosed in double quotes: line 2 "
                                      "column 1 (char 14))"),
    ("bad.toml", "epochs = [\n", "not valid TOML (Invalid value (at end of document))"),
    ("latin1.yaml", b"epochs: 1 # caf\xe9\n", "not UTF-8 text"),
])
def test_a_malformed_config_file_is_one_line_naming_it(tmp_path, capsys, name, text, problem):
    """`printf "epochs: [1\\n" > bad.yaml; saturate train --config bad.yaml` printed PyYAML's traceback and exited
    1; bad JSON and TOML gave one line that did not name the file."""
    from tools.train_cmd import main

    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    for extra in ([], ["--print-config"]):
        assert main(["--config", str(path), "--backend", "synthetic", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"saturate train: error: --config: {path}: {problem}"), err
        assert err.count("\n") == 1


def test_data_pointing_at_a_file_says_so(tmp_path, capsys):
    """`--data` naming a regular file (a tar, the manifest itself) said "directory does not exist"; a file for
    any other folder (shards to verify, merge or write into, a source) and a folder for --config are said as
    plainly (they gave `[Errno 20] Not a directory: '.../train-000000.tar/.parts/train.plan.json'`)."""
    from tools.cli import main as saturate
    from tools.train_cmd import main

    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(b"")
    assert main(["--backend", "pytorch", "--data", str(shard), "--run-dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == (f"saturate train: error: --data: {shard} is a file; give the folder that "
                                       "holds the shards and their manifests\n")
    for argv in (["verify", str(shard)], ["merge", str(shard), "--split", "train"],
                 ["convert", str(tmp_path), str(shard), "--split", "train"]):
        assert saturate(["shards", *argv]) == 2
        assert capsys.readouterr().err == (f"saturate shards: error: shard directory {shard} is a file, not a "
                                           "folder\n"), argv
    assert saturate(["shards", "convert", str(shard), str(tmp_path / "out"), "--split", "train"]) == 2
    assert f"source folder {shard} is a file; give the folder" in capsys.readouterr().err
    assert main(["--config", str(tmp_path), "--data", str(tmp_path)]) == 2
    assert f"--config: {tmp_path} is a folder; give a .yaml, .toml or .json file" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()


def test_cli_print_config(capsys):
    from tools.train_cmd import main

    assert main(["--backend", "synthetic", "--arch", "resnet18", "--no-channels-last", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert '"arch": "resnet18"' in printed and '"channels_last": false' in printed


def test_print_config_needs_no_run_time_paths(capsys, tmp_path):
    """--print-config shows a config whose data, checkpoint and weights live elsewhere; a run with the same
    flags still stops at the first missing one, and bad values are still refused when printing."""
    from tools.train_cmd import main

    elsewhere = ["--data", "/no/such/shards", "--resume", "/no/such.pt", "--pretrained", "/no/such.pth"]
    assert main([*elsewhere, "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["data"], printed["resume"], printed["pretrained"]) == ("/no/such/shards", "/no/such.pt",
                                                                           "/no/such.pth")
    assert main(["--backend", "dali-cpu", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["data"] is None
    assert main([*elsewhere, "--run-dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.startswith("saturate train: error: --data: directory does not exist")
    assert main(["--base-lr", "-1", "--print-config"]) == 2
    assert capsys.readouterr().err.startswith("saturate train: error: --base-lr: must be > 0")


# --- schedule and optimizer -----------------------------------------------------------------------------
def test_warmup_then_cosine_and_step():
    sched = dict(steps_per_epoch=10, epochs=10, warmup_epochs=2)
    assert [lr_factor(s, **sched) for s in (0, 9, 19)] == [1 / 20, 10 / 20, 1.0]
    assert lr_factor(20, **sched) == 1.0  # cosine starts at the peak after warm-up
    assert lr_factor(60, **sched) == pytest.approx(0.5)  # half way through the 80 cosine steps
    assert lr_factor(99, **sched) == pytest.approx(0.5 * (1 + math.cos(math.pi * 79 / 80)))
    step = dict(sched, schedule="step", milestones=(3, 6), gamma=0.1)
    assert [lr_factor(s, **step) for s in (25, 30, 59, 60, 99)] == pytest.approx([1, 0.1, 0.1, 0.01, 0.01])


def test_no_weight_decay_on_bn_and_bias():
    model = build_model("resnet18", num_classes=10)
    optimizer = build_optimizer(model, lr=0.1, weight_decay=1e-4)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    bn_and_bias = {id(p) for n, p in model.named_parameters() if "bn" in n or "downsample.1" in n or
                   n.endswith("bias")}
    assert {id(p) for p in no_decay["params"]} == bn_and_bias
    assert len(decay["params"]) == 21  # 20 convolutions + the fc weight
    assert optimizer.defaults["nesterov"] and optimizer.defaults["momentum"] == 0.9


def test_convnext_layer_scale_gets_no_weight_decay():
    """torchvision's ConvNeXt stores layer scale as (dim, 1, 1); ConvNeXt's own code (a 1-D gamma) never decays
    it, so it is exempt by name, next to every 1-D parameter (LayerNorm, biases)."""
    model = build_model("convnext_tiny", num_classes=10)
    decay, no_decay = build_optimizer(model, lr=1e-3, name="adamw", weight_decay=0.05).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    layer_scales = [n for n, p in model.named_parameters() if n.endswith(".layer_scale")]
    assert len(layer_scales) == 18 and all(model.get_parameter(n).ndim == 3 for n in layer_scales)  # 3+3+9+3 blocks
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert set(layer_scales) <= exempt
    assert exempt == {n for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith(".layer_scale")}
    assert all(names[id(p)].endswith("weight") and p.ndim in (2, 4) for p in decay["params"])


# --- model ----------------------------------------------------------------------------------------------
def test_pretrained_fine_tuning_replaces_the_head(tmp_path):
    torch.manual_seed(0)
    source = build_model("resnet18", num_classes=1000, channels_last=False)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = build_model("resnet18", num_classes=10, pretrained=path)
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.weight, source.layer4[1].bn2.weight)
    assert model.fc.weight.shape == (10, 512)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    torch.save(build_model("mobilenet_v3_small", num_classes=10).state_dict(), tmp_path / "other.pth")
    with pytest.raises(ValueError, match="--pretrained: .*other.pth does not match the architecture"):
        build_model("resnet18", num_classes=10, pretrained=tmp_path / "other.pth")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_step_fits_one_batch(precision):
    torch.manual_seed(0)
    model = torch.nn.Sequential(  # small enough to take milliseconds per step on a CPU
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 4),
    ).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, lr=0.2)
    scheduler = build_scheduler(optimizer, steps_per_epoch=1, epochs=40, warmup_epochs=0)
    step = TrainStep(model, optimizer, precision=precision, label_smoothing=0.0, scheduler=scheduler)
    assert not step.scaler.is_enabled()  # the scaler is for fp16 only
    labels = torch.arange(8) % 4
    images = torch.randn(8, 3, 16, 16) * 0.1 + labels[:, None, None, None] - 1.5  # brightness = class
    images = images.half().contiguous(memory_format=torch.channels_last)  # what the loader hands over
    losses = [float(step(images, labels)) for _ in range(20)]
    assert losses[-1] < losses[0] / 2, losses
    assert scheduler.last_epoch == 20  # stepped once per optimizer step
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.2 * lr_factor(20, steps_per_epoch=1, epochs=40,
                                                                              warmup_epochs=0))


@pytest.mark.gpu
def test_train_step_fp16_scaler_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = build_model("resnet18", num_classes=4).cuda()
    step = TrainStep(model, build_optimizer(model, lr=0.05), precision="fp16", compile=False)
    assert step.scaler.is_enabled()
    images = torch.randn(8, 3, 64, 64, device="cuda").half().contiguous(memory_format=torch.channels_last)
    loss = step(images, torch.arange(8, device="cuda") % 4)
    assert loss.is_cuda and torch.isfinite(loss)


# --- checkpoints ----------------------------------------------------------------------------------------
def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    run = tmp_path / "run"
    good = {"model": {"w": torch.arange(4.0)}, "step": 1, "config": TrainConfig().to_dict()}
    path = checkpoint.save(good, run, step=1, keep_last=3, is_best=True)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial bytes")  # a crash half-way through the write
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_save({"step": 2}, path)  # over the existing file
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save({"step": 2}, run, step=2, keep_last=3, is_best=True)
    monkeypatch.undo()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "step-00000001.pt"]
    for name in ("step-00000001.pt", "best.pt"):
        loaded = checkpoint.load(run / "checkpoints" / name)  # weights_only=True
        assert loaded["step"] == 1 and torch.equal(loaded["model"]["w"], torch.arange(4.0))
    assert checkpoint.resolve("auto", run) == path


def test_checkpoint_rotation_keeps_last_n_and_best(tmp_path):
    for step in range(1, 6):
        checkpoint.save({"step": step}, tmp_path, step=step, keep_last=2, is_best=step == 3)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000004.pt", "step-00000005.pt"]
    assert checkpoint.load(tmp_path / "checkpoints" / "best.pt")["step"] == 3
    assert checkpoint.resolve("auto", tmp_path).name == "step-00000005.pt"
    assert checkpoint.resolve("auto", tmp_path / "empty") is None


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    import random

    import numpy as np

    state = checkpoint.rng_state()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    checkpoint.atomic_save({"rng": state}, tmp_path / "rng.pt")
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "rng.pt")["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_a_global_batch_another_process_count_cannot_keep_names_the_counts_that_can():
    """A run resumed on another number of GPUs keeps its global batch; a count that does not divide it is refused
    with the counts that do (elastic resume needs the same global batch)."""
    cfg = build_config(overrides={**SYNTH, "global_batch_size": 12, "arch": "resnet18"})
    validate_environment(cfg, world_size=3, cuda=False)
    with pytest.raises(ConfigError, match=r"^--global-batch-size: 12 is not divisible by the world size 5; it runs "
                                          r"on 1, 2, 3, 4, 6, 12 processes$"):
        validate_environment(cfg, world_size=5, cuda=False)
    accumulated = build_config(overrides={**SYNTH, "global_batch_size": 12, "grad_accum_steps": 2, "arch": "resnet18"})
    with pytest.raises(ConfigError, match=r"x --grad-accum-steps 2; it runs on 1, 2, 3, 6 processes$"):
        validate_environment(accumulated, world_size=4, cuda=False)
    many = build_config(overrides={**SYNTH, "global_batch_size": 1024, "arch": "resnet18"})
    with pytest.raises(ConfigError, match=r"it runs on 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024 processes$"):
        validate_environment(many, world_size=3, cuda=False)

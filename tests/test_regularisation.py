"""The trainer's regularisation pieces without data: mixup/cutmix targets and pairs (training/mix.py), the
weight EMA (training/ema.py), gradient accumulation and clipping in the step, AdamW and the linear schedule."""

from __future__ import annotations

import pytest
import torch

from training.ema import WeightEMA, ema_weights
from training.evaluate import evaluate, evaluate_models, with_ema
from training.mix import BatchMix
from training.optim import build_optimizer, build_scheduler, lr_factor
from training.step import TrainStep

CLASSES = 6


def numbered_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is filled with the value i and labelled i: a mixed image's pixels say which images it holds."""
    labels = torch.arange(CLASSES)
    images = labels.float()[:, None, None, None].expand(CLASSES, 3, 8, 10).contiguous(
        memory_format=torch.channels_last).half()
    return images, labels


def test_mixup_pairs_each_image_with_the_previous_one():
    images, labels = numbered_batch()
    mix = BatchMix(num_classes=CLASSES, mixup_alpha=0.4, cutmix_alpha=0.0, switch_prob=0.5, seed=0, rank=0)
    mixed, targets = mix(images, labels, index=7)
    assert mixed.dtype == torch.float16 and mixed.is_contiguous(memory_format=torch.channels_last)
    assert targets.shape == (CLASSES, CLASSES) and targets.dtype == torch.float32
    lam = float(targets[0, 0])
    assert 0 < lam < 1
    for i in range(CLASSES):
        pair = (i - 1) % CLASSES  # torchvision pairs image i with image i-1 (the batch is shuffled)
        want = torch.zeros(CLASSES)
        want[i], want[pair] = lam, 1 - lam
        assert torch.allclose(targets[i], want, atol=1e-6) and float(targets[i].sum()) == pytest.approx(1, abs=1e-6)
        # the pixels hold the same mixture as the target: lam * i + (1 - lam) * (i - 1)
        value = float((targets[i] * torch.arange(CLASSES)).sum())
        assert torch.allclose(mixed[i].float(), torch.full((3, 8, 10), value), atol=2e-3)
    again, same = mix(images, labels, index=7)
    assert torch.equal(again, mixed) and torch.equal(same, targets)  # seeded by the batch index
    assert not torch.equal(mix(images, labels, index=8)[1], targets)


def test_cutmix_pastes_one_box_from_the_previous_image_and_weighs_by_area():
    images, labels = numbered_batch()
    mix = BatchMix(num_classes=CLASSES, mixup_alpha=0.0, cutmix_alpha=1.0, switch_prob=0.5, seed=3, rank=1)
    for index in range(4):
        mixed, targets = mix(images, labels, index=index)
        pasted = [mixed[i, 0] != i for i in range(CLASSES)]
        assert all(torch.equal(p, pasted[0]) for p in pasted)  # one box for the whole batch
        for i in range(CLASSES):
            pair = (i - 1) % CLASSES
            assert set(mixed[i].unique().tolist()) <= {float(i), float(pair)}
            share = float(pasted[i].float().mean())  # pixels taken from image i-1
            assert float(targets[i, pair]) == pytest.approx(share, abs=1e-6)
            assert float(targets[i, i]) == pytest.approx(1 - share, abs=1e-6)
            assert float(targets[i].sum()) == pytest.approx(1, abs=1e-6)


def test_mixup_or_cutmix_by_switch_probability():
    images, labels = numbered_batch()
    kinds = []
    mix = BatchMix(num_classes=CLASSES, mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=0.3, seed=0, rank=0)
    for index in range(200):
        mixed, _ = mix(images, labels, index=index)
        kinds.append(len(mixed[1].unique()) > 1)  # cutmix leaves two values in an image, mixup one
    assert 40 <= sum(kinds) <= 80  # Binomial(200, 0.3): mean 60, sd 6.5
    with pytest.raises(ValueError, match="--mixup / --cutmix"):
        BatchMix(num_classes=CLASSES, mixup_alpha=0, cutmix_alpha=0, switch_prob=0.5, seed=0, rank=0)


def test_mixing_leaves_the_global_rng_alone():
    images, labels = numbered_batch()
    mix = BatchMix(num_classes=CLASSES, mixup_alpha=0.2, cutmix_alpha=1.0, switch_prob=0.5, seed=0, rank=0)
    torch.manual_seed(11)
    before = torch.get_rng_state()
    mix(images, labels, index=0)
    assert torch.equal(torch.get_rng_state(), before)


def test_soft_targets_compose_with_label_smoothing():
    logits = torch.randn(5, CLASSES)
    labels = torch.tensor([0, 3, 5, 1, 1])
    loss = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    one_hot = torch.nn.functional.one_hot(labels, CLASSES).float()
    assert float(loss(logits, one_hot)) == pytest.approx(float(loss(logits, labels)), rel=1e-6)


# --- EMA ----------------------------------------------------------------------------------------------------
def test_ema_is_the_hand_computed_average():
    """decay 0.75, updated every 2nd optimizer step, starting from the model as it was at construction; the
    values are chosen so that float arithmetic is exact. Integer buffers are copied, not averaged."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 1, bias=False), torch.nn.BatchNorm1d(1))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[1].running_mean.fill_(2.0)
    ema = WeightEMA(model, decay=0.75, every=2)
    for w in (2.0, 5.0, 9.0, 3.0):  # the model's weight after optimizer steps 1..4
        with torch.no_grad():
            model[0].weight.fill_(w)
            model[1].running_mean.fill_(2 * w)
            model[1].num_batches_tracked.fill_(int(w))
        ema.update()
    # updates at steps 2 and 4: 0.75 * 1 + 0.25 * 5 = 2, then 0.75 * 2 + 0.25 * 3 = 2.25 (running_mean: 4, 4.5)
    assert torch.equal(ema.module[0].weight, torch.full((1, 2), 2.25))
    assert torch.equal(ema.module[1].running_mean, torch.tensor([4.5]))
    assert int(ema.module[1].num_batches_tracked) == 3
    assert torch.equal(model[0].weight, torch.full((1, 2), 3.0))  # the model itself is untouched
    assert not ema.module[0].weight.requires_grad
    restored = WeightEMA(model, decay=0.75, every=2)
    restored.load_state_dict(ema.state_dict())
    assert restored.optimizer_steps == 4 and torch.equal(restored.module[0].weight, ema.module[0].weight)
    assert ema_weights(ema.state_dict()).keys() == model.state_dict().keys()


def test_model_and_ema_are_evaluated_in_one_pass_with_exact_counts():
    """The val split is read once per evaluation however many models see it; each model's counts are what
    evaluating it alone gives, and the flat record keeps the model's keys plus `ema_`-prefixed ones."""
    torch.manual_seed(0)
    batches = [(torch.randn(5, 3, 2, 2), torch.randint(0, CLASSES, (5,))) for _ in range(3)]

    class ValSplit:  # counts the passes over it
        passes = 0

        def __iter__(self):
            self.passes += 1
            return iter(batches)

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, CLASSES))
    ema = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, CLASSES))
    split = ValSplit()
    results = evaluate_models({"model": model, "ema": ema}, split, device=torch.device("cpu"), precision="fp32")
    assert split.passes == 1
    for name, net in (("model", model), ("ema", ema)):
        logits = torch.cat([net(images) for images, _ in batches])
        labels = torch.cat([labels for _, labels in batches])
        assert results[name]["correct1"] == int((logits.argmax(1) == labels).sum())
        assert results[name]["correct5"] == int((logits.topk(5, 1).indices == labels[:, None]).any(1).sum())
        assert results[name] == evaluate(net, batches, device=torch.device("cpu"), precision="fp32")
    record = with_ema(results)
    assert sorted(record) == sorted([*results["model"], "ema_correct1", "ema_correct5", "ema_top1", "ema_top5",
                                     "ema_loss"])
    assert record["total"] == 15 and record["ema_correct1"] == results["ema"]["correct1"]


# --- the step: accumulation, clipping -------------------------------------------------------------------------
def linear_problem(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    images = torch.randn(8, 3, 2, 2).half()
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    return model, images, labels


def test_two_micro_batches_make_the_step_of_one_batch():
    whole_model, images, labels = linear_problem()
    split_model, _, _ = linear_problem()
    whole = TrainStep(whole_model, build_optimizer(whole_model, lr=0.5), precision="fp32")
    optimizer = build_optimizer(split_model, lr=0.5)
    scheduler = build_scheduler(optimizer, steps_per_epoch=1, epochs=5, warmup_epochs=0)
    split = TrainStep(split_model, optimizer, precision="fp32", grad_accum_steps=2, scheduler=scheduler)
    whole(images, labels)
    split(images[:4], labels[:4])
    assert scheduler.last_epoch == 0 and split_model[1].weight.grad is not None  # accumulated, not stepped
    split(images[4:], labels[4:])
    assert scheduler.last_epoch == 1 and split_model[1].weight.grad is None  # stepped, grads freed
    for a, b in zip(whole_model.parameters(), split_model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])  # fp16: the GradScaler is on (65536 x loss)
def test_clipping_bounds_the_step_of_the_true_gradients(precision):
    model, images, labels = linear_problem()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = build_optimizer(model, lr=1.0, momentum=0.0, weight_decay=0.0)
    step = TrainStep(model, optimizer, precision=precision, label_smoothing=0.0, clip_grad_norm=1e-3)
    assert step.scaler.is_enabled() == (precision == "fp16")
    step(images, labels)
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)])
    # SGD, lr 1: the update is minus the clipped gradient, whose norm is the clip value (not 1/65536 of it)
    assert float(moved.norm()) == pytest.approx(1e-3, rel=1e-3)


def test_adamw_and_the_linear_schedule():
    model, _, _ = linear_problem()
    optimizer = build_optimizer(model, lr=1e-3, name="adamw", betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == (0.8, 0.95) and optimizer.defaults["eps"] == 1e-6
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]  # none on the bias
    with pytest.raises(ValueError, match="--optimizer: unknown optimizer 'lamb'"):
        build_optimizer(model, lr=1e-3, name="lamb")
    sched = dict(steps_per_epoch=10, epochs=10, warmup_epochs=2, schedule="linear")
    assert [lr_factor(s, **sched) for s in (0, 19, 20, 60, 99)] == pytest.approx([1 / 20, 1, 1, 0.5, 1 / 80])


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_regularised_steps_make_no_host_sync(precision):
    """Mixup/cutmix, two micro-batches per step, clipping after unscaling, fused AdamW and the EMA update, under
    torch.cuda.set_sync_debug_mode("error"): any .item(), .cpu(), synchronize() or host read raises."""
    from training.model import build_model

    device = torch.device("cuda", torch.cuda.current_device())
    model = build_model("resnet18", num_classes=CLASSES).to(device)
    optimizer = build_optimizer(model, lr=1e-3, name="adamw", weight_decay=0.05)
    scheduler = build_scheduler(optimizer, steps_per_epoch=4, epochs=4, warmup_epochs=1)
    mix = BatchMix(num_classes=CLASSES, mixup_alpha=0.2, cutmix_alpha=1.0, switch_prob=0.5, seed=0, rank=0)
    step = TrainStep(model, optimizer, precision=precision, scheduler=scheduler, grad_accum_steps=2,
                     clip_grad_norm=1.0, mix=mix, ema=WeightEMA(model, decay=0.99))
    images = torch.randn(8, 3, 64, 64, device=device).half().contiguous(memory_format=torch.channels_last)
    labels = torch.arange(8, device=device) % CLASSES
    loss_sum = torch.zeros((), device=device)
    for _ in range(4):  # warm-up: cuDNN autotuning and allocator growth may sync
        loss_sum += step(images, labels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(6):
            loss_sum += step(images, labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss_sum).item() and scheduler.last_epoch == 5 and step.ema.optimizer_steps == 5

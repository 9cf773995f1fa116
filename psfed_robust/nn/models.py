"""Image classifiers of the batched NN engine, chosen and sized by name (``task.model``).

- ``mlp``: the 2-layer MLP of :func:`psfed_robust.tasks.make_mlp` (the one MLP of the project,
  also the Flower engine's: both engines start from the same model);
- ``cnn``: LeNet-style (LeCun et al., Proc. IEEE 1998): two conv + max-pool stages and three
  linear layers; 5x5 kernels for inputs of 28x28 and larger (MNIST, Fashion-MNIST: the classic
  LeNet-5 sizes 6/16 maps, 120/84 units), 3x3 with padding for the 8x8 digits;
- ``cifar_cnn``: a small CIFAR-10 CNN, three conv(3x3)+ReLU+max-pool stages (32/64/64 maps) and
  a 128-unit hidden layer.

No model has BatchNorm or dropout: the engine trains them functionally (``torch.func``), where a
model is a pure function of its flat parameter vector. Initialisation is PyTorch's default drawn
under a private seed (``torch.random.fork_rng``), so building a model never moves the global RNG.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from psfed_robust.tasks import make_mlp

__all__ = ["MODELS", "build_model"]

MODELS = ("mlp", "cnn", "cifar_cnn")


def _flat_size(body: nn.Module, shape: Sequence[int]) -> int:
    with torch.no_grad():
        return int(body(torch.zeros((1, *shape))).numel())


def _lenet(shape: Sequence[int], num_classes: int) -> nn.Module:
    c, h, _w = shape
    if h >= 28:  # LeNet-5 proper (MNIST 28x28 with 2-pixel padding on the first conv)
        body = nn.Sequential(
            nn.Conv2d(c, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        )
        h1, h2 = 120, 84
    else:  # 8x8 digits: 3x3 kernels keep two pooling stages meaningful (8 -> 4 -> 2)
        body = nn.Sequential(
            nn.Conv2d(c, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        )
        h1, h2 = 64, 32
    n = _flat_size(body, shape)
    return nn.Sequential(*body, nn.Linear(n, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(),
                         nn.Linear(h2, num_classes))


def _cifar_cnn(shape: Sequence[int], num_classes: int) -> nn.Module:
    c = shape[0]
    body = nn.Sequential(
        nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
    )
    n = _flat_size(body, shape)
    return nn.Sequential(*body, nn.Linear(n, 128), nn.ReLU(), nn.Linear(128, num_classes))


def build_model(
    name: str, input_shape: Sequence[int], num_classes: int, *, hidden: int = 64, seed: int = 0
) -> nn.Module:
    """The model ``name`` for images of ``input_shape`` (C, H, W), initialised from ``seed``.

    ``hidden`` sizes the MLP's hidden layer (the CNNs have fixed widths).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be (C, H, W) with positive sizes, got {shape}")
    if name == "mlp":
        features = shape[0] * shape[1] * shape[2]
        mlp = make_mlp(features, hidden, num_classes, seed)
        return nn.Sequential(nn.Flatten(), *mlp.children())
    if name == "cnn" and min(shape[1:]) < 8:
        raise ValueError(f"model 'cnn' needs images of at least 8x8, got {shape}")
    if name == "cifar_cnn" and min(shape[1:]) < 8:
        raise ValueError(f"model 'cifar_cnn' needs images of at least 8x8, got {shape}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _lenet(shape, num_classes) if name == "cnn" else _cifar_cnn(shape, num_classes)

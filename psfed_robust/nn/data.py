"""Image data of the batched NN engine: the Flower engine's offline loaders, as images.

``digits`` (scikit-learn's bundled 8x8 digits), ``mnist`` / ``fashion_mnist`` (torchvision files
under ``data_dir``) and ``cifar10`` (the python pickles under ``data_dir``) come from
``experiments.datasets.load_image_data`` — the same standardised values the Flower engine trains
on (nothing is downloaded) — reshaped to ``[N, C, H, W]``. ``synthetic`` is a small seeded image
task for tests: one smooth prototype per class plus Gaussian noise.

Client splits (IID, Dirichlet(alpha)) are ``experiments.datasets.split_clients``: the one split
of the project, so both engines give a client the same examples for the same run seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from psfed_robust.core.seeding import torch_generator

__all__ = ["IMAGE_SHAPES", "TASKS", "ImageTask", "client_table", "load_task", "split"]

#: (C, H, W) of each task's images
IMAGE_SHAPES: dict[str, tuple[int, int, int]] = {
    "digits": (1, 8, 8),
    "mnist": (1, 28, 28),
    "fashion_mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
    "synthetic": (1, 8, 8),
}
TASKS = tuple(IMAGE_SHAPES)


@dataclass(frozen=True)
class ImageTask:
    """Train/test images ``[N, C, H, W]`` (float32) and labels ``[N]`` (int64)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)


def synthetic(
    seed: int, *, num_train: int = 320, num_test: int = 160, num_classes: int = 4,
    noise: float = 0.8,
) -> ImageTask:
    """A small 8x8 task: class ``c`` is prototype ``c`` (a smooth random image) + N(0, noise²)."""
    gen = torch_generator("nn.synthetic", seed)
    protos = torch.randn((num_classes, 1, 4, 4), generator=gen)
    protos = torch.nn.functional.interpolate(protos, size=(8, 8), mode="bilinear",
                                             align_corners=False)

    def draw(n: int) -> tuple[Tensor, Tensor]:
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=gen)]
        x = protos[y] + noise * torch.randn((n, 1, 8, 8), generator=gen)
        return x.float(), y.long()

    xtr, ytr = draw(num_train)
    xte, yte = draw(num_test)
    return ImageTask(xtr, ytr, xte, yte, num_classes)


def load_task(kind: str, data_dir: str = "", seed: int = 0) -> ImageTask:
    """Load an image task (offline); ``seed`` is the scenario seed (digits' test split)."""
    if kind not in IMAGE_SHAPES:
        raise ValueError(f"unknown image task {kind!r}; allowed: {', '.join(TASKS)}")
    if kind == "synthetic":
        return synthetic(seed)
    from experiments.datasets import load_image_data

    data = load_image_data(kind, data_dir, seed=seed)
    shape = IMAGE_SHAPES[kind]
    return ImageTask(
        data.x_train.reshape(-1, *shape).contiguous(), data.y_train.long(),
        data.x_test.reshape(-1, *shape).contiguous(), data.y_test.long(), data.num_classes,
    )


def split(labels: Tensor, clients: int, partition: str, alpha: float, seed: int
          ) -> list[np.ndarray]:
    """Per-client example indices (``experiments.datasets.split_clients``: IID or Dirichlet)."""
    from experiments.datasets import split_clients

    if clients > len(labels):
        raise ValueError(f"{clients} clients but only {len(labels)} training examples")
    return split_clients(labels, clients, partition, alpha, seed)


def client_table(parts: list[np.ndarray]) -> tuple[Tensor, Tensor]:
    """``(table [K, n_max] int64, counts [K])``: client k's examples ``table[k, :counts[k]]``
    (padding repeats the client's first example and is never trained on)."""
    counts = torch.tensor([len(p) for p in parts], dtype=torch.long)
    n_max = int(counts.max())
    table = torch.empty((len(parts), n_max), dtype=torch.long)
    for k, p in enumerate(parts):
        t = torch.from_numpy(np.asarray(p, dtype=np.int64))
        table[k, : len(p)] = t
        table[k, len(p):] = t[0]
    return table, counts

"""Image classification data for the Flower engine, offline only, and client splits.

- ``digits``: scikit-learn's bundled 8×8 digits (1,797 images; no download).
- ``mnist`` / ``fashion_mnist``: torchvision's readers over ``data_dir`` (``download=False``; the
  usual ``<data_dir>/MNIST/raw`` / ``<data_dir>/FashionMNIST/raw`` IDX files).
- ``cifar10``: the ``cifar-10-batches-py`` pickles under ``data_dir`` (read directly).

Images are flattened to float32 vectors scaled to [0, 1] and standardised with the training
set's statistics; client splits are :func:`psfed_robust.tasks.split_indices` (IID or
Dirichlet(α) over labels), seeded by :func:`stable_seed`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor

from psfed_robust.nn.data import load_task, split

__all__ = ["ImageData", "load_image_data", "split_clients"]

IMAGE_TASKS = ("digits", "mnist", "fashion_mnist", "cifar10")


@dataclass(frozen=True)
class ImageData:
    """Flat features ``[N, F]`` (float32) and labels ``[N]`` (int64) for the Flower engine's MLP."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])


def load_image_data(kind: str, data_dir: str = "", seed: int = 0) -> ImageData:
    """One of ``digits``, ``mnist``, ``fashion_mnist``, ``cifar10`` (offline): the images of
    :func:`psfed_robust.nn.data.load_task` (the batched NN engine's data) flattened."""
    if kind not in IMAGE_TASKS:
        raise ValueError(f"unknown image task {kind!r}; allowed: {', '.join(IMAGE_TASKS)}")
    t = load_task(kind, data_dir, seed)
    return ImageData(t.x_train.reshape(len(t.x_train), -1), t.y_train,
                     t.x_test.reshape(len(t.x_test), -1), t.y_test, t.num_classes)


def split_clients(
    labels: Tensor, num_clients: int, partition: str, alpha: float, seed: int
) -> list[np.ndarray]:
    """Index lists per client (IID or Dirichlet(α)): :func:`psfed_robust.nn.data.split`, the
    split both image engines use."""
    return split(labels, num_clients, partition, alpha, seed)

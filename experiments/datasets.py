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
from functools import cached_property

import numpy as np
from torch import Tensor

from psfed_robust.nn.data import ImageTask, load_task, split

__all__ = ["ImageData", "load_image_data", "split_clients"]

IMAGE_TASKS = ("digits", "mnist", "fashion_mnist", "cifar10")


@dataclass(frozen=True)
class ImageData:
    """The batched NN engine's :class:`~psfed_robust.nn.data.ImageTask` seen as flat features
    ``[N, F]`` (float32) for the Flower engine's MLP: one set of fields, the task's; only the
    images are reshaped (once, on first use)."""

    task: ImageTask

    @cached_property
    def x_train(self) -> Tensor:
        return self.task.x_train.reshape(len(self.task.x_train), -1)

    @cached_property
    def x_test(self) -> Tensor:
        return self.task.x_test.reshape(len(self.task.x_test), -1)

    @property
    def y_train(self) -> Tensor:
        return self.task.y_train

    @property
    def y_test(self) -> Tensor:
        return self.task.y_test

    @property
    def num_classes(self) -> int:
        return self.task.num_classes

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])


def load_image_data(kind: str, data_dir: str = "", seed: int = 0) -> ImageData:
    """One of ``digits``, ``mnist``, ``fashion_mnist``, ``cifar10`` (offline): the images of
    :func:`psfed_robust.nn.data.load_task` (the batched NN engine's data) flattened."""
    if kind not in IMAGE_TASKS:
        raise ValueError(f"unknown image task {kind!r}; allowed: {', '.join(IMAGE_TASKS)}")
    return ImageData(load_task(kind, data_dir, seed))


def split_clients(
    labels: Tensor, num_clients: int, partition: str, alpha: float, seed: int
) -> list[np.ndarray]:
    """Index lists per client (IID or Dirichlet(α)): :func:`psfed_robust.nn.data.split`, the
    split both image engines use."""
    return split(labels, num_clients, partition, alpha, seed)

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

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from psfed_robust.core.seeding import numpy_rng
from psfed_robust.tasks import split_indices

__all__ = ["ImageData", "load_image_data", "split_clients"]


@dataclass(frozen=True)
class ImageData:
    x_train: Tensor  # [N, F] float32
    y_train: Tensor  # [N] int64
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])


def _standardise(xtr: np.ndarray, xte: np.ndarray) -> tuple[Tensor, Tensor]:
    mean = xtr.mean(axis=0, keepdims=True)
    std = xtr.std(axis=0, keepdims=True) + 1e-6
    return (torch.from_numpy(((xtr - mean) / std).astype(np.float32)),
            torch.from_numpy(((xte - mean) / std).astype(np.float32)))


def _digits(seed: int, test_fraction: float = 0.2) -> ImageData:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.data.astype(np.float32) / 16.0
    y = d.target.astype(np.int64)
    perm = numpy_rng("experiments.digits.split", seed).permutation(len(y))
    n_test = round(test_fraction * len(y))
    te, tr = perm[:n_test], perm[n_test:]
    xtr, xte = _standardise(x[tr], x[te])
    return ImageData(xtr, torch.from_numpy(y[tr]), xte, torch.from_numpy(y[te]), 10)


def _torchvision(kind: str, data_dir: str) -> ImageData:
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST}[kind]
    try:
        train = cls(data_dir, train=True, download=False)
        test = cls(data_dir, train=False, download=False)
    except RuntimeError as exc:
        raise FileNotFoundError(
            f"{kind}: no dataset under {data_dir!r} (torchvision layout expected; nothing is "
            f"downloaded): {exc}"
        ) from exc
    xtr = train.data.numpy().reshape(len(train.data), -1).astype(np.float32) / 255.0
    xte = test.data.numpy().reshape(len(test.data), -1).astype(np.float32) / 255.0
    a, b = _standardise(xtr, xte)
    return ImageData(a, train.targets.long(), b, test.targets.long(), 10)


def _cifar10(data_dir: str) -> ImageData:
    root = Path(data_dir) / "cifar-10-batches-py"
    if not root.is_dir():
        raise FileNotFoundError(f"cifar10: {root} not found (the python-pickle batches; nothing "
                                "is downloaded)")

    def read(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for n in names:
            with open(root / n, "rb") as fh:
                batch = pickle.load(fh, encoding="bytes")
            xs.append(np.asarray(batch[b"data"], dtype=np.float32) / 255.0)
            ys.append(np.asarray(batch[b"labels"], dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    train_names = sorted(p.name for p in root.glob("data_batch_*"))
    if not train_names or not (root / "test_batch").exists():
        raise FileNotFoundError(f"cifar10: {root} lacks data_batch_* or test_batch")
    xtr, ytr = read(train_names)
    xte, yte = read(["test_batch"])
    a, b = _standardise(xtr, xte)
    return ImageData(a, torch.from_numpy(ytr), b, torch.from_numpy(yte), 10)


def load_image_data(kind: str, data_dir: str = "", seed: int = 0) -> ImageData:
    """Load one of ``digits``, ``mnist``, ``fashion_mnist``, ``cifar10`` (offline)."""
    if kind == "digits":
        return _digits(seed)
    if kind in ("mnist", "fashion_mnist"):
        return _torchvision(kind, data_dir)
    if kind == "cifar10":
        return _cifar10(data_dir)
    raise ValueError(f"unknown image task {kind!r}; allowed: digits, mnist, fashion_mnist, cifar10")


def split_clients(
    labels: Tensor, num_clients: int, partition: str, alpha: float, seed: int
) -> list[np.ndarray]:
    """Index lists per client: :func:`psfed_robust.tasks.split_indices` (IID or Dirichlet(α))
    seeded by ``(partition, seed)``."""
    rng = numpy_rng("experiments.split", partition, seed)
    return split_indices(labels.numpy(), num_clients, partition, alpha, rng)

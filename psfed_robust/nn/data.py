"""Image data of the batched NN engine, offline only, and the client splits.

- ``digits``: scikit-learn's bundled 8x8 digits (1,797 images; a seeded 80/20 train/test cut);
- ``mnist`` / ``fashion_mnist``: torchvision's readers over ``data_dir`` (``download=False``);
- ``cifar10``: the ``cifar-10-batches-py`` pickles under ``data_dir``;
- ``synthetic``: a small seeded 8x8 task for tests (one smooth prototype per class + noise).

Pixels are scaled to [0, 1] and standardised per pixel with the training set's statistics —
the values the Flower engine (``experiments.datasets.load_image_data``) trains on, as images
``[N, C, H, W]`` (a test checks both loaders agree). Nothing is downloaded. Loaded tasks are
cached per ``(kind, data_dir, seed)`` (sweeps run many points on the same data).

Client splits are :func:`psfed_robust.tasks.split_indices` (IID or Dirichlet(alpha)) seeded as
the driver's split (``numpy_rng("experiments.split", partition, seed)``), so both engines give a
client the same examples for the same run seed.
"""

from __future__ import annotations

import functools
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from psfed_robust.core.seeding import numpy_rng, torch_generator
from psfed_robust.tasks import split_indices

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


def _standardise(xtr: np.ndarray, xte: np.ndarray) -> tuple[Tensor, Tensor]:
    mean = xtr.mean(axis=0, keepdims=True)
    std = xtr.std(axis=0, keepdims=True) + 1e-6
    return (torch.from_numpy(((xtr - mean) / std).astype(np.float32)),
            torch.from_numpy(((xte - mean) / std).astype(np.float32)))


def _digits(seed: int, test_fraction: float = 0.2) -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.data.astype(np.float32) / 16.0
    y = d.target.astype(np.int64)
    perm = numpy_rng("experiments.digits.split", seed).permutation(len(y))
    n_test = round(test_fraction * len(y))
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def _torchvision(kind: str, data_dir: str) -> tuple[np.ndarray, ...]:
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST}[kind]
    try:
        train = cls(data_dir, train=True, download=False)
        test = cls(data_dir, train=False, download=False)
    except RuntimeError as exc:
        raise FileNotFoundError(
            f"{kind}: no dataset under {data_dir!r} (torchvision layout expected; nothing is "
            f"downloaded): {exc}") from exc
    xtr = train.data.numpy().reshape(len(train.data), -1).astype(np.float32) / 255.0
    xte = test.data.numpy().reshape(len(test.data), -1).astype(np.float32) / 255.0
    return xtr, train.targets.numpy().astype(np.int64), xte, test.targets.numpy().astype(np.int64)


def _cifar10(data_dir: str) -> tuple[np.ndarray, ...]:
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
    return xtr, ytr, xte, yte


@functools.lru_cache(maxsize=8)
def _load(kind: str, data_dir: str, seed: int) -> ImageTask:
    if kind == "digits":
        xtr, ytr, xte, yte = _digits(seed)
    elif kind in ("mnist", "fashion_mnist"):
        xtr, ytr, xte, yte = _torchvision(kind, data_dir)
    else:
        xtr, ytr, xte, yte = _cifar10(data_dir)
    a, b = _standardise(xtr, xte)
    shape = IMAGE_SHAPES[kind]
    return ImageTask(a.reshape(-1, *shape).contiguous(), torch.from_numpy(ytr),
                     b.reshape(-1, *shape).contiguous(), torch.from_numpy(yte), 10)


def load_task(kind: str, data_dir: str = "", seed: int = 0) -> ImageTask:
    """Load an image task (offline); ``seed`` is the scenario seed (digits' test split)."""
    if kind not in IMAGE_SHAPES:
        raise ValueError(f"unknown image task {kind!r}; allowed: {', '.join(TASKS)}")
    if kind == "synthetic":
        return synthetic(seed)
    return _load(kind, str(data_dir), int(seed) if kind == "digits" else 0)


def split(labels: Tensor, clients: int, partition: str, alpha: float, seed: int
          ) -> list[np.ndarray]:
    """Per-client example indices: IID or Dirichlet(alpha), seeded by ``(partition, seed)``."""
    if clients > len(labels):
        raise ValueError(f"{clients} clients but only {len(labels)} training examples")
    rng = numpy_rng("experiments.split", partition, seed)
    return split_indices(labels.numpy(), clients, partition, alpha, rng)


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

"""Offline digits task for the Flower engine: data, partitions and the 2-layer MLP.

The data is scikit-learn's bundled ``load_digits`` (1,797 8×8 images, 10 classes; no download),
scaled to [0, 1]. A fixed, seeded permutation sets aside ``test_size`` images (360 by default) as
the test set; the rest are split over ``num_partitions`` clients by ``partition-id``: IID (a
seeded permutation cut into near-equal parts) or Dirichlet(α) label skew
(:func:`psfed_robust.tasks.split_indices`). The model is the project's one 2-layer MLP
(:func:`psfed_robust.tasks.make_mlp`), 64 → hidden → 10.

Everything is deterministic and process-independent (seeds come from
:func:`psfed_robust.core.seeding.stable_seed`), so every ClientApp process — a Ray actor in
simulation or a fresh ``flwr-clientapp`` process per message in deployment — rebuilds the same
split from ``(seed, partition-id, num-partitions)`` alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor, nn

from psfed_robust.core.seeding import numpy_rng, stable_seed
from psfed_robust.tasks import make_mlp, split_indices

__all__ = [
    "NUM_CLASSES",
    "NUM_FEATURES",
    "DigitsSplit",
    "client_data",
    "evaluate",
    "load_split",
    "make_model",
    "partition_indices",
    "train_epochs",
]

NUM_FEATURES = 64
NUM_CLASSES = 10
_NUM_IMAGES = 1797


@dataclass(frozen=True)
class DigitsSplit:
    """The fixed train/test split (float32 features in [0, 1], int64 labels)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@lru_cache(maxsize=8)
def load_split(test_size: int = 360, seed: int = 0) -> DigitsSplit:
    """Load ``sklearn.datasets.load_digits`` and split off a fixed, seeded test set."""
    if isinstance(test_size, bool) or not isinstance(test_size, int):
        raise TypeError(f"test_size must be an int, got {type(test_size).__name__}")
    if not 1 <= test_size < _NUM_IMAGES:
        raise ValueError(f"test_size must be in [1, {_NUM_IMAGES - 1}], got {test_size}")
    from sklearn.datasets import load_digits  # lazy: ~0.5 s import, only where data is needed

    x, y = load_digits(return_X_y=True)
    x = (np.asarray(x, dtype=np.float32) / 16.0).astype(np.float32)
    y = np.asarray(y, dtype=np.int64)
    perm = numpy_rng(seed, "digits-split").permutation(len(x))
    test, train = perm[:test_size], perm[test_size:]
    for arr in (x, y):
        arr.setflags(write=False)
    return DigitsSplit(x[train], y[train], x[test], y[test])


def partition_indices(
    labels: np.ndarray,
    partition_id: int,
    num_partitions: int,
    *,
    partitioning: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
) -> np.ndarray:
    """Indices (into ``labels``) of client ``partition_id``'s share of the training set.

    ``"iid"``: a seeded permutation cut into ``num_partitions`` near-equal parts.
    ``"dirichlet"``: for each class, proportions ~ Dirichlet(α·1) over the partitions; smaller α
    means more label skew. Every partition is guaranteed at least one example (an empty one
    borrows from the largest), so every client can train.
    """
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, int):
        raise TypeError("num_partitions must be an int")
    if num_partitions < 1 or num_partitions > len(labels):
        raise ValueError(
            f"num_partitions must be in [1, {len(labels)}] (training examples), "
            f"got {num_partitions}"
        )
    if isinstance(partition_id, bool) or not isinstance(partition_id, int):
        raise TypeError("partition_id must be an int")
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id must be in [0, {num_partitions - 1}], got {partition_id}")
    if partitioning == "iid":
        rng = numpy_rng(seed, "digits-iid", num_partitions)
    else:
        rng = numpy_rng(seed, "digits-dirichlet", num_partitions, float(alpha))
    return split_indices(labels, num_partitions, partitioning, alpha, rng)[partition_id]


def client_data(
    partition_id: int,
    num_partitions: int,
    *,
    partitioning: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    test_size: int = 360,
) -> tuple[Tensor, Tensor]:
    """The training tensors ``(x, y)`` of one client."""
    split = load_split(test_size, seed)
    idx = partition_indices(
        split.y_train,
        partition_id,
        num_partitions,
        partitioning=partitioning,
        alpha=alpha,
        seed=seed,
    )
    return torch.from_numpy(split.x_train[idx].copy()), torch.from_numpy(split.y_train[idx].copy())


def make_model(hidden: int = 64, seed: int = 0) -> nn.Sequential:
    """The shared 2-layer MLP (:func:`psfed_robust.tasks.make_mlp`) for the digits, 64 → hidden
    → 10 (4,810 parameters at 64), the same for the same ``(hidden, seed)`` everywhere."""
    return make_mlp(NUM_FEATURES, hidden, NUM_CLASSES, stable_seed(seed, "digits-model-init"))


def train_epochs(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int = 2,
    lr: float = 0.1,
    momentum: float = 0.9,
    batch_size: int = 32,
    generator: torch.Generator | None = None,
) -> float:
    """Plain minibatch SGD (fresh optimizer each call); returns the mean training loss."""
    if epochs < 0 or batch_size < 1 or not lr > 0:
        raise ValueError("need epochs >= 0, batch_size >= 1 and lr > 0")
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    total, count = 0.0, 0
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), batch_size):
            b = perm[i : i + batch_size]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[b]), y[b])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(b)
            count += len(b)
    return total / max(count, 1)


@torch.no_grad()
def evaluate(
    model: nn.Module, x: Tensor | np.ndarray, y: Tensor | np.ndarray
) -> tuple[float, float]:
    """``(mean cross-entropy loss, accuracy)`` of ``model`` on ``(x, y)``."""
    xt = torch.as_tensor(x)
    yt = torch.as_tensor(y)
    model.eval()
    logits = model(xt)
    loss = float(nn.functional.cross_entropy(logits, yt))
    acc = float((logits.argmax(1) == yt).float().mean())
    return loss, acc

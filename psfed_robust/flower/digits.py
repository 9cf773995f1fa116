"""Offline digits task for the Flower engine: data, partitions and the 2-layer MLP.

The data is scikit-learn's bundled ``load_digits`` (1,797 8×8 images, 10 classes; no download),
scaled to [0, 1]. A fixed, seeded permutation sets aside ``test_size`` images (360 by default, as
in shared/research/seed-psfed-audit.md §4) as the test set; the rest are split over
``num_partitions`` clients by ``partition-id``: IID (a seeded permutation cut into near-equal
parts) or Dirichlet(α) label skew. The model is the seed example's small classifier, a 2-layer MLP
64 → hidden → 10.

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

__all__ = [
    "MLP",
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
_PARTITIONINGS = ("iid", "dirichlet")


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
    if partitioning not in _PARTITIONINGS:
        raise ValueError(f"partitioning must be one of {_PARTITIONINGS}, got {partitioning!r}")
    n = len(labels)
    if partitioning == "iid":
        perm = numpy_rng(seed, "digits-iid", num_partitions).permutation(n)
        return np.sort(np.array_split(perm, num_partitions)[partition_id])
    if not alpha > 0 or not np.isfinite(alpha):
        raise ValueError(f"alpha must be a finite positive float, got {alpha}")
    rng = numpy_rng(seed, "digits-dirichlet", num_partitions, float(alpha))
    owner = np.empty(n, dtype=np.int64)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        props = rng.dirichlet(np.full(num_partitions, float(alpha)))
        cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
        for p, chunk in enumerate(np.split(idx, cuts)):
            owner[chunk] = p
    counts = np.bincount(owner, minlength=num_partitions)
    for p in np.flatnonzero(counts == 0).tolist():  # deterministic repair: steal from the largest
        donor = int(np.argmax(counts))
        victim = int(np.flatnonzero(owner == donor)[0])
        owner[victim] = int(p)
        counts[donor] -= 1
        counts[p] += 1
    return np.flatnonzero(owner == partition_id)


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


class MLP(nn.Module):
    """2-layer MLP ``in_features → hidden → num_classes`` with ReLU (4,810 parameters at 64)."""

    def __init__(
        self, hidden: int = 64, in_features: int = NUM_FEATURES, num_classes: int = NUM_CLASSES
    ) -> None:
        super().__init__()
        for name, v in (
            ("hidden", hidden),
            ("in_features", in_features),
            ("num_classes", num_classes),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def make_model(hidden: int = 64, seed: int = 0, **kwargs: int) -> MLP:
    """A freshly initialised :class:`MLP`, the same for the same ``(hidden, seed)`` everywhere."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stable_seed(seed, "digits-model-init"))
        return MLP(hidden, **kwargs)


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

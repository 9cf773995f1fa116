"""The classification task shared by every engine: the client split and the 2-layer MLP.

One implementation each, used by the digits Flower App (:mod:`psfed_robust.flower.digits`), the
driver's data loader (``experiments.datasets``), the Flower engine and the batched NN engine
(``psfed_robust.nn.models``), so every engine starts from the same clients and the same model.

- :func:`split_indices`: IID (a seeded permutation cut into near-equal parts) or Dirichlet(α)
  label skew (Hsu et al., 2019): for each class, proportions ``p ~ Dir(α·1_K)`` assign its
  examples to the clients; a client left empty takes one example from the largest client
  (deterministic repair), so every client can train.
- :func:`make_mlp`: ``features → hidden → classes`` with ReLU (``nn.Sequential`` of Linear,
  ReLU, Linear), weights drawn ``U(-1, 1)/sqrt(fan_in)`` from a private generator seeded by
  ``seed`` (building a model never moves the global RNG).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

__all__ = ["PARTITIONS", "make_mlp", "split_indices"]

PARTITIONS: tuple[str, ...] = ("iid", "dirichlet")


def split_indices(
    labels: npt.NDArray[np.integer], num_clients: int, partition: str, alpha: float,
    rng: np.random.Generator,
) -> list[npt.NDArray[np.int64]]:
    """Sorted example indices of each of ``num_clients`` clients (``rng`` seeds the split)."""
    if isinstance(num_clients, bool) or not isinstance(num_clients, int):
        raise TypeError(f"num_clients must be an int, got {type(num_clients).__name__}")
    n = len(labels)
    if not 1 <= num_clients <= n:
        raise ValueError(f"num_clients must be in [1, {n}] (training examples), got {num_clients}")
    if partition not in PARTITIONS:
        raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")
    if partition == "iid":
        perm = rng.permutation(n)
        return [np.sort(p).astype(np.int64) for p in np.array_split(perm, num_clients)]
    if not (alpha > 0 and np.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite positive float, got {alpha}")
    owner = np.empty(n, dtype=np.int64)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        props = rng.dirichlet(np.full(num_clients, float(alpha)))
        cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
        for k, chunk in enumerate(np.split(idx, cuts)):
            owner[chunk] = k
    counts = np.bincount(owner, minlength=num_clients)
    for k in np.flatnonzero(counts == 0).tolist():  # deterministic repair: take from the largest
        donor = int(np.argmax(counts))
        owner[int(np.flatnonzero(owner == donor)[0])] = int(k)
        counts[donor] -= 1
        counts[k] += 1
    return [np.flatnonzero(owner == k).astype(np.int64) for k in range(num_clients)]


def make_mlp(num_features: int, hidden: int, num_classes: int, seed: int) -> nn.Sequential:
    """The 2-layer MLP, initialised from ``seed`` (same seed, same model, in any process)."""
    for name, v in (("num_features", num_features), ("hidden", hidden),
                    ("num_classes", num_classes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    gen = torch.Generator().manual_seed(int(seed))
    model = nn.Sequential(nn.Linear(num_features, hidden), nn.ReLU(),
                          nn.Linear(hidden, num_classes))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.empty_like(p).uniform_(-1, 1, generator=gen)
                    / max(1.0, float(p.shape[-1]) ** 0.5))
    return model

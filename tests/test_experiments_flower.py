"""The driver's Flower engine and its offline dataset loaders (on small data the tests make)."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from experiments.datasets import load_image_data, split_clients
from experiments.driver import run_scenario
from experiments.schema import ScenarioError, load_scenario


def _write_idx(path: Path, arr: np.ndarray) -> None:
    magic = {1: 0x0801, 3: 0x0803}[arr.ndim]
    with open(path, "wb") as fh:
        fh.write(struct.pack(">I", magic))
        for d in arr.shape:
            fh.write(struct.pack(">I", d))
        fh.write(arr.astype(np.uint8).tobytes())


def _fake_mnist(root: Path, folder: str, n_train: int = 60, n_test: int = 20) -> None:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)


def test_mnist_and_fashion_loaders_read_torchvision_layout(tmp_path: Path) -> None:
    _fake_mnist(tmp_path, "MNIST")
    _fake_mnist(tmp_path, "FashionMNIST")
    for kind in ("mnist", "fashion_mnist"):
        d = load_image_data(kind, str(tmp_path))
        assert d.x_train.shape == (60, 784) and d.x_test.shape == (20, 784)
        assert d.y_train.tolist()[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
        assert abs(float(d.x_train.mean())) < 1e-4  # standardised with train statistics
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_image_data("mnist", str(tmp_path / "empty"))


def test_cifar10_loader_reads_pickle_batches(tmp_path: Path) -> None:
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(1)
    for name, n in (("data_batch_1", 30), ("data_batch_2", 30), ("test_batch", 10)):
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": list(range(n))}
        batch[b"labels"] = [i % 10 for i in batch[b"labels"]]
        (root / name).write_bytes(pickle.dumps(batch))
    d = load_image_data("cifar10", str(tmp_path))
    assert d.x_train.shape == (60, 3072) and d.y_test.tolist() == list(range(10))


def test_splits_cover_every_example_once() -> None:
    d = load_image_data("digits", seed=0)
    for partition, alpha in (("iid", 1.0), ("dirichlet", 0.1)):
        parts = split_clients(d.y_train, 7, partition, alpha, seed=3)
        allidx = np.concatenate(parts)
        assert len(parts) == 7 and all(len(p) > 0 for p in parts)
        assert sorted(allidx.tolist()) == list(range(len(d.y_train)))
    iid = split_clients(d.y_train, 7, "iid", 1.0, seed=3)
    assert max(map(len, iid)) - min(map(len, iid)) <= 1
    dirich = split_clients(d.y_train, 7, "dirichlet", 0.1, seed=3)
    # Dirichlet(0.1) is strongly non-IID: some client misses several classes.
    assert min(len(np.unique(d.y_train.numpy()[p])) for p in dirich) < 8


def test_image_scenario_without_data_dir_fails_before_work(tmp_path: Path) -> None:
    s = load_scenario("mnist_flower")
    with pytest.raises(ScenarioError, match=r"task.data_dir"):
        run_scenario(s, tmp_path / "o", progress=False, stream=None)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_flower_engine_digits_under_attack(tmp_path: Path) -> None:
    s = load_scenario(
        "digits_flower",
        ["runs=1", "rounds=4", "federation.clients=4", "federation.participants=4",
         "attack.malicious=1", "attack.params={}", "sweep.sharing.fraction=[1.0, 0.5]",
         'sweep.attack.name=["label_flip"]', 'sweep.defense.name=["median"]'],
    )
    out = run_scenario(s, tmp_path, progress=False, plots=False, stream=None)
    rows = {(r["point"], r["metric"]): r for r in out.summary_rows}
    acc_full, acc_half = rows[(0, "accuracy")]["steady"], rows[(1, "accuracy")]["steady"]
    assert 0.5 < acc_full <= 1.0 and 0.5 < acc_half <= 1.0
    down_full, down_half = rows[(0, "bytes_down")]["steady"], rows[(1, "bytes_down")]["steady"]
    assert down_half < 0.6 * down_full  # partial sharing sends about half the bytes
    assert rows[(0, "rejected")]["steady"] == 0

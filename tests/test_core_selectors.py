"""Mask selectors: fractions 0/1, exact counts, context errors, NaN, cross-process determinism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from psfed_robust.core.flatten import FlattenedModel
from psfed_robust.core.mask import Mask, count_for_fraction
from psfed_robust.core.selectors import (
    MASK_STRATEGIES,
    ClientSpecificMaskSelector,
    CompositeMaskSelector,
    FixedMaskSelector,
    GradientBasedSelector,
    MaskSelector,
    RoundRobinMaskSelector,
    StructuredMaskSelector,
    TopKMagnitudeSelector,
    client_index,
    make_selector,
)

ROOT = Path(__file__).resolve().parents[1]


def model() -> FlattenedModel:
    torch.manual_seed(0)
    return FlattenedModel(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))  # 15+8


def make(name: str, f: float) -> tuple[MaskSelector, dict[str, object]]:
    """The selector named ``name`` (one of ``MASK_STRATEGIES``) and the context it needs."""
    fm = model()
    grads = np.random.default_rng(1).standard_normal(fm.num_parameters)
    context: dict[str, dict[str, object]] = {
        "topk": {"flat_model": fm},
        "gradient": {"gradients": grads},
        "structured": {"flat_model": fm},
        "client_specific": {"client_id": 3},
        "round_robin_per_client": {"client_id": 1},
    }
    return make_selector(name, f, seed=1), context.get(name, {})


@pytest.mark.parametrize("name", MASK_STRATEGIES)
def test_fraction_zero_and_one(name: str) -> None:
    for f, expected in ((0.0, 0), (1.0, 23)):
        sel, ctx = make(name, f)
        for rnd in (1, 2, 5):
            m = sel.select(23, rnd, **ctx)
            assert isinstance(m, Mask) and m.size == 23 and m.count == expected


@pytest.mark.parametrize("name", ["random", "topk", "gradient", "client_specific", "round_robin"])
@pytest.mark.parametrize("f", [0.1, 0.3, 0.5, 0.77])
def test_exact_counts(name: str, f: float) -> None:
    sel, ctx = make(name, f)
    assert sel.select(23, 4, **ctx).count == count_for_fraction(23, f)


@pytest.mark.parametrize(
    ("sel", "key"),
    [
        (TopKMagnitudeSelector(0.5), "flat_model"),
        (GradientBasedSelector(0.5), "gradients"),
        (StructuredMaskSelector(0.5), "flat_model"),
        (ClientSpecificMaskSelector(0.5), "client_id"),
        (RoundRobinMaskSelector(0.5, coordinated=False), "client_id"),
    ],
)
def test_missing_context_names_the_key(sel: MaskSelector, key: str) -> None:
    with pytest.raises(ValueError, match=repr(key)):
        sel.select(23, 1)
    assert key in sel.required_context


def test_nan_gradients_never_selected() -> None:
    g = np.array([np.nan, 1.0, -5.0, np.nan, 0.5, 2.0])
    for f in (0.1, 0.5, 4 / 6):
        m = GradientBasedSelector(f).select(6, 1, gradients=g)
        assert not m.data[[0, 3]].any()
    assert GradientBasedSelector(0.5).select(6, 1, gradients=g).indices.tolist() == [1, 2, 5]
    assert GradientBasedSelector(1.0).select(6, 1, gradients=g).count == 6
    t = torch.tensor([0.0, -3.0, 1.0], dtype=torch.bfloat16)
    assert GradientBasedSelector(1 / 3).select(3, 1, gradients=t).indices.tolist() == [1]
    with pytest.raises(ValueError, match="entries"):
        GradientBasedSelector(0.5).select(5, 1, gradients=g)


def test_topk_known_by_hand() -> None:
    fm = model()
    flat = torch.zeros(23)
    flat[[3, 17]] = torch.tensor([-9.0, 8.0])
    fm.unflatten(flat)
    assert TopKMagnitudeSelector(2 / 23).select(23, 1, flat_model=fm).indices.tolist() == [3, 17]


def test_structured_fraction_counts_parameters() -> None:
    fm = model()  # tensors: 12, 3, 6, 2
    sel = StructuredMaskSelector(0.5, rotate_layers=False)
    m = sel.select(23, 1, flat_model=fm)
    assert m.count == 12 and m.indices.tolist() == list(range(12))  # 12 of target 12
    assert StructuredMaskSelector(0.6, rotate_layers=False).select(23, 1, flat_model=fm).count == 15
    rot = StructuredMaskSelector(0.3)
    m2 = rot.select(23, 2, flat_model=fm)  # starts at tensor 1 (3 params), adds the 6
    assert m2.indices.tolist() == list(range(12, 21))
    named = StructuredMaskSelector(layer_names=["2"]).select(23, 1, flat_model=fm)
    assert named.indices.tolist() == list(range(15, 23))
    with pytest.raises(TypeError):
        StructuredMaskSelector(0.5).select(23, 1, flat_model=np.zeros(23))
    with pytest.raises(ValueError):
        StructuredMaskSelector(0.5).select(22, 1, flat_model=fm)


def test_client_specific_overlap_has_an_effect() -> None:
    def overlap(of: float) -> int:
        sel = ClientSpecificMaskSelector(0.3, seed=7, overlap_fraction=of)
        a, b = sel.select(2000, 3, client_id=1), sel.select(2000, 3, client_id=2)
        return (a & b).count

    assert overlap(1.0) == count_for_fraction(2000, 0.3)  # identical masks
    assert overlap(0.5) >= count_for_fraction(600, 0.5)
    assert overlap(0.0) < overlap(0.5) < overlap(1.0)
    sel = ClientSpecificMaskSelector(0.3, seed=7)
    assert sel.select(100, 1, client_id="a") != sel.select(100, 1, client_id="b")
    assert sel.select(100, 1, client_id="a") == sel.select(100, 1, client_id="a")
    assert sel.select(100, 1, client_id="a") != sel.select(100, 2, client_id="a")


def test_round_robin_known_by_hand() -> None:
    sel = RoundRobinMaskSelector(count=4)
    assert sel.select(10, 1).indices.tolist() == [0, 1, 2, 3]
    assert sel.select(10, 3).indices.tolist() == [0, 1, 8, 9]
    pc = RoundRobinMaskSelector(count=3, coordinated=False)
    assert pc.select(10, 1, client_id=2).indices.tolist() == [6, 7, 8]
    assert pc.per_client and not sel.per_client
    covered = Mask.all_false(10)
    for r in range(1, 4):
        covered = covered | sel.select(10, r)
    assert covered.count == 10  # every entry shared every ceil(n/M) rounds
    with pytest.raises(ValueError):
        RoundRobinMaskSelector()
    with pytest.raises(ValueError):
        RoundRobinMaskSelector(count=11).select(10, 1)


def test_fixed_and_composite() -> None:
    fixed = FixedMaskSelector([1, 4])
    assert fixed.select(6, 1).indices.tolist() == [1, 4]
    assert fixed.fraction == pytest.approx(2 / 6)
    with pytest.raises(ValueError):
        FixedMaskSelector([7]).select(6, 1)
    comp = CompositeMaskSelector([FixedMaskSelector([0, 1]), FixedMaskSelector([1, 2])])
    assert comp.select(4, 1).indices.tolist() == [0, 1, 2]
    inter = CompositeMaskSelector(
        [FixedMaskSelector([0, 1]), FixedMaskSelector([1, 2])], mode="intersection"
    )
    assert inter.select(4, 1).indices.tolist() == [1]
    assert CompositeMaskSelector([]).select(4, 1).count == 0
    both = CompositeMaskSelector([TopKMagnitudeSelector(0.1), ClientSpecificMaskSelector(0.1)])
    assert both.required_context == ("flat_model", "client_id") and both.per_client
    with pytest.raises(ValueError):
        CompositeMaskSelector([], mode="xor")


def test_fraction_validation_and_client_index() -> None:
    for bad in (-0.1, 1.1, float("nan")):
        with pytest.raises(ValueError):
            make_selector("random", bad)
    with pytest.raises(TypeError):
        make_selector("random", "0.5")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        make_selector("random", True)
    with pytest.raises(ValueError, match="unknown mask_strategy 'nope'"):
        make_selector("nope", 0.5)
    assert client_index(5) == 5
    assert client_index("x") == client_index("x")
    with pytest.raises(ValueError):
        client_index(-1)
    with pytest.raises(TypeError):
        client_index(1.5)


@given(st.integers(1, 500), st.floats(0, 1), st.integers(1, 50), st.integers(0, 1000))
def test_seeded_selectors_regenerate_from_spec(n: int, f: float, rnd: int, cid: int) -> None:
    for sel in (
        make_selector("random", f, seed=3),
        ClientSpecificMaskSelector(f, seed=3, overlap_fraction=0.3),
        make_selector("round_robin_per_client", f),
    ):
        m = sel.select(n, rnd, client_id=cid)
        assert m.count == count_for_fraction(n, f)
        assert m.seed_spec is not None and m.seed_spec.materialize() == m


SCRIPT = textwrap.dedent(
    """
    import hashlib, json
    from psfed_robust.core.selectors import (
        ClientSpecificMaskSelector, RandomMaskSelector, RoundRobinMaskSelector)
    out = {}
    sels = {
        "client": ClientSpecificMaskSelector(0.3, seed=11),
        "random": RandomMaskSelector(0.3, seed=11),
        "rr": RoundRobinMaskSelector(0.1, coordinated=False),
    }
    for name, sel in sels.items():
        for cid in ("alice", "bob", 7):
            m = sel.select(5000, 3, client_id=cid)
            out[f"{name}-{cid}"] = hashlib.sha256(m.data.tobytes()).hexdigest()
    print(json.dumps(out))
    """
)


def test_selector_determinism_across_processes() -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT],
            env={**os.environ, "PYTHONHASHSEED": hashseed, "FLWR_TELEMETRY_ENABLED": "0"},
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for hashseed in ("1", "2")  # both at once: each spends seconds importing torch
    ]
    digests = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        digests.append(json.loads(out.strip().splitlines()[-1]))
    assert digests[0] == digests[1]
    d = digests[0]
    for name in ("client", "rr"):  # per-client selectors: clients differ from each other
        assert len({d[f"{name}-{c}"] for c in ("alice", "bob", 7)}) == 3
    assert len({d[f"random-{c}"] for c in ("alice", "bob", 7)}) == 1  # coordinated

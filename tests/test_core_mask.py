"""Mask and SeedSpec: immutability, constructors, operators, conversions (seed-audit defects)."""

from __future__ import annotations

import copy
import hashlib
import pickle

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from psfed_robust.core.mask import Mask, SeedSpec, count_for_fraction, random_indices


def test_copies_input_and_is_read_only() -> None:
    arr = np.array([True, False, True])
    m = Mask(arr)
    arr[1] = True  # the seed's "frozen" mask changed count 2 -> 3 here
    assert m.count == 2 and m.data.tolist() == [True, False, True]
    with pytest.raises(ValueError):
        m.data[0] = False
    with pytest.raises(AttributeError):
        m.data = np.zeros(3, bool)  # type: ignore[misc]
    with pytest.raises(AttributeError):
        m.foo = 1  # type: ignore[attr-defined]
    out = np.asarray(m)
    out[0] = False  # __array__ hands out a copy
    assert m.data[0]


def test_properties_known_by_hand() -> None:
    m = Mask([True, False, True, False, False])
    assert (m.size, m.count, len(m)) == (5, 2, 5)
    assert m.fraction == pytest.approx(0.4)
    assert m.indices.tolist() == [0, 2] and m.indices.dtype == np.int64
    assert Mask([]).fraction == 0.0 and Mask([]).size == 0
    with pytest.raises(ValueError, match="1-D"):
        Mask(np.zeros((2, 2), bool))


def test_from_indices_validation() -> None:
    assert Mask.from_indices([3, 0], 5).indices.tolist() == [0, 3]
    assert Mask.from_indices(np.array([1.0, 2.0]), 4).indices.tolist() == [1, 2]
    assert Mask.from_indices([], 4).count == 0
    with pytest.raises(ValueError, match="range"):
        Mask.from_indices([5], 5)
    with pytest.raises(ValueError, match="range"):
        Mask.from_indices([-1], 5)
    with pytest.raises(ValueError, match="duplicate"):
        Mask.from_indices([1, 1], 5)
    with pytest.raises(ValueError, match="integers"):
        Mask.from_indices([0.9, 1.7], 5)  # the seed truncated these to [0, 1]
    with pytest.raises(ValueError, match="integers"):
        Mask.from_indices(np.array([True, False]), 5)
    with pytest.raises(ValueError, match="integers"):
        Mask.from_indices([float("nan")], 5)
    with pytest.raises(TypeError):
        Mask.from_indices([0], 5.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Mask.from_indices([0], -1)


@given(st.integers(0, 3000), st.floats(0.0, 1.0), st.integers(0, 2**40), st.integers(0, 100))
def test_random_exact_count_and_determinism(size: int, f: float, seed: int, rnd: int) -> None:
    m = Mask.random(size, f, seed=seed, round_num=rnd)
    assert m.size == size and m.count == count_for_fraction(size, f)
    assert m == Mask.random(size, f, seed=seed, round_num=rnd)
    assert m.seed_spec is not None and m.seed_spec.materialize() == m


def test_random_no_seed_round_collision() -> None:
    a = Mask.random(1000, 0.5, seed=1000003, round_num=1)
    b = Mask.random(1000, 0.5, seed=0, round_num=2)  # collided in the seed package
    assert a != b
    assert Mask.random(7, 0.5).count == 4  # round half away from zero: 3.5 -> 4
    assert Mask.random(5, 0.5).count == 3
    with pytest.raises(ValueError):
        Mask.random(10, 1.5)
    with pytest.raises(TypeError):
        Mask.random(10, "0.5")  # type: ignore[arg-type]


def test_all_true_all_false() -> None:
    assert Mask.all_true(4).count == 4 and Mask.all_false(4).count == 0
    assert Mask.all_true(0).size == 0
    with pytest.raises(ValueError):
        Mask.all_true(-1)


def test_operators_known_by_hand() -> None:
    a = Mask([True, True, False, False])
    b = Mask([True, False, True, False])
    assert (a & b).data.tolist() == [True, False, False, False]
    assert (a | b).data.tolist() == [True, True, True, False]
    assert (a ^ b).data.tolist() == [False, True, True, False]
    assert (~a).data.tolist() == [False, False, True, True]
    assert a == Mask([True, True, False, False]) and a != b
    assert Mask([True]) != Mask([True, False])
    assert a.__eq__(np.array([True, True, False, False])) is NotImplemented
    assert hash(a) == hash(Mask(a.data))
    with pytest.raises(ValueError, match="sizes differ"):
        _ = a & Mask([True])
    with pytest.raises(TypeError):
        _ = a | np.ones(4, bool)  # type: ignore[operator]


@given(st.lists(st.booleans(), max_size=200), st.integers(0, 2**32))
def test_operator_laws(bits: list[bool], seed: int) -> None:
    a = Mask(bits)
    b = Mask(np.random.default_rng(seed).random(len(bits)) < 0.5)
    assert ~~a == a
    assert ~(a & b) == (~a | ~b)
    assert (a & b).count + (a | b).count == a.count + b.count
    assert Mask.from_dict(a.to_dict()) == a
    assert Mask.from_indices(a.indices, a.size) == a


def test_dict_repr_pickle() -> None:
    m = Mask.from_indices([0, 2], 3)
    assert m.to_dict() == {"indices": [0, 2], "size": 3}
    assert Mask.from_dict({"indices": [0, 2], "size": 3}) == m
    with pytest.raises(ValueError, match="indices"):
        Mask.from_dict({"size": 3})
    assert repr(m) == "Mask(count=2, size=3, fraction=66.67%)"
    r = Mask.random(100, 0.3, seed=1)
    for clone in (pickle.loads(pickle.dumps(r)), copy.deepcopy(r)):
        assert clone == r and clone.seed_spec == r.seed_spec
        assert not clone.data.flags.writeable


def test_to_torch() -> None:
    t = Mask([True, False]).to_torch()
    assert t.dtype.is_floating_point is False and t.tolist() == [True, False]


def test_seedspec_validation_and_kinds() -> None:
    with pytest.raises(ValueError, match="kind"):
        SeedSpec("bogus", 3)
    with pytest.raises(ValueError):
        SeedSpec("random", 3, 4)
    with pytest.raises(ValueError):
        SeedSpec("random", 3, 1, seed=-1)
    with pytest.raises(ValueError):
        SeedSpec("overlap", 10, 3, aux_count=4)
    with pytest.raises(ValueError, match="count == size"):
        SeedSpec("all", 5, 2)
    with pytest.raises(ValueError, match="count == 0"):
        SeedSpec("none", 5, 2)
    rr = SeedSpec("round_robin", 10, 3, offset=8).materialize()
    assert rr.indices.tolist() == [0, 8, 9]
    ov = SeedSpec("overlap", 100, 30, seed=1, aux_seed=2, aux_count=10).materialize()
    assert ov.count == 30
    assert random_indices(10, 7, 3).size == 7  # complement branch


def test_seed_spec_must_regenerate_the_data() -> None:
    good = Mask.random(50, 0.2, seed=1)
    assert Mask(good.data, seed_spec=good.seed_spec).seed_spec == good.seed_spec
    with pytest.raises(ValueError, match="regenerate"):
        Mask(~good.data, seed_spec=good.seed_spec)
    with pytest.raises(TypeError):
        Mask(good.data, seed_spec="x")  # type: ignore[arg-type]


# sha256[:16] of mask bytes / sorted indices as the seeded masks were regenerated before the
# no-sort draw (commit c7e2f4c): a seeded mask on the wire must regenerate identically in every
# version, or a receiver would apply values to the wrong coordinates.
_SEEDED_DIGESTS = {
    "random-1-0-0": "6e340b9cffb37a98",
    "idx-1-0-0": "e3b0c44298fc1c14",
    "random-1-1-3": "4bf5122f344554c5",
    "idx-1-1-3": "af5570f5a1810b7a",
    "random-10-5-1": "0a8f325c156a6750",
    "idx-10-5-1": "490d0714d41e9e03",
    "random-10-6-2": "3192b11429125bfa",
    "idx-10-6-2": "fafb6fd7af4511ec",
    "random-1000-1-7": "bc9a1621156cf12c",
    "idx-1000-1-7": "ee334055263881f9",
    "random-1000-999-7": "20dafcec9652d029",
    "idx-1000-999-7": "50da610556df26f0",
    "random-20011-400-9": "91a77aa5ee7cc4f1",
    "idx-20011-400-9": "09b8713f4b005ed8",
    "random-20011-10000-9": "cfb4dd22a02cda5b",
    "idx-20011-10000-9": "4791a12b88b89f8e",
    "random-20011-10006-9": "c176492f90d70d39",
    "idx-20011-10006-9": "b88a4a2b08c4ecc8",
    "random-100003-90000-11": "67e6424c39ff4d4f",
    "idx-100003-90000-11": "3b2b810c0f597e06",
    "random-1068810-534405-5": "2cea0de51d9c69bc",
    "idx-1068810-534405-5": "332ebbf5f8257ada",
    "random-1068810-106881-5": "62b76bd7cf2de920",
    "idx-1068810-106881-5": "119bce558d359076",
    "overlap-1000-300-100-1-2": "70b0207ebfe9b8b1",
    "overlap-50000-30000-20000-3-4": "676d31791ca4c0d7",
    "overlap-77-70-10-5-6": "a7e949e1ad436861",
}


def test_seeded_masks_regenerate_as_in_earlier_versions() -> None:
    def digest(a: np.ndarray) -> str:
        return hashlib.sha256(a.tobytes()).hexdigest()[:16]

    for key, want in _SEEDED_DIGESTS.items():
        kind, *nums = key.split("-")
        if kind == "overlap":
            size, count, aux, s1, s2 = map(int, nums)
            spec = SeedSpec("overlap", size, count, seed=s1, aux_seed=s2, aux_count=aux)
            got = digest(spec._materialize().data)
        else:
            size, count, seed = map(int, nums)
            if kind == "idx":
                got = digest(random_indices(size, count, seed))
            else:
                mask = SeedSpec("random", size, count, seed=seed)._materialize()
                assert mask.count == count
                np.testing.assert_array_equal(mask.indices, random_indices(size, count, seed))
                got = digest(mask.data)
        assert got == want, key

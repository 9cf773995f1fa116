"""Wire codec: round trips for every encoding, auto optimality, corruption always detected."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from psfed_robust._wire_coding import (
    _best_rice,
    _plan_gap,
    _plan_runs,
    _rice_lower_bound_bytes,
    _runs_lower_bound_bytes,
)
from psfed_robust.core.mask import Mask, SeedSpec
from psfed_robust.core.selectors import ClientSpecificMaskSelector, RoundRobinMaskSelector
from psfed_robust.wire import (
    ENCODINGS,
    HEADER_SIZE,
    EncodedUpdate,
    WireFormatError,
    decode_mask,
    decode_update,
    encode_mask,
    encode_update,
    encoding_costs,
)

NP_DTYPES = [np.float16, np.float32, np.float64]


# ---------------------------------------------------------------- helpers
@st.composite
def masks(draw: st.DrawFn, max_size: int = 5000) -> Mask:
    size = draw(st.integers(0, max_size))
    kind = draw(st.sampled_from(["empty", "full", "random", "random", "block", "indices"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if kind == "empty":
        return Mask.all_false(size) if draw(st.booleans()) else Mask(np.zeros(size, bool))
    if kind == "full":
        return Mask.all_true(size) if draw(st.booleans()) else Mask(np.ones(size, bool))
    if kind == "random":
        p = draw(st.sampled_from([0.001, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99]))
        return Mask(rng.random(size) < p)
    if kind == "block":
        lo = draw(st.integers(0, size))
        hi = draw(st.integers(lo, size))
        data = np.zeros(size, bool)
        data[lo:hi] = True
        return Mask(data)
    n = draw(st.integers(0, size))
    return Mask.from_indices(rng.choice(size, n, replace=False), size)


def values_for(mask: Mask, dtype: object, seed: int = 0) -> np.ndarray | torch.Tensor:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(mask.count) * 100
    if dtype == "bf16":
        return torch.from_numpy(v).to(torch.bfloat16)
    if dtype == "torch32":
        return torch.from_numpy(v.astype(np.float32))
    return v.astype(dtype)


def same_bits(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype
        return bool(torch.equal(a.view(torch.int16), b.view(torch.int16)))
    assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
    return bool(np.array_equal(a.view(np.uint8), b.view(np.uint8)))


def expected_values(v: object) -> object:
    if isinstance(v, torch.Tensor) and v.dtype != torch.bfloat16:
        return v.numpy()
    return v


def applicable(mask: Mask) -> list[str]:
    out = ["bitmap", "gap", "runs"]
    if mask.count == mask.size:
        out.append("dense")
    if mask.seed_spec is not None:
        out.append("seeded")
    return out


def resign(payload: bytes | bytearray) -> bytes:
    """Recompute the CRC so that only the structural checks can catch a change."""
    p = bytearray(payload)
    crc = zlib.crc32(bytes(p[HEADER_SIZE:]), zlib.crc32(bytes(p[:24])))
    p[24:28] = struct.pack("<I", crc)
    return bytes(p)


# ---------------------------------------------------------------- round trips
@given(masks(), st.sampled_from([*NP_DTYPES, "bf16", "torch32"]), st.data())
def test_roundtrip_every_encoding(mask: Mask, dtype: object, data: st.DataObject) -> None:
    vals = values_for(mask, dtype, seed=mask.count)
    for enc in ["auto", *applicable(mask)]:
        e = encode_update(mask, vals, encoding=enc)
        assert isinstance(e, EncodedUpdate)
        assert e.value_bytes + e.mask_bytes + e.framing_bytes == len(e.payload)
        assert e.framing_bytes == HEADER_SIZE
        if enc != "auto":
            assert e.encoding == enc
        size = data.draw(st.sampled_from([None, mask.size]))
        m2, v2 = decode_update(e.payload, expected_size=size)
        assert m2 == mask and m2.size == mask.size and m2.count == mask.count
        assert not m2.data.flags.writeable
        assert same_bits(v2, expected_values(vals))
        if isinstance(v2, np.ndarray):
            assert v2.flags.writeable
        assert decode_mask(e.payload) == mask


@given(masks())
def test_auto_is_never_more_expensive(mask: Mask) -> None:
    v = np.zeros(mask.count, np.float32)
    auto = encode_update(mask, v)
    for enc in applicable(mask):
        assert len(auto.payload) <= len(encode_update(mask, v, encoding=enc).payload), enc
    costs = encoding_costs(mask, 4)
    assert len(auto.payload) == min(costs.values())


@given(masks())
def test_mask_only_roundtrip(mask: Mask) -> None:
    for enc in ["auto", *applicable(mask)]:
        e = encode_mask(mask, encoding=enc)
        assert e.value_bytes == 0
        assert e.mask_bytes + e.framing_bytes == len(e.payload)
        assert decode_mask(e.payload, expected_size=mask.size) == mask
        with pytest.raises(WireFormatError, match="mask only"):
            decode_update(e.payload)


@pytest.mark.parametrize(
    "mask",
    [
        Mask.random(1000, 0.3, seed=5, round_num=2),
        Mask.random(1000, 0.9, seed=5, round_num=3),
        Mask.random(0, 0.5, seed=1),
        Mask.all_true(17),
        Mask.all_false(17),
        RoundRobinMaskSelector(0.25).select(103, round_num=7),
        RoundRobinMaskSelector(0.25, coordinated=False).select(103, 2, client_id="abc"),
        ClientSpecificMaskSelector(0.4, seed=3, overlap_fraction=0.5).select(500, 4, client_id=9),
    ],
    ids=lambda m: repr(m),
)
def test_seeded_roundtrip_and_cost(mask: Mask) -> None:
    assert mask.seed_spec is not None
    v = torch.randn(mask.count, dtype=torch.float32)
    e = encode_update(mask, v, encoding="seeded")
    assert e.mask_bytes <= 1 + 3 * 8
    m2, v2 = decode_update(e.payload)
    assert m2 == mask and m2.seed_spec is not None
    assert m2.seed_spec.materialize() == mask
    assert same_bits(v2, v.numpy())
    auto = encode_update(mask, v)
    assert len(auto.payload) <= len(e.payload)
    if mask.count != mask.size:
        assert auto.encoding == "seeded" or mask.size <= 8


def test_seed_spec_argument_is_checked() -> None:
    m = Mask(np.arange(50) % 3 == 0)
    spec = Mask.random(50, 0.2, seed=1).seed_spec
    assert spec is not None
    with pytest.raises(ValueError, match="does not regenerate"):
        encode_mask(m, seed_spec=spec)
    good = Mask.random(50, 0.2, seed=1)
    plain = Mask(good.data)  # same data, no spec
    e = encode_mask(plain, encoding="seeded", seed_spec=spec)
    assert decode_mask(e.payload) == plain


def test_known_layout_and_costs() -> None:
    m = Mask.from_indices([1, 3, 8], size=10)
    e = encode_update(m, np.array([1.0, 2.0, 3.0], np.float32), encoding="bitmap")
    assert e.payload[:4] == b"PSFW" and e.payload[4] == 1
    assert e.payload[5] == ENCODINGS.index("bitmap") and e.payload[6] == 2
    assert struct.unpack_from("<QQ", e.payload, 8) == (10, 3)
    assert e.mask_bytes == 2 and e.payload[28:30] == bytes([0b00001010, 0b00000001])
    assert e.value_bytes == 12 and len(e.payload) == 28 + 2 + 12
    # gap: indices 1,3,8 -> gaps 1,1,4; Rice k=1: remainders 1,1,0 (3 bits) + quotients 0,0,2
    g = encode_update(m, np.array([1.0, 2.0, 3.0], np.float32), encoding="gap")
    assert g.payload[28:30] == bytes([0, 1])  # not complemented, k = 1
    assert g.payload[30] == 0b11000000  # remainders 1,1,0
    assert g.payload[31] == 0b11001000  # unary: 1 | 1 | 001
    dense = encode_update(Mask.all_true(4), np.ones(4, np.float64))
    assert dense.encoding == "dense" and dense.mask_bytes == 0 and len(dense.payload) == 28 + 32


def _rice_cost_bits(g: np.ndarray, k: int) -> int:
    """Rice cost by its definition, per gap in Python: 1 + k + (g >> k) bits each."""
    return sum(1 + k + (int(x) >> k) for x in g)


@given(st.lists(st.integers(0, 5000), min_size=1, max_size=300))
def test_rice_parameter_is_optimal(gaps: list[int]) -> None:
    g = np.array(gaps, dtype=np.int64)
    k, bits = _best_rice(g)
    costs = [_rice_cost_bits(g, kk) for kk in range(40)]
    assert bits == min(costs) == costs[k]
    assert k == costs.index(min(costs))  # ties: the smallest optimal k (canonical bytes)


@given(masks(max_size=3000))
def test_planned_costs_match_an_independent_count_and_bounds_hold(mask: Mask) -> None:
    """The gap plan's cost equals the Rice cost of the gaps of the flatnonzero indices
    (counted per gap in Python); the runs plan's cost is the real section's; both cheap lower
    bounds that let ``auto`` skip a plan never exceed the exact cost."""
    complement = mask.count * 2 > mask.size
    idx = np.flatnonzero(~mask.data if complement else mask.data)
    gaps = np.diff(idx, prepend=-1) - 1
    plan = _plan_gap(mask, None)
    assert plan is not None
    k = plan.k
    bits = _rice_cost_bits(gaps, k)
    assert plan.nbytes == 2 + (gaps.size * k + 7) // 8 + (bits - gaps.size * k + 7) // 8
    costs = encoding_costs(mask, 4)
    assert costs["gap"] - HEADER_SIZE - 4 * mask.count == plan.nbytes
    runs = _plan_runs(mask)
    assert costs["runs"] - HEADER_SIZE - 4 * mask.count == runs.nbytes
    assert _runs_lower_bound_bytes(mask) <= runs.nbytes
    if gaps.size:
        assert _rice_lower_bound_bytes(mask, complement, gaps.size) <= plan.nbytes


def test_runs_layout_and_layer_masks() -> None:
    m = Mask.from_indices([1, 3, 8], size=10)
    r = encode_mask(m, encoding="runs")
    # runs z = 1,1,4 (canonical 1,0,3), o = 1,1,1 (canonical 0,0,0); both Rice k = 0
    assert r.payload[28:46] == bytes([0, 0]) + struct.pack("<QQ", 3, 1)
    assert r.payload[46:] == bytes([0b01100010, 0b11100000])  # 01|1|0001 ; 1|1|1
    assert decode_mask(r.payload) == m
    # whole layers: two blocks of a 1e6 model cost a few bytes, not a bitmap
    data = np.zeros(1_000_000, bool)
    data[1000:400_000] = True
    data[700_000:900_000] = True
    layers = Mask(data)
    e = encode_mask(layers)
    assert e.encoding == "runs" and e.mask_bytes < 40
    assert decode_mask(e.payload) == layers


def test_gap_uses_complement_for_dense_masks() -> None:
    m = Mask(np.random.default_rng(0).random(10_000) < 0.95)
    e = encode_mask(m, encoding="gap")
    assert e.payload[HEADER_SIZE] == 1  # complement flag
    assert e.mask_bytes < (10_000 - m.count) * 7 / 8  # < 7 bits per complement member
    assert decode_mask(e.payload) == m


def test_values_big_endian_and_torch_variants() -> None:
    m = Mask.from_indices([0, 2], 3)
    _, v = decode_update(encode_update(m, np.array([1.5, -2.0], ">f4")).payload)
    assert v.dtype == np.float32 and v.tolist() == [1.5, -2.0]
    t = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    _, v = decode_update(encode_update(m, t).payload)
    assert v.dtype == np.float64 and v.tolist() == [1.0, 2.0]
    _, v = decode_update(encode_update(m, torch.tensor([1.0, 3.0])[::1]).payload)
    assert v.tolist() == [1.0, 3.0]
    nonfinite = np.array([np.nan, np.inf], np.float32)
    _, v = decode_update(encode_update(m, nonfinite).payload)
    assert same_bits(v, nonfinite)


def test_encode_argument_errors() -> None:
    m = Mask.from_indices([0, 2], 3)
    with pytest.raises(ValueError, match="selects 2"):
        encode_update(m, np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="dtype"):
        encode_update(m, np.zeros(2, np.int32))
    with pytest.raises(TypeError, match="dtype"):
        encode_update(m, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="1-D"):
        encode_update(m, np.zeros((2, 1), np.float32))
    with pytest.raises(TypeError, match="numpy array or torch tensor"):
        encode_update(m, [1.0, 2.0])
    with pytest.raises(ValueError, match="full mask"):
        encode_update(m, np.zeros(2, np.float32), encoding="dense")
    with pytest.raises(ValueError, match="SeedSpec"):
        encode_update(m, np.zeros(2, np.float32), encoding="seeded")
    with pytest.raises(ValueError, match="unknown encoding"):
        encode_update(m, np.zeros(2, np.float32), encoding="zip")
    with pytest.raises(TypeError, match="Mask"):
        encode_update(np.ones(3, bool), np.zeros(3, np.float32))  # type: ignore[arg-type]


# ---------------------------------------------------------------- corruption
SMALL = [
    (Mask.from_indices([1, 3, 8], 10), "bitmap"),
    (Mask.from_indices([1, 3, 8], 10), "gap"),
    (Mask(np.arange(40) % 7 != 0), "gap"),
    (Mask.all_true(5), "dense"),
    (Mask.random(64, 0.25, seed=3), "seeded"),
    (ClientSpecificMaskSelector(0.5, seed=1).select(40, 1, client_id=2), "seeded"),
    (Mask.all_false(9), "gap"),
    (Mask.from_indices([1, 3, 8], 10), "runs"),
    (Mask(np.arange(40) % 7 != 0), "runs"),
    (Mask(np.arange(50) >= 20), "runs"),
    (Mask.all_false(9), "runs"),
]


@pytest.mark.parametrize(("mask", "enc"), SMALL, ids=[f"{e}-{m.count}" for m, e in SMALL])
def test_every_single_byte_corruption_and_truncation_is_rejected(mask: Mask, enc: str) -> None:
    v = np.arange(mask.count, dtype=np.float16)
    payload = encode_update(mask, v, encoding=enc).payload
    for i in range(len(payload)):
        for flip in (0x01, 0x80, 0xFF, 0x5A):
            bad = bytearray(payload)
            bad[i] ^= flip
            with pytest.raises(WireFormatError):
                decode_update(bytes(bad))
            with pytest.raises(WireFormatError):
                decode_mask(bytes(bad))
    for n in range(len(payload)):
        with pytest.raises(WireFormatError):
            decode_update(payload[:n])
    for extra in (b"\x00", b"\x01\x02"):
        with pytest.raises(WireFormatError):
            decode_update(payload + extra)


@given(masks(max_size=2000), st.data())
def test_random_corruptions_are_rejected(mask: Mask, data: st.DataObject) -> None:
    payload = encode_update(mask, values_for(mask, np.float32)).payload
    i = data.draw(st.integers(0, len(payload) - 1))
    flip = data.draw(st.integers(1, 255))
    bad = bytearray(payload)
    bad[i] ^= flip
    with pytest.raises(WireFormatError):
        decode_update(bytes(bad))
    cut = data.draw(st.integers(0, len(payload) - 1))
    with pytest.raises(WireFormatError):
        decode_update(payload[:cut])


def test_structural_checks_behind_a_valid_crc() -> None:
    """Payloads with a recomputed CRC still never decode to a wrong mask."""
    m = Mask.from_indices([1, 3, 8], 10)
    v = np.ones(3, np.float32)
    bitmap = bytearray(encode_update(m, v, encoding="bitmap").payload)
    bad = bytearray(bitmap)
    bad[29] |= 0b00000100  # padding bit beyond size 10
    with pytest.raises(WireFormatError, match="padding"):
        decode_update(resign(bad))
    bad = bytearray(bitmap)
    bad[28] |= 0b00100000  # an extra member: popcount 4 != count 3
    with pytest.raises(WireFormatError):
        decode_update(resign(bad))
    bad = bytearray(bitmap)
    bad[5] = 9  # unknown encoding id
    with pytest.raises(WireFormatError, match="encoding id"):
        decode_update(resign(bad))
    bad = bytearray(bitmap)
    bad[7] = 1  # reserved byte
    with pytest.raises(WireFormatError):
        decode_update(resign(bad))
    bad = bytearray(bitmap)
    struct.pack_into("<Q", bad, 16, 11)  # count > size
    with pytest.raises(WireFormatError):
        decode_update(resign(bad))
    gap = bytearray(encode_update(m, v, encoding="gap").payload)
    bad = bytearray(gap)
    bad[31] = 0b11000011  # last quotient 2 -> 6 (index 16 out of range), same length
    with pytest.raises(WireFormatError, match=r"range|unary"):
        decode_update(resign(bad))
    bad = bytearray(gap)
    bad[28] = 1  # complement flag inconsistent with the count
    with pytest.raises(WireFormatError, match="complement"):
        decode_update(resign(bad))
    bad = bytearray(gap)
    bad[29] = 63  # Rice parameter out of range
    with pytest.raises(WireFormatError):
        decode_update(resign(bad))
    dense = bytearray(encode_update(Mask.all_true(3), v, encoding="dense").payload)
    struct.pack_into("<Q", dense, 8, 4)  # size 4, count 3, no mask bytes
    with pytest.raises(WireFormatError, match="dense"):
        decode_update(resign(dense))
    seeded = bytearray(encode_update(Mask.random(10, 0.3, seed=1), v, encoding="seeded").payload)
    bad = bytearray(seeded)
    bad[28] = 17  # unknown seed kind
    with pytest.raises(WireFormatError, match="seed kind"):
        decode_update(resign(bad))
    bad = bytearray(seeded)
    struct.pack_into("<Q", bad, 8, 2)  # spec size 2 < count 3
    with pytest.raises(WireFormatError):
        decode_update(resign(bad))


def test_header_errors_and_expected_size() -> None:
    m = Mask.from_indices([0], 4)
    p = encode_update(m, np.ones(1, np.float32)).payload
    with pytest.raises(WireFormatError, match="expected 5"):
        decode_update(p, expected_size=5)
    with pytest.raises(WireFormatError, match="expected 5"):
        decode_update(p, 5)  # the contract's positional ``size``
    with pytest.raises(WireFormatError, match="expected 3"):
        decode_mask(p, expected_size=3)
    assert decode_update(p, 4)[0] == m
    with pytest.raises(ValueError, match="disagree"):
        decode_update(p, 4, expected_size=5)
    with pytest.raises(WireFormatError, match="magic"):
        decode_update(b"XXXX" + p[4:])
    with pytest.raises(WireFormatError, match="version"):
        decode_update(resign(p[:4] + b"\x02" + p[5:]))
    with pytest.raises(WireFormatError, match="too short"):
        decode_update(b"")
    with pytest.raises(TypeError):
        decode_update("not bytes")  # type: ignore[arg-type]
    assert decode_update(bytearray(p))[0] == m
    assert decode_update(memoryview(p))[0] == m


def test_wire_error_is_a_value_error() -> None:
    assert issubclass(WireFormatError, ValueError)


def test_seedspec_all_none_counts_are_validated() -> None:
    with pytest.raises(ValueError):
        SeedSpec("all", 10, 3)
    with pytest.raises(ValueError):
        SeedSpec("none", 10, 3)


@given(st.binary(max_size=4096), st.integers(min_value=0, max_value=2**32 - 1))
def test_crc32_backend_equals_zlib(data: bytes, start: int) -> None:
    """The fast CRC (ISA-L when installed) is zlib's CRC-32: same wire format either way."""
    from psfed_robust.wire import crc32

    assert crc32(data, start) == zlib.crc32(data, start)
    big = np.random.default_rng(len(data)).standard_normal(300_001).astype(np.float32)
    assert crc32(memoryview(big).cast("B"), start) == zlib.crc32(memoryview(big).cast("B"), start)


def test_crc32_backend_is_isal_when_installed() -> None:
    from psfed_robust.wire import CRC32_BACKEND

    pytest.importorskip("isal")
    assert CRC32_BACKEND == "isal"


def test_runs_structural_checks_behind_a_valid_crc() -> None:
    """A runs section that the CRC cannot catch (re-signed) still never yields a wrong mask."""
    size, v = 50, np.ones(30, np.float32)
    a = Mask(np.arange(size) >= 20)  # one run: z = 20, o = 30
    good = encode_update(a, v, encoding="runs").payload
    assert decode_update(good)[0] == a

    def section(mask: Mask) -> bytes:
        e = encode_mask(mask, encoding="runs")
        return e.payload[HEADER_SIZE:]

    def framed(sec: bytes) -> bytes:  # a's header (size 50, count 30) and values
        return resign(good[:HEADER_SIZE] + sec + v.tobytes())

    def with_head(n: int, zlen: int) -> bytes:
        sec = bytearray(section(a))
        struct.pack_into("<QQ", sec, 2, n, zlen)
        return framed(bytes(sec))

    for n, zlen, match in [
        (2, 1, "unary codes"),  # two runs announced, one code in each body
        (22, 1, "impossible"),  # more runs than size - count + 1 allow
        (0, 0, "impossible"),  # no runs but a count of 30
        (1, 10**6, "truncated"),
    ]:
        with pytest.raises(WireFormatError, match=match):
            decode_update(with_head(n, zlen))
    # the run of [40, 70) from a size-80 mask: 40 + 30 > 50
    with pytest.raises(WireFormatError, match="exceed"):
        decode_update(framed(section(Mask((np.arange(80) >= 40) & (np.arange(80) < 70)))))
    # 29 members in the runs but a count of 30 in the header
    with pytest.raises(WireFormatError, match="members"):
        decode_update(framed(section(Mask((np.arange(size) >= 20) & (np.arange(size) < 49)))))
    # a valid section of another mask with the same size and count decodes to that mask
    b = Mask((np.arange(size) < 10) | ((np.arange(size) >= 20) & (np.arange(size) < 40)))
    assert decode_update(framed(section(b)))[0] == b


# ---------------------------------------------------------------- declared sizes (issue 14 item 9)
def _forged(enc: str, size: int, count: int, section: bytes, dtype_id: int = 2) -> bytes:
    """A well-formed, correctly signed header declaring ``size`` over ``section``."""
    head = struct.pack("<4sBBBBQQ", b"PSFW", 1, ENCODINGS.index(enc), dtype_id, 0, size, count)
    return resign(head + b"\0\0\0\0" + section + b"\0" * (4 * count if dtype_id == 2 else 0))


def _both_paths() -> list[bool]:
    """[compiled (when it builds), numpy]: run a check on each of the codec's paths."""
    from psfed_robust import _wire_kernels

    return [True, False] if _wire_kernels.available() else [False]


_RUN1 = struct.pack("<BBQQ", 0, 0, 1, 1) + b"\x80\x80"  # one run: z = 0, o = 1
FORGED = [
    # the 29-byte payload of the issue: a seeded "none" mask of 2^40 coordinates (1 TiB)
    ("seeded-none-2^40", lambda: _forged("seeded", 1 << 40, 0, bytes((4,)))),
    ("seeded-all-2^40-mask-only", lambda: _forged("seeded", 1 << 40, 1 << 40, bytes((3,)), 0)),
    ("dense-mask-only-2^40", lambda: _forged("dense", 1 << 40, 1 << 40, b"", 0)),
    ("gap-empty-2^40", lambda: _forged("gap", 1 << 40, 0, bytes((0, 0)))),
    # gap with one member and a broken unary stream: numpy rejected it, the compiled decoder
    # first allocated the 8 GiB mask
    ("gap-2^33-bad-unary", lambda: _forged("gap", 1 << 33, 1, bytes((0, 0, 0)))),
    ("runs-2^40", lambda: _forged("runs", 1 << 40, 1, _RUN1)),
    ("bitmap-2^40", lambda: _forged("bitmap", 1 << 40, 0, b"\0" * 16, 0)),
]


@pytest.mark.parametrize(("name", "make"), FORGED, ids=[f[0] for f in FORGED])
def test_declared_sizes_are_capped_on_every_path(
    name: str, make: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = make()  # type: ignore[operator]
    for compiled in _both_paths():
        with monkeypatch.context() as mp:
            if not compiled:
                mp.setenv("PSFED_NO_CPP_KERNEL", "1")
            with pytest.raises(WireFormatError, match=r"declares size \d+, above \d+ trusted"):
                decode_mask(payload)
            if payload[6] != 0:
                with pytest.raises(WireFormatError, match="expected_size"):
                    decode_update(payload)


def test_size_cap_is_relative_to_the_payload_and_absolute() -> None:
    from psfed_robust.wire import (
        UNCHECKED_FREE_SIZE,
        UNCHECKED_MAX_SIZE,
        UNCHECKED_SIZE_PER_BYTE,
    )

    # any payload may declare UNCHECKED_FREE_SIZE: an empty mask of that size decodes
    free = encode_mask(Mask.all_false(UNCHECKED_FREE_SIZE)).payload
    assert len(free) <= HEADER_SIZE + 2 and decode_mask(free).size == UNCHECKED_FREE_SIZE
    # one more coordinate than the payload's length allows: rejected unless the size is expected
    big = UNCHECKED_FREE_SIZE + 1
    p = encode_update(Mask.all_false(big), np.zeros(0, np.float32)).payload
    assert big > UNCHECKED_SIZE_PER_BYTE * len(p)
    with pytest.raises(WireFormatError, match=f"declares size {big}"):
        decode_update(p)
    m, v = decode_update(p, expected_size=big)
    assert m.size == big and m.count == 0 and v.size == 0
    # the same size carried by a payload long enough (values of a seeded mask): accepted
    mask = Mask.random(big, 0.002, seed=3, round_num=1)
    q = encode_update(mask, np.ones(mask.count, np.float32), encoding="seeded").payload
    assert UNCHECKED_SIZE_PER_BYTE * len(q) >= big
    assert decode_update(q)[0] == mask
    # absolute: above UNCHECKED_MAX_SIZE whatever the payload's length (checked before the CRC)
    huge = _forged("gap", UNCHECKED_MAX_SIZE + 8, 0, b"\0" * (UNCHECKED_MAX_SIZE // 1000))
    assert UNCHECKED_SIZE_PER_BYTE * len(huge) > UNCHECKED_MAX_SIZE
    with pytest.raises(WireFormatError, match=f"above {UNCHECKED_MAX_SIZE} trusted"):
        decode_mask(huge)


def test_code_counts_are_bounded_by_the_section_before_allocating() -> None:
    """A gap or runs header announcing more codes than its bytes hold (one stop bit each) is
    rejected before arrays of that many codes exist."""
    size = 1 << 20
    with pytest.raises(WireFormatError, match="unary codes in 1 bytes"):
        decode_mask(_forged("gap", size, 9, bytes((0, 0, 0xFF)), 0))
    sec = struct.pack("<BBQQ", 0, 0, 500_000, 1) + b"\xff\xff"
    with pytest.raises(WireFormatError, match="unary codes in 1 bytes"):
        decode_mask(_forged("runs", size, 500_000, sec, 0))

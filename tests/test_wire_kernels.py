"""The wire codec's compiled kernels (gap decoder, run scan, join) against its numpy path: the
same bytes, the same masks, the same accept/reject verdicts; and the C library loader (build,
cache keys, failure, disable, one build for parallel processes)."""

from __future__ import annotations

import ctypes
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_wire import masks, resign

from psfed_robust import _wire_kernels
from psfed_robust._cpp import CLibrary, TorchExtension, source
from psfed_robust._wire_coding import (
    _mask_runs,
    _pack_fixed,
    _pack_unary,
    _rice_values,
    _run_stats,
)
from psfed_robust.core.mask import Mask
from psfed_robust.wire import (
    HEADER_SIZE,
    WireFormatError,
    decode_update,
    encode_update,
)

needs_c = pytest.mark.skipif(not _wire_kernels.available(), reason="no C compiler")


@contextmanager
def numpy_path() -> Iterator[None]:
    """Run the codec on its numpy path (the compiled kernels disabled)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PSFED_NO_CPP_KERNEL", "1")
        assert not _wire_kernels.available()
        yield


def verdict(payload: bytes) -> tuple[str, bytes]:
    try:
        mask, vals = decode_update(payload)
    except WireFormatError:
        return "rejected", b""
    return "ok", np.packbits(mask.data).tobytes() + vals.tobytes()


@needs_c
@settings(max_examples=300)
@given(masks(max_size=20_000))
def test_gap_and_auto_payloads_are_byte_identical(mask: Mask) -> None:
    v = np.arange(mask.count, dtype=np.float32)
    c_gap = encode_update(mask, v, encoding="gap").payload
    c_auto = encode_update(mask, v).payload
    with numpy_path():
        assert encode_update(mask, v, encoding="gap").payload == c_gap
        assert encode_update(mask, v).payload == c_auto
        assert verdict(c_gap) == ("ok", np.packbits(mask.data).tobytes() + v.tobytes())
    assert verdict(c_gap)[1] == np.packbits(mask.data).tobytes() + v.tobytes()


@needs_c
@settings(max_examples=400)
@given(masks(max_size=3000), st.data())
def test_corrupt_gap_sections_get_the_same_verdict(mask: Mask, data: st.DataObject) -> None:
    """Mutations behind a valid CRC (flips, inserted and removed bytes in the gap section):
    the compiled decoder accepts exactly what the numpy decoder accepts, with the same mask."""
    ones = np.ones(mask.count, np.float32)
    payload = bytearray(encode_update(mask, ones, encoding="gap").payload)
    msec_end = len(payload) - 4 * mask.count
    body = bytearray(payload[HEADER_SIZE:msec_end])
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "flip", "insert", "delete"]))
        if op == "insert" or not body:
            body.insert(data.draw(st.integers(0, len(body))), data.draw(st.integers(0, 255)))
        elif op == "delete":
            del body[data.draw(st.integers(0, len(body) - 1))]
        else:
            i = data.draw(st.integers(0, len(body) - 1))
            body[i] ^= data.draw(st.integers(1, 255))
    bad = resign(bytes(payload[:HEADER_SIZE] + body + payload[msec_end:]))
    got = verdict(bad)
    with numpy_path():
        assert verdict(bad) == got


@needs_c
def test_hand_made_gap_errors() -> None:
    m = Mask.from_indices([1, 3, 8], 10)
    gap = bytearray(encode_update(m, np.ones(3, np.float32), encoding="gap").payload)
    assert gap[29] == 1  # Rice k = 1: remainders 1,1,0 -> 0b110 + padding; gaps 1,1,4
    for mutate, match in [
        (lambda b: b.__setitem__(30, b[30] | 1), "padding"),  # a padding bit of the remainders
        (lambda b: b.__setitem__(31, 0), "unary codes"),  # the quotients' ones removed
        (lambda b: b.__setitem__(31, b[31] | 1), "found more"),  # an extra code after the last
    ]:
        bad = bytearray(gap)
        mutate(bad)
        with pytest.raises(WireFormatError, match=match):
            decode_update(resign(bad))
    bad = gap[:32] + b"\x00" + gap[32:]  # a trailing zero byte after the unary stream
    with pytest.raises(WireFormatError, match="length does not match"):
        decode_update(resign(bad))




@pytest.mark.parametrize("k", [0, 1, 7, 31, 32, 33, 45, 62])
def test_rice_packers_match_a_bit_string_oracle_for_every_width(k: int) -> None:
    """The numpy Rice body (the packer's kernel was removed: it did not earn 3x) against Python
    bit strings: remainders k bits MSB first, padded; quotients in unary, padded."""
    rng = np.random.default_rng(k)
    hi = min(2**62, 2 ** (k + 3))
    g = rng.integers(0, hi, 200, dtype=np.int64)
    g[:3] = [0, hi - 1, (1 << k) - 1 if k else 0]

    def packed(bits: str) -> bytes:
        bits += "0" * (-len(bits) % 8)
        return bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8))

    rem = packed("".join(format(int(v) & ((1 << k) - 1), f"0{k}b") for v in g)) if k else b""
    unary = packed("".join("0" * (int(v) >> k) + "1" for v in g))
    if k:
        assert _pack_fixed(g & ((1 << k) - 1), k) == rem
    assert _pack_unary(g >> k) == unary
    assert _rice_values(memoryview(rem + unary), g.size, k, 2**62, "t").tolist() == g.tolist()


@pytest.mark.parametrize("p", [0.0, 0.05, 0.5, 0.95, 1.0])
def test_run_stats_match_the_run_scan(p: float) -> None:
    """The popcount run statistics (the runs lower bound) against the runs themselves."""
    rng = np.random.default_rng(5)
    for size in [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 64, 65, 1000, 4099]:
        mask = Mask(rng.random(size) < p)
        got = _run_stats(mask)
        z, o = _mask_runs(mask.data.copy(), mask.count)
        assert got[0] == z.size and got[1] == int((o == 1).sum())
        assert got[2] == int((z[1:] == 1).sum())
        assert got[3] == int(z.sum() + o.sum())
    # one-past-the-last member far from the end (found by a backward scan in the kernel)
    for size, pos in [(1, 0), (9, 0), (9, 8), (4099, 0), (4099, 7), (4099, 8), (4099, 4090)]:
        data = np.zeros(size, bool)
        data[pos] = True
        assert _run_stats(Mask(data)) == (1, 1, 0, pos + 1)




@pytest.mark.parametrize("p", [0.0, 0.05, 0.5, 0.95, 1.0])
def test_run_scan_matches_a_python_loop(p: float) -> None:
    rng = np.random.default_rng(3)
    for size in [0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 1000, 4099]:
        data = rng.random(size) < p
        z, o, prev_end, start = [], [], 0, 0
        for i, x in enumerate([*data.tolist(), False]):
            if x and (i == 0 or not data[i - 1]):
                z.append(i - prev_end)
                start = i
            elif not x and i > 0 and data[i - 1]:
                o.append(i - start)
                prev_end = i
        zn, on = _mask_runs(data, int(data.sum()))
        assert zn.tolist() == z and on.tolist() == o


# ---------------------------------------------------------------- the loader
_ADD = {"psfed_test_add": (ctypes.c_int, (ctypes.c_int, ctypes.c_int))}


def _c_file(folder: Path, text: str, name: str = "add.c") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_clibrary_builds_caches_and_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if os.environ.get("PSFED_NO_CPP_KERNEL") not in (None, "", "0"):
        pytest.skip("compiled kernels disabled")
    cache = tmp_path / "cache"
    monkeypatch.setenv("PSFED_CACHE_DIR", str(cache))
    src = _c_file(tmp_path, "int psfed_test_add(int a, int b) { return a + b; }\n")
    lib = CLibrary("psfed_test", src, _ADD).get()
    if lib is None:
        pytest.skip("no C compiler")
    assert lib.psfed_test_add(2, 40) == 42
    built = list(cache.glob("psfed_test-*.so"))
    assert len(built) == 1  # one shared object, no temporary left behind
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]
    mtime = built[0].stat().st_mtime_ns
    # a second loader with the same source reuses the cached object (no compiler call)
    real_run = subprocess.run

    def no_build(cmd: list[str], *a: object, **k: object) -> object:
        assert "--version" in cmd, f"rebuilt: {cmd}"
        return real_run(cmd, *a, **k)  # type: ignore[call-overload]

    monkeypatch.setattr(subprocess, "run", no_build)
    assert CLibrary("psfed_test", src, _ADD).get().psfed_test_add(1, 1) == 2
    assert built[0].stat().st_mtime_ns == mtime
    # another source (or other flags) is another key: a second object, the first kept
    monkeypatch.setattr(subprocess, "run", real_run)
    src2 = _c_file(tmp_path, "int psfed_test_add(int a, int b) { return a + b + 1; }\n", "b.c")
    assert CLibrary("psfed_test", src2, _ADD).get().psfed_test_add(1, 1) == 3
    assert CLibrary("psfed_test", src, _ADD, cflags=("-O1",)).get().psfed_test_add(1, 1) == 2
    assert len(list(cache.glob("psfed_test-*.so"))) == 3 and built[0].exists()


def test_clibrary_failure_and_disable_leave_it_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PSFED_CACHE_DIR", str(tmp_path / "cache"))
    broken = CLibrary("psfed_broken", _c_file(tmp_path, "this is not C;\n"), {})
    assert broken.get() is None and broken.get() is None  # fails once, stays unavailable
    if os.environ.get("PSFED_NO_CPP_KERNEL") in (None, "", "0"):
        assert broken.error is not None and "psfed_broken" in broken.error
    missing = CLibrary("psfed_missing", tmp_path / "nope.c", {})
    assert missing.get() is None
    monkeypatch.setenv("PSFED_NO_CPP_KERNEL", "1")
    ok = _c_file(tmp_path, "int psfed_test_add(int a, int b) { return a + b; }\n", "ok.c")
    assert CLibrary("psfed_test", ok, _ADD).get() is None
    assert _wire_kernels.rice_decode(b"", b"\x80", 1, 0, 4, False) == (None, None)


def test_parallel_processes_build_once(tmp_path: Path) -> None:
    """Four processes ask for the same new library at once: one compiler run (the file lock),
    every process loads it."""
    if os.environ.get("PSFED_NO_CPP_KERNEL") not in (None, "", "0"):
        pytest.skip("compiled kernels disabled")
    src = _c_file(tmp_path, "int psfed_test_add(int a, int b) { return a * 1000 + b; }\n")
    probe = (
        "import ctypes, subprocess, sys\n"
        "from psfed_robust._cpp import CLibrary\n"
        "real = subprocess.run\n"
        "def counted(cmd, *a, **k):\n"
        "    if '--version' not in cmd:\n"
        "        open(sys.argv[2], 'a').write('build\\n')\n"
        "    return real(cmd, *a, **k)\n"
        "subprocess.run = counted\n"
        "sig = {'psfed_test_add': (ctypes.c_int, (ctypes.c_int, ctypes.c_int))}\n"
        "lib = CLibrary('psfed_par', sys.argv[1], sig).get()\n"
        "print(lib.psfed_test_add(7, 5))\n"
    )
    log = tmp_path / "builds.log"
    env = {**os.environ, "PSFED_CACHE_DIR": str(tmp_path / "cache")}
    procs = [
        subprocess.Popen([sys.executable, "-c", probe, str(src), str(log)], env=env,
                         stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert outs == ["7005"] * 4
    assert log.read_text().count("build") == 1


def test_numpy_path_round_trips_a_large_gap_mask() -> None:
    """The fallback still decodes what the kernels encode (and vice versa) at a real size."""
    rng = np.random.default_rng(0)
    mask = Mask(rng.random(200_000) < 0.9)
    v = rng.standard_normal(mask.count).astype(np.float32)
    p = encode_update(mask, v, encoding="gap").payload
    with numpy_path():
        p_np = encode_update(mask, v, encoding="gap").payload
        m2, v2 = decode_update(p)
    assert p == p_np and m2 == mask and np.array_equal(v2, v)
    m3, _ = decode_update(p_np)
    assert m3 == mask
    assert struct.unpack_from("<Q", p, 16)[0] == mask.count


@needs_c
@pytest.mark.parametrize("offset", [0, 1, 4093])
def test_join_equals_bytes_join_above_and_below_the_threshold(offset: int) -> None:
    """The huge-page concatenation gives ``b"".join``'s bytes, as a new immutable ``bytes``;
    parts of any alignment and kind (bytes, memoryview of an array, empty)."""
    rng = np.random.default_rng(offset)
    big = rng.standard_normal(_wire_kernels.JOIN_MIN_BYTES // 4 + 1000).astype(np.float32)
    values = memoryview(big[offset % 7 :]).cast("B")
    for parts in (
        (b"h" * (28 + offset), b"", rng.bytes(offset + 5), values),
        (values, b"tail"),
        (b"small", memoryview(big[:100]).cast("B")),  # below the threshold: plain join
        (b"",),
    ):
        out = _wire_kernels.join(parts)
        assert type(out) is bytes and out == b"".join(parts)
    out = _wire_kernels.join((b"x", values))
    before = bytes(out)
    big[-1] = big[-1] + 1.0  # the result is a copy, not a view of its parts
    assert out == before and out != b"".join((b"x", values))


def test_join_without_the_kernel_is_bytes_join() -> None:
    parts = (b"a" * 10, memoryview(np.arange(_wire_kernels.JOIN_MIN_BYTES, dtype=np.uint8)))
    with numpy_path():
        out = _wire_kernels.join(parts)
    assert type(out) is bytes and out == b"".join(parts)


@needs_c
def test_large_payload_is_the_same_through_both_paths() -> None:
    """encode_update at a size where the payload goes through ``join``: same bytes as the
    numpy path's ``b"".join`` and a round trip."""
    rng = np.random.default_rng(3)
    mask = Mask(rng.random(10_000_000) < 0.9)
    v = rng.standard_normal(mask.count).astype(np.float32)
    assert mask.count * 4 > _wire_kernels.JOIN_MIN_BYTES
    p = encode_update(mask, v).payload
    with numpy_path():
        p_np = encode_update(mask, v).payload
    assert p == p_np
    m2, v2 = decode_update(p)
    assert m2 == mask and np.array_equal(v2, v)


def test_cache_keys_follow_the_toolchain_and_environment_not_ninja(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's extension cache was keyed by a hash that included the ninja on PATH and was shared
    by every environment: a venv's and the system's ninja, or two venvs, rebuilt each other's
    builds (80-100 s per run). Here: same toolchain -> same key whatever ninja is found; another
    environment (``sys.prefix``) -> another torch-extension key; the C library, which links
    neither Python nor torch, keeps its key."""
    monkeypatch.setenv("PSFED_CACHE_DIR", str(tmp_path / "cache"))
    ext = TorchExtension("psfed_defense_kernels", source("defense_kernels.cpp"), cflags=["-O3"])
    clib = CLibrary("psfed_wire", source("wire_kernels.c"), {})
    try:
        p_ext, p_lib = ext.cache_path(), clib.cache_path()
    except RuntimeError as exc:  # no compiler
        pytest.skip(str(exc))
    assert p_ext.parent == tmp_path / "cache" and p_ext.name.startswith("psfed_defense_kernels-")
    assert TorchExtension(
        "psfed_defense_kernels", source("defense_kernels.cpp"), cflags=["-O3"]
    ).cache_path() == p_ext
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "ninja").write_text("#!/bin/sh\necho 0.0.1\n")
    (fake / "ninja").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    assert ext.cache_path() == p_ext and clib.cache_path() == p_lib
    assert TorchExtension("psfed_defense_kernels", source("defense_kernels.cpp"),
                          cflags=["-O2"]).cache_path() != p_ext
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "another-venv"))
    assert ext.cache_path() != p_ext
    assert clib.cache_path() == p_lib


def test_compiled_kernels_load_without_torch_cpp_extension_or_its_cuda_warning() -> None:
    """A fresh process that loads every kernel never imports ``torch.utils.cpp_extension`` (whose
    import prints "No CUDA runtime is found" on a CPU-only machine) and prints no warning."""
    if os.environ.get("PSFED_NO_CPP_KERNEL") not in (None, "", "0"):
        pytest.skip("compiled kernels disabled")
    probe = (
        "import sys\n"
        "from defenses._kernels import cpp_kernel_available\n"
        "from psfed_robust import _wire_kernels\n"
        "print(cpp_kernel_available(), _wire_kernels.available(),\n"
        "      'torch.utils.cpp_extension' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=600, check=True)
    ext_ok, wire_ok, imported = res.stdout.split()
    assert imported == "False"
    assert "CUDA" not in res.stderr and "Warning" not in res.stderr, res.stderr
    if ext_ok == "False" or wire_ok == "False":
        pytest.skip("no compiler: nothing built")

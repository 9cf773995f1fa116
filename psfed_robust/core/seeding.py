"""Process-independent seeds.

Every random draw in psfed-robust derives its seed from :func:`stable_seed`, a SHA-256 digest of
the parts, so the same scenario and seed give the same numbers in every process — unlike Python's
``hash()``, which is salted per process (the seed package's ClientSpecificMaskSelector bug).
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import torch

__all__ = ["numpy_rng", "stable_seed", "torch_generator"]

_MASK63 = (1 << 63) - 1


def _encode_part(part: object) -> bytes:
    if isinstance(part, bool):
        return b"b" + (b"1" if part else b"0")
    if isinstance(part, int | np.integer):
        return b"i" + str(int(part)).encode()
    if isinstance(part, float | np.floating):
        return b"f" + struct.pack("<d", float(part))
    if isinstance(part, str):
        return b"s" + part.encode("utf-8")
    if isinstance(part, bytes):
        return b"y" + part
    if part is None:
        return b"n"
    if isinstance(part, tuple | list):
        return b"t" + b"".join(_encode_part(p) + b"\x1f" for p in part)
    raise TypeError(
        f"stable_seed parts must be int, float, str, bytes, bool, None or tuples of those; "
        f"got {type(part).__name__}"
    )


def stable_seed(*parts: object) -> int:
    """Return a 63-bit seed that depends only on ``parts`` (never on the process)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(_encode_part(part))
        h.update(b"\x1e")
    return int.from_bytes(h.digest()[:8], "little") & _MASK63


def numpy_rng(*parts: object) -> np.random.Generator:
    """A numpy Generator (PCG64) seeded by :func:`stable_seed` of ``parts``."""
    return np.random.Generator(np.random.PCG64(stable_seed(*parts)))


def torch_generator(*parts: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch Generator on ``device`` seeded by :func:`stable_seed` of ``parts``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(stable_seed(*parts))
    return gen

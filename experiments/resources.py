"""Machine checks before any work: the device exists and a point's tensors fit in memory.

The batched engine holds, per block of ``B`` runs, the local models ``[B, K, D]``, a regressor
buffer of the same size, the participants' shared-index lists (int64, up to ``[B, K, M]``) and
the test set ``[B, N_t, D]``; CPU blocks run in parallel threads (one per core at most).
:func:`estimate_bytes` adds these up; a point whose estimate exceeds the memory available now
is refused with the figures, instead of failing inside torch after the output folder was made.
The estimate is a lower bound (temporaries of the attack and defense paths come on top).
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

from experiments.keys import ScenarioError

if TYPE_CHECKING:
    from experiments.schema import SweepPoint

__all__ = ["available_bytes", "check_resources", "device_of", "estimate_bytes", "require_memory"]


def device_of(point: SweepPoint) -> str:
    """The torch device of a batched point (``auto``: CUDA when available)."""
    dev = str(point.get("device"))
    if dev == "cpu":
        return dev
    import torch

    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise ScenarioError(
            f"device: sweep point {point.index}: 'cuda' was asked for but this machine has no "
            f"usable CUDA device (torch {torch.__version__}, built with CUDA "
            f"{torch.version.cuda or 'none'}); use device = 'cpu' or 'auto'"
        )
    return dev


def estimate_bytes(point: SweepPoint, device: str) -> int:
    """Lower-bound estimate of the batched engine's memory for ``point`` on ``device``."""
    import torch

    from experiments.configs import online_config
    from psfed_robust.engine.online import resolve_run_block

    cfg = online_config(point)
    block = resolve_run_block(cfg, torch.device(device))
    n_blocks = math.ceil(cfg.runs / block)
    concurrent = min(n_blocks, os.cpu_count() or 1) if device == "cpu" else 1
    item = 8 if cfg.dtype == "float64" else 4
    k, d = cfg.num_clients, cfg.dim
    per_block = block * (2 * k * d * item + k * cfg.share_count * 8 + cfg.num_test * d * item
                         + 4 * d * item)
    return int(per_block * concurrent)


def available_bytes(device: str) -> int | None:
    """Memory available now on ``device`` (None when it cannot be read)."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info()
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, AttributeError):
        return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_resources(point: SweepPoint) -> None:
    """Refuse a point that cannot run here (no CUDA for ``device = 'cuda'``, too little memory)."""
    if point.get("engine") != "batched":
        return
    device = device_of(point)
    require_memory(point, estimate_bytes(point, device), "task.dim",
                   f"dim {point.get('task.dim')}", "lower task.dim, federation.clients or runs")


def require_memory(point: SweepPoint, need: int, key: str, size: str, advice: str) -> None:
    """Refuse (naming ``key``) a point that needs more than the device's available memory."""
    device = device_of(point)
    have = available_bytes(device)
    if have is not None and need > have:
        raise ScenarioError(
            f"{key}: sweep point {point.index} ({point.label}) needs at least {_gib(need)} "
            f"on {device} (runs {point.get('runs')}, clients {point.get('federation.clients')}, "
            f"{size}), only {_gib(have)} is available; {advice}"
        )

"""A Little Is Enough (Baruch, Baruch & Goldberg, NeurIPS 2019): ``mu + z * sigma`` (or minus).

Threat model: omniscient (honest deltas of the round), colluding (every active malicious row sends
the same vector), mask-aware statistics: ``mu`` and ``sigma`` are computed per coordinate over the
honest participants that report it (``ctx.masks``); the crafted value is written only on the
attacker's shared coordinates.

``z``, with ``n`` clients and ``f`` attackers and ``s = floor(n/2 + 1) - f``:

- ``"paper"``: ``z = Phi^-1((n - s) / n)`` (the paper's z_max);
- ``"karimireddy"``: ``z = Phi^-1((n - f - s) / (n - f))`` (Karimireddy et al., Blades, FLPoison);
- ``"fixed"``: the given ``z`` (ByzFL's tau = 1.5; Garfield's 1.035).

``n`` defaults to the round's participants and ``f`` to the active malicious rows (per run); pass
them to pin the values. When ``s <= 0`` the probability leaves (0, 1); it is clipped to
``[1e-6, 1 - 1e-6]`` so z stays finite (|z| <= 4.75). Uses ``Phi^-1`` (``ndtri``), never ``Phi``
(the FLANDERS/NDSS slip). The chosen z per run goes to ``ctx.info["z"]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attacks.base import Attack, AttackContext, honest_statistics, register_attack, write_shared
from psfed_robust.params import check_choice, check_int, check_real

Z_MODES = ("paper", "karimireddy", "fixed")


def alie_z(n: Tensor | int, f: Tensor | int, z_mode: str = "paper") -> Tensor:
    """ALIE's z for ``n`` clients of which ``f`` attack (float64 tensor, broadcast over runs)."""
    check_choice("alie_z", "z_mode", z_mode, ("paper", "karimireddy"))
    nt = torch.as_tensor(n, dtype=torch.float64)
    ft = torch.as_tensor(f, dtype=torch.float64)
    s = torch.floor(nt / 2 + 1) - ft
    if z_mode == "paper":
        prob = (nt - s) / nt.clamp_min(1.0)
    else:
        prob = (nt - ft - s) / (nt - ft).clamp_min(1.0)
    return torch.special.ndtri(prob.clamp(1e-6, 1 - 1e-6))


@register_attack("alie")
class ALIE(Attack):
    """Every active malicious row sends ``mu + sign * z * sigma`` (see module doc)."""

    omniscient = True
    mask_aware = True

    def __init__(
        self,
        *,
        z_mode: str = "paper",
        z: float = 1.0,
        direction: str = "plus",
        ddof: int = 1,
        n: int | None = None,
        f: int | None = None,
    ) -> None:
        o = self._owner()
        self.z_mode = check_choice(o, "z_mode", z_mode, Z_MODES)
        self.z = check_real(o, "z", z)
        self.direction = check_choice(o, "direction", direction, ("plus", "minus"))
        self.ddof = check_int(o, "ddof", ddof, low=0, high=1)
        self.n = None if n is None else check_int(o, "n", n, low=1)
        self.f = None if f is None else check_int(o, "f", f, low=0, high=self.n)

    def z_value(self, deltas: Tensor, ctx: AttackContext) -> Tensor:
        """z per run ``[...]`` (float64)."""
        lead = deltas.shape[:-2]
        if self.z_mode == "fixed":
            return torch.full(lead, self.z, dtype=torch.float64)
        part = (
            torch.ones(deltas.shape[:-1], dtype=torch.bool)
            if ctx.participants is None
            else ctx.participants.to(torch.bool).expand(deltas.shape[:-1]).cpu()
        )
        n = part.sum(-1) if self.n is None else torch.full(lead, self.n)
        act = self.active_rows(deltas, ctx).cpu()
        f = act.sum(-1) if self.f is None else torch.full(lead, self.f)
        return alie_z(n, f, self.z_mode)

    def __call__(self, deltas: Tensor, ctx: AttackContext) -> Tensor:
        mu, sigma, count = honest_statistics(deltas, ctx, ddof=self.ddof)
        z = self.z_value(deltas, ctx)
        ctx.info["z"] = z
        sign = 1.0 if self.direction == "plus" else -1.0
        zz = (sign * z).to(device=deltas.device, dtype=deltas.dtype).unsqueeze(-1)
        crafted = mu + zz * sigma
        return write_shared(deltas, crafted.unsqueeze(-2), ctx, count > 0)

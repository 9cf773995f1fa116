"""The "add an attack / a defense in one small file" examples of docs/attacks_defenses.md, run."""

from __future__ import annotations

import torch

import attacks
import defenses

# --- begin example (docs/attacks_defenses.md, "Adding an attack") ---------------------------
from attacks import Attack, AttackContext, get_attack, register_attack


@register_attack("shrink_toward_zero")
class ShrinkTowardZero(Attack):
    """Send ``(1 - alpha) * delta``: a lazy client (cite the paper here)."""

    omniscient = False  # uses only its own update
    mask_aware = False  # ignores ctx.masks

    def __init__(self, *, alpha: float = 0.5) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"attack 'shrink_toward_zero': 'alpha' must be in [0, 1], got {alpha}")
        self.alpha = alpha

    def craft(self, deltas: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        return (1.0 - self.alpha) * deltas  # only malicious participating rows are replaced


atk = get_attack("shrink_toward_zero", alpha=0.25)
# --- end example ----------------------------------------------------------------------------


def _ctx(k: int, d: int) -> AttackContext:
    return AttackContext(
        round=0,
        generator=torch.Generator().manual_seed(0),
        reference=torch.zeros(d),
        masks=None,
        malicious=torch.tensor([True] + [False] * (k - 1)),
        participants=None,
    )


def test_class_example_registered_and_applied() -> None:
    assert "shrink_toward_zero" in attacks.list_attacks()
    x = torch.ones(4, 3)
    out = atk(x, _ctx(4, 3))
    assert torch.allclose(out[0], torch.full((3,), 0.75))
    assert torch.equal(out[1:], x[1:])
    assert atk.params == {"alpha": 0.25}


def test_function_attack_example() -> None:
    @register_attack("add_constant_ext_test", mask_aware=False)
    def add_constant(deltas: torch.Tensor, ctx: AttackContext, c: float = 1.0) -> torch.Tensor:
        return deltas + c

    a = get_attack("add_constant_ext_test", c=2.0)
    out = a(torch.zeros(3, 2), _ctx(3, 2))
    assert torch.equal(out, torch.tensor([[2.0, 2.0], [0.0, 0.0], [0.0, 0.0]]))
    try:
        get_attack("add_constant_ext_test", d=1)
    except ValueError as e:
        assert "'d'" in str(e) and "c" in str(e)
    else:  # pragma: no cover
        raise AssertionError("unknown parameter accepted")


def test_defense_function_example() -> None:
    @defenses.register_defense("coordinate_max_ext_test")
    def coordinate_max(updates, masks, global_model, *, participants, weights, mode, shift=0.0):
        return updates.amax(dim=-2) + shift

    agg = defenses.get_defense("coordinate_max_ext_test", shift=1.0)
    out = agg(torch.tensor([[1.0, 5.0], [3.0, 2.0]]), None, torch.zeros(2))
    assert torch.equal(out, torch.tensor([4.0, 6.0]))

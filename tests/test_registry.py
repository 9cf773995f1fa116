"""The one registry behind attacks and defenses, and the explicit-state contract of attacks."""

from __future__ import annotations

import threading

import pytest
import torch

import attacks
import defenses
from attacks import Attack, AttackContext, ParamError
from psfed_robust.registry import FunctionAdapter, Registrable, Registry


class Thing(Registrable):
    registry_label = "thing"

    def __init__(self, *, size: int = 1, colour: str = "red") -> None:
        self.size = size
        self.colour = colour


class FunctionThing(FunctionAdapter, Thing):
    pass


def test_registry_classes_functions_and_errors() -> None:
    reg: Registry[Thing] = Registry("thing", Thing, FunctionThing, skip_first=1)

    @reg.register("box")
    class Box(Thing):
        pass

    @reg.register("scaled", tag=True)
    def scaled(x: float, factor: float = 2.0) -> float:
        return x * factor

    assert reg.names() == ["box", "scaled"]
    assert reg.get("box", size=3).params == {"size": 3, "colour": "red"}
    assert repr(reg.get("box")) == "Box(size=1, colour='red')"
    s = reg.get("scaled", factor=4.0)
    assert isinstance(s, FunctionThing) and s.call(1.5) == 6.0 and type(s).tag is True  # type: ignore[attr-defined]
    with pytest.raises(ParamError, match=r"unknown thing 'cube'; allowed: box, scaled"):
        reg.get("cube")
    msg = r"thing 'box': unknown parameter\(s\) 'weight'; allowed: colour, size"
    with pytest.raises(ParamError, match=msg):
        reg.get("box", weight=1)
    with pytest.raises(ParamError, match="already registered"):
        reg.register("box")(type("Other", (Thing,), {}))
    with pytest.raises(ParamError, match="identifier"):
        reg.register("not a name")
    with pytest.raises(ParamError, match=r"parameters \['factor'\] need default values"):
        reg.register("bad")(lambda x, factor: x)


def test_attacks_and_defenses_share_the_registry_and_params() -> None:
    import psfed_robust.params as params

    assert attacks.ParamError is defenses.ParamError is params.ParamError
    assert type(attacks.base._REGISTRY) is type(defenses.base._REGISTRY) is Registry
    assert attacks.attack_class("gaussian").param_names() == ("p_a", "sigma")
    assert defenses.defense_class("trimmed_mean").param_names() == ("beta", "f")


@attacks.register_attack("count_calls_test")
class CountCalls(Attack):
    """A stateful plugin: adds the number of previous calls of this run to its delta."""

    def __call__(self, deltas: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        calls = ctx.state.get("calls", 0)
        ctx.state["calls"] = calls + 1
        ctx.info["calls"] = calls
        rows = self.active_rows(deltas, ctx).unsqueeze(-1)
        return torch.where(rows, deltas + calls, deltas)


def _run(atk: Attack, rounds: int, seed: int) -> list[float]:
    state: dict = {}  # one per run block, created by the engine
    out = []
    for t in range(rounds):
        ctx = AttackContext(
            round=t,
            generator=torch.Generator().manual_seed(seed + t),
            reference=torch.zeros(2),
            masks=None,
            malicious=torch.tensor([True, False]),
            participants=None,
            state=state,
        )
        out.append(float(atk(torch.zeros(2, 2), ctx)[0, 0]))
        assert ctx.info["calls"] == t
    return out


def test_stateful_attack_is_thread_safe_with_explicit_state() -> None:
    """One attack object shared by run blocks in parallel threads: each block's state is its own,
    so the results do not depend on the number of workers (a counter on ``self`` did)."""
    atk = attacks.get_attack("count_calls_test")
    serial = [_run(atk, 50, s) for s in range(4)]
    results: dict[int, list[float]] = {}

    def work(s: int) -> None:
        results[s] = _run(atk, 50, s)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert [results[s] for s in range(4)] == serial == [[float(t) for t in range(50)]] * 4
    assert vars(atk) == {}


def test_context_defaults_are_fresh_dicts() -> None:
    a = AttackContext(0, torch.Generator(), torch.zeros(1), None, torch.tensor([True]), None)
    b = AttackContext(0, torch.Generator(), torch.zeros(1), None, torch.tensor([True]), None)
    assert a.state == {} and a.info == {} and a.state is not b.state and a.info is not b.info

"""The digits app's threat model from its run config: attack, malicious clients, defense.

Every registered attack and defense is reachable (``attacks`` / ``defenses`` registries, with
pre-aggregators through ``defenses.get_defense(name, pre=[...])``); names and parameters are
checked by the registries themselves when the ServerApp starts, and the federation-dependent
conditions (malicious count vs the nodes, the rule's participant precondition such as Krum's
``n > 2f + 2`` — Blanchard et al., NeurIPS 2017) are checked against the number of nodes.

Routing (the threat model, docs/flower.md "Threat-model seams"):

- **omniscient** attacks (``Attack.omniscient``: ALIE — Baruch et al., NeurIPS 2019; IPM — Xie
  et al., UAI 2020; min-max / min-sum — Shejwalkar & Houmansadr, NDSS 2021; mimic — Karimireddy
  et al., ICLR 2022; their optimized variants) need the honest updates of the round, so they run
  in the server-side :class:`~psfed_robust.flower.ServerAdversary` — **simulation only**: a real
  deployment has no such observer;
- every other attack (model poisoning such as sign flip, data poisoning such as label flipping)
  runs **at the malicious clients**, assigned by the server in their train messages
  (``ThreatSettings.client_attacks``), with ``attack-persistent`` as the threat model's
  persistence (the attacker keeps its poisoned local model; Lari et al. 2025 §II).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from psfed_robust.flower.adversary import ServerAdversary
from psfed_robust.flower.apps.digits_config import (
    DigitsRunConfig,
    parse_malicious,
    parse_mapping,
    parse_sequence,
)
from psfed_robust.flower.settings import ThreatSettings
from psfed_robust.flower.validation import ClientId

__all__ = ["ThreatPlan", "plan_threat", "round_participants"]


@dataclass(frozen=True)
class ThreatPlan:
    """The validated threat model of one run."""

    defense: str
    defense_params: dict[str, Any]
    defense_pre: list[Any]
    aggregator: Any  # the built defense (a Composed one when pre-aggregators are given)
    attack: str | None = None
    attack_params: dict[str, Any] = field(default_factory=dict)
    side: Literal["client", "server"] | None = None
    kind: str = "model"
    persistent: bool = False
    malicious: tuple[ClientId, ...] = ()
    adversary: ServerAdversary | None = None
    seed: int = 0  # the attacks' seed (the run's ``seed``)

    def threat_settings(self) -> ThreatSettings | None:
        """PSFedAvg's ThreatSettings: the client-side assignment or the server adversary."""
        if self.attack is None:
            return None
        if self.side == "server":
            return ThreatSettings(adversary=self.adversary)
        return ThreatSettings(
            client_attacks={cid: (self.attack, dict(self.attack_params))
                            for cid in self.malicious},
            persistent=self.persistent,
            attack_seed=self.seed,
        )

    def describe(self) -> str:
        """One log line: the defense and, if any, the attack, where it runs and on whom."""
        pre = f" after pre-aggregators {self.defense_pre}" if self.defense_pre else ""
        text = f"defense {self.defense!r} {self.defense_params}{pre}"
        if self.attack is None:
            return text + "; no attack"
        where = ("in the server-side adversary (omniscient; simulation only)"
                 if self.side == "server" else "at the malicious clients")
        persist = ", persistent" if self.persistent else ""
        return (f"{text}; attack {self.attack!r} {self.attack_params} ({self.kind} poisoning"
                f"{persist}) {where}; malicious client ids {list(self.malicious)}")


def round_participants(cfg: DigitsRunConfig, num_nodes: int) -> int:
    """How many nodes one round samples (the strategy's rule: ``max(int(N p), min-nodes)``,
    at most N)."""
    return min(num_nodes, max(int(num_nodes * cfg.fraction_train), cfg.min_nodes))


def _config_value_ok(v: Any) -> bool:
    scalar = (bool, int, float, str, bytes)
    if isinstance(v, scalar):
        return True
    return (isinstance(v, list) and bool(v)
            and all(type(x) is type(v[0]) and isinstance(x, scalar) for x in v))


def _defense(cfg: DigitsRunConfig, num_nodes: int) -> tuple[dict[str, Any], list[Any], Any]:
    import defenses

    params = parse_mapping("defense-params", cfg.defense_params)
    pre = parse_sequence("defense-pre", cfg.defense_pre)
    if "pre" in params:
        raise ValueError("run config 'defense-params': give pre-aggregators in 'defense-pre'")
    try:
        agg = defenses.get_defense(cfg.defense_name, pre=pre or None, **params)
    except ValueError as e:
        raise ValueError(
            f"run config defense-name={cfg.defense_name!r} defense-params={params} "
            f"defense-pre={pre}: {e}"
        ) from None
    n = round_participants(cfg, num_nodes)
    try:
        agg.check_participants(n)
    except ValueError as e:
        raise ValueError(
            f"run config defense-name={cfg.defense_name!r} defense-params={params}: {e} "
            f"(each round aggregates {n} of {num_nodes} nodes"
            f"{' before the pre-aggregators' if pre else ''}: raise num-supernodes/min-nodes "
            "or change the defense's parameters)"
        ) from None
    return params, pre, agg


def _malicious(cfg: DigitsRunConfig, num_nodes: int, omniscient: bool) -> tuple[ClientId, ...]:
    spec = parse_malicious(cfg.malicious_clients)
    ids: tuple[ClientId, ...] = tuple(range(spec)) if isinstance(spec, int) else spec
    if not ids:
        raise ValueError(
            f"run config attack-name={cfg.attack_name!r} needs 'malicious-clients': a count "
            "(client ids 0..count-1) or a list of client ids such as \"0,3\""
        )
    if len(ids) > num_nodes:
        raise ValueError(
            f"run config 'malicious-clients' names {len(ids)} malicious clients "
            f"({cfg.malicious_clients!r}) but the federation has only {num_nodes} nodes "
            "(num-supernodes / min-nodes)"
        )
    if omniscient and len(ids) >= num_nodes:
        raise ValueError(
            f"run config attack-name={cfg.attack_name!r} is omniscient (it crafts from the "
            f"honest updates) but all {num_nodes} nodes are malicious: leave one honest"
        )
    return ids


def plan_threat(cfg: DigitsRunConfig, num_nodes: int) -> ThreatPlan:
    """Validate the run config's defense and attack against a federation of ``num_nodes``
    nodes; every error is a ValueError naming the run-config key and what is allowed."""
    params, pre, agg = _defense(cfg, num_nodes)
    base = ThreatPlan(cfg.defense_name, params, pre, agg)
    if not cfg.attacked:
        if parse_malicious(cfg.malicious_clients):
            raise ValueError(
                f"run config 'malicious-clients' is {cfg.malicious_clients!r} but "
                "'attack-name' is \"none\": name the attack they run"
            )
        return base
    if cfg.strategy != "psfedavg":
        raise ValueError(
            f"run config attack-name={cfg.attack_name!r} needs strategy=\"psfedavg\" (the "
            f"attack seams are PSFedAvg's), got strategy={cfg.strategy!r}"
        )
    import attacks
    from psfed_robust.flower._attack import build_attack

    aparams = parse_mapping("attack-params", cfg.attack_params)
    try:
        cls = attacks.attack_class(cfg.attack_name)
        build_attack(cfg.attack_name, aparams)
    except ValueError as e:
        raise ValueError(
            f"run config attack-name={cfg.attack_name!r} attack-params={aparams}: {e}"
        ) from None
    omniscient = bool(cls.omniscient)
    ids = _malicious(cfg, num_nodes, omniscient)
    kind = str(getattr(cls, "kind", "model"))
    if omniscient:
        if cfg.attack_persistent:
            raise ValueError(
                f"run config attack-persistent=true: {cfg.attack_name!r} is omniscient and runs "
                "in the server-side adversary, which cannot change a client's local model; "
                "persistence applies to client-side attacks only"
            )
        adversary = ServerAdversary(cfg.attack_name, ids, params=aparams, seed=cfg.seed)
        return ThreatPlan(cfg.defense_name, params, pre, agg, cfg.attack_name, aparams,
                          "server", kind, False, ids, adversary, cfg.seed)
    for k, v in aparams.items():
        if not _config_value_ok(v):
            raise ValueError(
                f"run config 'attack-params': {k}={v!r} cannot travel to a client (allowed: "
                "numbers, strings, booleans and non-empty lists of one of them)"
            )
    return ThreatPlan(cfg.defense_name, params, pre, agg, cfg.attack_name, aparams, "client",
                      kind, cfg.attack_persistent, ids, None, cfg.seed)

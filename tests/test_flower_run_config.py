"""The digits Flower App's threat-model run config: ``attack-*``, ``malicious-clients`` and
``defense-*`` keys, their validation when the ServerApp starts, the routing of omniscient attacks
to the server-side adversary, the log of malicious nodes, and the examples of
docs/flower_app.md run exactly as written through ``flwr run . local --stream`` (slow)."""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from flower_helpers import REPO, LocalHome, flwr_bin, local_home, parse_result
from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import attacks
import defenses
from psfed_robust.flower.apps import digits_server
from psfed_robust.flower.apps.digits_client import app as client_app
from psfed_robust.flower.apps.digits_client import server_only_view
from psfed_robust.flower.apps.digits_config import (
    THREAT_KEYS,
    DigitsRunConfig,
    parse_malicious,
    parse_mapping,
    parse_sequence,
)
from psfed_robust.flower.apps.digits_server import InvalidRunConfig, run_digits
from psfed_robust.flower.apps.digits_threat import plan_threat, round_participants
from psfed_robust.flower.testing import LocalGrid

DOC = REPO / "docs" / "flower_app.md"
RC = dict[str, bool | float | int | str]


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


@pytest.fixture
def builtin_attacks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the shipped attacks registered, as a user without plug-ins sees them: other test
    modules register plug-ins for the whole session, which would change the 'allowed:' lists."""
    from attacks.base import _REGISTRY

    def shipped(cls: type) -> bool:
        return str(getattr(cls, "func", cls).__module__).split(".")[0] == "attacks"

    monkeypatch.setattr(
        _REGISTRY, "_classes", {k: c for k, c in _REGISTRY._classes.items() if shipped(c)}
    )


def _plan(num_nodes: int = 4, **rc: Any) -> Any:
    return plan_threat(DigitsRunConfig.from_run_config(rc), num_nodes)


# ---------------------------------------------------------------- parsing
def test_params_are_one_json_or_toml_string() -> None:
    assert parse_mapping("attack-params", '{"scale": 4.0}') == {"scale": 4.0}
    assert parse_mapping("attack-params", "{scale = 4.0, x = 'a'}") == {"scale": 4.0, "x": "a"}
    assert parse_mapping("attack-params", "") == {} == parse_mapping("attack-params", "{}")
    with pytest.raises(ValueError, match="'attack-params' must be an object"):
        parse_mapping("attack-params", "[1, 2]")
    with pytest.raises(ValueError, match="'defense-params' must be a JSON or TOML"):
        parse_mapping("defense-params", "{f: 1}")
    with pytest.raises(ValueError, match="'z' is null; omit it"):
        parse_mapping("attack-params", '{"z": null}')


def test_pre_aggregators_as_names_or_specs() -> None:
    assert parse_sequence("defense-pre", "nnm, bucketing") == ["nnm", "bucketing"]
    assert parse_sequence("defense-pre", '["nnm", ["bucketing", {"s": 2}]]') == [
        "nnm", ("bucketing", {"s": 2})]
    assert parse_sequence("defense-pre", '{"name": "bucketing", "s": 2}') == [
        {"name": "bucketing", "s": 2}]
    assert parse_sequence("defense-pre", "") == []


def test_malicious_clients_is_a_count_or_ids() -> None:
    assert parse_malicious(2) == 2 and parse_malicious(2.0) == 2
    assert parse_malicious("0,3") == (0, 3) and parse_malicious("0") == (0,)
    assert parse_malicious("alice, 4") == ("alice", 4) and parse_malicious("") == ()
    for bad, match in ((-1, ">= 0"), (1.5, "whole"), (True, "count or ids"),
                       ("1,1", "listed twice"), ("-2", "negative")):
        with pytest.raises(ValueError, match=match):
            parse_malicious(bad)


def test_bool_keys_reject_other_strings() -> None:
    assert DigitsRunConfig.from_run_config({"attack-persistent": "true"}).attack_persistent
    with pytest.raises(ValueError, match="'attack-persistent' must be a bool"):
        DigitsRunConfig.from_run_config({"attack-persistent": "yes please"})


# ---------------------------------------------------------------- routing: every registered one
@pytest.mark.parametrize("name", attacks.list_attacks())
def test_every_attack_is_reachable_and_routed_by_its_threat_model(name: str) -> None:
    plan = _plan(5, **{"attack-name": name, "malicious-clients": 1, "seed": 7})
    omniscient = attacks.attack_class(name).omniscient
    assert plan.attack == name and plan.malicious == (0,)
    assert plan.side == ("server" if omniscient else "client")
    threat = plan.threat_settings()
    if omniscient:
        assert threat.adversary is plan.adversary and not threat.client_attacks
        assert plan.adversary.malicious == frozenset({0}) and plan.adversary.seed == 7
    else:
        assert threat.adversary is None and threat.client_attacks == {0: (name, {})}
        assert threat.attack_seed == 7


@pytest.mark.parametrize("name", defenses.list_defenses())
def test_every_defense_is_reachable_with_its_parameters(name: str) -> None:
    cls = defenses.defense_class(name)
    params = '{"f": 1}' if "f" in cls.param_names() else "{}"
    plan = _plan(7, **{"defense-name": name, "defense-params": params})
    assert isinstance(plan.aggregator, cls) and plan.attack is None
    if "f" in cls.param_names():
        assert getattr(plan.aggregator, "f", None) == 1


def test_pre_aggregators_compose_in_front_of_the_rule() -> None:
    with pytest.raises(ValueError, match=r"got n=4.*aggregates 7 of 7 nodes before the pre"):
        _plan(7, **{"defense-name": "krum", "defense-params": '{"f": 1}',
                    "defense-pre": '["nnm", ["bucketing", {"s": 2}]]'})  # 7 rows -> 4 buckets
    plan = _plan(11, **{"defense-name": "krum", "defense-params": '{"f": 1}',
                        "defense-pre": '["nnm", ["bucketing", {"s": 2}]]'})
    agg = plan.aggregator
    assert isinstance(agg, defenses.Composed)
    assert [p.name for p in agg.pre] == ["nnm", "bucketing"] and agg.pre[1].params["s"] == 2
    assert agg.rule.name == "krum" and getattr(agg.rule, "f", None) == 1


def test_attack_params_and_persistence_reach_the_client_assignment() -> None:
    plan = _plan(3, **{"attack-name": "sign_flip", "attack-params": "{scale = 4.0}",
                       "attack-persistent": True, "malicious-clients": "0,2"})
    threat = plan.threat_settings()
    assert threat.persistent and threat.client_attacks == {
        0: ("sign_flip", {"scale": 4.0}), 2: ("sign_flip", {"scale": 4.0})}


def test_clients_never_see_the_server_only_keys() -> None:
    rc: RC = {"attack-name": "alie", "malicious-clients": "0", "attack-persistent": False,
              "attack-params": "{}", "lr": 0.1}
    ctx = Context(1, 5, {"partition-id": 0}, RecordDict(), rc)
    view = server_only_view(ctx)
    assert view.run_config == {"lr": 0.1} and view.state is ctx.state
    assert not set(THREAT_KEYS) & set(view.run_config)


def test_round_participants_follows_the_sampling_rule() -> None:
    cfg = DigitsRunConfig.from_run_config({"fraction-train": 0.5, "min-nodes": 2})
    assert round_participants(cfg, 10) == 5 and round_participants(cfg, 3) == 2


# ---------------------------------------------------------------- bad configs, in process
@pytest.mark.parametrize(
    ("rc", "match"),
    [
        ({"attack-name": "nope", "malicious-clients": 1}, r"unknown attack 'nope'; allowed: alie"),
        ({"attack-name": "sign_flip", "attack-params": '{"sigma": 1.0}',
          "malicious-clients": 1}, r"unknown parameter\(s\) 'sigma'; allowed: scale"),
        ({"attack-name": "sign_flip", "attack-params": '{"persistent": true}',
          "malicious-clients": 1}, "'persistent' is the threat model's setting"),
        ({"attack-name": "sign_flip", "malicious-clients": 4},
         "names 4 malicious clients .* only 3 nodes"),
        ({"attack-name": "alie", "malicious-clients": 3}, "omniscient .* leave one honest"),
        ({"attack-name": "alie", "malicious-clients": 1, "attack-persistent": True},
         "attack-persistent=true: 'alie' is omniscient"),
        ({"attack-name": "sign_flip"}, "needs 'malicious-clients'"),
        ({"malicious-clients": "0"}, "'attack-name' is \"none\""),
        ({"defense-name": "krum", "defense-params": '{"f": 1}'},
         r"needs n > 2f \+ 2 = 4 participants \(f=1\), got n=3.*aggregates 3 of 3 nodes"),
        ({"defense-name": "median", "defense-pre": "mean"}, "not a pre-aggregator"),
        ({"defense-name": "nope"}, "unknown defense 'nope'"),
        ({"strategy": "fedavg", "attack-name": "zero", "malicious-clients": 1},
         "needs strategy=\"psfedavg\""),
        ({"attack-name": "gaussian", "attack-params": '{"sigma": "big"}',
          "malicious-clients": 1}, "parameter 'sigma' must be a finite real number"),
    ],
)
@pytest.mark.usefixtures("builtin_attacks")
def test_bad_configs_fail_at_start_with_the_reason(rc: RC, match: str) -> None:
    rc = {"num-server-rounds": 1, "min-nodes": 3, **rc}
    grid = LocalGrid(client_app, 3, run_config=rc)
    with pytest.raises(InvalidRunConfig, match=match):
        digits_server.main(grid, Context(1, 0, {}, RecordDict(), rc))
    assert not grid.traffic, "a bad config must fail before any message is sent"


def test_unknown_malicious_client_id_fails_before_training() -> None:
    rc: RC = {"num-server-rounds": 1, "min-nodes": 3, "attack-name": "sign_flip",
              "malicious-clients": "7"}
    grid = LocalGrid(client_app, 3, run_config=rc)
    with pytest.raises(InvalidRunConfig, match=r"client ids \[7\] are not in this federation; "
                       r"its client ids are \[0, 1, 2\]"):
        run_digits(grid, rc)
    assert {t.message_type for t in grid.traffic} <= {"query.psfed"}


# ---------------------------------------------------------------- attacks take effect
def _run(**extra: Any) -> Any:
    rc: RC = {"num-server-rounds": 3, "min-nodes": 3, **extra}
    return run_digits(LocalGrid(client_app, 3, run_config=rc), rc)


@pytest.fixture(scope="module")
def honest() -> Any:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    return _run()


def test_client_side_sign_flip_runs_at_the_malicious_client(honest: Any) -> None:
    res = _run(**{"attack-name": "sign_flip", "attack-params": '{"scale": 4.0}',
                  "malicious-clients": 1})
    assert res.attack == "sign_flip" and res.attack_side == "client"
    assert list(res.malicious_nodes.values()) == [0]
    # one of three equal IID partitions attacks: the malicious share of the examples is 1/3
    assert [h["attacking"] for h in res.history] == pytest.approx([1 / 3] * 3)
    # mean of (-4 d, d, d): the global model moves against the honest direction
    assert res.final_accuracy < 0.3 < 0.6 < honest.final_accuracy


def test_server_side_alie_rewrites_the_malicious_row(honest: Any) -> None:
    res = _run(**{"attack-name": "alie", "malicious-clients": "0"})
    assert res.attack == "alie" and res.attack_side == "server"
    assert res.adversary_rows == [1, 1, 1]
    assert list(res.malicious_nodes.values()) == [0]
    assert [h["attacking"] for h in res.history] == [0.0, 0.0, 0.0]  # clients stay honest
    assert res.accuracy != honest.accuracy


def test_label_flip_poisons_the_malicious_clients_labels(honest: Any) -> None:
    res = _run(**{"attack-name": "label_flip", "attack-params": "{p = 1.0}",
                  "malicious-clients": 1})
    assert res.attack_side == "client" and res.accuracy != honest.accuracy


def test_persistent_client_attack_keeps_the_poisoned_model() -> None:
    rc: RC = {"num-server-rounds": 2, "min-nodes": 2, "attack-name": "sign_flip",
              "attack-persistent": True, "malicious-clients": "1", "fraction": 1.0}
    grid = LocalGrid(client_app, 2, run_config=rc)
    run_digits(grid, rc)
    rc2 = {**rc, "attack-persistent": False}
    grid2 = LocalGrid(client_app, 2, run_config=rc2)
    run_digits(grid2, rc2)

    def theta(g: LocalGrid, pid: int) -> torch.Tensor:
        ctx = next(c for c in g.contexts.values() if c.node_config["partition-id"] == pid)
        return torch.from_numpy(ctx.state.array_records["psfed.local"]["theta"].numpy())

    # the attacker stores reference + attacked delta (persistent) instead of its trained model
    assert not torch.equal(theta(grid, 1), theta(grid2, 1))


# ---------------------------------------------------------------- the docs, through flwr run
def _doc_command(tag: str) -> list[str]:
    text = DOC.read_text()
    m = re.search(rf"<!-- run-config-example: {tag} -->\n```bash\n(.*?)```", text, re.S)
    assert m, f"docs/flower_app.md lacks the run-config example {tag!r}"
    argv = shlex.split(m.group(1).replace("\\\n", " "))
    assert argv[:3] == ["flwr", "run", "."], argv
    return [flwr_bin("flwr"), *argv[1:]]


def _doc_bad_configs() -> list[tuple[str, list[str]]]:
    """The rows of the docs' validation table: (run config, expected fragments)."""
    text = DOC.read_text()
    rows = re.findall(r"^\| `([^`]*)` \| `([^`]*)`", text, re.M)
    out = [(rc, [p.strip() for p in shown.split("…") if p.strip()]) for rc, shown in rows
           if "=" in rc and "'" in rc]
    assert len(out) == 4, out
    return out


def test_docs_examples_are_well_formed() -> None:
    for tag in ("sign_flip", "alie"):
        argv = _doc_command(tag)
        cfg = argv[argv.index("--run-config") + 1]
        from flwr.common.config import parse_config_args

        parsed = parse_config_args([cfg])
        DigitsRunConfig.from_run_config(parsed)
        assert set(parsed) <= set(_pyproject_keys()), "undeclared run-config key"
    assert _doc_bad_configs()


def test_flower_md_shows_the_same_example_the_slow_test_runs() -> None:
    """docs/flower.md's run-config example is the app doc's sign-flip example, verbatim."""
    text = (REPO / "docs" / "flower.md").read_text()
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "attack-name" in b]
    assert blocks, "docs/flower.md shows no run-config attack example"
    for block in blocks:
        lines = [ln.strip() for ln in block.splitlines()]
        argv = shlex.split(" ".join(ln.removesuffix("\\") for ln in lines))
        assert argv[1:] == _doc_command("sign_flip")[1:]


def _pyproject_keys() -> list[str]:
    import tomllib

    return list(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
        "config"])


SIM_TIMEOUT = 300.0


@pytest.fixture(scope="module")
def local_flwr() -> Iterator[LocalHome]:
    """One private FLWR_HOME (so one detached local SuperLink) for the module's flwr runs."""
    with local_home("psfed-rc-") as lh:
        yield lh


def _flwr(local_flwr: LocalHome, argv: list[str], name: str) -> str:
    t0 = time.monotonic()
    rc, out = local_flwr.run(argv, name, SIM_TIMEOUT)
    assert rc == 0, f"flwr run rc={rc} after {time.monotonic() - t0:.0f}s\n{out[-8000:]}"
    return out


def _run_doc_example(local_flwr: LocalHome, tag: str, side: str) -> tuple[str, dict[str, Any], str]:
    """Run the docs' example ``tag`` (attack ``tag``) through ``flwr run``; check that the result
    names the attack, the side it ran on and client 0 as the one malicious node.
    ``(terminal output, result, that node's id)``."""
    out = _flwr(local_flwr, _doc_command(tag), tag)
    res = parse_result(out)
    assert res["attack"] == tag and res["attack_side"] == side, out[-4000:]
    nodes = res["malicious_nodes"]
    assert isinstance(nodes, dict) and list(nodes.values()) == [0], out[-4000:]
    (node,) = nodes
    return out, res, node


@pytest.mark.slow
@pytest.mark.deployment
def test_docs_sign_flip_example_runs_through_flwr_run(local_flwr: LocalHome) -> None:
    out, res, node = _run_doc_example(local_flwr, "sign_flip", "client")
    assert re.search(rf"malicious node {node} \(client id 0\): attack 'sign_flip' "
                     r"\{'scale': 4.0\} at the client", out), out[-4000:]
    history = res["history"]
    assert isinstance(history, list) and len(history) == 2
    assert all(abs(h["attacking"] - 1 / 3) < 1e-9 for h in history), history


@pytest.mark.slow
@pytest.mark.deployment
def test_docs_alie_example_runs_through_flwr_run(local_flwr: LocalHome) -> None:
    out, res, _ = _run_doc_example(local_flwr, "alie", "server")
    assert res["adversary_rows"] == [1, 1], out[-4000:]
    assert "in the server-side adversary (omniscient; simulation only)" in out
    assert "after pre-aggregators ['nnm']" in out


@pytest.mark.parametrize("index", range(4))
@pytest.mark.usefixtures("builtin_attacks")
def test_docs_bad_configs_fail_with_the_documented_reason(index: int) -> None:
    """Each row of the docs' validation table, parsed as ``flwr run`` parses it, in process."""
    from flwr.common.config import parse_config_args

    rc, fragments = _doc_bad_configs()[index]
    run_config = {"num-server-rounds": 1, "min-nodes": 3,
                  **parse_config_args([f"num-server-rounds=1 min-nodes=3 {rc}"])}
    grid = LocalGrid(client_app, 3, run_config=run_config)
    with pytest.raises(InvalidRunConfig) as err:
        digits_server.main(grid, Context(1, 0, {}, RecordDict(), run_config))
    for frag in fragments:
        assert frag in f"invalid run config: {err.value}", (frag, str(err.value))


@pytest.mark.slow
@pytest.mark.deployment
def test_a_bad_config_shows_the_reason_in_the_terminal(local_flwr: LocalHome) -> None:
    """The same rows through ``flwr run . local --stream``: one suffices for the mechanism (an
    exception in the ServerApp's main is streamed to the terminal), each costs a Ray start."""
    index = 2  # malicious-clients > nodes
    rc, fragments = _doc_bad_configs()[index]
    argv = [flwr_bin("flwr"), "run", ".", "local", "--stream", "--federation-config",
            "num-supernodes=3 client-resources-num-cpus=1", "--run-config",
            f"num-server-rounds=1 min-nodes=3 {rc}"]
    out = _flwr(local_flwr, argv, f"bad{index}")
    assert "psfed-digits: invalid run config: " in out, out[-4000:]
    for frag in fragments:
        assert frag in out, f"{frag!r} not in the terminal output\n{out[-4000:]}"
    assert "PSFED-DIGITS-RESULT" not in out and "psfed-digits round=" not in out

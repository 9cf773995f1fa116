"""The digits Flower App, unchanged, in Flower's deployment runtime on 127.0.0.1.

(b) ``flower-superlink --insecure`` + 2 ``flower-supernode --insecure``, ``flwr run . <fed>``;
(c) the same over TLS (a CA and a server certificate the test generates) with SuperNode
    authentication: two SuperNode public keys are registered with ``flwr supernode register``,
    a SuperNode with an unregistered key and one with no key are refused.

Each test starts its own processes on free ports with a private FLWR_HOME, and stops them by PID
(their process groups) whatever happens; failures print the tail of every process log.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flower_helpers import (
    REPO,
    ProcessSet,
    flwr_bin,
    flwr_env,
    free_port,
    http_ok,
    make_supernode_keys,
    make_tls,
    parse_result,
    run_cli,
    wait_until,
    write_flower_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.deployment]

RUN_TIMEOUT = 480.0  # 2 rounds take ~35-55 s on 2 idle cores; 3 s polling + a process/message
START_TIMEOUT = 90.0
ROUNDS = 2


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="psfed-deploy-") as tmp:
        yield Path(tmp)


def _superlink_cmd(port: int, security: list[str]) -> list[str]:
    return [
        flwr_bin("flower-superlink"),
        *security,
        "--disable-runtime-dependency-installation",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def _supernode_cmd(superlink: str, partition: int, extra: list[str]) -> list[str]:
    return [
        flwr_bin("flower-supernode"),
        *extra,
        "--superlink",
        superlink,
        "--port",
        str(free_port()),
        "--node-config",
        f"partition-id={partition} num-partitions=2",
    ]


def _run_and_check(ps: ProcessSet, env: dict[str, str], federation: str, work: Path) -> None:
    t0 = time.monotonic()
    rc, out = run_cli(
        [
            flwr_bin("flwr"),
            "run",
            ".",
            federation,
            "--stream",
            "--run-config",
            f"num-server-rounds={ROUNDS} min-nodes=2",
        ],
        env,
        REPO,
        work / "flwr-run.log",
        RUN_TIMEOUT,
    )
    context = (
        f"\n--- flwr run . {federation} (rc={rc}, {time.monotonic() - t0:.0f}s) ---\n"
        f"{out[-8000:]}\n{ps.report()}"
    )
    assert rc == 0, context
    res = parse_result(out)
    assert res["strategy"] == "psfedavg" and res["num_nodes_seen"] == 2, context
    history = res["history"]
    assert isinstance(history, list) and len(history) == ROUNDS, context
    for r, h in enumerate(history, start=1):
        assert h["accepted-replies"] == 2.0 and h["rejected-replies"] == 0.0, context
        # a fresh flwr-clientapp process per message, yet the local model persisted
        assert h["local-rounds"] == pytest.approx(r, rel=1e-12), context
    accuracy = res["accuracy"]
    assert isinstance(accuracy, list) and len(accuracy) == ROUNDS, context
    assert float(accuracy[-1]) > 0.5, context
    for m in ps.procs:
        if m.name in ("supernode0", "supernode1"):
            assert m.alive(), f"{m.name} died\n{ps.report()}"


def test_insecure_superlink_and_two_supernodes(workdir: Path) -> None:
    home = workdir / "flwr_home"
    env = flwr_env(home)
    port = free_port()
    write_flower_config(home, {"deploy": {"address": f"127.0.0.1:{port}", "insecure": True}})
    ps = ProcessSet(workdir)
    try:
        ps.start("superlink", _superlink_cmd(port, ["--insecure"]), env)
        wait_until(
            lambda: http_ok(f"http://127.0.0.1:{port}/health"),
            START_TIMEOUT,
            "the SuperLink's /health",
            ps,
        )
        for i in range(2):
            ps.start(f"supernode{i}", _supernode_cmd(f"127.0.0.1:{port}", i, ["--insecure"]), env)
        _run_and_check(ps, env, "deploy", workdir)
    finally:
        ps.stop_all()
    assert all(not m.alive() for m in ps.procs)


def test_tls_and_supernode_authentication(workdir: Path) -> None:
    home = workdir / "flwr_home"
    env = flwr_env(home)
    port = free_port()
    ca, cert, key = make_tls(workdir / "certs")
    keys = [make_supernode_keys(workdir / "keys", f"node{i}") for i in range(3)]
    write_flower_config(
        home, {"secure": {"address": f"127.0.0.1:{port}", "root-certificates": str(ca)}}
    )
    superlink = f"127.0.0.1:{port}"
    tls = ["--root-certificates", str(ca)]
    ps = ProcessSet(workdir)
    try:
        ssl = ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
        ps.start("superlink", _superlink_cmd(port, [*ssl, "--enable-supernode-auth"]), env)
        wait_until(
            lambda: http_ok(f"https://127.0.0.1:{port}/health", cafile=ca),
            START_TIMEOUT,
            "the SuperLink's /health over TLS",
            ps,
        )
        assert not http_ok(f"http://127.0.0.1:{port}/health"), "plain HTTP must not be served"

        # allow-list two SuperNode public keys through the Control API (over TLS)
        for i in range(2):
            rc, out = run_cli(
                [flwr_bin("flwr"), "supernode", "register", str(keys[i][1]), "secure"],
                env,
                REPO,
                workdir / f"register{i}.log",
                120,
            )
            assert rc == 0 and "registered successfully" in out, out + ps.report()

        # an unregistered key and a missing key are both refused; the processes exit
        unknown = ps.start(
            "supernode-unknown-key",
            _supernode_cmd(superlink, 0, [*tls, "--auth-supernode-private-key", str(keys[2][0])]),
            env,
        )
        nokey = ps.start("supernode-no-key", _supernode_cmd(superlink, 1, tls), env)
        wait_until(
            lambda: not unknown.alive() and not nokey.alive(),
            START_TIMEOUT,
            "the unauthenticated SuperNodes to be refused",
            ps,
        )
        assert unknown.proc.returncode != 0, ps.report()
        assert "Failed to activate SuperNode" in unknown.text(), ps.report()
        assert nokey.proc.returncode != 0, ps.report()
        assert "Failed to initialize the connection" in nokey.text(), ps.report()

        for i in range(2):
            ps.start(
                f"supernode{i}",
                _supernode_cmd(
                    superlink, i, [*tls, "--auth-supernode-private-key", str(keys[i][0])]
                ),
                env,
            )
        _run_and_check(ps, env, "secure", workdir)

        # the SuperLink refused both and lists exactly the two registered nodes, online
        superlink_log = ps.procs[0].text()
        assert "ApiError:2004" in superlink_log, ps.report()  # unknown key: activation failed
        assert "ApiError:2001" in superlink_log, ps.report()  # no key: self-registration off
        rc, out = run_cli(
            [flwr_bin("flwr"), "supernode", "list", "secure", "--format", "json"],
            env,
            REPO,
            workdir / "list.log",
            120,
        )
        assert rc == 0, out
        assert "{" in out, out
        listing, _ = json.JSONDecoder().raw_decode(out[out.index("{") :])
        assert sorted(n["status"] for n in listing["nodes"]) == ["online", "online"], out
    finally:
        ps.stop_all()
    assert all(not m.alive() for m in ps.procs)

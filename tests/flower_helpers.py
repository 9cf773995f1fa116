"""Process helpers for the Flower App tests: free ports, managed processes, TLS/auth material.

Every process a test starts is recorded with its PID and stopped by PID (its own process group,
which holds the ``flower-superexec``/``flwr-serverapp``/``flwr-clientapp`` children it spawns):
SIGTERM, then SIGKILL after a timeout. Nothing is ever killed by name. The detached local
SuperLink that ``flwr run . local`` leaves behind is found by its unique ``FLWR_HOME`` path in
its command line and stopped the same way.

All processes talk to 127.0.0.1 only, on ports chosen free at run time, with a private
``FLWR_HOME`` and Flower's telemetry, update check and runtime ``uv sync`` turned off.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin/ (flwr, flower-superlink, ...)
RESULT_RE = re.compile(r"PSFED-DIGITS-RESULT (\{.*\})")


def flwr_bin(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else name


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flwr_env(flwr_home: Path, **extra: str) -> dict[str, str]:
    """Environment for every Flower process of a test: private FLWR_HOME, offline switches."""
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PYTHONUNBUFFERED="1",
        RAY_DEDUP_LOGS="0",
        RAY_USAGE_STATS_ENABLED="0",
        NO_COLOR="1",
    )
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def _tail(path: Path, n: int = 60) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as err:
        return f"<cannot read {path}: {err}>"
    return "\n".join(lines[-n:])


def _pgid_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - not ours
        return False
    return True


def stop_group(pid: int, timeout: float = 15.0) -> None:
    """Stop the process group led by ``pid`` (a process this test started): TERM, then KILL."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        if not _pgid_alive(pid):
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, 0)


@dataclass
class Managed:
    """A process started by a test, logging to ``log``; stopped by PID (its own group)."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        stop_group(self.proc.pid, timeout)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=1)

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


@dataclass
class ProcessSet:
    """The processes of one test; ``report()`` gives their log tails for failure messages."""

    workdir: Path
    procs: list[Managed] = field(default_factory=list)
    extra_logs: list[Path] = field(default_factory=list)
    extra_pids: list[int] = field(default_factory=list)

    def start(
        self, name: str, cmd: Sequence[str], env: dict[str, str], cwd: Path | None = None
    ) -> Managed:
        log = self.workdir / f"{name}.log"
        fh = log.open("wb")
        try:
            proc = subprocess.Popen(
                list(cmd),
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(cwd or self.workdir),
                start_new_session=True,
            )
        finally:
            fh.close()
        m = Managed(name, proc, log)
        self.procs.append(m)
        return m

    def adopt(self, pid: int, log: Path | None = None) -> None:
        """Take responsibility for a detached process (e.g. the local simulation SuperLink)."""
        self.extra_pids.append(pid)
        if log is not None:
            self.extra_logs.append(log)

    def stop_all(self) -> None:
        for m in reversed(self.procs):
            m.stop()
        for pid in self.extra_pids:
            stop_group(pid)

    def report(self, n: int = 60) -> str:
        parts = []
        for m in self.procs:
            state = "running" if m.alive() else f"exited {m.proc.returncode}"
            parts.append(f"----- {m.name} (pid {m.pid}, {state}) {m.log} -----\n{_tail(m.log, n)}")
        for p in self.extra_logs:
            parts.append(f"----- {p} -----\n{_tail(p, n)}")
        return "\n".join(parts)


def wait_until(
    pred: Callable[[], bool],
    timeout: float,
    what: str,
    procs: ProcessSet | None = None,
    interval: float = 0.25,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout:.0f}s waiting for {what}\n" + (procs.report() if procs else "")
    )


def http_ok(url: str, cafile: Path | None = None) -> bool:
    import ssl

    ctx = ssl.create_default_context(cafile=str(cafile)) if cafile else None
    try:
        with urllib.request.urlopen(url, timeout=1.0, context=ctx) as r:
            return bool(200 <= r.status < 300)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def run_cli(
    args: Sequence[str], env: dict[str, str], cwd: Path, log: Path, timeout: float
) -> tuple[int, str]:
    """Run a CLI command (e.g. ``flwr run``) in its own group; kill the group on timeout."""
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            list(args),
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(cwd),
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_group(proc.pid, 5)
            rc = -9
    return rc, log.read_text(errors="replace")


def find_local_superlinks(flwr_home: Path) -> list[int]:
    """PIDs of ``flower-superlink`` processes whose command line names ``flwr_home``.

    ``flwr run . local`` starts the SuperLink detached with ``--log-file
    $FLWR_HOME/local-superlink/superlink.log``; the private FLWR_HOME makes the match unique.
    """
    home = str(flwr_home)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv if a]
        if any(a.endswith("flower-superlink") for a in args[:3]) and any(home in a for a in args):
            found.append(int(entry.name))
    return found


def parse_result(output: str) -> dict[str, object]:
    """The ``PSFED-DIGITS-RESULT`` JSON the digits ServerApp logs at the end."""
    m = RESULT_RE.search(output)
    if not m:
        raise AssertionError("no PSFED-DIGITS-RESULT line in the output:\n" + output[-6000:])
    out = json.loads(m.group(1))
    assert isinstance(out, dict)
    return out


def write_flower_config(flwr_home: Path, connections: dict[str, dict[str, object]]) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with the given SuperLink connections."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", 'default = "local"', "", "[superlink.local]", 'address = ":local:"', ""]
    for name, conn in connections.items():
        lines.append(f"[superlink.{name}]")
        for k, v in conn.items():
            if isinstance(v, bool):
                lines.append(f"{k} = {'true' if v else 'false'}")
            else:
                lines.append(f'{k} = "{v}"')
        lines.append("")
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines))
    return path


@contextlib.contextmanager
def process_set(workdir: Path) -> Iterator[ProcessSet]:
    ps = ProcessSet(workdir)
    try:
        yield ps
    finally:
        ps.stop_all()


@dataclass
class LocalHome:
    """A private FLWR_HOME for ``flwr run . local``: its environment (free local ports), a work
    folder for logs, and the processes to stop (the detached local SuperLink, once adopted)."""

    work: Path
    home: Path
    env: dict[str, str]
    ps: ProcessSet

    def run(self, argv: Sequence[str], name: str, timeout: float) -> tuple[int, str]:
        """``run_cli`` in the repository with this home's environment, logged to ``name.log``."""
        return run_cli(argv, self.env, REPO, self.work / f"{name}.log", timeout)

    def adopt_superlinks(self) -> None:
        """Take charge of the local SuperLink(s) ``flwr run . local`` left (stopped on exit)."""
        log = self.home / "local-superlink" / "superlink.log"
        for pid in find_local_superlinks(self.home):
            if pid not in self.ps.extra_pids:
                self.ps.adopt(pid, log)


@contextlib.contextmanager
def local_home(prefix: str) -> Iterator[LocalHome]:
    """A :class:`LocalHome` in a temporary folder; on exit its local SuperLink is stopped by PID
    and checked gone."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        work = Path(tmp)
        home = work / "flwr_home"
        env = flwr_env(home, FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
                       FLWR_LOCAL_CONTROL_API_PORT=str(free_port()))
        write_flower_config(home, {})
        lh = LocalHome(work, home, env, ProcessSet(work))
        try:
            yield lh
        finally:
            lh.adopt_superlinks()
            lh.ps.stop_all()
        assert not find_local_superlinks(home), "the local SuperLink survived its stop"


# ---------------------------------------------------------------- TLS and SuperNode auth keys
def make_tls(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1/localhost: ``(ca, cert, key)``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "psfed-test-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = (
        directory / "ca.crt",
        directory / "server.pem",
        directory / ("server.key"),
    )
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_path, cert_path, key_path


def make_supernode_keys(directory: Path, name: str) -> tuple[Path, Path]:
    """An EC P-384 key pair in OpenSSH format (what ``flower-supernode`` and
    ``flwr supernode register`` read): ``(private_key_path, public_key_path)``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    priv = directory / name
    pub = directory / f"{name}.pub"
    priv.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    os.chmod(priv, 0o600)
    return priv, pub

"""Where a sweep's points are computed: this process (``local``) or a Ray cluster (``ray``).

The driver (:func:`experiments.driver.run_scenario`) owns every file: an executor only computes.
With :class:`RayExecutor` each sweep point becomes a Ray task that returns its *part* (CSV rows
and record, built by the same pure function as locally) to the driver, which writes it with the
same atomic part files and resume rules as the local executor — so ``tidy.csv`` and
``summary.csv`` are byte-identical whichever executor ran (same device, same code). A large
batched point can also be split into Monte Carlo run blocks (``runs_per_task``): each block
draws from its own generators (``stable_seed(seed, "psfed_robust.engine", purpose, block)``,
:mod:`psfed_robust.engine.schedule`), so a block run on another machine gives the same numbers;
the blocks are merged in run order on the driver before the part is built.

Failures: a task whose worker dies (killed, out of memory, node lost) is retried by Ray up to
``max_retries`` times; a point whose task raises, or keeps dying, is reported with its error while
the other points complete, and :class:`PointsFailed` names it at the end (the CLI exits non-zero).
Ray is connected to at ``address``, else ``RAY_ADDRESS``, else a local Ray instance is started in
this process (``ray.init(address="local", num_cpus=..., include_dashboard=False,
log_to_driver=False)``, as Flower's simulation does) and shut down afterwards. Multi-node
recipe and figures: docs/executors.md.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import logging
import math
import os
import sys
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from experiments.keys import NN_TASKS, ScenarioError
from experiments.results import PointResult

if TYPE_CHECKING:
    from experiments.schema import Scenario, SweepPoint

__all__ = ["EXECUTORS", "Executor", "PointsFailed", "RayExecutor", "SweepJob",
           "add_executor_arguments", "executor_from_args", "get_executor", "plan_blocks"]

#: executor names accepted by ``--executor`` / ``run_scenario(executor=...)``
EXECUTORS = ("local", "ray")

Part = tuple[str, dict[str, Any]]  # (CSV rows without header, record)


@dataclass(frozen=True)
class SweepJob:
    """What the driver hands an executor: pure functions, picklable by reference.

    ``compute(scenario, point)`` runs a whole point and returns its part (on a worker);
    ``build(scenario, point, result)`` turns merged run blocks into a part (on the driver);
    ``seed(scenario, point)`` is the point's seed.
    """

    scenario: Scenario
    compute: Callable[[Scenario, SweepPoint], Part]
    build: Callable[[Scenario, SweepPoint, PointResult], Part]
    seed: Callable[[Scenario, SweepPoint], int]


class Executor(Protocol):
    """Computes parts and yields ``(point, rows, record)`` as each point finishes."""

    def run(self, job: SweepJob, points: Sequence[SweepPoint], *,
            progress: bool = True) -> Iterator[tuple[SweepPoint, str, dict[str, Any]]]: ...


class PointsFailed(ScenarioError):
    """Some sweep points failed (each named with its error); the others' parts are saved."""

    def __init__(self, failures: Sequence[tuple[SweepPoint, str]], total: int) -> None:
        self.failures = list(failures)
        shown = "; ".join(f"sweep point {p.index} ({p.label}): {why}"
                          for p, why in self.failures[:5])
        more = "; ..." if len(self.failures) > 5 else ""
        super().__init__(
            f"{len(self.failures)} of {total} sweep point(s) failed: {shown}{more} — the other "
            f"points' results are saved; run the same command again to compute the failed ones"
        )


# ------------------------------------------------------------------------------ worker side


@functools.lru_cache(maxsize=1)
def code_identity() -> dict[str, str]:
    """Digest of the project's Python sources and the numeric library versions of this process.

    A worker refuses to compute with other torch/numpy/Python versions than the driver's (they
    can change the numbers); another code digest (sources edited, another commit) is reported
    by the driver as a warning.
    """
    import torch

    import experiments

    root = Path(experiments.__file__).resolve().parent.parent
    h = hashlib.sha256()
    for pkg in ("psfed_robust", "attacks", "defenses", "experiments"):
        for path in sorted((root / pkg).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return {"code": h.hexdigest()[:16], "torch": torch.__version__, "numpy": np.__version__,
            "python": sys.version.split()[0]}


def _prepare_worker(scenario: Scenario, driver_identity: dict[str, str],
                    plugins: Sequence[str]) -> None:
    """Refuse to compute with versions unlike the driver's; import the plugins (``plugins``:
    the driver's ``--plugin`` entries, files as absolute paths; then the scenario's)."""
    from experiments.schema import load_plugins

    mine = code_identity()
    diff = {k: (v, mine.get(k)) for k, v in driver_identity.items()
            if k != "code" and mine.get(k) != v}
    if diff:
        import socket

        raise RuntimeError(
            f"worker on {socket.gethostname()} differs from the driver: "
            + ", ".join(f"{k} {w} here vs {d} on the driver" for k, (d, w) in diff.items())
            + "; install the same psfed-robust commit and versions on every node "
            "(docs/executors.md)")
    source = scenario.source
    base = Path(source).parent if source and not source.startswith("<") else None
    load_plugins(plugins)
    load_plugins(scenario.get("plugins"), base)


def point_task(compute: Callable[[Scenario, SweepPoint], Part], scenario: Scenario,
               point: SweepPoint, identity: dict[str, str],
               plugins: Sequence[str]) -> tuple[Part, str]:
    """A Ray task: one whole sweep point -> its part (and this worker's code digest)."""
    _prepare_worker(scenario, identity, plugins)
    return compute(scenario, point), code_identity()["code"]


@dataclass
class BlockOutput:
    """Per-run curves of some run blocks of a batched point (a Ray task's answer)."""

    iterations: np.ndarray
    global_mse: np.ndarray  # [runs of these blocks, T]
    local_mse: np.ndarray
    seconds: float
    metadata: dict[str, Any]
    code: str  # the worker's code digest


def block_task(scenario: Scenario, point: SweepPoint, seed: int, blocks: list[int],
               device: str, identity: dict[str, str], plugins: Sequence[str]) -> BlockOutput:
    """A Ray task: run blocks ``blocks`` of a batched point on ``device``."""
    _prepare_worker(scenario, identity, plugins)
    import torch

    from experiments.configs import online_config
    from psfed_robust.engine import run_online

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("this run block was planned for CUDA but the worker sees no CUDA "
                           "device (give --gpus-per-point > 0, or device = 'cpu')")
    res = run_online(online_config(point, seed), device=device, blocks=blocks)
    return BlockOutput(np.asarray(res.iterations), np.asarray(res.global_mse),
                       np.asarray(res.local_mse), res.seconds, dict(res.metadata),
                       code_identity()["code"])


# ------------------------------------------------------------------------------ planning


def plan_device(point: SweepPoint, gpus_per_point: float) -> str:
    """The torch device type a Ray worker will use for ``point``: Ray hides GPUs from tasks that
    request none, so ``auto`` means CPU there unless ``gpus_per_point > 0``."""
    dev = str(point.get("device"))
    if dev == "auto":
        return "cuda" if gpus_per_point > 0 else "cpu"
    return dev


def plan_blocks(point: SweepPoint, runs_per_task: int | None, device: str) -> list[list[int]]:
    """Groups of consecutive engine run blocks, each at most ``runs_per_task`` runs (at least one
    block); ``[]`` when the point runs whole (not batched, not split, or a single block)."""
    if runs_per_task is None or point.get("engine") != "batched" or \
            point.get("task.kind") in NN_TASKS:  # the NN engine runs a point whole
        return []
    import torch

    from experiments.configs import online_config
    from psfed_robust.engine.online import block_ranges, resolve_run_block

    cfg = online_config(point)
    ranges = block_ranges(cfg.runs, resolve_run_block(cfg, torch.device(device)))
    if len(ranges) < 2 or cfg.runs <= runs_per_task:
        return []
    groups: list[list[int]] = []
    size = 0
    for b, (start, stop) in enumerate(ranges):
        if groups and size + (stop - start) <= runs_per_task:
            groups[-1].append(b)
            size += stop - start
        else:
            groups.append([b])
            size = stop - start
    return groups if len(groups) > 1 else []


def merge_blocks(point: SweepPoint, outs: Sequence[BlockOutput]) -> PointResult:
    """Concatenate block outputs (in block order) into the point's result, as a whole run."""
    from experiments.engines import theory_for_point

    first = outs[0]
    meta = {k: v for k, v in first.metadata.items() if k not in ("blocks", "block_workers")}
    th = theory_for_point(point)
    info: dict[str, Any] = {"seconds": round(sum(o.seconds for o in outs), 3),
                            "share_count": meta.get("values_per_link"), "p_e": meta.get("p_e"),
                            "engine": meta, "tasks": len(outs)}
    return PointResult(
        rounds=first.iterations,
        metrics={"global_mse": np.concatenate([o.global_mse for o in outs]),
                 "local_mse": np.concatenate([o.local_mse for o in outs])},
        theory_db=None if th is None else th["steady_db"],
        info=info,
    )


# ------------------------------------------------------------------------------ progress


class Progress:
    """``points: D done, R running, F failed, W waiting (of N)``: one line per change on a
    non-terminal stream, redrawn in place on a terminal."""

    def __init__(self, total: int, stream: Any = None, enabled: bool = True) -> None:
        self.total, self.enabled = total, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.last: tuple[int, int, int] | None = None

    def show(self, done: int, running: int, failed: int) -> None:
        state = (done, running, failed)
        if not self.enabled or state == self.last:
            return
        self.last = state
        waiting = self.total - done - running - failed
        line = (f"sweep points: {done} done, {running} running, {failed} failed, "
                f"{waiting} waiting (of {self.total})")
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
            self.stream.flush()
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty and self.last is not None:
            self.stream.write("\n")
            self.stream.flush()


# ------------------------------------------------------------------------------ Ray


@dataclass(frozen=True)
class _Unit:
    point: SweepPoint
    group: int  # index of the block group; -1 = the whole point
    blocks: tuple[int, ...] = ()


def _error_text(exc: BaseException) -> str:
    """One line naming what went wrong in a task (the cause for task errors)."""
    import ray.exceptions as rex

    if isinstance(exc, rex.RayTaskError) and getattr(exc, "cause", None) is not None:
        exc = exc.cause
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse a ``host:port`` that does not accept connections (Ray itself retries for minutes);
    ``auto`` and ``ray://`` addresses are left to Ray."""
    import socket

    host, sep, port = address.rpartition(":")
    if address == "auto" or "://" in address or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ScenarioError(
            f"--ray-address {address!r}: nothing accepts connections there ({exc.strerror or exc}"
            f"); start the head with `ray start --head --port={port}` or fix the address "
            f"(docs/executors.md)") from exc


@dataclass
class RayExecutor:
    """Sweep points (or run-block groups of large points) as Ray tasks; parts return here.

    ``address``: a Ray cluster (``"auto"``, ``"10.0.0.1:6379"``, ``"ray://..."``); default
    ``RAY_ADDRESS``, else a local instance started in this process with ``num_cpus`` CPUs (all
    cores by default). A process already connected to Ray uses that connection and leaves it
    open. ``cpus_per_point`` / ``gpus_per_point``: the Ray resources each task asks for (torch
    uses that many threads). ``runs_per_task``: split a batched point with more runs into groups
    of whole engine run blocks. ``max_retries``: Ray's retries of a task whose worker died.
    ``plugins``: modules or ``.py`` files (absolute paths) each worker imports first, as the
    driver did for ``--plugin`` (the scenario's own ``plugins`` are imported too).
    ``stream``: where progress and failures are reported (default stderr).
    """

    address: str | None = None
    num_cpus: int | None = None
    cpus_per_point: float = 1.0
    gpus_per_point: float = 0.0
    runs_per_task: int | None = None
    max_retries: int = 3
    plugins: tuple[str, ...] = ()
    stream: Any = None
    failures: list[tuple[SweepPoint, str]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if not self.cpus_per_point > 0 and not self.gpus_per_point > 0:
            raise ScenarioError(f"--cpus-per-point: must be > 0 (or give --gpus-per-point), got "
                                f"{self.cpus_per_point}")
        if self.cpus_per_point < 0 or self.gpus_per_point < 0:
            raise ScenarioError("--cpus-per-point / --gpus-per-point: must be >= 0")
        if self.runs_per_task is not None and self.runs_per_task < 1:
            raise ScenarioError(f"--runs-per-task: must be >= 1, got {self.runs_per_task}")
        if self.max_retries < 0:
            raise ScenarioError(f"--max-retries: must be >= 0, got {self.max_retries}")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ScenarioError(f"--ray-cpus: must be >= 1, got {self.num_cpus}")
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise ScenarioError("--executor ray: Ray is not installed in this environment "
                                "(pip install 'flwr[simulation]' or 'ray[default]')")

    # ------------------------------------------------------------------ cluster
    def _connect(self) -> bool:
        """Connect to (or start) Ray; True when this call started it (and must shut it down)."""
        import ray

        if ray.is_initialized():
            return False
        address = self.address or os.environ.get("RAY_ADDRESS") or None
        kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                              "logging_level": logging.WARNING}
        if address is None:
            ray.init(address="local", num_cpus=self.num_cpus or os.cpu_count() or 1, **kw)
        else:
            if self.num_cpus is not None:
                raise ScenarioError("--ray-cpus sizes a local Ray instance; a cluster's CPUs are "
                                    f"set by `ray start` on its nodes (address {address!r})")
            _check_reachable(address)
            try:
                ray.init(address=address, **kw)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ScenarioError(f"--ray-address {address!r}: cannot connect to the Ray "
                                    f"cluster ({exc})") from exc
        return True

    def slots(self) -> int:
        """How many tasks of this shape the cluster can run at once now."""
        import ray

        res = ray.cluster_resources()
        fits = []
        if self.cpus_per_point > 0:
            fits.append(math.floor(res.get("CPU", 0.0) / self.cpus_per_point + 1e-9))
        if self.gpus_per_point > 0:
            fits.append(math.floor(res.get("GPU", 0.0) / self.gpus_per_point + 1e-9))
        n = min(fits)
        if n < 1:
            raise ScenarioError(
                f"the Ray cluster cannot fit one task of {self.cpus_per_point} CPU(s) and "
                f"{self.gpus_per_point} GPU(s) (cluster resources: CPU {res.get('CPU', 0)}, GPU "
                f"{res.get('GPU', 0)}); lower --cpus-per-point / --gpus-per-point")
        return n

    # ------------------------------------------------------------------ run
    def run(self, job: SweepJob, points: Sequence[SweepPoint], *,
            progress: bool = True) -> Iterator[tuple[SweepPoint, str, dict[str, Any]]]:
        """Yield each point's ``(point, rows, record)`` as it completes; raise
        :class:`PointsFailed` at the end when some failed."""
        self.failures = []
        if not points:
            return
        import ray

        stream = self.stream if self.stream is not None else sys.stderr
        # Ray 2.x still hides GPUs from tasks asking for none (what plan_device relies on) and
        # warns that this default will change; the warning is about Ray, not about this run
        warnings.filterwarnings("ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO.*",
                                category=FutureWarning)
        owned = self._connect()
        bar = Progress(len(points), stream, progress)
        try:
            yield from self._schedule(ray, job, points, bar, stream)
        finally:
            bar.close()
            if owned:
                ray.shutdown()
        if self.failures:
            raise PointsFailed(self.failures, len(points))

    def _schedule(self, ray: Any, job: SweepJob, points: Sequence[SweepPoint], bar: Progress,
                  stream: Any) -> Iterator[tuple[SweepPoint, str, dict[str, Any]]]:
        opts = {"num_cpus": self.cpus_per_point, "num_gpus": self.gpus_per_point,
                "max_retries": self.max_retries, "retry_exceptions": False}
        remote_point = ray.remote(point_task).options(**opts)
        remote_blocks = ray.remote(block_task).options(**opts)
        identity = code_identity()
        scenario_ref = ray.put(job.scenario)
        pending: deque[_Unit] = deque()
        groups: dict[str, int] = {}
        for p in points:
            plan = plan_blocks(p, self.runs_per_task, plan_device(p, self.gpus_per_point))
            groups[p.key] = len(plan)
            if plan:
                pending.extend(_Unit(p, g, tuple(b)) for g, b in enumerate(plan))
            else:
                pending.append(_Unit(p, -1))
        inflight: dict[Any, _Unit] = {}
        got: dict[str, dict[int, BlockOutput]] = {}
        failed: set[str] = set()
        warned: set[str] = set()
        done = 0

        def running() -> int:
            return len({u.point.key for u in inflight.values()} - failed)

        while pending or inflight:
            cap = self.slots()
            while pending and len(inflight) < cap:
                u = pending.popleft()
                if u.point.key in failed:
                    continue
                if u.group < 0:
                    ref = remote_point.remote(job.compute, scenario_ref, u.point, identity,
                                              self.plugins)
                else:
                    ref = remote_blocks.remote(scenario_ref, u.point,
                                               job.seed(job.scenario, u.point), list(u.blocks),
                                               plan_device(u.point, self.gpus_per_point),
                                               identity, self.plugins)
                inflight[ref] = u
            bar.show(done, running(), len(failed))
            if not inflight:
                continue
            ready, _ = ray.wait(list(inflight), num_returns=1)
            u = inflight.pop(ready[0])
            if u.point.key in failed:
                continue
            try:
                out = ray.get(ready[0])
            except ray.exceptions.RayError as exc:
                why = _error_text(exc)
                if isinstance(exc, ray.exceptions.WorkerCrashedError | ray.exceptions.NodeDiedError
                              | ray.exceptions.OutOfMemoryError):
                    why += f" (worker lost {self.max_retries + 1} times: Ray's retries exhausted)"
                failed.add(u.point.key)
                self.failures.append((u.point, why))
                print(f"sweep point {u.point.index} ({u.point.label}) failed: {why}",
                      file=stream, flush=True)
                for ref, other in list(inflight.items()):
                    if other.point.key == u.point.key:
                        ray.cancel(ref)
                bar.show(done, running(), len(failed))
                continue
            code = out[1] if u.group < 0 else out.code
            if code != identity["code"] and code not in warned:
                warned.add(code)
                print(f"warning: a Ray worker runs other project sources than the driver (code "
                      f"digest {code} vs {identity['code']}): edited files or another commit; "
                      f"results may differ from a local run", file=stream, flush=True)
            if u.group < 0:
                rows, record = out[0]
            else:
                have = got.setdefault(u.point.key, {})
                have[u.group] = out
                if len(have) < groups[u.point.key]:
                    continue
                res = merge_blocks(u.point, [have[g] for g in sorted(have)])
                del got[u.point.key]
                rows, record = job.build(job.scenario, u.point, res)
            done += 1
            yield u.point, rows, record
            bar.show(done, running(), len(failed))


# ------------------------------------------------------------------------------ CLI glue


def get_executor(executor: str | Executor | None) -> Executor | None:
    """``None`` for the local executor (the driver's own loop), else the executor object."""
    if executor is None or executor == "local":
        return None
    if executor == "ray":
        return RayExecutor()
    if isinstance(executor, str):
        raise ScenarioError(f"executor: unknown executor {executor!r}; choose one of "
                            f"{', '.join(EXECUTORS)}")
    if not callable(getattr(executor, "run", None)):
        raise ScenarioError(f"executor: {executor!r} has no run(job, points, progress=...) method")
    return executor


def add_executor_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``run`` command's executor flags."""
    g = parser.add_argument_group("executor (docs/executors.md)")
    g.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="where sweep points run: this process (local) or Ray tasks (ray)")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="Ray cluster to use (default: RAY_ADDRESS, else a local Ray instance)")
    g.add_argument("--ray-cpus", type=int, default=None, metavar="N",
                   help="CPUs of the local Ray instance (default: all cores)")
    g.add_argument("--cpus-per-point", type=float, default=1.0, metavar="N",
                   help="CPUs each Ray task asks for (default 1)")
    g.add_argument("--gpus-per-point", type=float, default=0.0, metavar="N",
                   help="GPUs each Ray task asks for (default 0)")
    g.add_argument("--runs-per-task", type=int, default=None, metavar="R",
                   help="split batched points with more Monte Carlo runs into tasks of whole "
                   "run blocks of at most R runs")
    g.add_argument("--max-retries", type=int, default=3, metavar="N",
                   help="Ray retries of a task whose worker died (default 3)")


def executor_from_args(args: argparse.Namespace) -> str | Executor:
    """The executor the ``run`` flags ask for; Ray flags without ``--executor ray`` are refused."""
    if args.executor != "ray":
        given = [f for f, v, d in (("--ray-address", args.ray_address, None),
                                   ("--ray-cpus", args.ray_cpus, None),
                                   ("--cpus-per-point", args.cpus_per_point, 1.0),
                                   ("--gpus-per-point", args.gpus_per_point, 0.0),
                                   ("--runs-per-task", args.runs_per_task, None),
                                   ("--max-retries", args.max_retries, 3)) if v != d]
        if given:
            raise ScenarioError(f"{', '.join(given)}: only with --executor ray")
        return "local"
    plugins = tuple(str(Path(p).resolve()) if p.endswith(".py") else p
                    for p in getattr(args, "plugins", None) or ())
    return RayExecutor(address=args.ray_address, num_cpus=args.ray_cpus,
                       cpus_per_point=args.cpus_per_point, gpus_per_point=args.gpus_per_point,
                       runs_per_task=args.runs_per_task, max_retries=args.max_retries,
                       plugins=plugins)

"""Results a researcher can trust (issue 14, items 4-7): divergence, CIs, resume integrity,
validation before work, output paths and resources. The driver runs a fake engine here
(tests/experiments_fake.py) so that each case is exact and fast."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from experiments_fake import tiny_scenario
from scipy import stats

from experiments.cli import main
from experiments.driver import db_interval, point_seed, run_scenario
from experiments.keys import ScenarioError
from experiments.schema import load_scenario, parse_scenario, participant_counts

BASE = tiny_scenario("t", runs=3, rounds=40, seed=5, malicious=1)


def _raw(**sweep: Any) -> dict[str, Any]:
    return dict(BASE, sweep=dict(sweep))


def _run(raw: dict[str, Any], out: Path, **kw: Any) -> Any:
    return run_scenario(parse_scenario(raw), out, progress=False, stream=None, **kw)


# ------------------------------------------------------------------ 14.4 divergence and CIs
def test_db_interval_is_a_real_interval_where_the_linear_one_is_not() -> None:
    x = np.array([1e-3, 2e-3, 1.0])
    m, s, n = x.mean(), x.std(ddof=1), 3
    t = stats.t.ppf(0.975, 2)
    assert m - t * s / math.sqrt(n) < 0  # the old linear interval had no dB lower bound
    centre, lo, hi = db_interval(x)
    half = 10 / math.log(10) * t * s / math.sqrt(n) / m
    assert centre == pytest.approx(10 * math.log10(m))
    assert (lo, hi) == pytest.approx((centre - half, centre + half))
    assert math.isfinite(lo) and lo < centre < hi
    assert all(math.isnan(v) for v in db_interval(np.array([1.0, math.nan]))[1:])
    assert math.isnan(db_interval(np.array([math.nan, 1.0]))[0])  # NaN is never -inf dB


def test_diverged_points_are_labelled_everywhere(tmp_path: Path, fake: None) -> None:
    raw = _raw(**{"attack.params.sigma": [0.5, 99.0, 77.0]})
    out = _run(raw, tmp_path / "o", plots=True)
    rows = {r["label"]: r for r in csv.DictReader(out.summary_csv.open())
            if r["metric"] == "global_mse"}
    ok, nan, big = (rows[f"attack.sigma={v}"] for v in ("0.5", "99", "77"))
    assert ok["diverged"] == "false" and float(ok["ci_low_db"]) < float(ok["steady_db"])
    assert nan["diverged"] == "true" and nan["diverged_runs"] == "1"
    assert nan["steady_db"] == "nan" and nan["ci_low_db"] == "nan" and nan["ci_high_db"] == "nan"
    assert big["diverged"] == "true" and float(big["steady_db"]) == pytest.approx(90.0)
    assert big["ci_low_db"] == "nan"  # never a CI next to a 'diverged' verdict
    values = [r["value"] for r in csv.DictReader(out.tidy_csv.open())]
    assert "" not in values and "nan" in values
    lines = [ln for ln in out.table.splitlines() if ln.startswith("|")][2:]
    assert ["diverged" in ln for ln in lines] == [False, True, True]
    assert (tmp_path / "o" / "learning_curves.png").stat().st_size > 10_000


# ------------------------------------------------------------------ 14.5 resume integrity
def test_swapped_sweep_keys_resume_the_same_settings(tmp_path: Path, fake: None) -> None:
    a = _raw(**{"sharing.fraction": [1.0, 0.5], "attack.malicious": [0, 1, 2]})
    b = _raw(**{"attack.malicious": [0, 1, 2], "sharing.fraction": [1.0, 0.5]})
    sa, sb = parse_scenario(a), parse_scenario(b)
    assert sa.digest() == sb.digest()
    seeds_a = {p.setting: point_seed(sa, p) for p in sa.points()}
    assert seeds_a == {p.setting: point_seed(sb, p) for p in sb.points()}
    _run(a, tmp_path / "o")
    out = run_scenario(sb, tmp_path / "o", progress=False, stream=None)
    for row in out.summary_rows:  # each row carries its own setting's data
        if row["metric"] == "global_mse":
            base = 0.01 * (1 + row["sharing.fraction"]) * (1 + row["attack.malicious"])
            assert 10 * math.log10(base) < row["steady_db"] < 10 * math.log10(1.1 * base)
    ref = _run(b, tmp_path / "fresh")
    assert out.tidy_csv.read_bytes() == ref.tidy_csv.read_bytes()


def test_int_and_float_sweep_values_are_one_setting() -> None:
    one = parse_scenario(_raw(**{"sharing.fraction": [1]}))
    other = parse_scenario(_raw(**{"sharing.fraction": [1.0]}))
    assert one.sweep == other.sweep == {"sharing.fraction": [1.0]}
    assert point_seed(one, one.points()[0]) == point_seed(other, other.points()[0])
    p1 = parse_scenario(_raw(**{"attack.params.sigma": [1]})).points()[0]
    p2 = parse_scenario(_raw(**{"attack.params.sigma": [1.0]})).points()[0]
    assert p1.setting == p2.setting
    with pytest.raises(ScenarioError, match=r"sweep.sharing.fraction: values repeat"):
        parse_scenario(_raw(**{"sharing.fraction": [1, 1.0]}))


def _damage(path: Path, how: str) -> None:
    if how == "truncate":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "delete":
        path.unlink()
    elif how == "garbage":
        path.write_bytes(b"\x00garbage,1,2\n")


@pytest.mark.parametrize(("suffix", "how"), [
    (".csv", "truncate"), (".csv", "empty"), (".csv", "delete"), (".csv", "garbage"),
    (".json", "truncate"), (".json", "empty"), (".json", "garbage"),
])
def test_damaged_part_is_rerun_never_merged(tmp_path: Path, fake: None, suffix: str,
                                            how: str) -> None:
    raw = _raw(**{"sharing.fraction": [1.0, 0.5, 0.25]})
    ref = _run(raw, tmp_path / "ref")
    out = tmp_path / "o"
    _run(raw, out)
    victim = sorted((out / "parts").glob(f"*{suffix}"))[1]
    _damage(victim, how)
    from experiments.driver import finalize

    with pytest.raises(ScenarioError, match=r"sweep point \d .*run the same command again"):
        finalize(parse_scenario(raw), out)
    import io

    log = io.StringIO()
    again = run_scenario(parse_scenario(raw), out, progress=False, stream=log)
    assert "computing it again" in log.getvalue() and "2 of 3 sweep points" in log.getvalue()
    assert again.tidy_csv.read_bytes() == ref.tidy_csv.read_bytes()
    assert again.summary_csv.read_bytes() == ref.summary_csv.read_bytes()


# ------------------------------------------------------------------ 14.6 validation before work
@pytest.mark.parametrize(("sweep", "needle"), [
    ({"sharing.selector": ["random", "topk"]},
     "sharing.selector: 'topk' is not allowed on the batched engine"),
    ({"federation.stepsize": [0.05, math.inf]}, "sweep.federation.stepsize: inf is out of range"),
    ({"output.record_every": [10, 50]}, "output.record_every: sweep point 1"),
    ({"sharing.count": [4, 9]}, "sharing.count: sweep point 1"),
])
def test_a_later_invalid_point_fails_before_anything_is_written(
    tmp_path: Path, sweep: dict[str, list[Any]], needle: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import tomli_w

    path = tmp_path / "s.toml"
    path.write_text(tomli_w.dumps(_raw(**sweep)))
    out = tmp_path / "never"
    assert main(["run", str(path), "--out", str(out)]) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


def test_rule_precondition_names_rule_n_and_f() -> None:
    raw = dict(BASE, defense={"name": "krum"}, attack={"name": "gaussian", "malicious": 2})
    with pytest.raises(ScenarioError, match=r"'krum'.*n = 4.*f = 2"):
        parse_scenario(raw)
    ok = parse_scenario(dict(raw, defense={"name": "krum", "f": 0}))
    from experiments.configs import defense_params_of

    assert defense_params_of(ok.points()[0]) == {"f": 0}
    tm = parse_scenario(dict(BASE, defense={"name": "trimmed_mean"}))
    assert defense_params_of(tm.points()[0]) == {}  # trims beta n unless defense.f is set


def test_bernoulli_counts_cover_every_non_negligible_round() -> None:
    raw = dict(BASE, federation={"clients": 50, "scheduling": "bernoulli", "p_c": 0.2},
               rounds=100, runs=10)
    counts = participant_counts(parse_scenario(raw).points()[0])
    lo, hi, draws = counts[0], counts[-1], 1000
    assert counts == list(range(lo, hi + 1))
    assert stats.binom.cdf(lo - 1, 50, 0.2) * draws <= 1e-6 < stats.binom.cdf(lo, 50, 0.2) * draws
    assert stats.binom.sf(hi, 50, 0.2) * draws <= 1e-6 < stats.binom.sf(hi - 1, 50, 0.2) * draws


def test_keys_the_engine_ignores_and_renamed_keys_are_errors() -> None:
    flower: dict[str, Any] = {"name": "f", "engine": "flower", "task": {"kind": "digits"}}
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("federation", {"stepsize": 0.1}, "federation.stepsize: .*flower engine does not use"),
        ("sharing", {"uplink": "same"}, "sharing.uplink: .*flower engine does not use"),
        ("", {"device": "cuda"}, "device: .*flower engine does not use"),
    ]
    for key, value, needle in cases:
        raw = dict(flower, **value) if not key else dict(flower, **{key: value})
        with pytest.raises(ScenarioError, match=needle):
            parse_scenario(raw)
    with pytest.raises(ScenarioError, match=r"task.hidden: .*batched engine does not use"):
        parse_scenario(dict(BASE, task={"kind": "linear", "hidden": 32}))
    with pytest.raises(ScenarioError, match=r"'sharing.share_count' was renamed: use "
                                            r"'sharing.count'"):
        parse_scenario(dict(BASE, sharing={"share_count": 4}))
    with pytest.raises(ScenarioError, match=r"use 'attack.persistent'"):
        parse_scenario(dict(BASE, attack={"name": "gaussian", "params": {"persistent": True}}))
    with pytest.raises(ScenarioError, match=r"sharing.count: .*set one of them"):
        parse_scenario(dict(BASE, sharing={"count": 4, "fraction": 0.5}))


# ------------------------------------------------------------------ 14.7 paths and resources
def test_out_that_is_a_file_or_read_only(tmp_path: Path, fake: None) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ScenarioError, match="is a file"):
        _run(BASE, f)
    with pytest.raises(ScenarioError, match="cannot write results there"):
        _run(BASE, f / "below")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that ignores permissions")
        with pytest.raises(ScenarioError, match="cannot write results there"):
            _run(BASE, ro / "o")
    finally:
        ro.chmod(0o700)


def test_name_cannot_escape_results() -> None:
    for name in ("../../escaped", "a/b", "..", "/abs"):
        with pytest.raises(ScenarioError, match=r"name: .*plain folder name"):
            parse_scenario(dict(BASE, name=name))


def test_a_folder_named_like_a_shipped_scenario(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "headline").mkdir()
    assert load_scenario("headline").name == "headline"
    assert load_scenario("./headline").name == "headline"
    (tmp_path / "other").mkdir()
    with pytest.raises(ScenarioError, match="is a folder, not a scenario file"):
        load_scenario("other")


def test_huge_dim_is_refused_before_any_work(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "never"
    args = ["run", "headline", "--out", str(out), "--set", "task.dim=2000000000",
            "--set", "sweep.sharing.fraction=[1.0]"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "task.dim" in err and "GiB" in err and "available" in err
    assert not out.exists()


def test_cuda_without_cuda_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "never"
    assert main(["run", "headline", "--out", str(out), "--set", 'device="cuda"']) == 2
    assert "device: sweep point 0: 'cuda' was asked for" in capsys.readouterr().err
    assert not out.exists()

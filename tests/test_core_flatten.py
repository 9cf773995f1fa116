"""FlattenedModel: order, round trips, partial access, dtypes, buffers, name handling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from psfed_robust.core.flatten import FlattenedModel, all_finite
from psfed_robust.core.mask import Mask


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))


def test_order_and_info_known_by_hand() -> None:
    fm = FlattenedModel(small_model())
    assert fm.num_parameters == 6 + 2 + 2 + 1
    info = fm.parameter_info()
    assert [i["name"] for i in info] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert [(i["start"], i["end"]) for i in info] == [(0, 6), (6, 8), (8, 10), (10, 11)]
    assert info[0]["shape"] == (2, 3) and info[0]["dtype"] == "float32"
    assert info[0]["kind"] == "parameter"
    assert fm.get_param_index_range("2.weight") == (8, 10)
    with pytest.raises(KeyError):
        fm.get_param_index_range("nope")
    flat = fm.flatten()
    model = fm.model
    assert torch.equal(flat[:6], model[0].weight.reshape(-1))
    assert torch.equal(flat[10:], model[2].bias)
    assert repr(fm) == "FlattenedModel(num_parameters=11, num_tensors=4)"


def test_flatten_unflatten_roundtrip_and_errors() -> None:
    fm = FlattenedModel(small_model())
    new = torch.arange(11, dtype=torch.float32)
    fm.unflatten(new)
    assert torch.equal(fm.flatten(), new)
    fm.unflatten(np.arange(11, dtype=np.float64) * 2)  # numpy, cast to the tensors' dtype
    assert fm.flatten()[3].item() == 6.0
    fm.unflatten(list(range(11)))
    with pytest.raises(ValueError, match="Expected 11"):
        fm.unflatten(torch.zeros(10))
    with pytest.raises(ValueError, match="NaN"):
        fm.unflatten(torch.full((11,), float("nan")))
    with pytest.raises(ValueError, match="1-D"):
        fm.unflatten(torch.zeros(11, 1))
    with pytest.raises(TypeError):
        FlattenedModel("model")  # type: ignore[arg-type]


@given(st.integers(0, 2**32 - 1), st.floats(0.0, 1.0))
def test_extract_apply_inverse_and_locality(seed: int, f: float) -> None:
    fm = FlattenedModel(small_model())
    mask = Mask.random(fm.num_parameters, f, seed=seed)
    before = fm.flatten().clone()
    part = fm.extract(mask)
    assert torch.equal(part, before[mask.to_torch()])
    fm.apply(part, mask)  # extract -> apply is the identity
    assert torch.equal(fm.flatten(), before)
    new = torch.randn(mask.count, generator=torch.Generator().manual_seed(seed))
    fm.apply(new, mask)
    after = fm.flatten()
    sel = mask.to_torch()
    assert torch.equal(after[sel], new)
    assert torch.equal(after[~sel], before[~sel])  # apply touches only masked entries
    assert torch.equal(fm.extract(mask), new)


def test_apply_errors() -> None:
    fm = FlattenedModel(small_model())
    m = Mask.from_indices([0, 1], 11)
    with pytest.raises(ValueError, match="selects 2"):
        fm.apply(torch.zeros(3), m)
    with pytest.raises(ValueError, match="mask size"):
        fm.apply(torch.zeros(2), Mask.from_indices([0, 1], 12))
    with pytest.raises(ValueError, match="NaN"):
        fm.apply(torch.tensor([1.0, float("inf")]), m)
    with pytest.raises(TypeError, match="Mask"):
        fm.extract(np.ones(11, bool))  # type: ignore[arg-type]


def test_layer_mask_respects_dot_boundaries() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(2, 2)
            self.fc10 = nn.Linear(2, 1)

    fm = FlattenedModel(Net())
    m = fm.get_layer_mask("fc1")
    assert m.count == 6 and m.indices.tolist() == list(range(6))  # not fc10
    assert fm.get_layer_mask(["fc1.", "fc10"]).count == fm.num_parameters
    assert fm.get_layer_mask("fc10.bias").indices.tolist() == [8]
    assert fm.get_layer_mask("fc").count == 0


def test_include_buffers_batchnorm() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    plain = FlattenedModel(model)
    fm = FlattenedModel(model, include_buffers=True)
    assert plain.num_parameters == 9 + 6
    assert fm.num_parameters == 15 + 6  # running_mean, running_var; not num_batches_tracked
    kinds = [i["kind"] for i in fm.parameter_info()]
    assert kinds[-2:] == ["buffer", "buffer"]
    assert [i["name"] for i in fm.parameter_info()][-2:] == ["1.running_mean", "1.running_var"]
    flat = fm.flatten()
    flat[-3:] = 7.0
    fm.unflatten(flat)
    assert torch.equal(model[1].running_var, torch.full((3,), 7.0))


def test_trainable_only_and_fixed_order() -> None:
    model = small_model()
    model[0].weight.requires_grad_(False)
    fm = FlattenedModel(model, trainable_only=True)
    assert fm.num_parameters == 5
    assert [i["name"] for i in fm.parameter_info()] == ["0.bias", "2.weight", "2.bias"]
    assert FlattenedModel(model).num_parameters == 11
    a, b = FlattenedModel(small_model()), FlattenedModel(small_model())
    assert a.parameter_info() == b.parameter_info()


def test_tied_parameters_counted_once() -> None:
    lin = nn.Linear(2, 2)
    model = nn.Sequential(lin, lin)
    assert FlattenedModel(model).num_parameters == 6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_and_high_precision_models_keep_dtype(dtype: torch.dtype) -> None:
    model = small_model().to(dtype)
    fm = FlattenedModel(model)
    flat = fm.flatten()
    assert flat.dtype == dtype and fm.dtype == dtype
    m = Mask.from_indices([0, 5, 10], fm.num_parameters)
    vals = torch.tensor([1.5, -2.0, 0.25], dtype=dtype)
    fm.apply(vals, m)
    assert all(p.dtype == dtype for p in model.parameters())
    assert torch.equal(fm.extract(m), vals)
    fm.unflatten(flat)
    assert torch.equal(fm.flatten(), flat)
    assert fm.device == torch.device("cpu")
    np_flat = fm.flatten_numpy()
    assert np_flat.dtype == (np.float32 if dtype == torch.bfloat16 else flat.numpy().dtype)


def test_mixed_dtypes_promote() -> None:
    model = small_model()
    model[2].to(torch.float64)
    fm = FlattenedModel(model)
    assert fm.flatten().dtype == torch.float64
    fm.unflatten(torch.arange(11, dtype=torch.float64) + 1e-12)
    assert model[0].weight.dtype == torch.float32 and model[2].weight.dtype == torch.float64
    assert model[2].bias.item() == 10 + 1e-12  # fp64 kept: the seed lost the 1e-12


def test_moduledict_numeric_keys() -> None:
    model = nn.ModuleDict({"0": nn.Linear(2, 2), "10": nn.Linear(2, 1)})
    fm = FlattenedModel(model)
    assert fm.num_parameters == 9
    fm.unflatten(torch.arange(9, dtype=torch.float32))
    assert model["10"].bias.item() == 8.0
    assert fm.get_layer_mask("0").count == 6  # "0" does not match "10"


def test_lazy_module_errors() -> None:
    with pytest.raises(ValueError, match="lazy"):
        FlattenedModel(nn.LazyLinear(3))


def test_empty_model() -> None:
    fm = FlattenedModel(nn.ReLU())
    assert fm.num_parameters == 0 and fm.flatten().numel() == 0
    assert fm.extract(Mask.all_false(0)).numel() == 0


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_all_finite_exact_including_sum_overflow(dtype: type) -> None:
    info = np.finfo(dtype)
    x = np.linspace(-1, 1, 1001).astype(dtype)
    assert all_finite(x) and all_finite(torch.from_numpy(x))
    big = np.full(64, info.max, dtype)  # finite values whose sum overflows
    assert all_finite(big) and all_finite(-big)
    for bad in (np.nan, np.inf, -np.inf):
        for arr in (x, big):
            y = arr.copy()
            y[len(y) // 2] = bad
            assert not all_finite(y) and not all_finite(torch.from_numpy(y))
    y = big.copy()
    y[0], y[1] = np.inf, -np.inf  # +inf + -inf: the sum is NaN, still rejected
    assert not all_finite(y)
    assert all_finite(np.zeros(0, dtype)) and all_finite(np.zeros((3, 4), dtype))
    assert not all_finite(np.array([[0, 1], [np.nan, 2]], dtype))
    assert all_finite(np.arange(5)) and all_finite(torch.arange(5))

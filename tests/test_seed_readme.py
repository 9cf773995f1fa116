"""The seed package's README snippets run unchanged against psfed_robust (import line only)."""

from __future__ import annotations

import textwrap
from typing import Any

import numpy as np

BASIC_USAGE = textwrap.dedent(
    """
    import torch
    import torch.nn as nn
    from psfed_robust import FlattenedModel, RandomMaskSelector

    # Your PyTorch model
    model = nn.Sequential(
        nn.Linear(784, 128),
        nn.ReLU(),
        nn.Linear(128, 10)
    )

    # Wrap for partial sharing
    flat_model = FlattenedModel(model)
    print(f"Total parameters: {flat_model.num_parameters}")

    # Create a mask selector (50% of parameters, changes each round)
    selector = RandomMaskSelector(fraction=0.5, seed=42)

    # Generate mask for round 1
    mask = selector.select(flat_model.num_parameters, round_num=1)
    print(f"Selected {mask.count} / {mask.size} parameters")

    # Extract selected parameters (for sending to clients)
    partial_params = flat_model.extract(mask)

    # ... transmit partial_params to client ...

    # Apply received parameters (on client side)
    flat_model.apply(partial_params, mask)
    """
)

CUSTOM_SELECTOR = textwrap.dedent(
    """
    from psfed_robust import MaskSelector, Mask

    class MyCustomSelector(MaskSelector):
        def select(
            self,\x20
            num_parameters: int,\x20
            round_num: int,
            **kwargs
        ) -> Mask:
            # Your selection logic
            indices = your_custom_logic(num_parameters, round_num)
            return Mask.from_indices(indices, size=num_parameters)
    """
)


def test_basic_usage(capsys: Any) -> None:
    ns: dict[str, Any] = {}
    exec(compile(BASIC_USAGE, "README-basic-usage", "exec"), ns)
    out = capsys.readouterr().out
    assert "Total parameters: 101770" in out
    assert "Selected 50885 / 101770 parameters" in out
    before = ns["flat_model"].flatten()
    assert ns["partial_params"].shape == (50885,)
    assert ns["mask"].count == 50885
    # the round trip left the model unchanged
    ns["flat_model"].apply(ns["partial_params"], ns["mask"])
    assert bool((ns["flat_model"].flatten() == before).all())


def test_custom_selector() -> None:
    def your_custom_logic(num_parameters: int, round_num: int) -> np.ndarray:
        return np.arange(round_num % 3, num_parameters, 3)

    ns: dict[str, Any] = {"your_custom_logic": your_custom_logic}
    exec(compile(CUSTOM_SELECTOR, "README-custom-selector", "exec"), ns)
    selector = ns["MyCustomSelector"](fraction=0.3)
    mask = selector.select(10, round_num=1)
    assert mask.indices.tolist() == [1, 4, 7]
    assert mask.size == 10
    assert selector.select(10, 2).indices.tolist() == [2, 5, 8]

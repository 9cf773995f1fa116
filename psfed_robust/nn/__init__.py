"""Batched neural-network engine: image classification under attack through the round core.

``run_nn(NNConfig(...)) -> NNResult``; see docs/nn.md.
"""

from psfed_robust.nn.config import SELECTORS, NNConfig
from psfed_robust.nn.data import TASKS, ImageTask, load_task
from psfed_robust.nn.engine import NNResult, evaluate, run_nn, run_seed
from psfed_robust.nn.fused import FusedModel
from psfed_robust.nn.models import MODELS, build_model
from psfed_robust.nn.train import FunctionalModel

__all__ = [
    "MODELS",
    "SELECTORS",
    "TASKS",
    "FunctionalModel",
    "FusedModel",
    "ImageTask",
    "NNConfig",
    "NNResult",
    "build_model",
    "evaluate",
    "load_task",
    "run_nn",
    "run_seed",
]

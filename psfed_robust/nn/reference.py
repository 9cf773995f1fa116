"""A plain per-client torch loop of the same PSO-Fed round: the batched engine's oracle.

One ``nn.Module`` per client, ``torch.optim.SGD`` stepping over ``order[s:s+batch]`` batches,
the downlink merge and PSO-Fed's mean step written with plain indexing — no round core, no
``torch.func``. Covers what a direct check needs (no attack, ``mean`` in fill mode, every client
every round, coordinated selectors, local epochs); seeds, split, initial models, masks and batch
order are drawn exactly as :func:`psfed_robust.nn.run_nn` draws them. Used by the tests
(same parameters within float tolerance) and by ``benchmarks/nn_engine.py`` (the speed baseline).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from psfed_robust.core.flatten import FlattenedModel
from psfed_robust.core.seeding import stable_seed
from psfed_robust.nn.config import NNConfig
from psfed_robust.nn.data import ImageTask, load_task, split
from psfed_robust.nn.engine import evaluate, make_selector, run_seed
from psfed_robust.nn.models import build_model
from psfed_robust.nn.train import FunctionalModel

__all__ = ["reference_loop"]


def reference_loop(config: NNConfig, *, task: ImageTask | None = None
                   ) -> tuple[Tensor, np.ndarray]:
    """``(final global models [runs, P], test accuracy per round [runs, rounds])``."""
    cfg = config
    if cfg.attack != "none" and cfg.malicious > 0:
        raise ValueError("reference_loop runs without attacks")
    if cfg.defense != "mean" or cfg.mode != "fill" or cfg.num_participants != cfg.clients:
        raise ValueError("reference_loop covers mean in fill mode with every client")
    if cfg.local_steps or cfg.selector in ("round_robin_per_client", "client_specific"):
        raise ValueError("reference_loop covers local epochs and coordinated selectors")
    data = task if task is not None else load_task(cfg.task, cfg.data_dir, seed=cfg.seed)
    K = cfg.clients
    finals, accs = [], []
    for r in range(cfg.runs):
        rs = run_seed(cfg.seed, r)
        parts = split(data.y_train, K, cfg.partition, cfg.dirichlet_alpha, rs)
        init = build_model(cfg.model, data.input_shape, data.num_classes, hidden=cfg.hidden,
                           seed=stable_seed("experiments.flower.model", rs))
        g = FlattenedModel(init).flatten()
        P = g.numel()
        models = [build_model(cfg.model, data.input_shape, data.num_classes, hidden=cfg.hidden,
                              seed=stable_seed("experiments.flower.model", rs))
                  for _ in range(K)]
        flats = [FlattenedModel(m) for m in models]
        opts = [torch.optim.SGD(m.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay) for m in models]
        sel = make_selector(cfg.selector, cfg.fraction,
                            stable_seed("experiments.flower.masks", rs) % (1 << 31))
        fm = FunctionalModel(init)
        curve = []
        for n in range(1, cfg.rounds + 1):
            ctx = {"flat_model": FlattenedModel(init) if cfg.selector == "structured"
                   else g.numpy()} if sel.required_context else {}
            idx = torch.from_numpy(sel.select(P, n, **ctx).indices)
            lr = cfg.lr_at(n)
            locals_after = []
            for k in range(K):
                w = flats[k].flatten()
                w[idx] = g[idx]  # downlink merge: shared entries overwrite the local model
                flats[k].unflatten(w)
                if cfg.momentum_scope == "round":
                    opts[k] = torch.optim.SGD(models[k].parameters(), lr=lr,
                                              momentum=cfg.momentum,
                                              weight_decay=cfg.weight_decay)
                for group in opts[k].param_groups:
                    group["lr"] = lr
                ids = torch.from_numpy(parts[k])
                x, y = data.x_train[ids], data.y_train[ids]
                gen = torch.Generator().manual_seed(
                    stable_seed("experiments.flower.batches", rs, k, n))
                for _ in range(cfg.local_epochs):
                    order = torch.randperm(len(y), generator=gen) if cfg.shuffle \
                        else torch.arange(len(y))
                    for s in range(0, len(y), cfg.batch_size):
                        b = order[s : s + cfg.batch_size]
                        opts[k].zero_grad()
                        nn.functional.cross_entropy(models[k](x[b]), y[b]).backward()
                        opts[k].step()
                locals_after.append(flats[k].flatten())
            # PSO-Fed's mean step on the shared entries (weights 1/K)
            g = g.clone()
            g[idx] = torch.stack([w[idx] for w in locals_after]).mean(0)
            _, acc, _ = evaluate(fm, g.unsqueeze(0), data.x_test, data.y_test, data.num_classes)
            curve.append(float(acc[0]))
        finals.append(g)
        accs.append(curve)
    return torch.stack(finals), np.asarray(accs)

"""Client side of psfed: :class:`PSFedClient` and the ClientApp builder.

A ClientApp is rebuilt for every message (a fresh process per message in deployment), so the
client's **full local model lives in** ``context.state`` as one flat ArrayRecord
(``state["psfed.local"]["theta"]``, the model's dtype) and is restored on every message.

``train.psfed``: restore the local model (or, on first contact, take the dense global the server
sends) → merge the received global values on the downlink mask → ``train_local`` → apply the
client-side attack seam (malicious clients only) → derive the uplink mask (the downlink mask by
default) → store the local model → reply with the wire-encoded values on the uplink mask.

``evaluate.psfed`` evaluates, **in a copy**, the local model with the global values of the
evaluation mask merged in (``"merged"``, default), the pure local model (``"local"``) or the dense
global model (``"global"``); the stored local model is never changed by evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from psfed_robust.core.flatten import FlattenedModel
from psfed_robust.core.mask import Mask, count_for_fraction
from psfed_robust.core.round import attack_step, local_deltas, merge_
from psfed_robust.core.seeding import torch_generator
from psfed_robust.flower import _attack, _wire
from psfed_robust.flower._arrays import (
    array_from_numpy,
    array_from_parts,
    array_view,
    as_tensor,
)
from psfed_robust.flower._attack import AttackSpec, resolve_attack_spec
from psfed_robust.flower._masks import aligned, gather, index_tensor
from psfed_robust.flower.protocol import (
    CFG_EVAL_MODEL,
    CFG_MODEL_SIZE,
    CFG_SEND_SCORES,
    CFG_SERVER_ROUND,
    KEY_ATTACK,
    KEY_CONFIG,
    KEY_DOWN,
    KEY_INIT,
    META_CLIENT_ID,
    MSG_EVALUATE,
    MSG_QUERY,
    MSG_TRAIN,
    PAYLOAD,
    STATE_LOCAL,
    STATE_META,
    STATE_THETA,
    read_uplink_switches,
)
from psfed_robust.flower.validation import ClientId, evaluate_reply, query_reply, train_reply

__all__ = [
    "AttackSpec",
    "ConfigDict",
    "FunctionClient",
    "PSFedClient",
    "make_client_app",
    "register_psfed_handlers",
    "resolve_attack_spec",
    "resolve_client_id",
]

ConfigDict = dict[str, Any]
#: ``evaluate_fn(model, config, context) -> (loss, num_examples, metrics)``
EvaluateFn = Callable[[nn.Module, ConfigDict, Context], tuple[float, int, Mapping[str, float]]]


def resolve_client_id(context: Context) -> ClientId:
    """The client's stable id: ``node_config["client-id"]``, else ``node_config["partition-id"]``.

    Never the random ``context.node_id``. Deployment: start each SuperNode with
    ``--node-config "partition-id=3"`` (or ``client-id=...``).
    """
    nc = context.node_config
    for key in ("client-id", "partition-id"):
        if key in nc:
            v = nc[key]
            if isinstance(v, bool) or not isinstance(v, int | str):
                raise ValueError(f"node_config[{key!r}] must be an int or str, got {v!r}")
            if isinstance(v, str) and v.strip().isdigit():
                return int(v)
            return v
    raise ValueError(
        "psfed needs a stable client id: set node_config 'partition-id' (simulation sets it) or "
        "'client-id' (deployment: flower-supernode --node-config \"partition-id=0\")"
    )


def _payload(content: RecordDict, key: str) -> memoryview:
    """The ``payload`` bytes of ArrayRecord ``content[key]``, zero-copy (ValueError if bad)."""
    rec = content[key]
    if not isinstance(rec, ArrayRecord) or PAYLOAD not in rec:
        raise ValueError(f"record {key!r} is not an ArrayRecord with a {PAYLOAD!r} array")
    return _wire.payload_view(rec[PAYLOAD])


def _config(content: RecordDict, key: str) -> ConfigRecord | None:
    rec = content[key] if key in content else None
    return rec if isinstance(rec, ConfigRecord) else None


class PSFedClient:
    """Base client: subclass and implement :meth:`train_local` (and :meth:`evaluate_local`).

    Both operate on ``self.model`` in place; the library handles restoring and storing the local
    model, merging shared values, masks, attacks and the wire. During a call, ``self.context``
    is the Flower Context, ``self.client_id`` the stable id, ``self.current_mask`` the downlink
    mask, ``self.server_round`` the round and ``self.attack`` the attack this client runs (or
    None). ``self.train_metrics`` may be filled by ``train_local`` (finite floats) and is sent to
    the server with the update.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        include_buffers: bool = False,
        trainable_only: bool = False,
    ) -> None:
        self.model = model
        self.flat_model = FlattenedModel(
            model, include_buffers=include_buffers, trainable_only=trainable_only
        )
        self.current_mask: Mask | None = None
        self.context: Context | None = None
        self.client_id: ClientId | None = None
        self.server_round: int = 0
        self.attack: Any = None
        self.attack_persistent = False
        self.attack_generator: torch.Generator | None = None
        self.train_metrics: dict[str, float] = {}
        self.reference: npt.NDArray[Any] | None = None

    # ------------------------------------------------------------------ user hooks
    @property
    def num_parameters(self) -> int:
        return self.flat_model.num_parameters

    def train_local(self, config: ConfigDict) -> int:
        """Train ``self.model`` in place; return the number of training examples (> 0)."""
        raise NotImplementedError(f"{type(self).__name__} must implement train_local(config)")

    def evaluate_local(self, config: ConfigDict) -> tuple[float, int, dict[str, float]]:
        """Evaluate ``self.model``: ``(loss, num_examples, metrics)``; default: nothing."""
        return 0.0, 0, {}

    def compute_scores(self, config: ConfigDict) -> npt.NDArray[Any]:
        """Per-coordinate scores for the gradient-based selector (length D).

        Default: ``|grad|`` left in the parameters by the last backward of ``train_local``;
        coordinates without a gradient fall back to ``|local_after − reference|``.
        """
        flat = self.flat_model.flatten_numpy()
        ref = self.reference if self.reference is not None else flat
        out = np.abs(np.asarray(flat, dtype=np.float64) - np.asarray(ref, dtype=np.float64))
        for info, p in zip(self.flat_model.tensor_infos, self.flat_model._tensors, strict=True):
            g = getattr(p, "grad", None)
            if g is not None:
                out[info.start : info.end] = g.detach().abs().double().reshape(-1).cpu().numpy()
        return out

    def poison_labels(self, y: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Apply a data attack (``kind == "data"``, e.g. label flipping) to labels, if any."""
        atk = self.attack
        if atk is None or getattr(atk, "kind", "model") != "data":
            return y
        gen = self.attack_generator or torch.Generator().manual_seed(0)
        out: torch.Tensor = atk.poison_labels(y, num_classes, gen)
        return out

    # ------------------------------------------------------------------ state
    def _stored(self, context: Context, size: int) -> Array | None:
        """The stored local model's Array (shape checked, data not read), or None."""
        rec = context.state.get(STATE_LOCAL) if STATE_LOCAL in context.state else None
        if not isinstance(rec, ArrayRecord) or STATE_THETA not in rec:
            return None
        arr = rec[STATE_THETA]
        if tuple(arr.shape) != (size,):
            raise ValueError(
                f"stored local model has shape {tuple(arr.shape)}, model size is {size}"
            )
        return arr

    def _restore(self, context: Context, size: int) -> npt.NDArray[Any] | None:
        """A writable copy of the stored local model (one copy), or None."""
        arr = self._stored(context, size)
        if arr is None:
            return None
        theta = array_view(arr)
        if theta.shape != (size,):
            raise ValueError(f"stored local model has shape {theta.shape}, model size is {size}")
        return np.array(theta, copy=True)

    def _snapshot(self, dtype: np.dtype[Any]) -> Array | None:
        """The model's flat vector as an npy Array, copied once from the parameters.

        None when a tensor is not a contiguous CPU tensor of ``dtype`` (then flatten instead).
        """
        views: list[Any] = []
        with torch.no_grad():
            for t in self.flat_model._tensors:
                if t.device.type != "cpu" or not t.is_contiguous() or t.dtype == torch.bfloat16:
                    return None
                a = t.detach().numpy()
                if a.dtype != dtype:
                    return None
                views.append(memoryview(a.reshape(-1)).cast("B"))  # type: ignore[arg-type]
        return array_from_parts(dtype, (self.num_parameters,), views)

    def _store(
        self, context: Context, theta: npt.NDArray[Any] | Array, server_round: int
    ) -> None:
        arr = theta if isinstance(theta, Array) else array_from_numpy(np.ascontiguousarray(theta))
        context.state[STATE_LOCAL] = ArrayRecord({STATE_THETA: arr})
        meta = context.state.get(STATE_META) if STATE_META in context.state else None
        trained = 0
        if isinstance(meta, ConfigRecord):
            t = meta.get("rounds-trained", 0)
            trained = t if isinstance(t, int) else 0
        context.state[STATE_META] = ConfigRecord(
            {"rounds-trained": trained + 1, "last-round": int(server_round)}
        )
        if self.client_id is not None:
            meta_rec = context.state[STATE_META]
            assert isinstance(meta_rec, ConfigRecord)
            meta_rec[META_CLIENT_ID] = self.client_id

    def _local_dtype(self) -> np.dtype[Any]:
        dt = self.flat_model.dtype
        if dt == torch.bfloat16:  # numpy has no bfloat16: flatten_numpy widens it
            return np.dtype(np.float32)
        return np.dtype(torch.empty(0, dtype=dt).numpy().dtype)

    def _decode_down(self, content: RecordDict, size: int) -> tuple[Mask, npt.NDArray[Any]] | None:
        if KEY_DOWN not in content:
            return None
        mask, values = _wire.decode(_payload(content, KEY_DOWN), size, copy=False)
        if mask.size != size or values.shape != (mask.count,):
            raise ValueError(f"downlink payload: mask size {mask.size}, {values.shape} values")
        return mask, values

    def _begin(
        self, msg: Message, context: Context, *, dense_overwrites: bool = True
    ) -> tuple[ConfigDict, int, npt.NDArray[Any] | None, bool, Mask | None,
               npt.NDArray[Any] | None]:
        """Parse a train/evaluate message: ``(config, size, local, fresh, mask, values)``.

        ``local`` is the writable local model the round starts from (the stored one, the
        first-contact ``psfed.init`` model or the client's own initial model). When the
        downlink mask is full and ``dense_overwrites`` (the caller overwrites every coordinate
        with ``values``), the stored model is not read at all and ``local`` is None. ``values``
        are read-only views of the message payload.
        """
        self.context = context
        self.client_id = resolve_client_id(context)
        crec = _config(msg.content, KEY_CONFIG)
        cfg: ConfigDict = dict(crec.items()) if crec is not None else {}
        size = int(cfg.get(CFG_MODEL_SIZE, self.num_parameters))
        if size != self.num_parameters:
            raise ValueError(
                f"server model has {size} parameters, the client model {self.num_parameters} "
                "(build the initial ArrayRecord with psfed_robust.flower.arrays_from_model)"
            )
        self.server_round = int(cfg.get(CFG_SERVER_ROUND, 0))
        down = self._decode_down(msg.content, size)
        mask = values = None
        if down is not None:
            mask, values = down
        skip_local = dense_overwrites and mask is not None and mask.count == size
        local: npt.NDArray[Any] | None = None
        if KEY_INIT in msg.content:  # first contact / re-sync: the dense global model
            init_mask, init_values = _wire.decode(_payload(msg.content, KEY_INIT), size,
                                                  copy=False)
            if init_mask.count != size or init_values.shape != (size,):
                raise ValueError("init payload is not a dense model of the right size")
            if not skip_local:
                local = init_values.astype(self._local_dtype(), copy=True)
            fresh = False
        elif skip_local:
            fresh = self._stored(context, size) is None
        else:
            local = self._restore(context, size)
            fresh = local is None
            if local is None:
                local = self.flat_model.flatten_numpy()
        return cfg, size, local, fresh, mask, values

    # ------------------------------------------------------------------ handlers
    def handle_train(self, msg: Message, context: Context) -> Message:
        """Run one ``train.psfed`` round (see the module docstring)."""
        cfg, size, local, fresh, mask, values = self._begin(msg, context)
        if mask is None or values is None:
            raise ValueError("train message without a downlink payload")
        dtype = self._local_dtype()
        if local is None:  # dense downlink: the global overwrites everything (no copy at all)
            local = values.astype(dtype, copy=False)
        else:
            dtype = local.dtype
            _merge(local, mask, values)
            local.setflags(write=False)
        # the merged model the round starts from (read-only; nothing writes to it below)
        reference = local
        self.reference = reference
        self.current_mask = mask
        self.flat_model.unflatten(as_tensor(local))

        spec = resolve_attack_spec(
            context, self.client_id if self.client_id is not None else 0,
            _config(msg.content, KEY_ATTACK),
        )
        if spec is not None:
            self.attack = _attack.build_attack(spec.name, spec.params)
            self.attack_persistent = spec.persistent
            self.attack_generator = torch_generator(
                "flower.client-attack", spec.seed, str(self.client_id), self.server_round
            )
        self.train_metrics = {}
        user_cfg = {k: v for k, v in cfg.items() if not k.startswith("psfed-")}
        n = self.train_local(user_cfg)
        # the trained local model: copied once, straight from the parameters into the npy bytes
        # of the state record; ``after`` is a read-only view of them
        after_arr = self._snapshot(dtype)
        if after_arr is not None:
            after = array_view(after_arr)
        else:
            after = self.flat_model.flatten_numpy().astype(dtype, copy=False)

        # uplink mask
        uplink, encoding, fraction = read_uplink_switches(cfg)
        if uplink == "client":
            frac = mask.fraction if fraction is None else fraction
            k_up = count_for_fraction(size, frac)
            score = np.abs(after.astype(np.float64) - reference.astype(np.float64))
            data = np.zeros(size, dtype=bool)
            if k_up >= size:
                data[:] = True
            elif k_up > 0:
                data[np.argpartition(-score, k_up - 1)[:k_up]] = True
            up_mask = Mask(data)
        else:
            up_mask = mask

        sent = after
        new_local = after
        if self.attack is not None and getattr(self.attack, "kind", "model") == "model":
            sent, new_local = self._apply_attack(after, reference, up_mask, context)

        scores = None
        if bool(cfg.get(CFG_SEND_SCORES, False)):
            scores = np.asarray(self.compute_scores(user_cfg), dtype=np.float32).reshape(-1)
            if scores.shape != (size,):
                raise ValueError(
                    f"compute_scores returned shape {scores.shape}, expected ({size},)"
                )

        self._store(
            context, after_arr if after_arr is not None and new_local is after else new_local,
            self.server_round,
        )
        up_values = gather(sent, up_mask)
        payload = _wire.encode_array(
            up_mask, np.ascontiguousarray(up_values),
            encoding,
        )
        return train_reply(
            msg, payload, client_id=self._id_for_record(), num_examples=int(n), fresh=fresh,
            metrics=self.train_metrics,
            scores=array_from_numpy(scores) if scores is not None else None,
        )

    def _apply_attack(
        self, after: npt.NDArray[Any], reference: npt.NDArray[Any], up_mask: Mask,
        context: Context,
    ) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        """The round core's attack seam on this client's delta (vs. the merged reference).

        The attack's run state is an explicit dict kept in ``context.state`` between rounds.
        """
        ref_t = as_tensor(reference)
        honest = local_deltas(as_tensor(after), ref_t).unsqueeze(0)
        assert self.attack_generator is not None
        state = _attack.load_state(context.state)
        ctx = _attack.attack_context(
            state, {},
            round=self.server_round,
            generator=self.attack_generator,
            reference=ref_t,
            masks=up_mask.to_torch().unsqueeze(0),
            malicious=torch.ones(1, dtype=torch.bool),
            participants=None,
        )
        attacked, changed = attack_step(self.attack, honest, ctx,
                                        persistent=self.attack_persistent)
        _attack.store_state(context.state, state)
        sent = (ref_t + attacked[0]).numpy()
        new_local = sent if changed is not None and bool(changed[0]) else after
        return sent, new_local

    def _id_for_record(self) -> int | str:
        cid = self.client_id
        return cid if isinstance(cid, int | str) else str(cid)

    def handle_evaluate(self, msg: Message, context: Context) -> Message:
        """Evaluate in a copy (the stored local model is never modified)."""
        crec = _config(msg.content, KEY_CONFIG)
        model_kind = str(crec.get(CFG_EVAL_MODEL, "merged")) if crec is not None else "merged"
        cfg, _size, local, _fresh, mask, values = self._begin(
            msg, context, dense_overwrites=model_kind != "local"
        )
        if local is None:  # full mask: the global values are the whole model
            assert values is not None
            theta = values.astype(self._local_dtype(), copy=False)
        else:
            theta = local  # already a private copy: the stored state is never written
            if mask is not None and values is not None and model_kind != "local":
                _merge(theta, mask, values)
        self.current_mask = mask
        self.flat_model.unflatten(as_tensor(theta))
        user_cfg = {k: v for k, v in cfg.items() if not k.startswith("psfed-")}
        loss, n, extra = self.evaluate_local(user_cfg)
        return evaluate_reply(msg, client_id=self._id_for_record(), loss=float(loss),
                              num_examples=int(n), metrics=extra)

    def handle_query(self, msg: Message, context: Context) -> Message:
        """Identity query: ``{"client-id", "has-local"}``."""
        self.context = context
        self.client_id = resolve_client_id(context)
        return query_reply(msg, client_id=self._id_for_record(),
                           has_local=STATE_LOCAL in context.state)


def _merge(local: npt.NDArray[Any], mask: Mask, values: npt.NDArray[Any]) -> None:
    """The round core's downlink merge on a numpy local model (``local`` is written)."""
    if mask.count:
        merge_(torch.from_numpy(local), index_tensor(mask), as_tensor(aligned(values)))


class FunctionClient(PSFedClient):
    """A PSFedClient from plain functions ``train_fn(model, config, context) -> num_examples``
    and ``evaluate_fn(model, config, context) -> (loss, num_examples, metrics)``."""

    def __init__(
        self,
        model: nn.Module,
        train_fn: Callable[[nn.Module, ConfigDict, Context], int],
        evaluate_fn: EvaluateFn | None = None,
        **flat_kwargs: Any,
    ) -> None:
        super().__init__(model, **flat_kwargs)
        self._train_fn = train_fn
        self._evaluate_fn = evaluate_fn

    def train_local(self, config: ConfigDict) -> int:
        assert self.context is not None
        return int(self._train_fn(self.model, config, self.context))

    def evaluate_local(self, config: ConfigDict) -> tuple[float, int, dict[str, float]]:
        if self._evaluate_fn is None:
            return 0.0, 0, {}
        assert self.context is not None
        loss, n, metrics = self._evaluate_fn(self.model, config, self.context)
        return float(loss), int(n), dict(metrics)


ClientFn = Callable[[Context], PSFedClient]


def register_psfed_handlers(app: ClientApp, client_fn: ClientFn) -> ClientApp:
    """Register the ``train.psfed``/``evaluate.psfed``/``query.psfed`` handlers on ``app``."""
    action = MSG_TRAIN.split(".")[1]

    @app.train(action)
    def _train(msg: Message, context: Context) -> Message:
        return client_fn(context).handle_train(msg, context)

    @app.evaluate(action)
    def _evaluate(msg: Message, context: Context) -> Message:
        return client_fn(context).handle_evaluate(msg, context)

    @app.query(action)
    def _query(msg: Message, context: Context) -> Message:
        return client_fn(context).handle_query(msg, context)

    assert MSG_EVALUATE.endswith(action) and MSG_QUERY.endswith(action)
    return app


def make_client_app(
    client_fn: ClientFn | None = None,
    *,
    model_fn: Callable[[Context], nn.Module] | None = None,
    train_fn: Callable[[nn.Module, ConfigDict, Context], int] | None = None,
    evaluate_fn: EvaluateFn | None = None,
    mods: Sequence[Any] | None = None,
    include_buffers: bool = False,
) -> ClientApp:
    """A ready ClientApp speaking the psfed protocol.

    Either ``client_fn(context) -> PSFedClient`` (a subclass with ``train_local``), or
    ``model_fn(context) -> nn.Module`` plus ``train_fn(model, config, context) -> num_examples``
    (and optionally ``evaluate_fn(model, config, context) -> (loss, num_examples, metrics)``).
    The client object is built anew for every message; its local model lives in context.state.
    """
    if client_fn is None:
        if model_fn is None or train_fn is None:
            raise ValueError("make_client_app needs client_fn=, or model_fn= and train_fn=")
        mf, tf, ef = model_fn, train_fn, evaluate_fn

        def client_fn(context: Context) -> PSFedClient:
            return FunctionClient(mf(context), tf, ef, include_buffers=include_buffers)

    elif model_fn is not None or train_fn is not None:
        raise ValueError("pass either client_fn= or model_fn=/train_fn=, not both")
    app = ClientApp(mods=list(mods) if mods else None)
    return register_psfed_handlers(app, client_fn)

"""The training step (forward, backward, accumulation, guarded AdamW update) and gradient checkpointing."""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from .batches import IGNORE


def step_compiled(flag: Optional[bool] = None) -> bool:
    """Whether the training step is compiled: `flag`, or (None) the backend's default.

    On Metal compiling always pays. On the CPU it pays too once batches come in a few padded shapes
    (train_batches' buckets): the fused element-wise kernels beat MLX's scalar CPU loops, and each
    bucket's trace and kernel builds happen once per run (benchmarks/bench_train.py reports them).
    """
    return True if flag is None else bool(flag)


def forward_logits(model, batch: dict) -> mx.array:
    """Teacher-forced logits (B, L, V) of a training batch (audio, or cached encoder memory)."""
    if "memory" in batch:
        memory, valid = batch["memory"], batch["valid"]
    else:
        memory, valid = model.encode(batch["audio"], batch["lengths"])
    return model.decode(batch["tokens"], memory, valid)[0]


def token_cross_entropy(logits: mx.array, labels: mx.array):
    """(sum of the cross entropy over the real label tokens, number of those tokens)."""
    mask = labels != IGNORE
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), mx.where(mask, labels, 0)) * mask
    return ce.sum(), mask.sum()


def default_loss(model, batch: dict):
    """Mean cross entropy over the real label tokens of the batch.

    Returns:
        (loss, number of label tokens), both scalars.
    """
    ce_sum, ntoks = token_cross_entropy(forward_logits(model, batch), batch["labels"])
    return ce_sum / mx.maximum(ntoks, 1), ntoks


def _assign(dst, src):
    """Copy the leaves of tree `src` into the same-shaped containers of `dst`, in place."""
    items = dst.items() if isinstance(dst, dict) else enumerate(dst)
    for k, v in list(items):
        if isinstance(v, (dict, list)):
            _assign(v, src[k])
        else:
            dst[k] = src[k]


class Stepper:
    """The training step: forward, backward, (accumulate), guarded AdamW update.

    Gradients of micro-batches are summed weighted by their token counts, so an accumulated step
    equals one big batch (mean over all its label tokens). With `reduce` (data-parallel training,
    `distributed.World.reduce_step`) the sums of every process are combined before the update, and a
    micro-batch may be None (this process has no rows of it): it adds nothing.
    """

    def __init__(self, model, optimizer, loss: Callable, compile: bool = True, reduce: Optional[Callable] = None):
        self.model, self.optimizer, self.reduce = model, optimizer, reduce
        # The guarded update compares old and new state leaf by leaf: the state must exist up front.
        optimizer.init(model.trainable_parameters())  # keeps any state already there (resume)
        self.loss_and_grad = nn.value_and_grad(model, loss)
        self.state = [model.state, optimizer.state, mx.random.state]
        self.compiled = compile
        wrap = partial(mx.compile, inputs=self.state, outputs=self.state) if compile else (lambda f: f)
        self._first = wrap(partial(self._micro, None))
        self._more = wrap(self._micro)
        self._step = wrap(self._single)
        self._finish = wrap(self._micro_and_apply)
        self._apply_only = wrap(self._apply)

    def _micro(self, acc, batch):
        (loss, ntoks), grads = self.loss_and_grad(self.model, batch)
        w = ntoks.astype(mx.float32)
        grads = tree_map(lambda g: g * w, grads)
        if acc is None:
            return grads, loss * w, w
        return tree_map(mx.add, grads, acc[0]), acc[1] + loss * w, acc[2] + w

    def _apply(self, grads, loss_sum, ntoks):
        grads = tree_map(lambda g: g / ntoks, grads)
        loss = loss_sum / ntoks
        finite = mx.isfinite(loss)
        for g in tree_flatten(grads):
            finite = finite & mx.isfinite(g[1]).all()
        # Update, then keep the old values wherever the step was not finite: nothing moves.
        old_params = self.model.trainable_parameters()
        old_opt = tree_map(lambda x: x, self.optimizer.state)
        self.optimizer.update(self.model, grads)
        keep = lambda new, old: mx.where(finite, new, old)  # noqa: E731
        self.model.update(tree_map(keep, self.model.trainable_parameters(), old_params))
        _assign(self.optimizer.state, tree_map(keep, self.optimizer.state, old_opt))
        return loss, ntoks, finite

    def _single(self, batch):
        return self._apply(*self._micro(None, batch))

    def _micro_and_apply(self, acc, batch):
        return self._apply(*self._micro(acc, batch))

    def _zeros(self):
        zero = mx.array(0.0)
        return tree_map(mx.zeros_like, self.model.trainable_parameters()), zero, zero

    def _reduced(self, batches: list[Optional[dict]]):
        """This process's token-weighted sums, computed, then combined with the other processes'."""
        acc = None
        for b in batches:
            if b is not None:
                acc = self._first(b) if acc is None else self._more(acc, b)
                mx.eval(acc)
        return self.reduce(acc if acc is not None else self._zeros())

    def __call__(self, batches: list[Optional[dict]]):
        """One optimizer step over micro-batches; returns (loss, tokens, finite) evaluated."""
        if self.reduce is not None:
            out = self._apply_only(*self._reduced(batches))
        elif len(batches) == 1:
            out = self._step(batches[0])
        else:
            acc = self._first(batches[0])
            mx.eval(acc)
            for b in batches[1:-1]:
                acc = self._more(acc, b)
                mx.eval(acc)
            out = self._finish(acc, batches[-1])
        mx.eval(self.state, out)
        return out


# -- gradient checkpointing -----------------------------------------------------------------------

_CHECKPOINTED: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    """A subclass of `cls` whose call recomputes its activations in the backward pass (mx.checkpoint)."""
    if cls not in _CHECKPOINTED:
        def __call__(self, x, *args):
            # Arrays (and tuples of arrays, like the cross-attention K/V) must be checkpoint inputs:
            # arrays captured by the closure would be constants and get no gradient.
            leaves, spec = [], []
            for a in args:
                if isinstance(a, mx.array):
                    spec.append((1, None))
                    leaves.append(a)
                elif isinstance(a, (tuple, list)) and a and all(isinstance(e, mx.array) for e in a):
                    spec.append((len(a), type(a)))
                    leaves.extend(a)
                else:
                    spec.append((0, a))

            def inner(params, x, *arrs):
                self.update(params)
                rebuilt, i = [], 0
                for n, kind in spec:
                    if n == 0:
                        rebuilt.append(kind)
                    elif kind is None:
                        rebuilt.append(arrs[i])
                    else:
                        rebuilt.append(kind(arrs[i:i + n]))
                    i += n
                return cls.__call__(self, x, *rebuilt)

            return mx.checkpoint(inner)(self.trainable_parameters(), x, *leaves)

        _CHECKPOINTED[cls] = type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__})
    return _CHECKPOINTED[cls]


def set_grad_checkpoint(model, on: bool) -> None:
    """Turn gradient checkpointing of every encoder/decoder layer on or off (per instance)."""
    for layer in list(model.model.encoder.layers) + list(model.model.decoder.layers):
        base = type(layer).__mro__[1] if type(layer) in _CHECKPOINTED.values() else type(layer)
        layer.__class__ = _checkpointed_class(base) if on else base

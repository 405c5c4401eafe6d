"""Online CMS updates driven by the task loss (D10, Eq. 71): the language model runs segment by segment.

What this is: `run_online`, the forward pass of a model whose CMS has online levels. Segments are aligned to
absolute positions and `S` tokens long (`S` = the gcd of the online chunk sizes, so every level boundary is a
segment end). For each segment: forward every block from the carried state with the CMS weights in force; take
the segment's next-token loss on its observed targets (the pairs inside the segment, summed over tokens); take its
gradient with respect to every online level's fast weights (per sequence: each sequence's loss depends only on
its own weights); add it to each level's accumulator; apply the updates due at the segment end (`CMS.step`).
The logits a caller gets are those of that forward, so an outer loss over them sees every segment with the
weights that were in force for it.

A call may end inside a segment. Its tokens are read at once (their logits need no gradient), and the state
keeps them with the block states at the segment start (`Pending`); the call that completes the segment runs the
whole segment again from there to take its gradient. So one pass == pieces == token by token, and a decoded
token costs one step plus, every `S` tokens, one segment's forward and backward.

Meta-gradients: "first_order" takes the inner gradient without a graph (the outer gradient reaches the initial
weights through the update's identity path, and the learning rates through `-lr * g`); "full" keeps its graph
(exact second order; attention then runs SDPA's math kernel, the only one with a double backward). Inner
gradients need autograd, so learning is unavailable under `torch.inference_mode` (`torch.no_grad` is fine: the
segment is differentiated locally and the results detached).
What it is not: the model (`lm.py`) or the CMS layer (`layers/cms.py`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layers.attention import twice_differentiable
from ..layers.cms import CMS

ForwardLayers = Callable[[Tensor, tuple[Any, ...]], tuple[Tensor, tuple[Any, ...]]]


class Pending(NamedTuple):
    """The current segment's tokens read so far `[B, n]` and every block's state at the segment start."""

    tokens: Tensor
    layers: tuple[Any, ...]


class OnlineCMS(NamedTuple):
    """Which blocks carry online CMS levels (`(block index, CMS)`), the segment length and the meta-gradient mode.

    A block's CMS state is the last entry of its state tuple.
    """

    blocks: Sequence[tuple[int, CMS]]
    segment: int
    full: bool


def run_online(
    forward_layers: ForwardLayers,
    online: OnlineCMS,
    ids: Tensor,
    layers: tuple[Any, ...],
    position: int,
    pending: Pending | None,
    learn: bool,
) -> tuple[Tensor, tuple[Any, ...], Pending | None]:
    """ids `[B, T]` from absolute `position` -> logits `[B, T, V]`, the block states, the pending segment.

    `pending` None inside a segment means that segment is not learned from (a call with `learn=False` read
    part of it); learning resumes at the next segment start.
    """
    S, outs, t, T = online.segment, [], 0, ids.shape[1]
    while t < T:
        n = min(S - position % S, T - t)
        piece = ids[:, t : t + n]
        if position % S == 0:
            pending = Pending(piece[:, :0], layers)
        if not learn or pending is None:
            logits, layers = forward_layers(piece, layers)
            pending = None
        elif (position + n) % S == 0:
            logits, layers = _learn_segment(forward_layers, online, pending, piece, position + n)
            pending = None
        else:
            logits, layers = forward_layers(piece, layers)
            pending = Pending(torch.cat([pending.tokens, piece], dim=1), pending.layers)
        outs.append(logits)
        position, t = position + n, t + n
    return torch.cat(outs, dim=1), layers, pending


def _learn_segment(
    forward_layers: ForwardLayers, online: OnlineCMS, pending: Pending, piece: Tensor, end: int
) -> tuple[Tensor, tuple[Any, ...]]:
    """Forward the whole segment from its start, differentiate its loss, update the levels. -> logits of `piece`."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "online CMS learning needs autograd, which torch.inference_mode disables; use torch.no_grad() instead, "
            "or pass learn=False to read without learning"
        )
    outer = torch.is_grad_enabled()
    tokens = torch.cat([pending.tokens, piece], dim=1)
    full = online.full and outer
    with torch.enable_grad(), twice_differentiable() if full else contextlib.nullcontext():
        start = _require_grad(pending.layers, online, fresh=not outer)
        logits, layers = forward_layers(tokens, start)
        fast = [w for b, cms in online.blocks for w in cms.fast_weights(layers[b][-1])]
        grads = _inner_grads(logits, tokens, fast, create_graph=full, retain_graph=outer)
        layers = list(layers)
        k = 0
        for b, cms in online.blocks:
            m = 3 * len(cms.online_levels)
            layers[b] = (*layers[b][:-1], cms.step(layers[b][-1], grads[k : k + m], end))
            k += m
    layers = tuple(layers)
    if not outer:
        logits, layers = logits.detach(), _detach(layers)
    return logits[:, pending.tokens.shape[1] :], layers


def _inner_grads(
    logits: Tensor, tokens: Tensor, fast: list[Tensor], *, create_graph: bool, retain_graph: bool
) -> list[Tensor]:
    """Gradient of the segment's summed next-token loss (Eq. 71) w.r.t. each fast weight (zeros if unused)."""
    if tokens.shape[1] < 2:  # a one-token segment has no observed target
        return [torch.zeros_like(w) for w in fast]
    pred = logits[:, :-1].flatten(0, 1)
    pred = pred if pred.dtype == torch.float64 else pred.float()
    loss = F.cross_entropy(pred, tokens[:, 1:].flatten(), reduction="sum")
    grads = torch.autograd.grad(
        loss, fast, create_graph=create_graph, retain_graph=retain_graph or create_graph, allow_unused=True
    )
    return [g if g is not None else torch.zeros_like(w) for g, w in zip(grads, fast, strict=True)]


def _require_grad(layers: tuple[Any, ...], online: OnlineCMS, fresh: bool) -> tuple[Any, ...]:
    """The block states with every online fast weight differentiable: a new detached leaf where it was not, or
    everywhere when `fresh` (no outer graph to keep)."""
    layers = list(layers)
    for b, _ in online.blocks:
        if layers[b] is None:  # a fresh block builds its fast weights from the parameters inside its forward
            continue
        levels = tuple(
            None if st is None else st._replace(weights=tuple(_leaf(w, fresh) for w in st.weights))
            for st in layers[b][-1]
        )
        layers[b] = (*layers[b][:-1], levels)
    return tuple(layers)


def _leaf(w: Tensor, fresh: bool) -> Tensor:
    return w if w.requires_grad and not fresh else w.detach().requires_grad_()


def _detach(tree: Any) -> Any:
    if isinstance(tree, Tensor):
        return tree.detach()
    if isinstance(tree, tuple):
        items = [_detach(x) for x in tree]
        return type(tree)(*items) if hasattr(tree, "_fields") else tuple(items)
    return tree

"""Titans LMM (and MAG) against a per-token loop written here from the documented equations.

What this pins: `TitansMemory.forward` (the default chunk form and the `naive` op) equals, in float64 to 1e-10, a
loop that takes only the layer's parameters (q/k/v projection, short-conv taps, gate projections, initial memory,
output norm, gate and projection) and computes, token by token: the causal depthwise convolution of width 4 with
SiLU; L2-normalised q and k, raw v; the per-head gates `eta = sigmoid(x W + b) / C` (C1's step cap), `alpha`,
`beta = sigmoid(x W + b)`; the inner gradient of `1/2 ||M(k) - v||^2` (D3) of the residual MLP memory
`M(x) = x + W1 silu(W2 x)` (D2) by autograd, taken at the chunk-start weights (D5 / Eq. 91; C = 1 is the exact
recurrence), clipped to Frobenius norm 3 over both weights together (C3); momentum and decay
`S = beta S - eta G`, `W = alpha W + S` (Titans Eqs. 13-14, D4 with `dgd=False`; the `dgd=True` switch:
`W = W (alpha I - eta x̂ x̂^T) + S` with each layer's chunk-start input); the inclusive read `o_t = M_t(q_t)` (D5);
and the output `W_o (RMSNorm_head(o) ⊙ silu(x W_g))` (Titans §3.3). Outputs and the final state (conv inputs,
weights, momenta, chunk anchor, offset) are compared, with T not a multiple of C, and the outer gradients of a
loss on outputs and final weights agree with autograd through the loop for a few parameters. MAG (Titans Eqs.
26-28) is pinned the same way with a dense sliding-window softmax attention (RoPE, persistent tokens) written here.

What this does not pin: the fused Triton kernel and the lean path (tests/ops), the MAC hybrid, the memory's
`out_norm` LayerNorm branch, the dot objective, state carried across calls (tests/layers/test_titans.py), and
float32 / bf16 numerics.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from nestlearn.layers.hybrid import MemoryAsGate
from nestlearn.layers.titans import TitansMemory, titans_spec

DT = torch.float64
ATOL = 1e-10
DIM, HEADS, T = 16, 2, 11
CLIP = 3.0  # C3: the Titans memories' inner-gradient clip
NORM_EPS = 1e-6  # MemorySpec.norm_eps: x̂ = x / sqrt(||x||^2 + eps^2) in the DGD projector
RMS_EPS = 1e-6  # RMSNorm's eps (nestlearn/layers/basic.py)


def build(chunk: int, impl: str = "auto", **switches) -> TitansMemory:
    """A float64 layer whose gates vary from token to token and whose step size is away from its initial tenth."""
    torch.manual_seed(0)
    layer = TitansMemory(DIM, HEADS, spec=titans_spec(**switches), chunk_size=chunk, impl=impl).double()
    perturb_gates(layer)
    return layer


@torch.no_grad()
def perturb_gates(layer: TitansMemory) -> None:
    g = torch.Generator().manual_seed(5)
    for gate, bias in ((layer.eta, 0.5), (layer.alpha, 1.5), (layer.beta, 0.0)):
        if gate is not None:
            gate.proj.weight.copy_(0.4 * torch.randn(gate.proj.weight.shape, generator=g, dtype=DT))
            gate.proj.bias.fill_(bias)
    layer.qkv.weight[2 * DIM :].mul_(3.0)  # larger values, so that the clip at 3 acts on some tokens and not others


def silu_conv(h: Tensor, taps: Tensor) -> Tensor:
    """Causal depthwise convolution, zeros before the sequence, then SiLU: `y_t = silu(sum_j w_j h_{t-w+1+j})` (the
    last tap multiplies the current token, PyTorch's `conv1d` order). h `[B, T, C]`, taps `[C, w]`."""
    width, out = taps.shape[1], []
    for t in range(h.shape[1]):
        acc = torch.zeros_like(h[:, 0])
        for j in range(width):
            s = t - width + 1 + j
            if s >= 0:
                acc = acc + taps[:, j] * h[:, s]
        out.append(F.silu(acc))
    return torch.stack(out, dim=1)


def unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def mlp(w1: Tensor, w2: Tensor, x: Tensor) -> Tensor:
    """Eq. 89 per head: `x + W1 silu(W2 x)`, x `[B, H, d]`, W1 `[B, H, d, e]`, W2 `[B, H, e, d]`."""
    return x + (w1 @ F.silu(w2 @ x[..., None]))[..., 0]


def gate(head, x: Tensor) -> Tensor:
    """`sigmoid(x W + b)` per head `[B, T, H]`."""
    return torch.sigmoid(x @ head.proj.weight.T + head.proj.bias)


def gated_output(out, o: Tensor, x: Tensor) -> Tensor:
    """Titans §3.3: `W_o (RMSNorm_head(o) ⊙ silu(x W_g))`, o `[B, T, H, d]`."""
    normed = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + RMS_EPS) * out.norm.weight
    return (normed.flatten(2) * F.silu(x @ out.gate.weight.T)) @ out.out.weight.T


def titans_reference(layer: TitansMemory, x: Tensor) -> dict:
    """The layer's forward, token by token, from its parameters only (see the module docstring)."""
    B, T_, D = x.shape
    H, d, C, spec = layer.heads, D // layer.heads, layer.chunk_size, layer.spec
    h = x @ layer.qkv.weight.T  # [B, T, 3D]
    conv = silu_conv(h, layer.conv.weight)
    q, k, v = (conv[..., i * D : (i + 1) * D].reshape(B, T_, H, d) for i in range(3))
    q, k = unit(q), unit(k)
    eta = gate(layer.eta, x) / C  # C1: the step size capped at 1 / C
    alpha = gate(layer.alpha, x) if spec.decay else torch.ones_like(eta)
    beta = gate(layer.beta, x) if spec.momentum else torch.zeros_like(eta)
    w = [p[None].expand(B, -1, -1, -1) for p in layer.init.weights]  # W1 [B, H, d, e], W2 [B, H, e, d]
    s = [torch.zeros_like(t) for t in w]
    outs, clipped, frozen = [], [], w
    for t in range(T_):
        if t % C == 0:
            frozen = w  # Eq. 91: every gradient of the chunk at its start
        kt, vt = k[:, t], v[:, t]
        loss = 0.5 * (mlp(*frozen, kt) - vt).pow(2).sum()  # D3, summed over independent (batch, head) blocks
        grads = torch.autograd.grad(loss, frozen, create_graph=True)
        norm = torch.sqrt(sum(g.pow(2).sum((-1, -2)) for g in grads))  # ||G_t|| over both weights, per head
        factor = CLIP / torch.clamp(norm, min=CLIP)  # C3
        clipped.append(norm > CLIP)
        inputs = [F.silu((frozen[1] @ kt[..., None])[..., 0]), kt]  # each layer's input at the chunk start
        e, a, b = (g[:, t, :, None, None] for g in (eta, alpha, beta))
        new_w, new_s = [], []
        for wi, si, gi, xi in zip(w, s, grads, inputs, strict=True):
            si = b * si - e * factor[..., None, None] * gi
            if spec.dgd:
                xh = xi / torch.sqrt(xi.pow(2).sum(-1, keepdim=True) + NORM_EPS**2)
                wi = a * wi - e * (wi @ xh[..., None]) * xh[..., None, :] + si
            else:
                wi = a * wi + si
            new_w.append(wi)
            new_s.append(si)
        w, s = new_w, new_s
        outs.append(mlp(*w, q[:, t]))  # D5: inclusive read
    o = torch.stack(outs, dim=1)
    offset = T_ % C
    return {
        "y": gated_output(layer.output, o, x),
        "conv": h[:, T_ - (layer.conv.width - 1) :],
        "weights": w,
        "momenta": s,
        "anchor": frozen if offset else w,
        "offset": offset,
        "clipped": torch.stack(clipped),
    }


def assert_close(got: Tensor, want: Tensor, what: str) -> None:
    err = float((got - want).detach().abs().max())
    assert err <= ATOL, f"{what}: max |difference| {err:.3g}"


CASES = {
    "c1": (1, {}),
    "c3": (3, {}),
    "c4": (4, {}),
    "c4_no_momentum": (4, {"momentum": False}),
    "c4_no_decay": (4, {"decay": False}),
    "c3_dgd": (3, {"dgd": True}),
}


@pytest.mark.parametrize("impl", ["auto", "naive"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_lmm_equals_per_token_loop(case: str, impl: str) -> None:
    chunk, switches = CASES[case]
    layer = build(chunk, impl, **switches)
    x = torch.randn(2, T, DIM, dtype=DT, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        y, st = layer(x)
    ref = titans_reference(layer, x)
    clipped = ref["clipped"]
    assert clipped.any() and not clipped.all(), float(clipped.double().mean())  # the clip is exercised, both ways
    assert_close(y, ref["y"], "output")
    assert_close(st.conv, ref["conv"], "conv state")
    assert st.memory.offset == ref["offset"]
    for field in ("weights", "momenta", "anchor"):
        for i, (a, b) in enumerate(zip(getattr(st.memory, field), ref[field], strict=True)):
            assert_close(a, b, f"{field}[{i}]")


def outer_loss(y: Tensor, weights: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    g = torch.Generator().manual_seed(11)
    loss = (y * torch.randn(y.shape, generator=g, dtype=DT)).sum()
    return loss + sum((w * torch.randn(w.shape, generator=g, dtype=DT)).sum() for w in weights)


@pytest.mark.parametrize("chunk", [1, 3])
def test_outer_gradients_equal_autograd_through_the_loop(chunk: int) -> None:
    """Gradients of a loss on the output and the final weights (through every inner update, the clip included)."""
    layer = build(chunk)
    x = torch.randn(2, T, DIM, dtype=DT, generator=torch.Generator().manual_seed(7))
    params = [layer.init.weights[0], layer.init.weights[1], layer.eta.proj.weight, layer.conv.weight, layer.qkv.weight]
    y, st = layer(x)
    got = torch.autograd.grad(outer_loss(y, st.memory.weights), params)
    ref = titans_reference(layer, x)
    want = torch.autograd.grad(outer_loss(ref["y"], ref["weights"]), params)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert float(b.abs().max()) > 1e-6
        assert_close(a, b, f"gradient of parameter {i}")


# ------------------------------------------------------------------------------------------------------------
# MAG (Titans Eqs. 26-28)


def rope(x: Tensor, base: float = 10000.0) -> Tensor:
    """Half-split RoPE at positions 0..T-1: dims i and i + d/2 rotate by `p base^(-2i/d)`. x `[B, T, H, d]`."""
    d = x.shape[-1]
    freq = base ** (-torch.arange(0, d, 2, dtype=DT) / d)
    angle = torch.arange(x.shape[1], dtype=DT)[:, None] * freq[None, :]
    cos, sin = angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def window_attention(att, x: Tensor, window: int) -> Tensor:
    """Softmax attention: query p sees the persistent tokens (no position) and keys p' with p - window < p' <= p."""
    B, T_, D = x.shape
    H = att.heads
    d = D // H
    q = rope((x @ att.q_proj.weight.T).reshape(B, T_, H, d)).transpose(1, 2)
    k = rope((x @ att.k_proj.weight.T).reshape(B, T_, H, d)).transpose(1, 2)
    v = (x @ att.v_proj.weight.T).reshape(B, T_, H, d).transpose(1, 2)
    k = torch.cat([att.persistent_k[None].expand(B, -1, -1, -1), k], dim=2)
    v = torch.cat([att.persistent_v[None].expand(B, -1, -1, -1), v], dim=2)
    n_p = att.n_persistent
    pos = torch.arange(T_)
    visible = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
    mask = torch.cat([torch.ones(T_, n_p, dtype=torch.bool), visible], dim=1)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~mask, float("-inf"))
    o = torch.softmax(scores, dim=-1) @ v
    return o.transpose(1, 2).reshape(B, T_, D) @ att.o_proj.weight.T


def rms(norm, x: Tensor) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS) * norm.weight


@pytest.mark.parametrize("chunk", [1, 4])
def test_mag_equals_attention_and_loop_combined(chunk: int) -> None:
    """`W_o (RMSNorm(y) ⊙ sigmoid(RMSNorm(m)))` with y the window attention and m the Titans loop (decision 23)."""
    torch.manual_seed(0)
    layer = MemoryAsGate(DIM, HEADS, spec=titans_spec(), chunk_size=chunk, window=5, n_persistent=2, impl="auto")
    layer = layer.double()
    perturb_gates(layer.memory)
    x = torch.randn(2, T, DIM, dtype=DT, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        y, st = layer(x)
    ref = titans_reference(layer.memory, x)
    a = window_attention(layer.attention, x, window=5)
    comb = layer.combine
    want = (rms(comb.norm_y, a) * torch.sigmoid(rms(comb.norm_m, ref["y"]))) @ comb.out.weight.T
    assert_close(y, want, "MAG output")
    for i, (w, r) in enumerate(zip(st.memory.memory.weights, ref["weights"], strict=True)):
        assert_close(w, r, f"memory weights[{i}]")

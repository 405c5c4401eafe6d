"""The paper's forms, one config switch away from the stabilised defaults, each against its equation written out
here in float64: the uncapped eta gate (`eta_cap=False`), Titans §3.3's memory without the inner clip
(`titans_paper_memory=True`) and the CMS chain of Eq. 70 as printed (`cms_chain="paper"`); then every switch that
applies together in a language model (state carried exactly, gradients reach every parameter).
What this is not: the defaults' own tests (test_titans.py, test_self_modifying.py, test_cms.py, tests/golden)."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
import torch.nn.functional as F

from nestlearn.layers import self_modifying
from nestlearn.layers.cms import CMS
from nestlearn.layers.titans import INNER_GRAD_CLIP, TitansMemory
from nestlearn.models import CausalLM, ModelConfig
from nestlearn.models.block import Block, build_mixers
from nestlearn.models.config import fields_for
from nestlearn.ops.memory import memory_naive

TINY = dict(vocab_size=64, d_model=16, n_layers=1, n_heads=2, mlp_hidden=12)
SHAPES = {"hope": dict(mem_chunk=4, proj_chunk=3), "titans_lmm": dict(mem_chunk=4),  # eta's cap: 1 / 4
          "titans_mag": dict(mem_chunk=4, window=6, n_persistent=2),
          "titans_mac": dict(mem_chunk=4, segment=8, n_persistent=2),
          "titans_mal": dict(mem_chunk=4, window=6, n_persistent=2)}  # fmt: skip


def mixer(variant: str, **kw) -> torch.nn.Module:
    """The first sequence mixer of one block of `variant` (float64, seed 0)."""
    torch.manual_seed(0)
    cfg = ModelConfig(variant=variant, **TINY, **SHAPES[variant], **kw)
    return build_mixers(cfg)[0].double()


def titans_memory(m: torch.nn.Module) -> TitansMemory:
    return m if isinstance(m, TitansMemory) else m.memory  # MAG / MAC hold one


def silu_mlp(w1: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`x + W1 silu(W2 x)` for x `[..., d]`, W1 `[..., d, e]`, W2 `[..., e, d]`."""
    return x + (w1 @ F.silu(w2 @ x[..., None]))[..., 0]


# ---------------------------------------------------------------------------------------------
# 1. eta_cap


@pytest.mark.parametrize("variant", ["titans_lmm", "titans_mag", "titans_mac", "titans_mal"])
@pytest.mark.parametrize("cap", [True, False])
def test_titans_eta_with_and_without_cap(variant: str, cap: bool) -> None:
    """eta = sigmoid(x W + b) / C with the cap (C = mem_chunk = 4), sigmoid(x W + b) without; both start at the same
    value: the bias moves so that sigmoid(b_uncapped) = sigmoid(b_capped) / C = 0.1 / C."""
    gate = titans_memory(mixer(variant, eta_cap=cap)).eta
    x = 3 * torch.randn(2, 9, 16, dtype=torch.float64)
    W, b = gate.proj.weight, gate.proj.bias
    literal = torch.sigmoid(x @ W.T + b)
    torch.testing.assert_close(gate(x), literal / 4 if cap else literal, rtol=0, atol=1e-15)
    # the biases are float32 parameters made float64 by .double(): equal to float32 rounding
    torch.testing.assert_close(torch.sigmoid(b), torch.full_like(b, 0.1 if cap else 0.1 / 4), rtol=1e-6, atol=0)
    other = titans_memory(mixer(variant, eta_cap=not cap)).eta
    assert torch.equal(other.proj.weight, W)  # the same initial weights: only the bias moves
    start, other_start = torch.sigmoid(b) * gate.scale, torch.sigmoid(other.proj.bias) * other.scale
    torch.testing.assert_close(start, other_start, rtol=1e-6, atol=0)


def test_uncapped_titans_layer_is_the_recurrence() -> None:
    """The whole layer with eta_cap=False: static q/k/v, gates sigmoid(x W + b) with no 1 / C, the memory op."""
    layer = mixer("titans_lmm", eta_cap=False)
    with torch.no_grad():
        layer.eta.proj.bias.zero_()  # as if trained to eta around 1/2, twice what the cap would allow
    x = 3 * torch.randn(2, 11, 16, dtype=torch.float64)
    y, _ = layer(x)
    h, _ = layer.conv(layer.qkv(x))
    q, k, v = (t.reshape(2, 11, 2, 8) for t in h.chunk(3, dim=-1))
    eta = torch.sigmoid(x @ layer.eta.proj.weight.T + layer.eta.proj.bias)
    assert eta.max() > 1 / 4  # past the cap that eta_cap=True would impose
    alpha, beta = torch.sigmoid(layer.alpha.proj(x)), torch.sigmoid(layer.beta.proj(x))
    o, _ = memory_naive(
        F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, eta, alpha, beta,
        state=layer.init.state(2), spec=layer.spec, chunk_size=4,
    )  # fmt: skip
    torch.testing.assert_close(y, layer.output(o, x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("cap", [True, False])
def test_hope_eta_with_and_without_cap(cap: bool) -> None:
    """Self-modifying Titans: eta = sigmoid(r · M_eta(u) + b) / max(C_mem, C_proj) with the cap (here 1 / 4),
    sigmoid(r · M_eta(u) + b) without, M_eta(u) = u + W1 silu(W2 u) at the chunk-start weights; same start."""
    layer = mixer("hope", eta_cap=cap)
    B, H, d, n = 2, 2, 8, 3  # one C_proj chunk
    u = 3 * torch.randn(B, H, n, d, dtype=torch.float64)
    frozen = layer.proj_init.state(B).weights
    gen = self_modifying._generate(u, frozen, {}, dict(layer.readout), dict(layer.readout_bias), layer.plan)
    i = layer.adaptive.index("eta")
    w1, w2 = (w[None, :, None] for w in layer.proj_init.select(i, H))  # [1, H, 1, ...]
    z = (silu_mlp(w1, w2, u) * layer.readout["eta"][None, :, None]).sum(-1) + layer.readout_bias["eta"][None, :, None]
    literal = torch.sigmoid(z).transpose(1, 2)  # [B, n, H]
    torch.testing.assert_close(gen["eta"], literal / 4 if cap else literal, rtol=0, atol=1e-15)
    start = torch.sigmoid(layer.readout_bias["eta"]) * layer.eta_scale
    torch.testing.assert_close(start, torch.full_like(start, 0.1 / 4), rtol=1e-6, atol=0)  # float32 bias


# ---------------------------------------------------------------------------------------------
# 2. titans_paper_memory


def layer_norm(a: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine parameters, eps 1e-5 (torch's default)."""
    return (a - a.mean(-1, keepdim=True)) / torch.sqrt(a.var(-1, unbiased=False, keepdim=True) + 1e-5)


def titans_paper_m(w1: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Titans §3.3: `M(x) = x + LN(W1 silu(W2 x))` for one vector x `[d]`."""
    return x + layer_norm(w1 @ F.silu(w2 @ x))


@pytest.mark.parametrize("variant", ["titans_lmm", "titans_mal"])
def test_titans_paper_memory_is_the_literal_update(variant: str) -> None:
    """One token from the initial state, per sequence and head, written from Titans (Eqs. 13-14, §3.3):
    l = 1/2 ||M_0(k) - v||^2 (the 1/2 is nestlearn's, D3), S_1 = -eta grad l (S_0 = 0), M_1 = alpha M_0 + S_1,
    o = M_1(q), with no clip: the gradient's norm is above the default clip of 3, so a clip would change it."""
    layer = mixer(variant, titans_paper_memory=True)
    assert layer.spec.out_norm and layer.spec.max_grad_norm is None
    x = 4 * torch.randn(2, 1, 16, dtype=torch.float64)
    y, st = layer(x)
    h, _ = layer.conv(layer.qkv(x))
    q, k, v = (t.reshape(2, 2, 8) for t in h.chunk(3, dim=-1))  # [B, H, d] of the one token
    q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    eta = torch.sigmoid(x[:, 0] @ layer.eta.proj.weight.T + layer.eta.proj.bias) / 4  # [B, H]
    alpha = torch.sigmoid(x[:, 0] @ layer.alpha.proj.weight.T + layer.alpha.proj.bias)
    w1_0, w2_0 = layer.init.weights
    outs, norms = torch.zeros(2, 2, 8, dtype=torch.float64), []
    for b in range(2):
        for hd in range(2):
            w1, w2 = w1_0[hd].detach().requires_grad_(), w2_0[hd].detach().requires_grad_()
            loss = 0.5 * (titans_paper_m(w1, w2, k[b, hd]) - v[b, hd]).pow(2).sum()
            g1, g2 = torch.autograd.grad(loss, (w1, w2))
            norms.append(math.sqrt(g1.pow(2).sum() + g2.pow(2).sum()))
            s1, s2 = -eta[b, hd] * g1, -eta[b, hd] * g2
            m1, m2 = alpha[b, hd] * w1_0[hd] + s1, alpha[b, hd] * w2_0[hd] + s2
            outs[b, hd] = titans_paper_m(m1, m2, q[b, hd])
            for got, want in ((st.memory.weights, (m1, m2)), (st.memory.momenta, (s1, s2))):
                for a, w in zip(got, want, strict=True):
                    torch.testing.assert_close(a[b, hd], w, rtol=0, atol=1e-12)
    assert min(norms) > INNER_GRAD_CLIP, norms
    torch.testing.assert_close(y, layer.output(outs[:, None], x), rtol=0, atol=1e-12)


def test_titans_paper_memory_refuses_a_clip() -> None:
    cfg = ModelConfig(variant="titans_mac", titans_paper_memory=True)
    assert cfg.inner_grad_clip is None  # the default clip is dropped: the config says what the model computes
    assert ModelConfig(variant="titans_mag", titans_paper_memory=True, inner_grad_clip=None).inner_grad_clip is None
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="titans_paper_memory=True is Titans' memory without an inner-gradient clip"):
        ModelConfig(variant="titans_lmm", titans_paper_memory=True, inner_grad_clip=1.0)
    with pytest.raises(ValueError, match="set memory_kind='mlp'"):
        ModelConfig(variant="titans_lmm", titans_paper_memory=True, memory_kind="linear")
    with pytest.raises(ValueError, match="titans_paper_memory = True does not apply to variant 'hope'"):
        ModelConfig(variant="hope", titans_paper_memory=True)


# ---------------------------------------------------------------------------------------------
# 3. cms_chain


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ gate.mT) * (x @ up.mT)) @ down.mT


@pytest.mark.parametrize("variant", ["chain", "nested"])
def test_paper_chain_is_the_literal_composition(variant: str) -> None:
    """Eq. 70 as printed: y = MLP_3(MLP_2(MLP_1(x))), no residual between levels and no level norm."""
    torch.manual_seed(0)
    cms = CMS(6, 5, (None, 4, 2), variant=variant, lr=(0.0, 0.5, 0.25), chain="paper").double()
    x = torch.randn(2, 7, 6, dtype=torch.float64)
    state = cms.init_state(2)
    state = cms.step(state, [torch.randn_like(w) for w in cms.fast_weights(state)], end=4)  # fast weights moved
    static = tuple(m.weight[None] for m in (cms.levels[0].gate, cms.levels[0].up, cms.levels[0].down))
    w1, w2, w3 = static, state.levels[1].weights, state.levels[2].weights
    torch.testing.assert_close(cms(x, state), swiglu(swiglu(swiglu(x, *w1), *w2), *w3), rtol=0, atol=1e-12)


def test_the_block_adds_the_paper_chain_to_its_residual() -> None:
    """Hope-Attention block with cms_chain='paper': x1 = x + Attn(norm x), out = x1 + MLP_2(MLP_1(norm x1))."""
    torch.manual_seed(0)
    cfg = ModelConfig(variant="hope_attention", **TINY, cms_levels=(None, None), cms_lr=0.0, cms_chain="paper")
    block = Block(cfg, 0).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    out, _ = block(x, None)
    a, _ = block.mixers[0](block.norms[0](x), block.mixers[0].init_state(2))
    x1 = x + a
    mlp1, mlp2 = block.mlp.levels
    torch.testing.assert_close(out, x1 + mlp2(mlp1(block.mlp_norm(x1))), rtol=0, atol=1e-12)


def test_paper_chain_of_one_level_and_refusals() -> None:
    torch.manual_seed(0)
    cms = CMS(6, 5, (None,), lr=(0.0,), chain="paper").double()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(cms(x, cms.init_state(2)), cms.levels[0](x), rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="cms_chain='paper' composes the levels"):
        ModelConfig(variant="hope", cms_variant="independent", cms_chain="paper")
    with pytest.raises(ValueError, match="chain form 'paper' composes the levels"):
        CMS(6, 5, (None, 4), variant="independent", lr=(0.0, 0.1), chain="paper")
    with pytest.raises(ValueError, match="CMS chain must be 'residual' or 'paper'"):
        CMS(6, 5, (None,), lr=(0.0,), chain="sum")


def test_paper_forms_change_the_fingerprint_only_when_set() -> None:
    """Saved states keep loading: the new fields at their defaults leave the fingerprint as before they existed."""
    cfg = ModelConfig(variant="hope")
    later = ("impl", "activation_checkpointing", "eta_cap", "titans_paper_memory", "cms_chain", "memory_save_every",
             "compile_projection", "compile_projection_budget")  # fmt: skip
    d = {k: v for k, v in cfg.to_dict().items() if k not in later}
    assert cfg.fingerprint() == hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
    assert ModelConfig(variant="hope", eta_cap=False).fingerprint() != cfg.fingerprint()
    assert ModelConfig(variant="hope", cms_chain="paper").fingerprint() != cfg.fingerprint()


# ---------------------------------------------------------------------------------------------
# all switches in a model


@pytest.mark.parametrize("variant", ["hope", "hope_attention", "titans_lmm", "titans_mac", "titans_mag", "titans_mal"])
def test_models_with_every_paper_switch_carry_state_and_train(variant: str) -> None:
    """Every switch that applies, in a language model with online CMS levels: one pass == pieces (D12), and the
    loss reaches every parameter."""
    switches = fields_for(variant, dict(eta_cap=False, titans_paper_memory=True, cms_chain="paper"))
    shape = {**SHAPES.get(variant, {}), **({"cms_levels": (None, 4), "cms_lr": 1e-2} if "hope" in variant else {})}
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(variant=variant, **{**TINY, "n_layers": 2}, **shape, **switches)).double()
    ids = torch.randint(0, 64, (2, 11))
    with torch.no_grad():
        logits, _ = model(ids)
        outs, st = [], None
        for lo, hi in ((0, 3), (3, 4), (4, 11)):
            out, st = model(ids[:, lo:hi], st)
            outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), logits, rtol=0, atol=1e-10)
    loss, _ = model.loss(ids)
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert torch.isfinite(loss) and not dead, dead

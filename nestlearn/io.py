"""Atomic safetensors + JSON files: the one way nestlearn writes tensors to disk.

What this is: `save_bundle(directory, name, tensors, meta)` writes `name.safetensors` and `name.json`, each to a
temporary file in the same directory first and then renamed over the target, so a crash or a full disk never
leaves a half-written file under the real name. The JSON records the SHA-256 of the tensor file, and
`load_bundle` refuses a pair that does not match (a torn or mixed save). What it is not: a checkpoint policy
(keep-last-N, resume) or anything model-specific.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1


def save_bundle(directory: str | Path, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write `directory/name.safetensors` and `directory/name.json` atomically; returns the JSON path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensor_path, meta_path = directory / f"{name}.safetensors", directory / f"{name}.json"
    plain = {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
    tmp = _temp_path(directory, name)
    try:
        save_file(plain, str(tmp))
        digest = _sha256(tmp)
        os.replace(tmp, tensor_path)
    finally:
        tmp.unlink(missing_ok=True)
    record = {"format_version": FORMAT_VERSION, "tensors_sha256": digest, **meta}
    _write_text_atomic(meta_path, json.dumps(record, indent=2, sort_keys=True))
    return meta_path


def load_bundle(directory: str | Path, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a pair written by `save_bundle`, checking that both exist and belong together."""
    directory = Path(directory)
    tensor_path, meta_path = directory / f"{name}.safetensors", directory / f"{name}.json"
    for p in (tensor_path, meta_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} does not exist; point to a directory written by nestlearn's save functions")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path} is not valid JSON ({e}): the bundle is damaged and cannot be read") from e
    if meta.get("tensors_sha256") != _sha256(tensor_path):
        raise ValueError(
            f"{tensor_path} does not match the SHA-256 recorded in {meta_path}: the pair is corrupted, truncated or "
            "comes from two different saves, and cannot be read"
        )
    return load_file(str(tensor_path)), meta


def _temp_path(directory: Path, name: str) -> Path:
    fd, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    return Path(path)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = _temp_path(path.parent, path.name)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

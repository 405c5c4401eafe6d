"""Atomic safetensors + JSON files: the one way nestlearn writes tensors to disk.

What this is: `save_bundle(directory, name, tensors, meta)` writes `name.safetensors` and `name.json`, each to a
temporary file in the same directory first and then renamed over the target, so a crash or a full disk never
leaves a half-written file under the real name. The JSON records the SHA-256 of the tensor file, and
`load_bundle` refuses a pair that does not match (a torn or mixed save). `split_tree` / `join_tree` turn a tree
of tensors (dicts, lists, tuples, NamedTuples, scalars: a model's learning state, an optimizer's state_dict) into
tensors by dotted path plus a JSON structure, and back. What it is not: a checkpoint policy (keep-last-N,
resume) or anything model-specific.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
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
    write_text_atomic(meta_path, json.dumps(record, indent=2, sort_keys=True))
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


def write_text_atomic(path: Path, text: str) -> None:
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


# ---------------------------------------------------------------------------------------------
# trees of tensors <-> tensors by path + a JSON structure

Scalar = int | float | str | bool | None


def split_tree(tree: Any, root: str) -> tuple[dict[str, torch.Tensor], Any]:
    """Tensors by dotted path (`root.0.weights.1`, a NamedTuple's fields by name) and a JSON structure that
    `join_tree` rebuilds the tree from. Leaves other than tensors and JSON scalars are refused."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[path] = x
            return {"__tensor__": path}
        if isinstance(x, tuple) and hasattr(x, "_fields"):
            return {"__fields__": [[f, walk(v, f"{path}.{f}")] for f, v in zip(x._fields, x, strict=True)]}
        if isinstance(x, dict):
            return {"__dict__": [[_key(k), walk(v, f"{path}.{k}")] for k, v in x.items()]}
        if isinstance(x, list | tuple):
            return {
                "__list__" if isinstance(x, list) else "__tuple__": [walk(v, f"{path}.{i}") for i, v in enumerate(x)]
            }
        if isinstance(x, Scalar):
            return x
        raise ValueError(f"cannot save a value of type {type(x).__name__} at {path}")

    return tensors, walk(tree, root)


def join_tree(
    tensors: dict[str, torch.Tensor],
    structure: Any,
    template: Any = None,
    check: Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor] | None = None,
    root: str = "",
) -> Any:
    """The tree `split_tree` split. With a `template` tree (e.g. a freshly built state) NamedTuples come back as
    the template's types, their fields must match, and each tensor is passed to `check(tensor, like, path)`,
    which returns the tensor to use (cast, moved) or raises; without one, NamedTuples come back as dicts. A
    structure of the wrong shape is a ValueError naming the path."""

    def build(x: Any, like: Any, path: str) -> Any:
        if not isinstance(x, dict):
            return x
        if "__tensor__" in x:
            if x["__tensor__"] not in tensors:
                raise ValueError(f"the saved tensors have no {x['__tensor__']}; the file is not complete")
            t = tensors[x["__tensor__"]]
            if like is not None and check is not None:
                return check(t, like, path)
            return t
        if "__fields__" in x:
            return _fields(x["__fields__"], like, path)
        if "__dict__" in x:
            likes = like if isinstance(like, dict) else {}
            return {_unkey(k): build(v, likes.get(_unkey(k)), f"{path}.{_unkey(k)}") for k, v in x["__dict__"]}
        items = x.get("__list__", x.get("__tuple__"))
        if items is None:
            raise ValueError(f"unreadable structure at {path}")
        likes = [None] * len(items) if like is None else like
        if not isinstance(likes, list | tuple) or len(likes) != len(items):
            raise ValueError(f"{path} holds {len(items)} entries, which this model's state does not have there")
        out = [build(v, lk, f"{path}.{i}") for i, (v, lk) in enumerate(zip(items, likes, strict=True))]
        return out if "__list__" in x else tuple(out)

    def _fields(pairs: list[list[Any]], like: Any, path: str) -> Any:
        names = [f for f, _ in pairs]
        if like is None:
            return {f: build(v, None, f"{path}.{f}") for f, v in pairs}
        if not (isinstance(like, tuple) and hasattr(like, "_fields")) or tuple(names) != like._fields:
            raise ValueError(f"{path} holds fields {names}, which this model's state does not have there")
        return type(like)(*(build(v, lk, f"{path}.{f}") for (f, v), lk in zip(pairs, like, strict=True)))

    return build(structure, template, root)


def _key(k: Any) -> Any:
    return {"__int__": k} if isinstance(k, int) else k


def _unkey(k: Any) -> Any:
    return k["__int__"] if isinstance(k, dict) else k

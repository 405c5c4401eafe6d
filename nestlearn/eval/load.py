"""A trained model back from a training run, ready to evaluate or generate, and its export to Hugging Face.

What this is: `load_run(path, device="cpu") -> Loaded`. `path` is a run directory (the `out` of `nestlearn
train`: the newest intact checkpoint under `checkpoints/` is taken, damaged ones are named on stderr and passed
over, as a resumed run does: the same reader, `train.checkpoints.read_checkpoint`) or one checkpoint directory
(`checkpoints/step_XXXXXXX`). The checkpoint's model config is rebuilt, its weights loaded strictly, and the
tokenizer it was trained with is built and compared with the recorded identity. Every bad input (no such
directory, not a run, no checkpoint, every checkpoint damaged, weights that do not fit the config, tokenizer
files missing or different) is a ValueError whose one line names the fix. `export_hf(loaded, out_dir)` writes a
Hugging Face directory (`save_pretrained`) that `AutoModelForCausalLM.from_pretrained` reloads.
What it is not: training, resuming (the optimizer state is checked, then dropped) or a model hub client.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.tokenizer import Tokenizer, check_identity, get_tokenizer
from ..errors import first_line
from ..models import CausalLM, ModelConfig
from ..train.checkpoints import checkpoint_dirs, read_checkpoint

FIX_RUN = "give the `out` directory of `nestlearn train` or one of its checkpoints/step_XXXXXXX directories"


@dataclass
class Loaded:
    """A checkpoint in memory: the model (eval mode, on its device), the tokenizer it was trained with, the
    checkpoint directory, its training step, and `info` (run, checkpoint, step, sha256 of the weights' file,
    variant, model_config, tokenizer identity, data identity, train_config, code_version, parameters)."""

    model: CausalLM
    tokenizer: Tokenizer
    checkpoint: Path
    step: int
    info: dict[str, Any] = field(default_factory=dict)


def load_run(path: str | Path, device: str | torch.device = "cpu", *, tokenizer: str | None = None) -> Loaded:
    """The newest intact checkpoint of a run directory, or the given checkpoint directory (see the module
    docstring). `tokenizer` overrides how the tokenizer is built (e.g. "hf:/path/to/dir", needed for a run
    trained with a local Hugging Face tokenizer); its identity must still equal the checkpoint's."""
    path = Path(path)
    run, checkpoint, (tensors, meta) = _find(path)
    if meta.get("kind") != "nestlearn.checkpoint":
        raise ValueError(f"{checkpoint} holds {meta.get('kind')!r}, not the model of a nestlearn training run")
    model = _build(checkpoint, meta, tensors, torch.device(device))
    tok = _tokenizer(checkpoint, meta["tokenizer"], tokenizer)
    info = {
        "run": None if run is None else str(run),
        "checkpoint": str(checkpoint),
        "step": meta["step"],
        "sha256": meta["tensors_sha256"],
        "variant": model.config.variant,
        "model_config": meta["model_config"],
        "tokenizer": meta["tokenizer"],
        "data": meta.get("data"),
        "train_config": meta.get("config", {}),
        "code_version": meta.get("code_version"),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return Loaded(model, tok, checkpoint, meta["step"], info)


def _find(path: Path) -> tuple[Path | None, Path, tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """(run directory or None, checkpoint directory, its model tensors and metadata)."""
    if not path.is_dir():
        raise ValueError(f"{path} does not exist or is not a directory; {FIX_RUN}")
    if (path / "trainer.json").is_file():
        try:
            return None, path, _read_checkpoint(path)
        except ValueError as e:
            raise ValueError(
                f"checkpoint {path} is damaged ({e}); give its run directory to take the newest intact checkpoint"
            ) from None
    root = path / "checkpoints"
    if not root.is_dir():
        raise ValueError(f"{path} is not a training run (it has no checkpoints/ directory); {FIX_RUN}")
    candidates = checkpoint_dirs(root)
    if not candidates:
        raise ValueError(f"{root} holds no checkpoint yet; train longer (ckpt_every=...) or {FIX_RUN}")
    damaged: list[tuple[Path, str]] = []
    for checkpoint in reversed(candidates):
        try:
            found = _read_checkpoint(checkpoint)
        except ValueError as e:
            damaged.append((checkpoint, str(e)))
            continue
        for bad, why in damaged:  # said only when an intact one is taken, so that an error stays one line
            print(f"checkpoint {bad} is damaged and passed over ({why})", file=sys.stderr, flush=True)
        return path, checkpoint, found
    newest, why = damaged[0]
    raise ValueError(
        f"every checkpoint in {root} is damaged ({len(candidates)} tried; the newest, {newest.name}: {why}); train "
        f"again or {FIX_RUN}"
    )


def _read_checkpoint(checkpoint: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The model tensors and metadata, checked as resume checks them (hashes, finite values, both bundles);
    ValueError with the reason on one line."""
    try:
        tensors, meta, _ = read_checkpoint(checkpoint)
        trainer = json.loads((checkpoint / "trainer.json").read_text())
    except (ValueError, OSError, KeyError) as e:
        raise ValueError(first_line(e)) from None
    if trainer.get("step") != meta.get("step") or trainer.get("model_config") != meta.get("model_config"):
        raise ValueError("its trainer.json and model.json disagree")
    return tensors, meta


def _build(checkpoint: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor], device: torch.device) -> CausalLM:
    try:
        cfg = ModelConfig.from_dict(meta["model_config"])
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(
            f"the model config of {checkpoint} cannot be read by this nestlearn ({first_line(e)}); use the version "
            f"that trained it ({meta.get('code_version', 'unknown')})"
        ) from None
    model = CausalLM(cfg)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise ValueError(
            f"the weights in {checkpoint} do not fit its model config ({first_line(e)}); the checkpoint is "
            "damaged or written by another version"
        ) from None
    return model.to(device).eval()


def _tokenizer(checkpoint: Path, identity: dict[str, Any], override: str | None) -> Tokenizer:
    """The tokenizer the checkpoint was trained with, built offline and compared with its identity."""
    name = override or identity.get("name", "?")
    if override is None and name.startswith("hf:"):
        raise ValueError(
            f"checkpoint {checkpoint} was trained with the local Hugging Face tokenizer {name!r}, whose directory "
            "is not recorded; pass --tokenizer hf:<that directory>"
        )
    try:
        tok = get_tokenizer(name)
    except (ValueError, RuntimeError, OSError) as e:
        raise ValueError(
            f"the tokenizer {name!r} of checkpoint {checkpoint} cannot be loaded ({first_line(e)}); restore its "
            "files (gpt2: the cache under $NESTLEARN_CACHE, hf: the directory) or pass --tokenizer"
        ) from None
    check_identity(identity, tok.identity, f"checkpoint {checkpoint}")
    return tok


def export_hf(loaded: Loaded, out_dir: str | Path) -> Path:
    """Write `loaded`'s model as a Hugging Face directory (config.json + safetensors weights) and
    `nestlearn_checkpoint.json` (where it came from: step, SHA-256, tokenizer identity). Needs transformers."""
    from ..models.hf import NestLearnConfig, NestLearnForCausalLM

    out = Path(out_dir)
    hf = NestLearnForCausalLM(NestLearnConfig.from_model_config(loaded.model.config))
    hf.lm.load_state_dict({k: v.detach().cpu() for k, v in loaded.model.state_dict().items()})
    hf.save_pretrained(out)
    origin = {k: loaded.info.get(k) for k in ("run", "checkpoint", "step", "sha256", "tokenizer", "code_version")}
    (out / "nestlearn_checkpoint.json").write_text(json.dumps(origin, indent=1))
    return out

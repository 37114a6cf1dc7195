"""Portable model folders (config JSON + safetensors + tokenizer) and loading from DeepSpeed checkpoints."""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ds_pld.checkpoints import META_FILE, read_checkpoint_meta
from ds_pld.config_errors import ConfigError
from ds_pld.models.bert import BertForPreTraining
from ds_pld.models.config import build_bert_config

CONFIG_FILE = "ds_pld_model.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"


def save_pretrained(model: BertForPreTraining, folder: str | Path, tokenizer: Any = None) -> Path:
    """Write the model (its config, including an EarlyBERT-pruned shape) and optionally its tokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().float().contiguous().cpu() for name, tensor in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder / TOKENIZER_DIR))
    return folder


def _deepspeed_state_dict(checkpoint_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights of a DeepSpeed checkpoint, whatever its ZeRO stage."""
    tag_dir = checkpoint_dir / tag
    if any(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")) and any(tag_dir.glob("zero_pp_rank_*model_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise ConfigError(f"{str(tag_dir)!r} holds no DeepSpeed model states")
    return torch.load(files[0], map_location="cpu", weights_only=False)["module"]


@dataclass(frozen=True)
class SavedModel:
    """A model saved by us, located but not loaded: its config as saved and how to read its weights."""

    path: Path
    kind: str  # "model folder" (save_pretrained, final/) or "DeepSpeed checkpoint"
    config: dict[str, Any]
    read_state: Callable[[], dict[str, torch.Tensor]]


def find_saved(path: str | Path) -> SavedModel:
    """A `save_pretrained` folder, or a DeepSpeed checkpoint folder written by training (the one holding `latest`,
    or one tag folder); its weights are read only when asked for."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return SavedModel(path, "model folder", json.loads((path / CONFIG_FILE).read_text()),
                          lambda: load_file(str(path / WEIGHTS_FILE)))
    if (path / META_FILE).is_file():
        checkpoint_dir, tag = path.parent, path.name
    else:
        checkpoint_dir, tag = path, None
    meta = read_checkpoint_meta(checkpoint_dir, tag)
    if meta is None:
        raise ConfigError(f"{str(path)!r} is neither a model folder ({CONFIG_FILE}) nor a checkpoint folder "
                          f"with a 'latest' file")
    if "model_config" not in meta:
        raise ConfigError(f"checkpoint {str(checkpoint_dir / meta['tag'])!r} does not record its model config")
    return SavedModel(path, "DeepSpeed checkpoint", meta["model_config"],
                      lambda: _deepspeed_state_dict(checkpoint_dir, meta["tag"]))


def load_pretrained(path: str | Path, **config_overrides: Any) -> BertForPreTraining:
    """Load a model from a `save_pretrained` folder or from a DeepSpeed checkpoint folder written by training
    (the one holding `latest`, or one tag folder). Pruned (EarlyBERT) shapes are rebuilt from the saved config."""
    saved = find_saved(path)
    model = BertForPreTraining(build_bert_config(saved.config, **config_overrides))
    missing, unexpected = model.load_state_dict(saved.read_state(), strict=False)
    if unexpected or [k for k in missing if not k.endswith(("head_coef", "ffn_coef"))]:
        raise ConfigError(f"weights in {str(path)!r} do not fit the model config: missing {missing}, "
                          f"unexpected {unexpected}")
    return model


def find_tokenizer(path: str | Path) -> Path | None:
    """The tokenizer saved with a model folder, or with the training run a checkpoint folder belongs to
    (`<run>/checkpoints[/<tag>]`: `<run>/tokenizer` or `<run>/final/tokenizer`)."""
    path = Path(path)
    for folder in (path, path.parent, path.parent.parent):
        for candidate in (folder / TOKENIZER_DIR, folder / "final" / TOKENIZER_DIR):
            if candidate.is_dir():
                return candidate
    return None

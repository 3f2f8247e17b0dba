"""Checkpoint layouts -> timm's: official DINO and DINOv2 ``.pth``, Hugging Face ``facebook/dino-*`` and
``facebook/dinov2-*`` safetensors, timm safetensors; read from a local file or an object, tensors only."""

from __future__ import annotations

import io
import re
from pathlib import Path

import torch
import torch.nn as nn

from ..core.storage import as_location, is_local


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors, from a local file or an object (``s3://.../dino.pth``: no shared volume needed)."""
    path = as_location(path)
    if not path.is_file():
        raise FileNotFoundError(f"--weights: no such file: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load, load_file

        try:
            return load_file(str(path)) if is_local(path) else load(path.read_bytes())
        except Exception as e:  # a damaged or foreign file
            raise ValueError(f"--weights {path}: not a safetensors file ({type(e).__name__}: {e})") from None
    source = str(path) if is_local(path) else io.BytesIO(path.read_bytes())
    try:
        sd = torch.load(source, map_location="cpu", weights_only=True)  # tensors only: no code in it runs
    except Exception as e:  # not a checkpoint, a pickle of other objects, a truncated file
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"--weights {path}: not a checkpoint torch can load safely ({type(e).__name__}: {first})"
        ) from None
    if not isinstance(sd, dict):
        raise ValueError(f"--weights {path}: not a checkpoint (holds a {type(sd).__name__}, not a dict of tensors)")
    # Full DINO training checkpoints hold {"teacher": ..., "student": ...}; others wrap in "model"/"state_dict".
    for key in ("teacher", "model", "state_dict", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    return {re.sub(r"^(module\.)?(backbone\.)?", "", k): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def detect_layout(sd: dict) -> str:
    keys = set(sd)
    if any(k.startswith(("embeddings.", "vit.embeddings.", "dinov2.embeddings.")) for k in keys):
        return "dinov2_hf" if any("layer_scale1" in k for k in keys) else "dino_hf"
    if "mask_token" in keys or "register_tokens" in keys:
        return "dinov2_official"
    if "cls_token" in keys and any(k.startswith("blocks.") for k in keys):
        return "dino_official_or_timm"  # the official DINO .pth already uses timm's key names
    raise ValueError("unrecognised checkpoint layout (expected DINO, DINOv2, Hugging Face or timm ViT keys)")


def _hf_to_official(sd: dict) -> dict:
    """transformers ViTModel / Dinov2Model / Dinov2WithRegistersModel keys -> the official DINO/DINOv2 layout."""
    sd = {re.sub(r"^(vit|dinov2)\.", "", k): v for k, v in sd.items()}
    out = {}
    layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    for i in layers:
        p, q = f"encoder.layer.{i}.", f"blocks.{i}."
        a = p + "attention.attention."
        v2 = p + "norm1.weight" in sd  # DINOv2 names its sub-layers differently from ViT (DINO v1)
        names = {
            "norm1": "norm1" if v2 else "layernorm_before",
            "norm2": "norm2" if v2 else "layernorm_after",
            "mlp.fc1": "mlp.fc1" if v2 else "intermediate.dense",
            "mlp.fc2": "mlp.fc2" if v2 else "output.dense",
            "attn.proj": "attention.output.dense",
        }
        for t in ("weight", "bias"):
            out[q + f"attn.qkv.{t}"] = torch.cat([sd[a + f"query.{t}"], sd[a + f"key.{t}"], sd[a + f"value.{t}"]])
            for ours, theirs in names.items():
                out[q + f"{ours}.{t}"] = sd[p + f"{theirs}.{t}"]
        if p + "layer_scale1.lambda1" in sd:
            out[q + "ls1.gamma"] = sd[p + "layer_scale1.lambda1"]
            out[q + "ls2.gamma"] = sd[p + "layer_scale2.lambda1"]
    renames = {
        "embeddings.cls_token": "cls_token",
        "embeddings.mask_token": "mask_token",
        "embeddings.register_tokens": "register_tokens",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    out.update({ours: sd[theirs] for theirs, ours in renames.items() if theirs in sd})
    if "mask_token" in out:
        out["mask_token"] = out["mask_token"].reshape(1, -1)
    return out


def to_timm_state_dict(sd: dict, model: nn.Module) -> dict:
    """Any supported layout -> timm keys for ``model``; timm's own filter does DINOv2 and pos-embed resampling."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    if detect_layout(sd) in ("dino_hf", "dinov2_hf"):
        sd = _hf_to_official(sd)
    sd = checkpoint_filter_fn(dict(sd), model)
    # The head is dropped (num_classes=0): ignore any head weights a checkpoint carries.
    return {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm.", "pooler."))}


def load_weights(model: nn.Module, path: str | Path) -> str:
    """Load a checkpoint in any supported layout into a timm ViT; returns the detected layout."""
    raw = read_checkpoint(path)
    try:
        layout = detect_layout(raw)
    except ValueError as e:
        raise ValueError(f"--weights {path}: {e}") from None
    try:
        sd = to_timm_state_dict(raw, model)
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches: a checkpoint of another size
        first = str(e).strip().splitlines()[-1][:300]
        raise ValueError(f"--weights {path}: layout {layout} does not fit this backbone ({first})") from None
    if missing or unexpected:
        raise ValueError(
            f"--weights {path}: layout {layout} does not fit this backbone: "
            f"missing {sorted(missing)[:6]}, unexpected {sorted(unexpected)[:6]} (is --backbone the right size?)"
        )
    return layout

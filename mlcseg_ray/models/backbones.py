"""Frozen ViT backbones by timm name, real weight loading, and the feature hook (DESIGN §2 "Features", §4).

Weights come, in order, from ``--weights PATH`` (official DINO ``.pth``, official DINOv2 ``.pth``, Hugging Face
``facebook/dino-*`` / ``facebook/dinov2-*`` safetensors, timm safetensors; all mapped to the timm layout), timm's
local cache, then the hub when online. ``random-*`` backbones are deterministic random-weight models for tests and
the demo; everything made with them says so.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn

from ..core.storage import as_location
from .checkpoints import load_weights
from .simulated import PATCH as SIMULATED_PATCH
from .simulated import SIMULATED_BACKBONE, SIMULATED_WARNING, SimulatedAccelerator

log = logging.getLogger("mlcseg_ray")

# timm names of the supported self-supervised backbones.
PRETRAINED_BACKBONES = [
    "vit_small_patch8_224.dino",
    "vit_small_patch16_224.dino",
    "vit_base_patch8_224.dino",
    "vit_base_patch16_224.dino",
    "vit_small_patch14_dinov2.lvd142m",
    "vit_base_patch14_dinov2.lvd142m",
    "vit_small_patch14_reg4_dinov2.lvd142m",
    "vit_base_patch14_reg4_dinov2.lvd142m",
]
# Random-weight stand-ins: (timm architecture, extra kwargs). Deterministic: seeded before construction.
RANDOM_BACKBONES = {
    "random-vit-s8": ("vit_small_patch8_224", {}),
    "random-vit-s16": ("vit_small_patch16_224", {}),
    "random-vit-tiny": ("vit_small_patch8_224", dict(embed_dim=48, depth=2, num_heads=3)),
    "random-vit-tiny-reg": ("vit_small_patch14_reg4_dinov2", dict(embed_dim=48, depth=2, num_heads=3, img_size=56)),
}

RANDOM_WEIGHTS_WARNING = (
    "RANDOM WEIGHTS: the backbone has random, untrained weights. Masks, classes and metrics from this run say "
    "nothing about the method's quality; use a pretrained DINO backbone (--weights PATH) for real results."
)


class WeightsNotFound(ValueError):
    pass


@dataclass
class BackboneInfo:
    name: str
    arch: str
    patch_size: int
    embed_dim: int
    num_heads: int
    num_prefix_tokens: int
    weights: str  # where the weights came from
    random_weights: bool
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)

    def to_dict(self) -> dict:
        return asdict(self)


def available_backbones() -> list[str]:
    return PRETRAINED_BACKBONES + list(RANDOM_BACKBONES) + [SIMULATED_BACKBONE]


def patch_size_of(name: str) -> int:
    """The patch size a backbone name implies (timm names say it: ``..._patch8_...``), without building a model."""
    if name == SIMULATED_BACKBONE:
        return SIMULATED_PATCH
    arch = RANDOM_BACKBONES[name][0] if name in RANDOM_BACKBONES else name
    m = re.search(r"patch(\d+)", arch)
    if m:
        return int(m.group(1))
    return int(create_architecture(name).patch_embed.patch_size[0])


def _create(arch: str, **kwargs) -> nn.Module:
    # dynamic_img_size: any input whose sides are multiples of the patch size, position embeddings interpolated.
    # timm is imported here, not at the top: it and the torchvision it imports cost ~2 s in every process that
    # imports this module (every Ray worker, the CLI), and only the processes that build a model need them
    import timm

    return timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs)


def create_architecture(name: str) -> nn.Module:
    """The timm model for ``name`` with freshly initialised weights (random backbones are seeded)."""
    if name in RANDOM_BACKBONES:
        arch, kwargs = RANDOM_BACKBONES[name]
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return _create(arch, **kwargs)
    if name not in PRETRAINED_BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(available_backbones())}")
    return _create(name)


NO_WEIGHTS_OPTIONS = (
    "Options: --weights PATH to an official DINO/DINOv2 .pth, a Hugging Face facebook/dino-* or facebook/dinov2-* "
    "model.safetensors, or a timm model.safetensors; or put the timm weights in the Hugging Face cache (HF_HOME); "
    "or --backbone random-vit-s8 for a random-weight test run."
)


def _hub_id(name: str) -> str | None:
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    return getattr(cfg, "hf_hub_id", None) if cfg else None


def cached_weights(name: str) -> str | None:
    """The timm weights of ``name`` in the Hugging Face cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    hub_id = _hub_id(name)
    cached = try_to_load_from_cache(hub_id, "model.safetensors") if hub_id else None
    return cached if isinstance(cached, str) else None


def hub_weights(name: str) -> str:
    """The timm weights of ``name``: from the cache, else downloaded into it. Raises WeightsNotFound, naming the
    options a user has."""
    from huggingface_hub import hf_hub_download

    cached = cached_weights(name)
    if cached:
        return cached
    hub_id = _hub_id(name)
    if not hub_id:
        raise WeightsNotFound(f"no weights for {name}: timm has no hub id for it. {NO_WEIGHTS_OPTIONS}")
    try:
        return hf_hub_download(hub_id, "model.safetensors")
    except Exception as e:  # offline, no DNS, gated...
        raise WeightsNotFound(
            f"no weights for {name}: not in timm's cache and the hub is unreachable "
            f"({type(e).__name__}). {NO_WEIGHTS_OPTIONS}"
        ) from None


def locate_weights(name: str, weights: str | None = None) -> str | None:
    """Where a run's weights will come from, checked once in the driver before any worker starts: the file
    given, timm's cache (downloaded there when online), or None for a random-weight backbone. Raises
    WeightsNotFound / FileNotFoundError with the options a user has."""
    if name == SIMULATED_BACKBONE:
        if weights is not None:
            raise ValueError(f"{SIMULATED_BACKBONE} is a timing stand-in: it takes no --weights")
        return None
    if weights is not None:
        if not as_location(weights).is_file():
            raise FileNotFoundError(f"--weights: no such file: {weights}")
        where = as_location(weights)
        st = where.stat()
        _check_weights(name, str(weights), st.st_size, getattr(st, "st_mtime_ns", None))
        return str(weights)
    if name in RANDOM_BACKBONES:
        return None
    return hub_weights(name)


@functools.lru_cache(maxsize=8)
def _check_weights(name: str, weights: str, size: int, mtime_ns: int | None) -> None:
    """The checkpoint loads (tensors only: nothing in it is executed) into ``name``'s architecture, or a ValueError
    naming the file and the cause: in the driver, before any worker or actor tries (once per file version)."""
    load_weights(create_architecture(name), weights)


def build_backbone(name: str, weights: str | None = None) -> tuple[nn.Module, BackboneInfo]:
    """A frozen, eval-mode model and the facts about it that the feature store records."""
    model = create_architecture(name)
    random_weights = name in RANDOM_BACKBONES and weights is None
    if weights is not None:
        layout = load_weights(model, weights)
        source = f"{weights} ({layout})"
    elif random_weights:
        source = "random (seed 0)"
    else:
        path = hub_weights(name)
        load_weights(model, path)
        source = f"timm ({path})"
    model.eval().requires_grad_(False)
    pcfg = getattr(model, "pretrained_cfg", {}) or {}
    info = BackboneInfo(
        name=name,
        arch=model.default_cfg.get("architecture", name) if hasattr(model, "default_cfg") else name,
        patch_size=int(model.patch_embed.patch_size[0]),
        embed_dim=int(model.embed_dim),
        num_heads=int(model.blocks[-1].attn.num_heads),
        num_prefix_tokens=int(model.num_prefix_tokens),
        weights=source,
        random_weights=random_weights,
        mean=tuple(pcfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(pcfg.get("std", (0.229, 0.224, 0.225))),
    )
    return model, info


# a batch (B, 3, H, W) -> keys (B, N, D), cls_attn (B, N), cls (B, D): FeatureExtractor, or the simulated one
Extractor = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def feature_extractor(cfg: Any, device: str) -> tuple[ForwardClock, dict]:
    """What an extraction or describe actor runs over a batch (keys, CLS attention, CLS token: see
    :class:`FeatureExtractor`) for ``cfg``'s backbone, weights and precision on ``device``, timed, and the facts
    the feature store records of it."""
    if cfg.backbone == SIMULATED_BACKBONE:
        simulated = SimulatedAccelerator(cfg.sim_forward_ms)
        return ForwardClock(simulated), simulated.info()
    model, info = build_backbone(cfg.backbone, cfg.weights)
    extractor = FeatureExtractor(model.to(device), autocast_dtype(cfg.precision, device))
    return ForwardClock(extractor), {**info.to_dict(), "precision": extractor.precision}


class ForwardClock:
    """An actor's model, shared by the shards it works on at once: one forward at a time (one device), a shard's
    turn at it held for all its forwards where it asks (:meth:`turn`), and the wall time of the forwards each
    thread made (``seconds``: how busy a shard kept the model, the markers' ``forward_seconds``;
    bench/accelerator_feed.py)."""

    def __init__(self, extractor: Extractor) -> None:
        self.extractor = extractor
        self._device = threading.RLock()
        self._own = threading.local()

    @property
    def seconds(self) -> float:
        """The seconds of the forwards made by the calling thread (the shard it runs)."""
        return getattr(self._own, "seconds", 0.0)

    def turn(self) -> threading.RLock:
        """Held for a shard's forwards, so that two shards' outputs are not gathered at once (memory stays that of
        one shard in the model and one being written)."""
        return self._device

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with self._device:
            started = time.perf_counter()
            out = self.extractor(x)
            if x.is_cuda:  # the forward is queued on the GPU: done when the device says so
                torch.cuda.synchronize(x.device)
            self._own.seconds = self.seconds + time.perf_counter() - started
        return out


def untrained_warning(backbone: dict) -> str | None:
    """What a run must say loudly of its backbone (the feature store's record of it), or None: random weights,
    or the simulated accelerator."""
    if SIMULATED_BACKBONE in (backbone.get("backbone"), backbone.get("name")):  # the store's record, or the model's
        return SIMULATED_WARNING
    return RANDOM_WEIGHTS_WARNING if backbone.get("random_weights") else None


def autocast_dtype(precision: str, device: str) -> torch.dtype | None:
    """The autocast dtype of the forward pass for ``precision`` on ``device`` (None: float32). ``auto`` is bf16
    on CUDA, where float32 leaves most of the tensor cores' throughput unused, and float32 on CPU."""
    if precision == "bf16" or (precision == "auto" and str(device).startswith("cuda")):
        return torch.bfloat16
    if precision in ("fp32", "auto"):
        return None
    raise ValueError(f"unknown precision {precision!r}; use auto, fp32 or bf16")


class FeatureExtractor(nn.Module):
    """Last-block attention keys (heads concatenated), CLS->patch attention (mean over heads), final CLS token.

    Only the CLS row of the last block's output is used, so on a timm ``Block`` the last block runs its query,
    projection and MLP for that row alone (7% of a ViT-S/8's forward at 512 px on CPU): the CLS row of the
    attention, computed in float32 for ``cls_attn``, also weights the values. Other blocks fall back to the whole
    ``forward_features`` and take the keys from a hook on the last ``attn.qkv``. Prefix tokens (CLS, registers)
    are sliced off with ``num_prefix_tokens`` so that row i of ``keys`` is patch i in raster order. ``dtype``: the
    forward runs under autocast to it (bf16), the CLS row of the attention in float32.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype
        last = model.blocks[-1]
        self.attn = last.attn
        self.npt = int(model.num_prefix_tokens)
        # the CLS-only last block needs the layout of timm's own Block and Attention; anything else runs whole
        from timm.layers import Attention
        from timm.models.vision_transformer import Block

        self.cls_only = type(last) is Block and type(last.attn) is Attention

    @property
    def precision(self) -> str:
        return "bf16" if self.dtype == torch.bfloat16 else "fp32"

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.autocast(x.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            return self._forward_cls_only(x) if self.cls_only else self._forward_whole(x)

    def _heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The last block's keys (B, N - prefix, C), and its q, k, v (B, H, N, hd)."""
        B, N, _ = qkv.shape
        H, hd = self.attn.num_heads, self.attn.head_dim
        q, k, v = qkv.reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.attn.q_norm(q), self.attn.k_norm(k)
        return k.transpose(1, 2).reshape(B, N, H * hd)[:, self.npt :], q, k, v

    def _cls_row(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The CLS row of the attention (B, H, N), in float32 whatever the autocast: one row, and bf16 would round
        it coarsely (autocast would run even a product of float32 tensors in bf16, hence it is turned off here)."""
        with torch.autocast(q.device.type, enabled=False):
            scores = (q[:, :, :1].float() * self.attn.scale) @ k.float().transpose(-2, -1)
        return torch.softmax(scores, dim=-1)[:, :, 0]

    def _forward_whole(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        qkv = []  # the last block's qkv output, caught by a hook for this call only
        hook = self.attn.qkv.register_forward_hook(lambda module, inputs, output: qkv.append(output))
        try:
            tokens = self.model.forward_features(x)  # (B, N, C), final norm applied
        finally:
            hook.remove()
        keys, q, k, _ = self._heads(qkv[-1])
        return {"keys": keys, "cls_attn": self._cls_row(q, k)[:, :, self.npt :].mean(1), "cls": tokens[:, 0]}

    def _forward_cls_only(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        m = self.model
        t = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))  # forward_features up to the blocks
        t = m.blocks[:-1](t)
        h = m.blocks[-1].norm1(t)
        keys, q, k, v = self._heads(self.attn.qkv(h))
        # from the attention row on, one image at a time: a matrix product's rounding depends on how many rows and
        # matrices it has, and an image's CLS token must not depend on which images share its batch (shard-size
        # invariance); for one row per image this costs little
        rows, cls = [], []
        for i in range(len(t)):
            rows.append(self._cls_row(q[i : i + 1], k[i : i + 1]))
            cls.append(self._cls_tail(t[i : i + 1, :1], h[i : i + 1, :1], rows[-1], v[i : i + 1]))
        return {
            "keys": keys,
            "cls_attn": torch.cat(rows)[:, :, self.npt :].mean(1),
            "cls": m.norm(torch.cat(cls))[:, 0],
        }

    def _cls_tail(self, t: torch.Tensor, h: torch.Tensor, row: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The last block from its attention on, for one image's CLS row: ``t`` the block's input row and ``h`` it
        normed (1, 1, C), ``row`` its attention (1, H, N), ``v`` the values (1, H, N, hd)."""
        last, attn = self.model.blocks[-1], self.attn
        o = (row[:, :, None].to(v.dtype) @ v).transpose(1, 2).flatten(2)  # (1, 1, C)
        # the output norm and the gate are newer timm options (Identity and None where unused), absent in older ones
        if getattr(attn, "norm", None) is not None:
            o = attn.norm(o)
        if getattr(attn, "gate", None) is not None:
            o = o * attn.gate(h).sigmoid()
        c = t + last.drop_path1(last.ls1(attn.proj_drop(attn.proj(o))))
        return c + last.drop_path2(last.ls2(last.mlp(last.norm2(c))))

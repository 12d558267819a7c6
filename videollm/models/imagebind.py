"""ImageBind (Girdhar et al., 2023), the audio and vision towers that Video-LLaMA's audio branch uses.

The original Video-LLaMA builds the *whole* ImageBind-Huge model (six modalities, 1.2 B
parameters) as ``audio_encoder`` but only ever runs two of its towers:

* **audio** at inference: 8 clips of 2 s -> log-mel (1, 128, 204) each -> 768-wide, 12-block
  transformer -> CLS -> Linear to 1024 -> L2 normalise -> x20 (a fixed logit scale).
* **vision** when training the audio branch (quirk M9/M10 of the reference): every video frame is
  turned into a 2-frame clip, embedded by the 1280-wide, 32-block tower -> CLS -> Linear to 1024
  -> L2 normalise (norm 1, *not* 20).

This module builds only the modalities asked for (default ``("vision", "audio")``) and keeps the
exact state-dict key names of the released ``imagebind_huge.pth`` for them, because those names
are this module's public interface to the released weights::

    modality_preprocessors.{m}.cls_token / .pos_embedding_helper.pos_embed / .rgbt_stem.proj...
    modality_trunks.{m}.pre_transformer_layer.0.* / .blocks.{i}.{attn,norm_1,mlp,norm_2}.*
    modality_heads.{m}.0.* (LayerNorm) / .2.weight (Linear, no bias)
    modality_postprocessors.audio.1.log_logit_scale (a buffer, not a parameter)

The towers follow ordinary ``train()``/``eval()`` semantics: in train mode the audio trunk's
DropPath (up to 0.1) is active. The original freezes ImageBind and calls ``.eval()`` once but
does not pin it there, so a later ``model.train()`` re-enables DropPath (quirk A6); whoever builds
Video-LLaMA decides whether to reproduce that.

:func:`load_imagebind_weights` loads the released file unchanged and counts (without complaint)
the keys of the modalities that were not built (text, depth, thermal, imu).

Shapes use N for the number of clips or images fed to a tower at once (batch x clips, flattened),
L for tokens and D for the tower's width.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from videollm.errors import CheckpointError, ConfigError, DataError, closest
from videollm.models.eva_vit import DropPath  # stochastic depth, shared with the EVA ViT

logger = logging.getLogger(__name__)

VISION = "vision"
AUDIO = "audio"
BUILDABLE_MODALITIES = (VISION, AUDIO)
# Every modality of the released checkpoint; keys of the ones we do not build are skipped.
RELEASED_MODALITIES = ("vision", "text", "audio", "depth", "thermal", "imu")
CHECKPOINT_FILENAME = "imagebind_huge.pth"


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------


@dataclass
class ImageBindConfig:
    """Every dimension of the two towers; the defaults are ImageBind-Huge.

    ``modalities`` lists the towers to build (a subset of ``("vision", "audio")``).
    """

    modalities: List[str] = field(default_factory=lambda: [VISION, AUDIO])
    out_embed_dim: int = 1024

    vision_embed_dim: int = 1280
    vision_num_blocks: int = 32
    vision_num_heads: int = 16
    vision_image_size: int = 224
    vision_num_frames: int = 2  # a still image is repeated into a clip of this many frames
    vision_kernel_size: List[int] = field(default_factory=lambda: [2, 14, 14])  # (T, H, W)
    vision_drop_path: float = 0.0

    audio_embed_dim: int = 768
    audio_num_blocks: int = 12
    audio_num_heads: int = 12
    audio_num_mel_bins: int = 128
    audio_target_len: int = 204
    audio_kernel_size: int = 16
    audio_stride: int = 10
    audio_drop_path: float = 0.1
    audio_logit_scale: float = 20.0  # fixed (a buffer), from the released model definition

    mlp_ratio: int = 4


def imagebind_huge_config(modalities: Sequence[str] = (VISION, AUDIO)) -> ImageBindConfig:
    """The released ImageBind-Huge dimensions for the given towers."""
    return ImageBindConfig(modalities=list(modalities))


def imagebind_tiny_config(modalities: Sequence[str] = (VISION, AUDIO)) -> ImageBindConfig:
    """A few-thousand-parameter model with the same structure, for tests.

    Audio input (1, 16, 36) with kernel 16 / stride 10 gives 1 x 3 patches; vision input 28 px with
    patch 14 gives 2 x 2 patches.
    """
    return ImageBindConfig(
        modalities=list(modalities),
        out_embed_dim=24,
        vision_embed_dim=32,
        vision_num_blocks=2,
        vision_num_heads=4,
        vision_image_size=28,
        vision_kernel_size=[2, 14, 14],
        audio_embed_dim=32,
        audio_num_blocks=2,
        audio_num_heads=4,
        audio_num_mel_bins=16,
        audio_target_len=36,
        audio_kernel_size=16,
        audio_stride=10,
    )


# ------------------------------------------------------------------------------------------------
# Preprocessors: patchify, prepend CLS, add learned positions
# ------------------------------------------------------------------------------------------------


class PadIm2Video(nn.Module):
    """Turn images into clips: (N, C, H, W) -> (N, C, T, H, W), repeating a single frame T times."""

    def __init__(self, ntimes: int) -> None:
        super().__init__()
        self.ntimes = ntimes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            x = x.unsqueeze(2)
        elif x.ndim != 5:
            raise DataError(f"vision input must be (N, C, H, W) or (N, C, T, H, W), got {tuple(x.shape)}")
        if x.shape[2] == 1:
            x = x.expand(-1, -1, self.ntimes, -1, -1)
        return x


class PatchStem(nn.Module):
    """Convolutional patch embedding, optionally followed by a LayerNorm.

    ``proj`` is the convolution itself (audio) or ``Sequential(PadIm2Video, Conv3d)`` (vision),
    which gives the released keys ``rgbt_stem.proj.weight`` and ``rgbt_stem.proj.1.weight``.
    """

    def __init__(self, proj: nn.Module, norm_layer: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.proj = proj
        self.norm_layer = norm_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, [T,] H, W) -> (N, patches, D)."""
        x = self.proj(x).flatten(2).transpose(1, 2)
        if self.norm_layer is not None:
            x = self.norm_layer(x)
        return x


class LearnedPositions(nn.Module):
    """Holds the learned position table ``pos_embed`` (1, 1 + patches, D)."""

    def __init__(self, num_tokens: int, dim: int) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.empty(1, num_tokens, dim))


class PatchPreprocessor(nn.Module):
    """Stem, CLS token and positions: (N, C, [T,] H, W) -> tokens (N, 1 + patches, D).

    The stem is called ``rgbt_stem`` for both towers, as in the released checkpoint.
    Positions are not interpolated: the input must have the configured size.
    """

    def __init__(self, stem: PatchStem, num_patches: int, dim: int) -> None:
        super().__init__()
        self.rgbt_stem = stem
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.pos_embedding_helper = LearnedPositions(1 + num_patches, dim)
        # Initialisation of the original (OpenCLIP style): N(0, 1) scaled by D^-0.5.
        with torch.no_grad():
            nn.init.normal_(self.cls_token, std=dim**-0.5)
            nn.init.normal_(self.pos_embedding_helper.pos_embed, std=dim**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.rgbt_stem(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1)
        pos = self.pos_embedding_helper.pos_embed
        if tokens.shape[1] != pos.shape[1]:
            raise DataError(
                f"input of shape {tuple(x.shape)} gives {tokens.shape[1]} tokens but the position "
                f"table has {pos.shape[1]}; resize the input to the size the model was built for"
            )
        return tokens + pos


# ------------------------------------------------------------------------------------------------
# Trunk: a pre-LN transformer
# ------------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Multi-head self-attention with the parameters (and names) of ``nn.MultiheadAttention``.

    ``in_proj_weight`` (3D, D), ``in_proj_bias`` (3D), ``out_proj`` Linear(D, D) and, with
    ``add_bias_kv``, ``bias_k``/``bias_v`` (1, 1, D): one extra learned key and value appended to
    the projected keys and values of every sequence (so each query can attend to a "null" slot).
    Works batch-first: (N, L, D) -> (N, L, D).
    """

    def __init__(self, dim: int, num_heads: int, add_bias_kv: bool) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"attention width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, dim))
            self.bias_v = nn.Parameter(torch.empty(1, 1, dim))
        else:
            self.bias_k = self.bias_v = None
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)
        if add_bias_kv:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(n, 1, dim)], dim=1)
            v = torch.cat([v, self.bias_v.expand(n, 1, dim)], dim=1)

        def heads(t: torch.Tensor) -> torch.Tensor:  # (N, L', D) -> (N, heads, L', D / heads)
            return t.unflatten(-1, (self.num_heads, dim // self.num_heads)).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        return self.out_proj(out.transpose(1, 2).reshape(n, length, dim))


class Mlp(nn.Module):
    """Linear -> exact GELU -> Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block: x + DropPath(attn(LN(x))), then x + DropPath(mlp(LN(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, add_bias_kv: bool, drop_path: float) -> None:
        super().__init__()
        self.attn = SelfAttention(dim, num_heads, add_bias_kv)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm_1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio * dim)
        self.norm_2 = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm_1(x)))
        x = x + self.drop_path(self.mlp(self.norm_2(x)))
        return x


class Trunk(nn.Module):
    """Optional LayerNorm, then ``num_blocks`` blocks: (N, L, D) -> (N, L, D).

    ``pre_transformer_layer`` is a one-element Sequential so that the vision tower's LayerNorm has
    the released key ``pre_transformer_layer.0.weight``. Drop-path rates grow linearly from 0 in
    the first block to ``drop_path`` in the last, as in the original.
    """

    def __init__(
        self,
        dim: int,
        num_blocks: int,
        num_heads: int,
        *,
        pre_layer_norm: bool,
        add_bias_kv: bool,
        drop_path: float,
        mlp_ratio: int = 4,
    ) -> None:
        super().__init__()
        self.pre_transformer_layer = nn.Sequential(nn.LayerNorm(dim, eps=1e-6) if pre_layer_norm else nn.Identity())
        # Plain Python (not torch.linspace) so that the model can be built on the meta device.
        rates = [drop_path * i / max(num_blocks - 1, 1) for i in range(num_blocks)]
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio, add_bias_kv, r) for r in rates])
        for module in self.modules():  # "jax" initialisation of the original
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.pre_transformer_layer(tokens))


# ------------------------------------------------------------------------------------------------
# Heads and postprocessors
# ------------------------------------------------------------------------------------------------


class SelectCLS(nn.Module):
    """(N, L, D) -> (N, D): the first (CLS) token."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


class L2Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1, p=2)


class FixedLogitScale(nn.Module):
    """Multiply by exp(log_logit_scale), capped at 100; the scale is a buffer (not trained).

    In the released model the audio tower's scale is log(20) (and it is a *buffer*, so a trainer
    that saves "trainable parameters plus buffers" saves it too).
    """

    def __init__(self, scale: float, max_scale: float = 100.0) -> None:
        super().__init__()
        self.max_scale = max_scale
        self.register_buffer("log_logit_scale", torch.tensor(math.log(scale), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_logit_scale.exp().clamp(max=self.max_scale) * x


def _head(dim: int, out_dim: int) -> nn.Sequential:
    """LayerNorm -> CLS -> Linear(no bias): keys ``0.weight``, ``0.bias``, ``2.weight``."""
    return nn.Sequential(nn.LayerNorm(dim, eps=1e-6), SelectCLS(), nn.Linear(dim, out_dim, bias=False))


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------


class ImageBindModel(nn.Module):
    """ImageBind towers for the modalities in ``config.modalities``.

    Inputs per modality:

    * audio: log-mel spectrograms (N, 1, num_mel_bins, target_len), or (B, S, 1, mels, frames)
    * vision: images (N, 3, H, W) or clips (N, 3, T, H, W); or (B, S, 3, H, W) frames

    Outputs: see :meth:`get_audio_feature` and :meth:`forward`.
    """

    config_schema = ImageBindConfig

    def __init__(self, config: Optional[ImageBindConfig] = None) -> None:
        super().__init__()
        self.config = config = config or ImageBindConfig()
        unknown = [m for m in config.modalities if m not in BUILDABLE_MODALITIES]
        if unknown or not config.modalities:
            raise ConfigError(
                f"imagebind modalities {list(config.modalities)}: only {list(BUILDABLE_MODALITIES)} can be built"
                + (closest(unknown[0], BUILDABLE_MODALITIES) if unknown else "")
            )
        self.modalities = tuple(m for m in BUILDABLE_MODALITIES if m in config.modalities)
        self.modality_preprocessors = nn.ModuleDict()
        self.modality_trunks = nn.ModuleDict()
        self.modality_heads = nn.ModuleDict()
        self.modality_postprocessors = nn.ModuleDict()
        if VISION in self.modalities:
            self._build_vision(config)
        if AUDIO in self.modalities:
            self._build_audio(config)

    def _build_vision(self, c: ImageBindConfig) -> None:
        kt, kh, kw = c.vision_kernel_size
        conv = nn.Conv3d(3, c.vision_embed_dim, kernel_size=(kt, kh, kw), stride=(kt, kh, kw), bias=False)
        stem = PatchStem(nn.Sequential(PadIm2Video(c.vision_num_frames), conv))
        grid = (c.vision_num_frames // kt) * (c.vision_image_size // kh) * (c.vision_image_size // kw)
        self.modality_preprocessors[VISION] = PatchPreprocessor(stem, grid, c.vision_embed_dim)
        self.modality_trunks[VISION] = Trunk(
            c.vision_embed_dim, c.vision_num_blocks, c.vision_num_heads,
            pre_layer_norm=True, add_bias_kv=False, drop_path=c.vision_drop_path, mlp_ratio=c.mlp_ratio,
        )
        self.modality_heads[VISION] = _head(c.vision_embed_dim, c.out_embed_dim)
        self.modality_postprocessors[VISION] = L2Normalize()

    def _build_audio(self, c: ImageBindConfig) -> None:
        conv = nn.Conv2d(1, c.audio_embed_dim, kernel_size=c.audio_kernel_size, stride=c.audio_stride, bias=False)
        # The stem's LayerNorm keeps PyTorch's default eps (1e-5); every other one uses 1e-6.
        stem = PatchStem(conv, nn.LayerNorm(c.audio_embed_dim))
        rows = (c.audio_num_mel_bins - c.audio_kernel_size) // c.audio_stride + 1
        cols = (c.audio_target_len - c.audio_kernel_size) // c.audio_stride + 1
        self.modality_preprocessors[AUDIO] = PatchPreprocessor(stem, rows * cols, c.audio_embed_dim)
        self.modality_trunks[AUDIO] = Trunk(
            c.audio_embed_dim, c.audio_num_blocks, c.audio_num_heads,
            pre_layer_norm=False, add_bias_kv=True, drop_path=c.audio_drop_path, mlp_ratio=c.mlp_ratio,
        )
        self.modality_heads[AUDIO] = _head(c.audio_embed_dim, c.out_embed_dim)
        self.modality_postprocessors[AUDIO] = nn.Sequential(L2Normalize(), FixedLogitScale(c.audio_logit_scale))

    @classmethod
    def from_config(cls, cfg=None) -> "ImageBindModel":
        """Build from an OmegaConf DictConfig (or dict / None) holding :class:`ImageBindConfig` keys."""
        if cfg is None:
            return cls(ImageBindConfig())
        from omegaconf import DictConfig, OmegaConf

        values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        known = set(ImageBindConfig.__dataclass_fields__)
        for key in values:
            if key not in known:
                raise ConfigError(f"imagebind.{key}: unknown key{closest(key, known)}")
        for key in ("modalities", "vision_kernel_size"):
            if key in values:
                values[key] = list(values[key])
        return cls(ImageBindConfig(**values))

    def _check(self, modality: str) -> None:
        if modality not in self.modalities:
            raise ConfigError(
                f"modality '{modality}' is not built in this ImageBind model (built: {list(self.modalities)}); "
                f"add it to imagebind modalities{closest(modality, BUILDABLE_MODALITIES)}"
            )

    def get_audio_feature(self, x: torch.Tensor, modality: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """Run one tower; the name is the original's, it serves vision as well.

        Args:
            x: audio (N, 1, mels, frames) or vision (N, 3, H, W) / (N, 3, T, H, W); with
                ``x.ndim >= 5`` the first two dims (B, S) are flattened to B*S clips and restored
                at the end (so (B, S, 1, mels, frames) and (B, S, 3, H, W) frames both work).
            modality: ``"audio"`` or ``"vision"``.

        Returns:
            ``(feature, embedding)``: ``feature`` is the head without its last Linear (LayerNorm
            then CLS), (B, S, D) or (N, D); ``embedding`` is that Linear plus the postprocessor,
            (B, S, out_dim) or (N, out_dim): norm 20 for audio, norm 1 for vision.
        """
        self._check(modality)
        batch_dims = x.shape[:2] if x.ndim >= 5 else None
        if batch_dims is not None:
            x = x.flatten(0, 1)
        tokens = self.modality_trunks[modality](self.modality_preprocessors[modality](x))
        head = self.modality_heads[modality]
        feature = head[1](head[0](tokens))
        embedding = self.modality_postprocessors[modality](head[2](feature))
        if batch_dims is not None:
            feature = feature.unflatten(0, batch_dims)
            embedding = embedding.unflatten(0, batch_dims)
        return feature, embedding

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """ImageBind's own forward: {modality: input} -> {modality: embedding (B, out_dim)}.

        Inputs with ``ndim >= 5`` hold S clips per sample; their embeddings are averaged over S.
        """
        outputs = {}
        for modality, x in inputs.items():
            _, embedding = self.get_audio_feature(x, modality)
            outputs[modality] = embedding.mean(dim=1) if x.ndim >= 5 else embedding
        return outputs


def imagebind_huge(modalities: Sequence[str] = (VISION, AUDIO)) -> ImageBindModel:
    """ImageBind-Huge towers (random init); load weights with :func:`load_imagebind_weights`."""
    return ImageBindModel(imagebind_huge_config(modalities))


# ------------------------------------------------------------------------------------------------
# Loading the released checkpoint
# ------------------------------------------------------------------------------------------------


@dataclass
class ImageBindLoadSummary:
    """What :func:`load_imagebind_weights` did, key by key."""

    loaded: List[str] = field(default_factory=list)
    skipped_other_modality: List[str] = field(default_factory=list)  # towers not built
    missing: List[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: List[str] = field(default_factory=list)  # in the file, for a built tower, unknown

    def __str__(self) -> str:
        return (
            f"{len(self.loaded)} loaded, {len(self.skipped_other_modality)} skipped (modalities not built), "
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected"
        )


def _modality_of(key: str) -> Optional[str]:
    """'modality_trunks.audio.blocks.0...' -> 'audio'; None for keys outside the four groups."""
    parts = key.split(".")
    if len(parts) > 1 and parts[0].startswith("modality_"):
        return parts[1]
    return None


def load_imagebind_weights(
    model: ImageBindModel,
    path_or_state_dict: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
    *,
    prefix: str = "",
    strict: bool = False,
    assign: bool = False,
) -> ImageBindLoadSummary:
    """Load the released ``imagebind_huge.pth`` (or any state dict of the same layout).

    Args:
        model: the model to fill.
        path_or_state_dict: a file, a directory holding ``imagebind_huge.pth`` (what the
            original's ``imagebind_ckpt_path`` names), or an in-memory state dict. Files are read
            with ``torch.load(weights_only=True)``.
        prefix: stripped from the keys first (e.g. ``"audio_encoder."`` for Video-LLaMA checkpoints);
            keys without it are ignored.
        strict: raise :class:`CheckpointError` when keys are missing or unexpected.
        assign: passed to ``load_state_dict`` (use it for a model built on the meta device).

    Keys of the released modalities that this model did not build are skipped and counted.
    A key whose shape differs from the model's raises :class:`CheckpointError`.
    """
    source = "<state dict>"
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = os.fspath(path_or_state_dict)
        if os.path.isdir(path):
            path = os.path.join(path, CHECKPOINT_FILENAME)
        source = path
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: ImageBind checkpoint not found (download {CHECKPOINT_FILENAME})")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling errors come in many types
            raise CheckpointError(f"{path}: cannot load as a weights-only torch checkpoint: {exc}") from exc
    else:
        state = path_or_state_dict
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source}: expected a state dict, got {type(state).__name__}")

    own = model.state_dict()
    summary = ImageBindLoadSummary()
    to_load: Dict[str, torch.Tensor] = {}
    for raw_key, tensor in state.items():
        if not raw_key.startswith(prefix):
            continue
        key = raw_key[len(prefix) :]
        modality = _modality_of(key)
        if key in own:
            if tuple(tensor.shape) != tuple(own[key].shape):
                raise CheckpointError(
                    f"{source}: {raw_key} has shape {tuple(tensor.shape)} but the model expects "
                    f"{tuple(own[key].shape)}; is the model config ImageBind-Huge?"
                )
            to_load[key] = tensor
            summary.loaded.append(key)
        elif modality in RELEASED_MODALITIES and modality not in model.modalities:
            summary.skipped_other_modality.append(key)
        else:
            summary.unexpected.append(key)
    summary.missing = [k for k in own if k not in to_load]
    if strict and (summary.missing or summary.unexpected):
        raise CheckpointError(
            f"{source}: missing keys {summary.missing[:5]}, unexpected keys {summary.unexpected[:5]} ({summary})"
        )
    model.load_state_dict(to_load, strict=False, assign=assign)
    logger.info("ImageBind weights from %s: %s", source, summary)
    return summary

"""EVA ViT-g/14: the frozen per-frame image encoder of Video-LLaMA (BLIP-2 style).

The original Video-LLaMA (following BLIP-2 / LAVIS) uses EVA-CLIP-g's vision tower with its last
block dropped: 224 px input, patch 14, width 1408, **39** blocks, 16 heads of 88, MLP hidden 6144
(``int(1408 * 4.3637)``), exact GELU, pre-norm LayerNorm (eps 1e-6), an absolute position
embedding over CLS + 16x16 patches, **no final norm and no head**. ``forward`` returns all
``1 + num_patches`` tokens (257 at 224 px) of the last block.

Quirks kept on purpose (see the project's reference notes, item M1):

* the qkv projection is one ``Linear`` *without* bias plus two separate parameters ``q_bias`` and
  ``v_bias``; the key bias is fixed at zero, so the effective bias is ``cat(q_bias, 0, v_bias)``;
* ``q`` is multiplied by ``head_dim ** -0.5`` before ``q @ k^T`` (no other scaling);
* ``precision="fp16"`` halves only Conv2d/Linear weights and biases (:func:`convert_weights_to_fp16`);
  ``cls_token``, ``pos_embed``, the LayerNorms and ``q_bias``/``v_bias`` stay fp32, so the model
  runs under autocast (or after ``.float()`` on CPU).

State-dict key names are part of the public interface: they are exactly those of the released
LAVIS ``eva_vit_g.pth`` (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``,
``blocks.N.{norm1,attn.q_bias,attn.v_bias,attn.qkv.weight,attn.proj,norm2,mlp.fc1,mlp.fc2}.*``);
the parent model adds the ``visual_encoder.`` prefix.

Also here: :class:`FP32LayerNorm`, the LayerNorm that BLIP-2 puts after the ViT (``ln_vision``,
eps 1e-5), which computes in fp32 and casts back to the input dtype.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from videollm.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "EVAVisionTransformer",
    "FP32LayerNorm",
    "LoadResult",
    "convert_weights_to_fp16",
    "create_eva_vit_g",
    "interpolate_pos_embed",
    "load_eva_vit_weights",
]

# EVA ViT-g/14 as BLIP-2 uses it (the original's create_eva_vit_g).
EVA_G_PATCH_SIZE = 14
EVA_G_WIDTH = 1408
EVA_G_DEPTH = 39  # EVA-CLIP-g has 40 blocks; BLIP-2 drops the last one.
EVA_G_HEADS = 1408 // 88
EVA_G_MLP_RATIO = 4.3637  # int(1408 * 4.3637) == 6144
EVA_G_LN_EPS = 1e-6


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    pair = tuple(int(v) for v in value)
    if len(pair) != 2:
        raise ConfigError(f"{name}: expected an int or a pair of ints, got {value!r}")
    return pair  # type: ignore[return-value]


class DropPath(nn.Module):
    """Stochastic depth: zero the whole residual branch of a sample with probability ``p``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class PatchEmbed(nn.Module):
    """Non-overlapping patches via a strided conv: (B, C, H, W) -> (B, N, D), N = (H/p) * (W/p)."""

    def __init__(self, img_size: tuple[int, int], patch_size: tuple[int, int], in_chans: int, embed_dim: int) -> None:
        super().__init__()
        if img_size[0] % patch_size[0] or img_size[1] % patch_size[1]:
            raise ConfigError(
                f"img_size {img_size} is not a multiple of patch_size {patch_size}; "
                "choose an image size divisible by the patch size"
            )
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = (img_size[0] // patch_size[0], img_size[1] // patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, channels, height, width) -> (batch, num_patches, embed_dim)."""
        if x.ndim != 4 or tuple(x.shape[-2:]) != self.img_size:
            raise ConfigError(
                f"EVA ViT input has shape {tuple(x.shape)} but the model was built for "
                f"(batch, {self.proj.in_channels}, {self.img_size[0]}, {self.img_size[1]}); "
                "resize the frames or set the model's image_size"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with EVA's split qkv bias (q and v learned, k fixed at zero)."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, tokens, dim) -> (batch, tokens, dim)."""
        b, n, d = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)
        # (B, N, 3*D) -> (3, B, heads, N, head_dim)
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        # The original scales q explicitly before q @ k^T; do the same and tell SDPA not to rescale.
        q = q * self.scale
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.0, scale=1.0
        )
        out = out.transpose(1, 2).reshape(b, n, d)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2 (-> dropout); no dropout between fc1 and fc2, like the original."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)); no layer scale."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_hidden: int,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        eps: float = EVA_G_LN_EPS,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_hidden, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, tokens, dim) -> (batch, tokens, dim)."""
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class EVAVisionTransformer(nn.Module):
    """EVA ViT without final norm or head; returns every token of the last block.

    Args:
        img_size: input resolution (int or (height, width)); 224 for Video-LLaMA.
        patch_size: patch side (int or pair); 14 for ViT-g/14.
        in_chans: input channels.
        embed_dim: width D (1408 for ViT-g).
        depth: number of blocks (39 for BLIP-2's ViT-g).
        num_heads: attention heads (16 for ViT-g; head dim = D / heads).
        mlp_ratio: MLP hidden = int(D * mlp_ratio), unless ``mlp_hidden`` is given.
        mlp_hidden: explicit MLP hidden size (overrides ``mlp_ratio``).
        drop_rate, attn_drop_rate: dropout after proj/fc2 and on attention probabilities.
        drop_path_rate: stochastic depth, linearly increasing from 0 to this over the blocks.
        layer_norm_eps: LayerNorm eps (1e-6 for EVA).
        use_checkpoint: recompute each block in the backward pass (saves activation memory).
        pos_embed_init_std: std of the random position embedding (EVA: 0.02). Only matters when
            training from scratch: on flat synthetic frames a larger value lets the Q-Former's
            attention pooling see where a patch is, which motion needs.

    Shapes: ``forward(x)``: (batch, in_chans, H, W) -> (batch, 1 + num_patches, embed_dim),
    token 0 is CLS.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = EVA_G_PATCH_SIZE,
        in_chans: int = 3,
        embed_dim: int = EVA_G_WIDTH,
        depth: int = EVA_G_DEPTH,
        num_heads: int = EVA_G_HEADS,
        mlp_ratio: float = EVA_G_MLP_RATIO,
        mlp_hidden: int | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        layer_norm_eps: float = EVA_G_LN_EPS,
        use_checkpoint: bool = False,
        pos_embed_init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.pos_embed_init_std = pos_embed_init_std
        self.image_size = _pair(img_size, "img_size")
        self.num_features = self.embed_dim = embed_dim
        self.use_checkpoint = use_checkpoint
        self.patch_embed = PatchEmbed(self.image_size, _pair(patch_size, "patch_size"), in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        hidden = int(mlp_hidden) if mlp_hidden is not None else int(embed_dim * mlp_ratio)
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist() if depth > 0 else []
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, hidden, drop_rate, attn_drop_rate, rates[i], layer_norm_eps)
            for i in range(depth)
        )
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        # EVA/BEiT init: trunc-normal(0.02) for Linear weights, pos_embed and cls_token; zero biases;
        # LayerNorm 1/0; then proj and fc2 of block i (1-based) divided by sqrt(2 i). Irrelevant
        # once the released weights are loaded, but it keeps random-weight models well scaled.
        nn.init.trunc_normal_(self.pos_embed, std=self.pos_embed_init_std)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for i, block in enumerate(self.blocks, start=1):
            block.attn.proj.weight.div_(math.sqrt(2.0 * i))
            block.mlp.fc2.weight.div_(math.sqrt(2.0 * i))

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, cols), e.g. (16, 16) at 224 px with patch 14."""
        return self.patch_embed.grid_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn per-block activation checkpointing on or off (only active while training with grads)."""
        self.use_checkpoint = enable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, channels, height, width) -> (batch, 1 + num_patches, embed_dim)."""
        x = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1) + self.pos_embed
        x = self.pos_drop(x)
        for block in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                # Non-reentrant checkpointing restores the RNG state, so dropout/drop-path masks in the
                # recomputation equal those of the forward pass.
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back to the input dtype (BLIP-2's ``ln_vision``).

    The default eps is torch's 1e-5, as in the original. Shapes: (..., D) -> (..., D).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        out = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return out.to(x.dtype)


def convert_weights_to_fp16(module: nn.Module) -> nn.Module:
    """Halve the weights and biases of every Conv1d/Conv2d/Linear in ``module``, in place.

    Everything else (cls_token, pos_embed, LayerNorms, q_bias, v_bias) stays as it is, which
    reproduces the original's ``vit_precision="fp16"``. Returns ``module``.
    """
    for sub in module.modules():
        if isinstance(sub, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            sub.weight.data = sub.weight.data.half()
            if sub.bias is not None:
                sub.bias.data = sub.bias.data.half()
    return module


def interpolate_pos_embed(
    pos_embed: torch.Tensor, new_grid: int | Sequence[int], num_extra_tokens: int = 1
) -> torch.Tensor:
    """Resize an absolute position embedding to another patch grid (bicubic, extra tokens kept).

    Args:
        pos_embed: (1, num_extra_tokens + S*S, D); the old grid must be square (S x S).
        new_grid: the new grid, int (square) or (rows, cols).
        num_extra_tokens: leading tokens copied unchanged (1: the CLS token).

    Returns:
        (1, num_extra_tokens + rows*cols, D). The input tensor itself when the grid is unchanged;
        otherwise a new fp32 tensor (the interpolation runs in fp32, like the original).
    """
    rows, cols = _pair(new_grid, "new_grid")
    n_old = pos_embed.shape[-2] - num_extra_tokens
    side = int(round(math.sqrt(n_old)))
    if pos_embed.ndim != 3 or n_old <= 0 or side * side != n_old:
        raise CheckpointError(
            f"pos_embed of shape {tuple(pos_embed.shape)} is not (1, {num_extra_tokens} + S*S, D) "
            "for a square grid S x S; is this an EVA ViT checkpoint?"
        )
    if (side, side) == (rows, cols):
        return pos_embed
    logger.info("interpolating pos_embed from %dx%d to %dx%d patches", side, side, rows, cols)
    dim = pos_embed.shape[-1]
    pos_embed = pos_embed.float()
    extra, grid = pos_embed[:, :num_extra_tokens], pos_embed[:, num_extra_tokens:]
    grid = grid.reshape(-1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat((extra, grid), dim=1)


def create_eva_vit_g(
    img_size: int = 224,
    drop_path_rate: float = 0.0,
    use_checkpoint: bool = False,
    precision: str = "fp16",
    **dims,
) -> EVAVisionTransformer:
    """Build EVA ViT-g/14 (39 blocks, width 1408) with random weights; load with :func:`load_eva_vit_weights`.

    Args:
        img_size: input resolution (224 in Video-LLaMA; 16x16 patches + CLS = 257 tokens).
        drop_path_rate: stochastic depth (0 in Video-LLaMA).
        use_checkpoint: per-block gradient checkpointing.
        precision: ``"fp16"`` (Conv/Linear weights halved, the original's default) or ``"fp32"``.
        **dims: overrides of any :class:`EVAVisionTransformer` argument (``patch_size``,
            ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``, ``mlp_hidden``, ...), e.g. for a
            tiny test model.
    """
    if precision not in ("fp16", "fp32"):
        raise ConfigError(f"vit_precision: {precision!r} is not supported; use 'fp16' or 'fp32'")
    model = EVAVisionTransformer(
        img_size=img_size, drop_path_rate=drop_path_rate, use_checkpoint=use_checkpoint, **dims
    )
    if precision == "fp16":
        convert_weights_to_fp16(model)
    return model


class LoadResult(NamedTuple):
    """Keys that did not match while loading (same fields as torch's ``_IncompatibleKeys``)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def load_eva_vit_weights(
    model: EVAVisionTransformer, state_dict_or_path: Mapping[str, torch.Tensor] | str | os.PathLike
) -> LoadResult:
    """Load released EVA ViT-g weights (LAVIS ``eva_vit_g.pth``) into ``model``, non-strictly.

    The file is read with ``torch.load(..., map_location="cpu", weights_only=True)``. A leading
    ``visual_encoder.`` prefix on every key is accepted and removed. If the checkpoint's
    ``pos_embed`` has another patch grid than the model, it is resized with
    :func:`interpolate_pos_embed`. Like the original, keys that do not match are tolerated
    (``strict=False``) but they are returned and logged as warnings; a key present on both sides
    with a different shape raises :class:`CheckpointError`. Tensors are cast to the dtype of the
    model's parameter they land in (fp16 Linear weights stay fp16).
    """
    source = "<state dict>"
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        source = os.fspath(state_dict_or_path)
        if not os.path.isfile(source):
            raise CheckpointError(
                f"{source}: EVA ViT checkpoint not found; download eva_vit_g.pth from LAVIS and point the "
                "model config at it"
            )
        try:
            state_dict = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling errors come in many types
            raise CheckpointError(f"{source}: cannot be read as a torch checkpoint ({exc})") from exc
    else:
        state_dict = state_dict_or_path
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{source}: expected a state dict (mapping of name -> tensor), got {type(state_dict)}")
    if isinstance(state_dict.get("model"), Mapping) and "pos_embed" not in state_dict:
        state_dict = state_dict["model"]

    prefix = "visual_encoder."
    state = dict(state_dict)
    if state and all(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items()}

    if "pos_embed" in state:
        state["pos_embed"] = interpolate_pos_embed(state["pos_embed"], model.grid_size)

    own = model.state_dict()
    for key, value in state.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(value.shape)} but the model expects {tuple(own[key].shape)}; "
                "the checkpoint does not match the ViT configuration (embed_dim/depth/patch_size)"
            )
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:
        logger.warning("%s: %d keys missing from the EVA ViT checkpoint: %s", source,
                       len(result.missing_keys), result.missing_keys)
    if result.unexpected_keys:
        logger.warning("%s: %d unexpected keys in the EVA ViT checkpoint (ignored): %s", source,
                       len(result.unexpected_keys), result.unexpected_keys)
    return LoadResult(list(result.missing_keys), list(result.unexpected_keys))

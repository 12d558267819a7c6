"""Validation of what the dataclass schemas cannot see: the nested model dictionaries and the
constraints between keys.

``model.vit``, ``model.qformer``, ``model.video_qformer``, ``model.audio_qformer``,
``model.imagebind`` and ``model.llm_config`` are free-form dictionaries in the model schema
(they are passed on as keyword arguments), so a typo in them used to be ignored or to surface
as a ``TypeError`` deep inside a constructor. Here every key is checked against what the part
that receives it accepts (with a "did you mean" suggestion), every value's type and range, and
the structural constraints of the model:

* widths divisible by their attention heads (ViT, every Q-Former, the LLM, ImageBind towers), the
  LLM's heads divisible by its key/value heads;
* at least one query token per Q-Former, at least one frame position;
* the video and audio Q-Formers as wide as the image Q-Former (``llama_proj`` and the frame
  position embedding are built at that width);
* keys that the model sets itself (``model.vit.img_size`` comes from ``model.image_size``,
  ``qformer.encoder_width`` from the encoder) are refused with the key to use instead.

Across sections (:func:`validate_cross_sections`): a dataset's ``n_frms`` must fit the model's
frame positions (``model.max_frame_pos``) and be >= 1.

Every error is a :class:`~videollm.errors.ConfigError` naming the full key, e.g.
``model.llm_config.hiden_size: unknown key (did you mean hidden_size?)``.

Entry points: :func:`validate_model_values` (``model:`` as a plain dict; called by
:func:`videollm.config.validate_config`, and meant for ``VideoLLAMA.from_config``) and
:func:`validate_cross_sections`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from videollm.config import Range, validate_mapping
from videollm.errors import ConfigError, closest

POSITIVE = Range(ge=1)
NON_NEGATIVE = Range(ge=0)
PROBABILITY = Range(ge=0, lt=1)
EPS = Range(gt=0)

# Top-level model keys and their ranges (the schema gives their types).
MODEL_RANGES: Dict[str, Range] = {
    "image_size": POSITIVE,
    "drop_path_rate": PROBABILITY,
    "num_query_token": Range(ge=1, why="the image Q-Former needs at least one query token"),
    "num_video_query_token": Range(ge=1, why="the video Q-Former needs at least one query token"),
    "num_audio_query_token": Range(ge=1, why="the audio Q-Former needs at least one query token"),
    "max_frame_pos": Range(ge=1, why="frame positions of the video Q-Former: at least one frame"),
    "max_txt_len": POSITIVE,
    "device_8bit": NON_NEGATIVE,
}


@dataclass
class ViTOverrides:
    """What ``model.vit`` may set: the arguments of ``EVAVisionTransformer`` that the model does
    not set itself (a test keeps the two in step)."""

    patch_size: Union[int, List[int]] = 14
    in_chans: int = 3
    embed_dim: int = 1408
    depth: int = 39
    num_heads: int = 16
    mlp_ratio: float = 4.3637
    mlp_hidden: Optional[int] = None
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    layer_norm_eps: float = 1e-6
    pos_embed_init_std: float = 0.02


VIT_RANGES = {"in_chans": POSITIVE, "embed_dim": POSITIVE, "depth": POSITIVE, "num_heads": POSITIVE,
              "mlp_ratio": Range(gt=0), "mlp_hidden": POSITIVE, "drop_rate": PROBABILITY,
              "attn_drop_rate": PROBABILITY, "layer_norm_eps": EPS, "pos_embed_init_std": NON_NEGATIVE}
# keys of the ViT that come from top-level model keys
VIT_SET_BY_MODEL = {"img_size": "model.image_size", "drop_path_rate": "model.drop_path_rate",
                    "use_checkpoint": "model.use_grad_checkpoint"}

QFORMER_RANGES = {"hidden_size": POSITIVE, "num_hidden_layers": POSITIVE, "num_attention_heads": POSITIVE,
                  "intermediate_size": POSITIVE, "hidden_dropout_prob": PROBABILITY,
                  "attention_probs_dropout_prob": PROBABILITY, "layer_norm_eps": EPS,
                  "max_position_embeddings": POSITIVE, "cross_attention_freq": POSITIVE, "vocab_size": POSITIVE,
                  "initializer_range": NON_NEGATIVE, "pad_token_id": NON_NEGATIVE}
QFORMER_SET_BY_MODEL = {
    "encoder_width": "the width of the encoder it reads (set by the model)",
    "query_length": "model.num_query_token / num_video_query_token / num_audio_query_token",
}

IMAGEBIND_RANGES = {"out_embed_dim": POSITIVE, "vision_embed_dim": POSITIVE, "vision_num_blocks": POSITIVE,
                    "vision_num_heads": POSITIVE, "vision_image_size": POSITIVE, "vision_num_frames": POSITIVE,
                    "vision_drop_path": PROBABILITY, "audio_embed_dim": POSITIVE, "audio_num_blocks": POSITIVE,
                    "audio_num_heads": POSITIVE, "audio_num_mel_bins": POSITIVE, "audio_target_len": POSITIVE,
                    "audio_kernel_size": POSITIVE, "audio_stride": POSITIVE, "audio_drop_path": PROBABILITY,
                    "audio_logit_scale": Range(gt=0), "mlp_ratio": POSITIVE}

LLM_POSITIVE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "max_position_embeddings", "head_dim")
# accepted by transformers' configs although not in a default config's attributes
LLM_LEGACY_KEYS = ("rope_theta", "rope_scaling", "torch_dtype", "name_or_path", "attn_implementation")


def _check_ranges(values: Mapping[str, Any], ranges: Mapping[str, Range], prefix: str) -> None:
    for key, rng in ranges.items():
        if key in values:
            rng.check(values[key], f"{prefix}.{key}")


def _divisible(width: int, heads: int, width_key: str, heads_key: str) -> None:
    if heads > 0 and width % heads:
        raise ConfigError(f"{width_key}: {width} is not divisible by {heads_key} {heads} "
                          f"(each attention head needs an equal share of the width)")


def _refuse_set_by_model(values: Mapping[str, Any], reserved: Mapping[str, str], prefix: str) -> None:
    for key, source in reserved.items():
        if key in values:
            raise ConfigError(f"{prefix}.{key}: set by the model, not here; use {source}")


def _mapping(model: Mapping[str, Any], key: str, prefix: str) -> Dict[str, Any]:
    value = model.get(key) or {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{prefix}.{key}: expected a mapping, got {value!r}")
    return dict(value)


def validate_vit(vit: Dict[str, Any], image_size: int, prefix: str = "model.vit") -> None:
    """``model.vit`` overrides of the EVA ViT (keys, types, ranges, width / heads, patch / image)."""
    _refuse_set_by_model(vit, VIT_SET_BY_MODEL, prefix)
    validate_mapping(vit, ViTOverrides, prefix)
    _check_ranges(vit, VIT_RANGES, prefix)
    full = {f.name: f.default for f in dataclasses.fields(ViTOverrides)} | vit
    _divisible(full["embed_dim"], full["num_heads"], f"{prefix}.embed_dim", f"{prefix}.num_heads")
    patch = full["patch_size"]
    patches = list(patch) if isinstance(patch, (list, tuple)) else [patch, patch]
    if len(patches) != 2 or any(p < 1 for p in patches):
        raise ConfigError(f"{prefix}.patch_size: {patch!r} must be a positive int or [height, width]")
    if any(p > image_size for p in patches):
        raise ConfigError(f"{prefix}.patch_size: {patch!r} is larger than model.image_size {image_size} "
                          "(no patch would fit)")


def validate_qformer(overrides: Dict[str, Any], prefix: str, inherited: Optional[Dict[str, Any]] = None,
                     width: Optional[int] = None) -> Dict[str, Any]:
    """Q-Former overrides (``model.qformer`` or a branch's); returns the effective settings.

    ``inherited``: the image Q-Former's settings a branch Q-Former inherits (heads, FFN size);
    ``width``: the width a branch Q-Former must have (the image Q-Former's hidden size).
    """
    from videollm.models.qformer import QFormerConfig

    _refuse_set_by_model(overrides, QFORMER_SET_BY_MODEL, prefix)
    validate_mapping(overrides, QFormerConfig, prefix)
    _check_ranges(overrides, QFORMER_RANGES, prefix)
    defaults = {f.name: f.default for f in dataclasses.fields(QFormerConfig)}
    full = defaults | {k: v for k, v in (inherited or {}).items() if k in ("num_attention_heads", "intermediate_size")}
    if width is not None:
        if "hidden_size" in overrides and overrides["hidden_size"] != width:
            raise ConfigError(f"{prefix}.hidden_size: {overrides['hidden_size']} differs from the image Q-Former's "
                              f"hidden_size {width}; the branch Q-Former, its frame positions and llama_proj are "
                              "built at that width (remove the key)")
        full["hidden_size"] = width
    full |= overrides
    heads_key = f"{prefix}.num_attention_heads" if "num_attention_heads" in overrides else (
        "model.qformer.num_attention_heads" if inherited and "num_attention_heads" in inherited
        else f"{prefix}.num_attention_heads")
    _divisible(full["hidden_size"], full["num_attention_heads"], f"{prefix}.hidden_size", heads_key)
    return full


def validate_imagebind(overrides: Dict[str, Any], prefix: str = "model.imagebind") -> None:
    """``model.imagebind`` overrides of ImageBindConfig."""
    from videollm.models.imagebind import ImageBindConfig

    validate_mapping(overrides, ImageBindConfig, prefix)
    _check_ranges(overrides, IMAGEBIND_RANGES, prefix)
    full = dataclasses.asdict(ImageBindConfig()) | overrides
    for tower in ("vision", "audio"):
        _divisible(full[f"{tower}_embed_dim"], full[f"{tower}_num_heads"], f"{prefix}.{tower}_embed_dim",
                   f"{prefix}.{tower}_num_heads")
    unknown = [m for m in full["modalities"] if m not in ("vision", "audio")]
    if unknown:
        raise ConfigError(f"{prefix}.modalities: {unknown[0]!r} unknown; the audio branch builds 'vision' and 'audio'")
    kernel = full["vision_kernel_size"]
    if len(kernel) != 3 or any(k < 1 for k in kernel):
        raise ConfigError(f"{prefix}.vision_kernel_size: {kernel!r} must be three positive ints (time, height, width)")


def _llm_config_class(model_type: Any, prefix: str) -> Any:
    from transformers import CONFIG_MAPPING

    if not isinstance(model_type, str):
        raise ConfigError(f"{prefix}.model_type: expected a string, got {model_type!r}")
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(f"{prefix}.model_type: '{model_type}' is not a transformers model type"
                          f"{closest(model_type, list(CONFIG_MAPPING.keys()))}")
    return CONFIG_MAPPING[model_type]


def _type_matches(value: Any, default: Any) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    return True  # lists, dicts: left to transformers


def validate_llm_config(llm: Dict[str, Any], prefix: str = "model.llm_config") -> None:
    """``model.llm_config`` (transformers config kwargs for a randomly initialised LLM)."""
    import inspect

    cls = _llm_config_class(llm.get("model_type", "llama"), prefix)
    defaults = cls().to_dict()
    known = set(defaults) | set(getattr(cls, "attribute_map", {}) or {}) | set(LLM_LEGACY_KEYS)
    known |= {n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "kwargs")}
    for key, value in llm.items():
        if key == "model_type":
            continue
        if key not in known:
            raise ConfigError(f"{prefix}.{key}: unknown key for a {cls.__name__}{closest(key, sorted(known))}")
        if key in defaults and not _type_matches(value, defaults[key]):
            raise ConfigError(f"{prefix}.{key}: expected {type(defaults[key]).__name__}, got {value!r}")
        if key in LLM_POSITIVE:
            POSITIVE.check(value, f"{prefix}.{key}")
    full = defaults | llm
    hidden, heads = full.get("hidden_size"), full.get("num_attention_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and "head_dim" not in llm:
        _divisible(hidden, heads, f"{prefix}.hidden_size", f"{prefix}.num_attention_heads")
    kv = llm.get("num_key_value_heads")  # unset: one per attention head (its default follows num_attention_heads)
    if isinstance(heads, int) and isinstance(kv, int) and kv > 0 and heads % kv:
        raise ConfigError(f"{prefix}.num_attention_heads: {heads} is not a multiple of num_key_value_heads {kv} "
                          "(grouped-query attention shares each key/value head among equal groups)")


def validate_model_values(model: Mapping[str, Any], prefix: str = "model", schema: Optional[type] = None) -> None:
    """Nested dictionaries and structural constraints of a ``model:`` section (a plain dict whose
    top-level keys already passed the model's schema).

    ``schema``: the model class's ``config_schema`` (what ``from_config`` knows); without it the
    architecture is read from ``model["arch"]``. Only Video-LLaMA's schema is known here; other
    architectures are left to their own checks. In ``from_config``::

        validate_mapping(values, cls.config_schema, "model")
        validate_model_values(values, "model", cls.config_schema)
    """
    from videollm.models.video_llama import VideoLLAMAConfig

    if schema is not None:
        if schema is not VideoLLAMAConfig:
            return
    elif str(model.get("arch")) != "video_llama":
        return
    _check_ranges(model, MODEL_RANGES, prefix)

    image_size = int(model.get("image_size", VideoLLAMAConfig.image_size))
    validate_vit(_mapping(model, "vit", prefix), image_size, f"{prefix}.vit")
    image_q = _mapping(model, "qformer", prefix)
    image_full = validate_qformer(image_q, f"{prefix}.qformer")
    for branch in ("video_qformer", "audio_qformer"):
        validate_qformer(_mapping(model, branch, prefix), f"{prefix}.{branch}", inherited=image_q,
                         width=image_full["hidden_size"])
    validate_imagebind(_mapping(model, "imagebind", prefix), f"{prefix}.imagebind")
    llm = _mapping(model, "llm_config", prefix)
    if llm:
        validate_llm_config(llm, f"{prefix}.llm_config")


def _frames_of(proc: Any) -> Optional[int]:
    if not isinstance(proc, Mapping):
        return None
    n = proc.get("n_frms")
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def validate_cross_sections(model: Optional[Mapping[str, Any]], datasets: Mapping[str, Any]) -> None:
    """Constraints between ``datasets`` and ``model``: ``n_frms`` >= 1 and within the frame positions."""
    import sys

    max_pos = None
    if model is not None and str(model.get("arch", "video_llama")) == "video_llama":
        from videollm.models.video_llama import VideoLLAMAConfig

        max_pos = int(model.get("max_frame_pos", VideoLLAMAConfig.max_frame_pos))
    for name, entry in (datasets or {}).items():
        procs = (entry or {}).get("vis_processor") or {}
        for split, proc in procs.items() if isinstance(procs, Mapping) else ():
            key = f"datasets.{name}.vis_processor.{split}"
            size = proc.get("image_size") if isinstance(proc, Mapping) else None
            if isinstance(size, int) and size < 1:
                raise ConfigError(f"{key}.image_size: {size} is out of range; must be >= 1")
            n = _frames_of(proc)
            if n is None or n >= sys.maxsize:  # unset: every frame (the processor's default)
                continue
            if n < 1:
                raise ConfigError(f"{key}.n_frms: {n} is out of range; must be >= 1 (frames per clip)")
            if max_pos is not None and n > max_pos:
                raise ConfigError(f"{key}.n_frms: {n} frames, more than model.max_frame_pos {max_pos} (the video "
                                  "Q-Former's frame positions); lower n_frms or raise max_frame_pos")


__all__: Sequence[str] = ("validate_model_values", "validate_cross_sections", "validate_vit", "validate_qformer",
                          "validate_imagebind", "validate_llm_config", "ViTOverrides")

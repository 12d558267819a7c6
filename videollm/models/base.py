"""The model contract: what every registered video LLM implements, and all that callers may use.

The chat, batch inference, evaluation, the conversion tool, device placement and the runner
talk to a model only through :class:`VideoLLM`; a new system is one file in ``videollm/models/``
that subclasses it (see ``video_llama.py`` for a complete example and
``tests/toy_vlm.py`` for a minimal one), registered with ``@registry.register_model(arch)``.

What a model provides:

* ``tokenizer`` (attribute) and the transformers causal LM under the attribute named by
  ``llm_attr`` (``language_model`` returns it), so that LoRA, quantisation, device maps and
  saving work the same for every model.
* ``encode_media(media, text=None)``: a list of :class:`Media` -> one ``(n_i, H_llm)`` tensor of
  LLM-width embeddings each. ``text_conditioned`` says whether the result depends on ``text``
  (LLaMA-VID conditions its context token on the question): the chat then re-encodes per
  question instead of caching. ``num_media_tokens(medium)`` and ``token_count`` ("fixed",
  "per_frame", "data") say how many tokens a medium becomes.
* ``media_placeholder``: the string that stands for one medium in a prompt (split there by the
  merge path). The model's prompt format is a registered conversation template
  (:mod:`videollm.templates`); ``default_template`` names it.
* ``prepare_batch(batch)``: the model-owned processor that turns what datasets emit (media and
  conversations or captions) into token ids and labels; the runner applies it to every batch.
* ``forward(batch) -> {"loss", "num_tokens", ...}``; ``generate(inputs_embeds, attention_mask,
  **kwargs)`` returns only the new token ids; ``generation_inputs(batch)`` gives the prompt of a
  caption-style evaluation batch and ``decode_caption(ids)`` its text.
* ``freeze_plan()`` (which parameters train, as data), ``trainable_state_dict()`` (what a
  checkpoint's ``model`` entry holds), ``load_weights(...)`` (one checked load path with one
  summary), ``place(device)``, ``set_autocast_dtype(dtype)``.
* Chat media loading: ``load_media(path_or_image, kind)`` -> :class:`Media` with the model's
  own frame sampling and transforms.
* Optional, for the frozen-encoder feature cache (:mod:`videollm.feature_cache`):
  ``frozen_front_prefixes`` (the parameters of the frozen front, e.g. ViT + Q-Former),
  ``frozen_front(media)`` (pixels -> the front's outputs), ``frozen_fingerprint()`` (what
  produced them), and accepting those outputs in place of pixels: ``Media("features", ...)`` in
  ``encode_media`` and batches marked ``batch[FEATURES_KEY] = True`` in ``forward`` /
  ``generation_inputs``.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from videollm.errors import CheckpointError

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Batch key: True when the batch's media tensor holds the frozen front's outputs (a feature cache).
FEATURES_KEY = "frozen_features"
MEDIA_KINDS = ("video", "image", "audio", "audio_video", "features")


@dataclass
class Media:
    """One medium of a sample or a conversation, processed for its model.

    ``kind``: "video" (``data`` (3, T, H, W)), "image" ((3, H, W)), "audio", "audio_video"
    (video in ``data``, audio clips in ``extra["audio"]``), "features" (precomputed encoder
    outputs). ``meta``: e.g. ``{"path", "msg"}`` (``msg``: the frame-time sentence of a video).
    """

    kind: str
    data: Any
    meta: Dict[str, Any] = field(default_factory=dict)
    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in MEDIA_KINDS:
            raise ValueError(f"Media kind {self.kind!r}: expected one of {MEDIA_KINDS}")


@dataclass
class FreezeRule:
    prefix: str  # parameter-name prefix ("" matches every parameter)
    trainable: bool
    why: str = ""
    pattern: Optional[str] = None  # a regular expression searched in the name instead of a prefix

    def matches(self, name: str) -> bool:
        if self.pattern is not None:
            return re.search(self.pattern, name) is not None
        return name.startswith(self.prefix)


@dataclass
class FreezePlan:
    """Which parameters train: ordered rules, the LAST matching rule wins for each parameter."""

    rules: List[FreezeRule] = field(default_factory=list)

    def add(self, prefix: str | Sequence[str], trainable: bool, why: str = "") -> "FreezePlan":
        for p in [prefix] if isinstance(prefix, str) else prefix:
            self.rules.append(FreezeRule(p, trainable, why))
        return self

    def add_pattern(self, pattern: str, trainable: bool, why: str = "") -> "FreezePlan":
        """A rule for the names in which ``pattern`` (a regular expression) is found."""
        self.rules.append(FreezeRule("", trainable, why, pattern=pattern))
        return self

    def trainable(self, name: str) -> bool:
        out = True
        for rule in self.rules:
            if rule.matches(name):
                out = rule.trainable
        return out

    def apply(self, model: nn.Module) -> Dict[str, int]:
        """Set ``requires_grad`` of every parameter; returns {"trainable": n, "frozen": n} (elements)."""
        counts = {"trainable": 0, "frozen": 0}
        for name, p in model.named_parameters():
            p.requires_grad = self.trainable(name)
            counts["trainable" if p.requires_grad else "frozen"] += p.numel()
        return counts


@dataclass
class WeightSource:
    """One file of weights for a model: which keys it provides and how strictly it is checked.

    ``provides``: key prefixes the file must supply (a model key under them missing from the file
    is an error when strict). ``ignore_others``: drop file keys outside ``provides`` or unknown
    to the model (e.g. BLIP-2's text-side weights). ``rename``: (pattern, replacement) regular
    expressions applied to the file's keys first (e.g. an InstructBLIP Q-Former into another
    model's names).
    """

    path: str
    provides: Tuple[str, ...] = ("",)
    ignore_others: bool = False
    strict: Optional[bool] = None
    rename: Tuple[Tuple[str, str], ...] = ()
    drop: Tuple[str, ...] = ()  # file-key prefixes removed before loading (e.g. llama_proj.)


def _matches(key: str, prefixes: Sequence[str]) -> bool:
    return any(key.startswith(p) for p in prefixes)


class VideoLLM(nn.Module):
    """Base class of every registered model. Subclasses set the class attributes and implement
    ``encode_media``, ``num_media_tokens``, ``prepare_batch``, ``forward``, ``freeze_plan`` and
    ``from_config``."""

    arch: ClassVar[str] = ""
    config_schema: ClassVar[Optional[type]] = None
    llm_attr: ClassVar[str] = "language_model"
    media_placeholder: ClassVar[str] = "<image>"
    text_conditioned: ClassVar[bool] = False
    token_count: ClassVar[str] = "fixed"  # "fixed" | "per_frame" | "data"
    # load_media takes a prepared feature file (.pkl, videollm.long_video); the demo then offers one
    reads_feature_files: ClassVar[bool] = False
    default_template: ClassVar[str] = "vicuna"
    # Keys a checkpoint may carry that the model does not have (regular expressions).
    tolerated_unexpected: ClassVar[Tuple[str, ...]] = ()
    # Config keys that name weight files/folders, with what each is (export and error messages).
    weight_keys: ClassVar[Dict[str, str]] = {}

    tokenizer: Any
    cfg: Any

    # ------------------------------------------------------------------ the LLM
    @property
    def language_model(self) -> nn.Module:
        """The transformers causal LM (the submodule named ``llm_attr``; may be PEFT-wrapped)."""
        module = self._modules.get(self.llm_attr)
        if module is None:
            raise AttributeError(f"{type(self).__name__} has no language model '{self.llm_attr}' yet")
        return module

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_input_embeddings()(ids)

    @property
    def llm_dtype(self) -> torch.dtype:
        return self.language_model.get_input_embeddings().weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.get_input_embeddings().weight.device

    def llm_is_placed(self) -> bool:
        """True when the LLM was placed at load time (bitsandbytes, a device map) and must not move."""
        lm = self.language_model
        return bool(getattr(lm, "hf_device_map", None) or getattr(lm, "is_quantized", False)
                    or getattr(lm, "is_loaded_in_8bit", False) or getattr(lm, "is_loaded_in_4bit", False))

    # ------------------------------------------------------------------ media
    def encode_media(self, media: Sequence[Media], text: Optional[str] = None) -> List[torch.Tensor]:
        """Media -> LLM-width embeddings, one (n_i, H_llm) tensor per medium."""
        raise NotImplementedError

    def num_media_tokens(self, medium: Media) -> int:
        raise NotImplementedError

    def load_media(self, source: Any, kind: str, *, timeout: Optional[float] = 30.0) -> Media:
        """A file path (or PIL image / tensor for images) -> :class:`Media` processed for this model."""
        raise NotImplementedError

    # ------------------------------------------------------------------ frozen front (feature cache)
    # Parameter-name prefixes of the frozen front whose outputs a feature cache stores; empty: none.
    frozen_front_prefixes: ClassVar[Tuple[str, ...]] = ()

    def frozen_front(self, media: Sequence[Media]) -> List[torch.Tensor]:
        """Processed media -> the frozen front's outputs, one tensor per medium (no gradients),
        which ``encode_media`` takes back as ``Media("features", ...)``."""
        raise NotImplementedError(
            f"{self.arch or type(self).__name__}: this model has no cacheable frozen front; implement "
            "frozen_front_prefixes, frozen_front(media), frozen_fingerprint() and accept Media('features') "
            "in encode_media (see videollm/feature_cache.py)")

    def frozen_fingerprint(self) -> Dict[str, Any]:
        """What makes the frozen front's outputs: {"arch", "weights" (a hash), config values}.
        A feature cache records it and refuses to serve a model whose fingerprint differs."""
        raise NotImplementedError(
            f"{self.arch or type(self).__name__}: no frozen_fingerprint(); this model cannot use a feature cache")

    def weights_fingerprint(self, prefixes: Sequence[str]) -> str:
        """A hash of the parameters and buffers under ``prefixes`` (names, dtypes, shapes, bytes)."""
        import hashlib

        digest = hashlib.blake2b(digest_size=16)
        for name, tensor in sorted(self.state_dict().items()):
            if not _matches(name, prefixes):
                continue
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
        return digest.hexdigest()

    # ------------------------------------------------------------------ training
    def batch_processor(self):
        """A light, picklable callable: dataset batch -> model batch (ids, labels), run in the
        loader's workers; None when batches need no processing."""
        return None

    def prepare_batch(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        """The model-owned processor applied to one batch (what the loader does per batch)."""
        processor = self.batch_processor()
        return processor(batch) if processor is not None else batch

    def check_dataset(self, name: str, declared: Dict[str, Any]) -> None:
        """Check the model facts a dataset's YAML declares (e.g. a token count) against the model;
        raise ConfigError naming the key on a mismatch. Default: nothing to check."""

    def freeze_plan(self) -> FreezePlan:
        raise NotImplementedError

    def apply_freeze_plan(self) -> Dict[str, int]:
        counts = self.freeze_plan().apply(self)
        logger.info("%s freeze plan: %s trainable, %s frozen parameters", self.arch, f"{counts['trainable']:,}",
                    f"{counts['frozen']:,}")
        return counts

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        """A checkpoint's ``model`` entry: the trainable parameters plus ALL buffers (LAVIS layout)."""
        # every name of a tied frozen weight (OPT's lm_head is its embedding) counts as frozen
        frozen = {n for n, p in self.named_parameters(remove_duplicate=False) if not p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k not in frozen}

    # DDP: parameters unused in some steps need find_unused_parameters.
    ddp_find_unused_parameters: bool = False

    # ------------------------------------------------------------------ precision and placement
    autocast_dtype: torch.dtype = torch.float16

    def set_autocast_dtype(self, dtype: torch.dtype) -> None:
        self.autocast_dtype = dtype

    def maybe_autocast(self, device: Optional[torch.device] = None):
        """Autocast on CUDA in ``autocast_dtype`` (fp16 unless the run says otherwise); none on CPU."""
        device = device or self.device
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=self.autocast_dtype)
        return contextlib.nullcontext()

    def place(self, device: torch.device) -> None:
        """Move to ``device``; an LLM placed at load time (quantised, device map) stays put."""
        placed = self.llm_is_placed()
        for name, child in self.named_children():
            if name == self.llm_attr and placed:
                continue
            child.to(device)
        for _, param in self.named_parameters(recurse=False):
            param.data = param.data.to(device)
        for name, buf in self.named_buffers(recurse=False):
            setattr(self, name, buf.to(device))

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, inputs_embeds: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 **kwargs: Any) -> torch.Tensor:
        """Generate from prompt embeddings (B, L, H_llm); returns only the NEW token ids (B, n)."""
        if attention_mask is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        with self.maybe_autocast(inputs_embeds.device):
            return self.language_model.generate(inputs_embeds=inputs_embeds.to(self.llm_dtype),
                                                attention_mask=attention_mask, **kwargs)

    def generation_inputs(self, batch: Dict[str, Any]):
        """Prompt (inputs_embeds, attention_mask) for a caption-style evaluation batch."""
        raise NotImplementedError

    def decode_caption(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    # ------------------------------------------------------------------ weights
    def load_weights(self, state: Dict[str, torch.Tensor], source: WeightSource | str, *,
                     strict: Optional[bool] = None) -> Tuple[List[str], List[str]]:
        """Load a partial state dict, checked: shapes must match, keys under ``provides`` must be
        present, keys the model lacks are errors (unless tolerated or ``ignore_others``).
        Returns (missing, unexpected); logs one summary."""
        from videollm.checkpoint import report_load

        if isinstance(source, str):
            source = WeightSource(source)
        if strict is None:
            strict = source.strict if source.strict is not None else bool(getattr(self.cfg, "strict_load", True))
        if source.rename:
            rules = [(re.compile(p), r) for p, r in source.rename]
            renamed = {}
            for key, value in state.items():
                for pat, rep in rules:
                    key = pat.sub(rep, key)
                renamed[key] = value
            state = renamed
        if source.drop:
            state = {k: v for k, v in state.items() if not _matches(k, source.drop)}
        own = self.state_dict()
        if source.ignore_others:
            state = {k: v for k, v in state.items() if _matches(k, source.provides) and k in own}
        for key, value in state.items():
            if key in own and tuple(own[key].shape) != tuple(value.shape):
                raise CheckpointError(
                    f"{source.path}: {key} has shape {tuple(value.shape)} but the model expects "
                    f"{tuple(own[key].shape)}; is the checkpoint for another LLM size or config?"
                )
        result = self.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if _matches(k, source.provides)]
        unexpected = list(result.unexpected_keys)
        report_load(missing, unexpected, expected_missing_prefixes=(),
                    expected_unexpected_patterns=self.tolerated_unexpected, strict=strict, source=source.path)
        return missing, unexpected

    def load_weight_sources(self, sources: Sequence[WeightSource]) -> None:
        from videollm.checkpoint import load_model_state

        for src in sources:
            self.load_weights(load_model_state(src.path), src)

    # ------------------------------------------------------------------ config
    @classmethod
    def from_config(cls, cfg: Any) -> "VideoLLM":
        """Build from an OmegaConf node or dict, validated against ``config_schema``."""
        from omegaconf import OmegaConf

        from videollm.config import validate_mapping, with_defaults

        values = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else dict(cfg)
        if cls.config_schema is None:
            raise TypeError(f"{cls.__name__} has no config_schema")
        from videollm.validation import validate_model_values

        validate_mapping(values, cls.config_schema, "model")
        validate_model_values(values, "model", cls.config_schema)
        return cls(cls.config_schema(**with_defaults(values, cls.config_schema)))

    @classmethod
    def missing_weights(cls, cfg: Any) -> List[str]:
        """The weight keys of ``cfg`` that are empty, each with what it is (for clear errors)."""
        return [f"model.{k} ({what})" for k, what in cls.weight_keys.items() if not cfg.get(k)]

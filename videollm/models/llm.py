"""Language model and tokenizer factory shared by every video LLM of videollm.

:func:`build_language_model` makes any Hugging Face causal LM (``AutoModelForCausalLM``): from a
local folder (no hub downloads), or with random weights from a config dict (the tiny models of
the tests and of the quick start). It also applies the memory options: bitsandbytes 8-bit
(LLM.int8) and 4-bit (NF4, double quantization) loading, a ``device_map``, and gradient
checkpointing. bitsandbytes >= 0.50 runs its 8-bit and 4-bit kernels on the CPU as well, so the
quantized paths work (slowly) without a GPU.

:func:`build_tokenizer` makes the model's tokenizer:

- ``llama_exact``: :func:`videollm.tokenizer.load_model_tokenizer`, the transformers-4.28 slow
  LLaMA rules Video-LLaMA was trained with (``"tiny"`` or no path = the built-in tiny one).
- ``auto``: ``transformers.AutoTokenizer`` on a local folder (OPT/GPT-2 byte-level BPE, LLaMA
  with ``legacy=False``, Mistral, Yi, ...).

For what Video-LLaMA's ``_build_llm`` already did (dtype, ``from_config``, 8-bit with a
``device_8bit`` placement, ``device_map``), :func:`build_language_model` does exactly the same
calls, so the model's numbers do not change.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from videollm.errors import ConfigError

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOKENIZER_KINDS = ("llama_exact", "auto")


def _dtype(name: str, key: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"{key}: '{name}' unknown; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def _cuda_target(device_map: Any, device_8bit: Union[int, str]) -> bool:
    """Whether a quantized LLM will live on a CUDA device."""
    if not torch.cuda.is_available():
        return False
    if device_map in ("cpu", {"": "cpu"}) or str(device_8bit) == "cpu":
        return False
    return True


def quantization_config(
    *,
    load_in_8bit: bool,
    load_in_4bit: bool,
    dtype: torch.dtype,
    on_cuda: bool,
    bnb_4bit_quant_type: str = "nf4",
):
    """The ``transformers.BitsAndBytesConfig`` for 8-bit or 4-bit loading, or ``None``.

    4-bit: NF4 with double quantization (the QLoRA recipe); matmuls compute in fp16 on CUDA, and
    on the CPU in bf16 when the LLM dtype is bf16, else fp32 (fp16 matmuls are slow or missing on
    CPUs). 4-bit wins when both are asked for, as Video-LLaMA's ``load_in_4bit`` did.
    """
    import transformers

    if load_in_4bit:
        if on_cuda:
            compute = torch.float16
        else:
            compute = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        return transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
    if load_in_8bit:
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return None


def enable_gradient_checkpointing(llm: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant checkpointing).

    With ``use_reentrant=False`` the checkpointed layers get gradients even when their inputs do
    not require grad (frozen embeddings), so ``enable_input_require_grads`` is needed only by
    reentrant checkpointing; PEFT calls it itself when it wraps a checkpointed model.
    """
    if not getattr(llm, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{type(llm).__name__} does not support gradient checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5.2x name
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def is_checkpointing(llm: nn.Module) -> bool:
    """Whether activation (gradient) checkpointing is on in ``llm``."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in llm.modules())


def build_language_model(
    path: str = "",
    *,
    config: Optional[Mapping[str, Any]] = None,
    dtype: str = "bf16",
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    device_map: Optional[Union[str, Dict[str, Any]]] = None,
    device_8bit: Union[int, str] = 0,
    grad_checkpointing: bool = False,
    key: str = "model.llama_model",
    dtype_key: str = "model.llm_dtype",
    bnb_4bit_quant_type: str = "nf4",
) -> nn.Module:
    """Any transformers causal LM, from a local folder or with random weights.

    Args:
        path: a Hugging Face model folder (``config.json`` + weights). Empty: random weights
            from ``config``.
        config: ``{"model_type": "llama", **config kwargs}`` for random weights (``model_type``
            defaults to ``llama``), e.g. the tiny models of the tests.
        dtype: ``fp32``, ``fp16`` or ``bf16``: the dtype of the weights that are not quantized.
        load_in_8bit / load_in_4bit: bitsandbytes quantization of the linear layers when loading
            from ``path`` (CPU or CUDA); 4-bit wins if both are set. With random weights (no
            ``path``) they are ignored with a warning, as before.
        device_map: passed to ``from_pretrained`` (``"auto"``, ``{"": 0}``, a layer map...).
        device_8bit: where a quantized LLM goes when ``device_map`` is not given (a CUDA index);
            on a machine without CUDA it goes to the CPU.
        grad_checkpointing: see :func:`enable_gradient_checkpointing`.
        key / dtype_key: the config keys named in errors.

    Returns:
        The ``PreTrainedModel``; ``forward(input_ids | inputs_embeds (B, L, H), attention_mask (B, L))``
        gives ``logits (B, L, vocab)``.
    """
    import transformers

    torch_dtype = _dtype(dtype, dtype_key)
    if path:
        folder = Path(path)
        if not folder.is_dir():
            raise ConfigError(f"{key}: {folder} does not exist (give a local Hugging Face model folder)")
        if not (folder / "config.json").is_file():
            raise ConfigError(
                f"{key}: {folder} is not a Hugging Face model folder (no config.json); "
                "for Vicuna v0 apply the delta first with apply_delta.py"
            )
        kwargs: Dict[str, Any] = {"dtype": torch_dtype}
        quant = quantization_config(
            load_in_8bit=load_in_8bit,
            load_in_4bit=load_in_4bit,
            dtype=torch_dtype,
            on_cuda=_cuda_target(device_map, device_8bit),
            bnb_4bit_quant_type=bnb_4bit_quant_type,
        )
        if quant is not None:
            _require_bitsandbytes(key)
            kwargs["quantization_config"] = quant
            kwargs["device_map"] = {"": device_8bit if _cuda_target(device_map, device_8bit) else "cpu"}
        if device_map:
            kwargs["device_map"] = device_map
        try:
            llm = transformers.AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"{key}: cannot load a causal LM from {folder}: {exc}") from exc
    else:
        if not config:
            raise ConfigError(f"{key}: empty; give a model folder, or llm_config for random weights")
        if load_in_8bit or load_in_4bit or device_map:
            logger.warning("%s: random-weight LLM: 8-bit/4-bit loading and device_map apply only to a model folder", key)
        llm_kwargs = dict(config)
        model_type = llm_kwargs.pop("model_type", "llama")
        try:
            hf_config = transformers.AutoConfig.for_model(model_type, **llm_kwargs)
        except (ValueError, KeyError) as exc:
            raise ConfigError(f"{key}: llm_config: {exc}") from exc
        llm = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch_dtype)
    if load_in_4bit and path and not _cuda_target(device_map, device_8bit):
        _warn_cpu_4bit_blocks(llm, key)
    if grad_checkpointing:
        enable_gradient_checkpointing(llm)
    return llm


def _warn_cpu_4bit_blocks(llm: nn.Module, key: str) -> None:
    """bitsandbytes' CPU inference path repacks 4-bit weights per 64-wide block of inputs and fails
    (a reshape error) on layers narrower than that; training mode does not repack."""
    narrow = sorted({m.in_features for m in llm.modules() if hasattr(m, "in_features") and m.in_features % 64})
    if narrow:
        logger.warning(
            "%s: 4-bit on the CPU: linear layers with %s inputs (not a multiple of 64) fail in "
            "bitsandbytes' CPU inference kernels; they work in training mode", key, narrow
        )


def _require_bitsandbytes(key: str) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"{key}: 8-bit/4-bit loading needs bitsandbytes (pip install -e '.[quant]')"
        ) from None


def is_quantized(llm: nn.Module) -> bool:
    """Whether ``llm`` was loaded in 8 or 4 bits by bitsandbytes."""
    return bool(getattr(llm, "is_loaded_in_8bit", False) or getattr(llm, "is_loaded_in_4bit", False))


# ----------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------


def _is_llama_tokenizer(folder: Path) -> bool:
    """A LLaMA (SentencePiece-BPE) tokenizer folder, for which ``legacy=False`` is passed."""
    for name, field in (("tokenizer_config.json", "tokenizer_class"), ("config.json", "model_type")):
        f = folder / name
        if f.is_file():
            try:
                value = json.loads(f.read_text()).get(field) or ""
            except (json.JSONDecodeError, AttributeError):
                continue
            if "llama" in str(value).lower():
                return True
    return False


def build_tokenizer(
    kind: str,
    path: Optional[str],
    *,
    key: str = "model.tokenizer",
    added_tokens: Sequence[str] = (),
    pad_token: Optional[str] = None,
    use_fast: bool = True,
):
    """The model's tokenizer.

    Args:
        kind: ``llama_exact`` (:func:`videollm.tokenizer.load_model_tokenizer`: pad := unk when the
            folder sets none, ``<ImageHere>`` and ``<AudioHere>`` added; ``None``/``""``/``"tiny"``
            = the built-in tiny tokenizer) or ``auto`` (``transformers.AutoTokenizer`` on a local
            folder; ``legacy=False`` for LLaMA tokenizers).
        path: the tokenizer (or model) folder.
        added_tokens: tokens added (as special tokens) after the pad token is set; existing ones
            keep their ids.
        pad_token: the pad token; added to the vocabulary when new. ``None``: the folder's own,
            else unk, else eos.
        key: the config key named in errors.
    """
    if kind == "llama_exact":
        from videollm.tokenizer import load_model_tokenizer

        tok = load_model_tokenizer(path)
        if pad_token is not None:
            if pad_token not in tok.added_tokens_encoder and pad_token not in tok.special_tokens:
                tok.add_tokens([pad_token], special_tokens=True)
            tok.set_pad_token(pad_token)
        if added_tokens:
            tok.add_tokens(list(added_tokens), special_tokens=True)
        return tok
    if kind != "auto":
        raise ConfigError(f"{key}: tokenizer kind '{kind}' unknown; choose one of {', '.join(TOKENIZER_KINDS)}")
    import transformers

    if not path:
        raise ConfigError(f"{key}: the 'auto' tokenizer needs a local tokenizer folder")
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"{key}: {folder} does not exist (give a local tokenizer folder)")
    kwargs: Dict[str, Any] = {"use_fast": use_fast}
    if _is_llama_tokenizer(folder):
        kwargs["legacy"] = False
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{key}: cannot load a tokenizer from {folder}: {exc}") from exc
    if pad_token is not None:
        if pad_token not in tok.get_vocab():
            tok.add_special_tokens({"pad_token": pad_token})
        else:
            tok.pad_token = pad_token
    elif tok.pad_token is None:
        fallback = tok.unk_token if tok.unk_token is not None else tok.eos_token
        if fallback is None:
            raise ConfigError(f"{key}: {folder}: the tokenizer has no pad, unk or eos token; set a pad token")
        tok.pad_token = fallback
    if added_tokens:
        new = [t for t in added_tokens if t not in tok.get_vocab()]
        if new:
            tok.add_tokens(new, special_tokens=True)
    return tok

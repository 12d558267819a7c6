"""LoRA and QLoRA on the language model of a video LLM, through PEFT.

A video LLM keeps its LLM in one attribute (``model.llm_attr``, e.g. ``"llama_model"``).
:func:`apply_lora` replaces that attribute by a ``peft.PeftModel`` around the LLM, so the
model's state-dict names of the LLM become PEFT's::

    llama_model.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight   (frozen)
    llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight (r, in)
    llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight (out, r)

and a targeted linear layer computes ``W x + (alpha / r) * B A dropout(x)``. Inside the LLM only
the LoRA matrices (and ``modules_to_save``) train; what trains outside it (the connector) is the
model's business. With a 4-bit (or 8-bit) base loaded by bitsandbytes
(:func:`videollm.models.llm.build_language_model`) this is QLoRA: the base is first prepared
with ``peft.prepare_model_for_kbit_training`` (norms and other unquantized weights in fp32).

:func:`save_adapter` / :func:`load_adapter` write and read the standard PEFT adapter folder
(``adapter_config.json`` + ``adapter_model.safetensors``); :func:`merge_lora` folds the adapter
into the base weights (plain LLM names again); :func:`merge_lora_state_dict` does the same on a
checkpoint's state dict (``python -m videollm.convert merge-lora``); :func:`set_lora_alpha`
changes the scaling at inference (PLLaVA answers with alpha 4 an adapter trained with another).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
from torch import nn

from videollm.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

ADAPTER_NAME = "default"
PEFT_INFIX = ".base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class LoRAConfig:
    """``model.lora`` of a config: the LoRA applied to the LLM.

    ``target_modules``: names (suffixes) of the linear layers that get an adapter; ``bias``:
    ``none``, ``all`` or ``lora_only`` (which biases train); a string ``target_modules`` is passed to
    PEFT as is (a regex, or ``all-linear``); ``modules_to_save``: LLM modules
    trained in full and saved with the adapter (e.g. ``["embed_tokens", "lm_head"]`` after adding
    tokens); ``use_rslora``: scaling ``alpha / sqrt(r)`` instead of ``alpha / r``.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    target_modules: Union[List[str], str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    bias: str = "none"
    modules_to_save: Optional[List[str]] = None
    use_rslora: bool = False

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], key: str = "model.lora") -> "LoRAConfig":
        """From a plain mapping (the YAML node); unknown keys are a :class:`ConfigError`."""
        from videollm.errors import closest

        names = set(cls.__dataclass_fields__)
        for name in values:
            if name not in names:
                raise ConfigError(f"{key}.{name}: unknown key{closest(name, names)}; keys: {', '.join(sorted(names))}")
        cfg = cls(**{k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in values.items()})
        cfg.validate(key)
        return cfg

    def validate(self, key: str = "model.lora") -> None:
        if int(self.r) <= 0:
            raise ConfigError(f"{key}.r: {self.r}; the rank must be a positive integer")
        if not 0 <= float(self.dropout) < 1:
            raise ConfigError(f"{key}.dropout: {self.dropout}; must be in [0, 1)")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"{key}.bias: '{self.bias}' unknown; choose none, all or lora_only")
        if not self.target_modules:
            raise ConfigError(f"{key}.target_modules: empty; name the linear layers to adapt (e.g. [q_proj, v_proj])")

    @property
    def scaling(self) -> float:
        return float(self.alpha) / (math.sqrt(self.r) if self.use_rslora else float(self.r))

    def to_peft(self):
        import peft

        return peft.LoraConfig(
            r=int(self.r),
            lora_alpha=self.alpha,
            lora_dropout=float(self.dropout),
            target_modules=self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules),
            bias=self.bias,
            modules_to_save=list(self.modules_to_save) if self.modules_to_save else None,
            use_rslora=bool(self.use_rslora),
            task_type="CAUSAL_LM",
        )


def _as_config(cfg: Union[LoRAConfig, Mapping[str, Any]]) -> LoRAConfig:
    if isinstance(cfg, LoRAConfig):
        cfg.validate()
        return cfg
    return LoRAConfig.from_dict(dict(cfg))


def _peft_model_class():
    try:
        import peft
    except ImportError:
        raise ConfigError("model.lora: LoRA needs the peft package (pip install -e '.[quant]')") from None
    return peft.PeftModel


def is_lora(module: nn.Module) -> bool:
    """Whether ``module`` is a PEFT-wrapped LLM."""
    try:
        import peft
    except ImportError:
        return False
    return isinstance(module, peft.PeftModel)


def _llm(model: nn.Module, llm_attr: str) -> nn.Module:
    llm = getattr(model, llm_attr, None)
    if not isinstance(llm, nn.Module):
        raise ConfigError(f"{type(model).__name__} has no language model attribute '{llm_attr}'")
    return llm


def apply_lora(model: nn.Module, llm_attr: str, cfg: Union[LoRAConfig, Mapping[str, Any]]) -> None:
    """Wrap ``getattr(model, llm_attr)`` in a ``PeftModel`` with a LoRA adapter, in place.

    Inside the LLM only the LoRA matrices (and ``modules_to_save``, and biases per ``bias``) are
    trainable afterwards; parameters outside the LLM keep their ``requires_grad``. A quantized
    (bitsandbytes) LLM is first prepared for k-bit training (QLoRA); gradient checkpointing,
    when the LLM has it on, stays on (non-reentrant).
    """
    import peft

    from videollm.models.llm import is_checkpointing, is_quantized

    cfg = _as_config(cfg)
    _peft_model_class()
    llm = _llm(model, llm_attr)
    if is_lora(llm):
        raise ConfigError(f"{llm_attr}: LoRA is already applied")
    names = [name for name, _ in llm.named_modules()]
    # a list names modules by suffix; a string is PEFT's regex or "all-linear", checked by PEFT
    targets = [] if isinstance(cfg.target_modules, str) else cfg.target_modules
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in llm.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(
            f"model.lora.target_modules: {missing} not found in the LLM ({type(llm).__name__}); "
            f"its linear layers: {', '.join(linear)}"
        )
    if is_quantized(llm):
        checkpointing = is_checkpointing(llm)
        llm = peft.prepare_model_for_kbit_training(
            llm,
            use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        )
    wrapped = peft.get_peft_model(llm, cfg.to_peft())
    setattr(model, llm_attr, wrapped)
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    logger.info("LoRA r=%d alpha=%s on %s: %d trainable LLM parameters", cfg.r, cfg.alpha, cfg.target_modules, trainable)


def _is_lora_key(key: str) -> bool:
    return ".lora_" in key or ".modules_to_save." in key


def lora_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The adapter's tensors under the model's own (PEFT) names: ``lora_A``/``lora_B`` (and
    ``modules_to_save``) of every wrapped LLM, e.g.
    ``llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``."""
    return {k: v for k, v in model.state_dict().items() if _is_lora_key(k)}


def save_adapter(model: nn.Module, llm_attr: str, out_dir: Union[str, Path]) -> Path:
    """Write the PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    llm = _llm(model, llm_attr)
    if not is_lora(llm):
        raise ConfigError(f"{llm_attr}: no LoRA adapter to save (model.lora is not set)")
    out = Path(out_dir)
    llm.save_pretrained(str(out), safe_serialization=True)
    if not (out / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{out}: PEFT wrote no {ADAPTER_WEIGHTS}")
    return out


def load_adapter(model: nn.Module, llm_attr: str, path: Union[str, Path], is_trainable: bool = False) -> None:
    """Load a PEFT adapter folder into the model's LLM (wrapping a plain LLM first).

    The folder must provide exactly the LLM's adapter tensors: a missing one would silently keep
    its fresh initialization, so it is an error, as is an extra one. ``is_trainable`` keeps the
    adapter trainable (resuming), otherwise it is frozen (inference).
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    peft_model_cls = _peft_model_class()
    folder = Path(path)
    if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{folder}: not a PEFT adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    llm = _llm(model, llm_attr)
    if not is_lora(llm):
        llm = peft_model_cls.from_pretrained(llm, str(folder), is_trainable=is_trainable)
        setattr(model, llm_attr, llm)
    saved = load_file(str(folder / ADAPTER_WEIGHTS))
    expected = get_peft_model_state_dict(llm, adapter_name=ADAPTER_NAME)
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{folder}: adapter does not fit the LLM (target_modules or modules_to_save differ): "
            f"missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for name, tensor in saved.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{folder}: {name}: shape {tuple(tensor.shape)}, the LLM's is {tuple(expected[name].shape)} (r differs?)"
            )
    set_peft_model_state_dict(llm, saved, adapter_name=ADAPTER_NAME)
    for name, p in llm.named_parameters():
        if _is_lora_key("." + name):
            p.requires_grad_(is_trainable)


def merge_lora(model: nn.Module, llm_attr: str) -> None:
    """Fold the adapter into the base weights and drop PEFT: the LLM is plain again, with its
    original state-dict names (``W <- W + (alpha / r) B A``)."""
    from videollm.models.llm import is_quantized

    llm = _llm(model, llm_attr)
    if not is_lora(llm):
        raise ConfigError(f"{llm_attr}: no LoRA adapter to merge")
    if is_quantized(llm.get_base_model()):
        # Re-quantizing W + BA loses the adapter in rounding, and bitsandbytes' CPU inference
        # repacks 4-bit weights in a layout PEFT's merge does not read (garbage, measured).
        raise ConfigError(
            f"{llm_attr}: the LLM is 8/4-bit; merge into a 16/32-bit base: save_adapter, rebuild the "
            "LLM without load_in_8bit/load_in_4bit, load_adapter, then merge_lora"
        )
    setattr(model, llm_attr, llm.merge_and_unload())


def set_lora_alpha(model: nn.Module, alpha: float) -> int:
    """Set alpha of every LoRA layer in ``model`` (scaling := alpha / r, or alpha / sqrt(r) with
    rsLoRA); returns how many layers changed. The saved adapter config keeps the trained alpha."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, r in module.r.items():
                module.lora_alpha[name] = alpha
                rs = module.use_rslora.get(name, False) if isinstance(module.use_rslora, dict) else module.use_rslora
                module.scaling[name] = alpha / (math.sqrt(r) if rs else r)
            count += 1
    if count == 0:
        raise ConfigError("set_lora_alpha: the model has no LoRA layer")
    return count


# ----------------------------------------------------------------------------------------------
# Merging on state dicts (checkpoints)
# ----------------------------------------------------------------------------------------------

_LORA_A = re.compile(r"^(?P<llm>.+?)\.base_model\.model\.(?P<mod>.+)\.lora_A\.(?P<adapter>[^.]+)\.weight$")


def lora_llm_attrs(state: Mapping[str, torch.Tensor]) -> List[str]:
    """The LLM attribute names that carry PEFT keys in ``state`` (``["llama_model"]``)."""
    return sorted({m.group("llm") for k in state if (m := _LORA_A.match(k))})


def plain_key(key: str, llm_attr: str) -> Optional[str]:
    """PEFT name -> the plain LLM name, ``None`` for keys without a plain counterpart
    (``lora_A``/``lora_B``, the ``original_module`` copy of ``modules_to_save``)."""
    prefix = f"{llm_attr}{PEFT_INFIX}"
    if not key.startswith(prefix):
        return key
    rest = key[len(prefix):]
    if ".lora_" in rest or ".original_module." in rest:
        return None
    rest = rest.replace(".base_layer.", ".")
    rest = re.sub(r"\.modules_to_save\.[^.]+\.", ".", rest)
    return f"{llm_attr}.{rest}"


def merge_lora_state_dict(
    state: Mapping[str, torch.Tensor],
    scaling: float,
    base: Optional[Mapping[str, torch.Tensor]] = None,
    llm_attr: Optional[str] = None,
) -> Dict[str, torch.Tensor]:
    """Fold PEFT LoRA tensors of ``state`` into their base weights, under plain names.

    Args:
        state: a checkpoint's ``model`` dict: e.g. the trainable connector plus
            ``<llm>.base_model.model.<mod>.lora_A.default.weight`` (r, in) and ``lora_B`` (out, r).
        scaling: alpha / r of the adapter.
        base: where the frozen base weights ``W`` (out, in) are found when ``state`` lacks them:
            under the plain name ``<llm>.<mod>.weight`` or the PEFT one ``...base_layer.weight``
            (e.g. the state dict of the model the checkpoint belongs to).
        llm_attr: the LLM attribute; default: found from the keys (exactly one is allowed).

    Returns:
        every tensor of ``state`` under its plain name, the LoRA pairs replaced by the merged
        ``<llm>.<mod>.weight = W + scaling * B @ A`` (computed in fp32, stored in W's dtype).
    """
    attrs = [llm_attr] if llm_attr else lora_llm_attrs(state)
    if not attrs:
        raise CheckpointError("no LoRA tensors (<llm>.base_model.model.*.lora_A.*) in the checkpoint")
    if len(attrs) > 1:
        raise CheckpointError(f"LoRA tensors of several models in one checkpoint: {attrs}; pass llm_attr")
    attr = attrs[0]
    base = base or {}
    prefix = f"{attr}{PEFT_INFIX}"
    odd = [k for k in state if k.startswith(prefix) and ".lora_" in k and not re.search(r"\.lora_[AB]\.[^.]+\.weight$", k)]
    if odd:
        raise CheckpointError(
            f"{odd[0]}: a LoRA tensor of a kind this merge does not fold (embedding/conv LoRA, LoRA bias); "
            "merge on the model with videollm.models.lora.merge_lora instead"
        )
    out: Dict[str, torch.Tensor] = {}
    pairs = 0
    for key, a in state.items():
        m = _LORA_A.match(key)
        if m is None or m.group("llm") != attr:
            continue
        mod, adapter = m.group("mod"), m.group("adapter")
        stem = f"{attr}{PEFT_INFIX}{mod}"
        b_key = f"{stem}.lora_B.{adapter}.weight"
        if b_key not in state:
            raise CheckpointError(f"{key}: no matching {b_key}")
        w_names = (f"{stem}.base_layer.weight", f"{attr}.{mod}.weight")
        w = next((src[n] for src in (state, base) for n in w_names if n in src), None)
        if w is None:
            raise CheckpointError(f"{key}: base weight {w_names[1]} found neither in the checkpoint nor in the model")
        b = state[b_key]
        if b.shape[1] != a.shape[0] or w.shape != (b.shape[0], a.shape[1]):
            raise CheckpointError(
                f"{key}: shapes do not fit: W {tuple(w.shape)}, B {tuple(b.shape)}, A {tuple(a.shape)}"
            )
        if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise CheckpointError(
                f"{w_names[1]}: base weight is {w.dtype} (an 8/4-bit LLM); build the base without 8/4-bit loading to merge"
            )
        merged = w.float() + scaling * (b.float() @ a.float())
        out[f"{attr}.{mod}.weight"] = merged.to(w.dtype)
        pairs += 1
    for key, value in state.items():
        name = plain_key(key, attr)
        if name is None or name in out:
            continue
        out[name] = value
    logger.info("merged %d LoRA pairs of %s (scaling %g)", pairs, attr, scaling)
    return out


def adapter_scaling(state: Mapping[str, torch.Tensor], cfg: LoRAConfig, key: str = "model.lora") -> float:
    """``cfg.scaling``, after checking ``cfg.r`` against the rank of the LoRA tensors in ``state``."""
    ranks = {tuple(v.shape)[0] for k, v in state.items() if _LORA_A.match(k)}
    if ranks and ranks != {int(cfg.r)}:
        raise ConfigError(f"{key}.r: {cfg.r}, but the checkpoint's LoRA rank is {sorted(ranks)}")
    return cfg.scaling

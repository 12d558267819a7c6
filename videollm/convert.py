"""Checkpoint conversion tool: ``python -m videollm.convert SUBCOMMAND ...``.

Subcommands (each is also a function of this module):

- ``strip IN OUT`` (:func:`strip_checkpoint`): drop the training state (``optimizer``, ``scaler``)
  of a runner checkpoint, keeping ``model``, ``config``, ``epoch`` (and ``merged_from``).
- ``merge VL AL OUT`` (:func:`merge_checkpoints`): one file from a vision-language (``ckpt``) and an
  audio-language (``ckpt_2``) checkpoint; loading it as ``ckpt`` gives the model that loading both
  gives. A key present in both with different values is an error; equal ones (the buffers every
  checkpoint carries, e.g. ``Qformer.bert.embeddings.position_ids``) are kept once.
- ``to-safetensors IN OUT`` / ``to-pth IN OUT`` (:func:`to_safetensors`, :func:`to_pth`): the
  original's ``.pth`` runner layout <-> safetensors, exactly (see "safetensors layout" below).
- ``export --cfg-path EVAL_CFG OUT_DIR`` (:func:`export_folder`): a self-contained folder with a
  ``config.yaml`` that ``demo.py``, ``videollm.cli`` and ``load_config`` accept.
- ``inspect FILE`` (:func:`inspect_checkpoint`): what a checkpoint holds and which model it fits.
- ``merge-lora IN [OUT] --cfg-path CFG [--hf-out DIR]`` (:func:`merge_lora_checkpoint`): a
  training checkpoint's LoRA adapter folded into the LLM weights, under plain names.

Checkpoint layout (the original Video-LLaMA runner's ``_save_checkpoint``): ``{"model": trainable
parameters + ALL persistent buffers, "optimizer": AdamW state, "config": plain dict, "scaler":
GradScaler state or None, "epoch": int}``. A VL checkpoint holds the video branch and
``llama_proj``; an AL checkpoint the audio branch. A file holding a bare state dict (name ->
tensor) is accepted everywhere too, and written back bare.

Safetensors layout written here: the ``model`` tensors under their own names (so the file loads
directly as ``model.ckpt``), and in the string metadata: ``format=pt``, ``config`` and ``epoch`` as
JSON, ``videollm.extra`` (other JSON entries, e.g. ``merged_from``), ``videollm.layout``
(``runner`` or ``state_dict``), ``videollm.key_order`` and ``videollm.aliases`` (names that
shared one tensor: stored as copies, tied again by ``to-pth``).

Every file is read through :func:`videollm.checkpoint.load_file` (``torch.load(weights_only=True)``
or safetensors): a pickle that needs code to unpickle is refused, never run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from videollm.checkpoint import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIX,
    atomic_folder,
    is_storage_error,
    load_file,
    save_atomic,
    save_safetensors_atomic,
    storage_error,
)
from videollm.errors import CheckpointError, ConfigError, VideoLLMError

logger = logging.getLogger(__name__)

TRAINING_ENTRIES = ("optimizer", "scaler")
RELEASE_ENTRIES = ("model", "config", "epoch", "merged_from")
KNOWN_PRESETS = ("vicuna7b", "vicuna13b", "llama2_7b", "llama2_13b", "tiny")
META_LAYOUT, META_EXTRA, META_ORDER, META_ALIASES = (
    "videollm.layout",
    "videollm.extra",
    "videollm.key_order",
    "videollm.aliases",
)
# Persistent buffers that every runner checkpoint carries whatever was trained; they do not tell
# which branch a file belongs to.
_BUFFER_SUFFIXES = ("position_ids", "rotary_emb.inv_freq", "modality_preprocessors.text.mask", "log_logit_scale")


# ----------------------------------------------------------------------------------------------
# Reading and writing any checkpoint file
# ----------------------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike) -> Tuple[Dict[str, Any], str]:
    """Read a ``.pth``/``.pt``/``.bin``/``.ckpt`` or ``.safetensors`` file safely.

    Returns:
        ``(ckpt, layout)``: ``ckpt`` in the runner layout (``ckpt["model"]`` maps names to tensors,
        other entries as stored), ``layout`` ``"runner"`` or ``"state_dict"`` (the file held a bare
        state dict).
    """
    path = Path(path)
    obj = load_file(path)
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        return _from_safetensors(obj, _safetensors_metadata(path), path)
    if isinstance(obj.get("model"), Mapping):
        ckpt, layout = dict(obj), "runner"
        ckpt["model"] = dict(obj["model"])
    else:
        ckpt, layout = {"model": obj}, "state_dict"
    for key, value in ckpt["model"].items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: not a checkpoint: model entry {key!r} is a {type(value).__name__}, not a tensor "
                f"(top-level keys: {sorted(map(str, obj))[:8]})"
            )
    return ckpt, layout


def _safetensors_metadata(path: Path) -> Dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _json_meta(meta: Mapping[str, str], key: str, path: Path) -> Any:
    try:
        return json.loads(meta[key])
    except ValueError as e:
        raise CheckpointError(f"{path}: metadata entry {key!r} is not valid JSON ({e})") from e


def _from_safetensors(tensors: Dict[str, torch.Tensor], meta: Mapping[str, str], path: Path) -> Tuple[Dict[str, Any], str]:
    state = dict(tensors)
    if META_ORDER in meta:
        order = _json_meta(meta, META_ORDER, path)
        if sorted(order) == sorted(state):
            state = {k: state[k] for k in order}
        else:
            logger.warning("%s: %s does not list the stored tensors; keeping the file's order", path, META_ORDER)
    for alias, canonical in (_json_meta(meta, META_ALIASES, path) if META_ALIASES in meta else {}).items():
        if alias in state and canonical in state and torch.equal(state[alias], state[canonical]):
            state[alias] = state[canonical]  # tie them again, as they were in the .pth
    ckpt: Dict[str, Any] = {"model": state}
    for key in ("config", "epoch"):
        if key in meta:
            ckpt[key] = _json_meta(meta, key, path)
    if META_EXTRA in meta:
        ckpt.update(_json_meta(meta, META_EXTRA, path))
    return ckpt, meta.get(META_LAYOUT, "runner")


def _check_json(value: Any, what: str, path: Path) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"{path}: entry {what!r} cannot be stored as JSON in safetensors metadata ({e}); "
            "keep the .pth, or strip that entry"
        ) from e
    if json.loads(text) != value and value == value:  # tuples become lists, int keys strings
        logger.warning("%s: entry %r changes slightly through JSON (tuples become lists)", path, what)
    return text


def _untie(state: Mapping[str, torch.Tensor], path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Tensors safetensors accepts (no shared memory, contiguous), and the names that were aliases."""
    by_storage: Dict[int, List[str]] = defaultdict(list)
    exact: Dict[tuple, str] = {}
    aliases: Dict[str, str] = {}
    for key, t in state.items():
        if t.device.type == "meta":
            raise CheckpointError(f"{path}: tensor {key} is on the meta device (no data to save)")
        if t.numel() == 0:
            continue
        by_storage[t.untyped_storage().data_ptr()].append(key)
        view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if view in exact:
            aliases[key] = exact[view]
        else:
            exact[view] = key
    shared = {k for keys in by_storage.values() if len(keys) > 1 for k in keys}
    out = {}
    for key, t in state.items():
        t = t.detach().cpu()
        whole = t.numel() * t.element_size() == t.untyped_storage().nbytes()
        out[key] = t.clone() if (key in shared or not whole or not t.is_contiguous()) else t
    return out, aliases


def write_checkpoint(ckpt: Mapping[str, Any], path: str | os.PathLike, layout: str = "runner") -> Path:
    """Write ``ckpt`` (runner layout) to ``path``, all or nothing; the suffix picks the format.

    ``.safetensors``: see the module docstring; the training state (``optimizer``, ``scaler``)
    cannot be stored there and is dropped with a warning. Pickle suffixes: ``torch.save`` of the
    dict (or of the bare state dict when ``layout == "state_dict"``).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        dropped = [k for k in TRAINING_ENTRIES if ckpt.get(k) is not None]
        if dropped:
            logger.warning("%s: safetensors holds no training state; dropping %s", path, ", ".join(dropped))
        tensors, aliases = _untie(ckpt["model"], path)
        meta = {META_LAYOUT: layout, META_ORDER: json.dumps(list(tensors))}
        if aliases:
            meta[META_ALIASES] = json.dumps(aliases)
        for key in ("config", "epoch"):
            if key in ckpt:
                meta[key] = _check_json(ckpt[key], key, path)
        extra = {k: v for k, v in ckpt.items() if k not in ("model", "config", "epoch") + TRAINING_ENTRIES}
        if extra:
            meta[META_EXTRA] = _check_json(extra, ", ".join(extra), path)
        save_safetensors_atomic(tensors, path, metadata=meta)
    elif suffix in PICKLE_SUFFIXES:
        save_atomic(dict(ckpt["model"]) if layout == "state_dict" else dict(ckpt), path)
    else:
        raise CheckpointError(
            f"{path}: unknown output type {suffix!r}; use one of {', '.join(PICKLE_SUFFIXES + (SAFETENSORS_SUFFIX,))}"
        )
    logger.info("wrote %s (%d tensors)", path, len(ckpt["model"]))
    return path


# ----------------------------------------------------------------------------------------------
# strip / to-safetensors / to-pth
# ----------------------------------------------------------------------------------------------


def strip_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Dict[str, Any]:
    """Release copy of a runner checkpoint: keep ``model``, ``config``, ``epoch`` (and ``merged_from``)."""
    ckpt, layout = read_checkpoint(src)
    out = {k: ckpt[k] for k in RELEASE_ENTRIES if k in ckpt}
    dropped = sorted(set(ckpt) - set(out))
    logger.info("%s: dropping %s", src, ", ".join(dropped) if dropped else "nothing (no training state)")
    write_checkpoint(out, dst, layout)
    return out


def to_safetensors(src: str | os.PathLike, dst: str | os.PathLike) -> Dict[str, Any]:
    """``.pth`` runner checkpoint (or bare state dict) -> ``.safetensors`` (training state dropped)."""
    if Path(dst).suffix.lower() != SAFETENSORS_SUFFIX:
        raise CheckpointError(f"{dst}: the output of to-safetensors must end in {SAFETENSORS_SUFFIX}")
    ckpt, layout = read_checkpoint(src)
    write_checkpoint(ckpt, dst, layout)
    return ckpt


def to_pth(src: str | os.PathLike, dst: str | os.PathLike) -> Dict[str, Any]:
    """``.safetensors`` -> ``.pth`` in the original's runner layout (or bare, as it was)."""
    if Path(dst).suffix.lower() not in PICKLE_SUFFIXES:
        raise CheckpointError(f"{dst}: the output of to-pth must end in one of {', '.join(PICKLE_SUFFIXES)}")
    ckpt, layout = read_checkpoint(src)
    write_checkpoint(ckpt, dst, layout)
    return ckpt


# ----------------------------------------------------------------------------------------------
# Which branch a checkpoint holds
# ----------------------------------------------------------------------------------------------


def _matches(key: str, prefixes: Sequence[str]) -> bool:
    return any(key.startswith(p) for p in prefixes)


def branch_kind(keys: Sequence[str]) -> str:
    """``"VL"``, ``"AL"``, ``"VL+AL"`` or ``"other"``, from the branch weights a file holds.

    Buffers (``position_ids`` etc.) are ignored: every runner checkpoint carries all of them.
    """
    from videollm.models.video_llama import AUDIO_BRANCH, VIDEO_BRANCH

    weights = [k for k in keys if not k.endswith(_BUFFER_SUFFIXES)]
    video = any(_matches(k, VIDEO_BRANCH) for k in weights)
    audio = any(_matches(k, AUDIO_BRANCH) for k in weights)
    return {(True, False): "VL", (False, True): "AL", (True, True): "VL+AL"}.get((video, audio), "other")


# ----------------------------------------------------------------------------------------------
# merge
# ----------------------------------------------------------------------------------------------


def merge_checkpoints(vl: str | os.PathLike, al: str | os.PathLike, dst: str | os.PathLike) -> Dict[str, Any]:
    """Merge a VL (``ckpt``) and an AL (``ckpt_2``) checkpoint into one file at ``dst``.

    ``model`` is the union of both. A key in both files must hold the same tensor (dtype, shape,
    values), otherwise :class:`CheckpointError` names it. ``merged_from`` records, per source, its
    role, path, epoch and config; the training state of both is dropped.
    """
    vl_ckpt, _ = read_checkpoint(vl)
    al_ckpt, _ = read_checkpoint(al)
    vl_kind, al_kind = branch_kind(list(vl_ckpt["model"])), branch_kind(list(al_ckpt["model"]))
    if vl_kind == "AL" and al_kind == "VL":
        raise CheckpointError(f"{vl}: holds the audio branch and {al} the video branch; swap the two arguments (VL first)")
    if "VL" not in vl_kind:
        raise CheckpointError(f"{vl}: holds no video-branch weights (video_Qformer, llama_proj, ...); is it a VL checkpoint?")
    if "AL" not in al_kind:
        raise CheckpointError(f"{al}: holds no audio-branch weights (audio_Qformer, audio_llama_proj, ...); is it an AL checkpoint?")
    merged = dict(vl_ckpt["model"])
    for key, value in al_ckpt["model"].items():
        if key not in merged:
            merged[key] = value
            continue
        other = merged[key]
        if other.dtype != value.dtype or other.shape != value.shape or not torch.equal(other, value):
            raise CheckpointError(
                f"{al}: {key} is also in {vl} with a different value ({_describe(value)} vs {_describe(other)}); "
                "the two checkpoints disagree on a shared weight: are they from the same LLM and run family?"
            )
    out = {
        "model": merged,
        "merged_from": [
            {"role": role, "path": str(p), "epoch": c.get("epoch"), "config": c.get("config")}
            for role, p, c in (("ckpt", vl, vl_ckpt), ("ckpt_2", al, al_ckpt))
        ],
    }
    write_checkpoint(out, dst)
    return out


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}"


# ----------------------------------------------------------------------------------------------
# merge-lora
# ----------------------------------------------------------------------------------------------


def merge_lora_checkpoint(
    src: str | os.PathLike,
    dst: Optional[str | os.PathLike] = None,
    cfg_path: Optional[str | os.PathLike] = None,
    options: Optional[Sequence[str]] = None,
    *,
    model: Optional[torch.nn.Module] = None,
    hf_out: Optional[str | os.PathLike] = None,
) -> Dict[str, Any]:
    """Fold the LoRA adapter of a training checkpoint into the LLM's weights.

    ``src`` holds the trainable tensors (connector, ..., and the LLM's PEFT-named
    ``<llm>.base_model.model.<module>.lora_A/lora_B.default.weight``). The frozen base weights and
    the adapter's ``r``/``alpha`` come from the model of ``cfg_path`` (built on the CPU; its
    ``model.lora`` must be set) or from ``model`` (any module with ``.llm_attr`` and ``.lora``).

    ``dst``: the same checkpoint with each LoRA pair replaced by the merged ``<llm>.<module>.weight``
    (``W + alpha/r * B @ A``) and every other PEFT name made plain; the training state is dropped,
    and ``model.lora`` is removed from its stored config. It loads as ``model.ckpt`` of the model
    WITHOUT ``model.lora``. ``hf_out``: the merged LLM as a Hugging Face folder (save_pretrained),
    plus the model's tokenizer when it has ``save_pretrained``.
    """
    import copy

    from omegaconf import DictConfig, OmegaConf

    from videollm.models.lora import LoRAConfig, adapter_scaling, is_lora, lora_llm_attrs, merge_lora_state_dict

    if dst is None and hf_out is None:
        raise ConfigError("merge-lora: give OUT and/or --hf-out")
    ckpt, layout = read_checkpoint(src)
    state = ckpt["model"]
    attrs = lora_llm_attrs(state)
    if not attrs:
        raise CheckpointError(f"{src}: holds no LoRA tensors (<llm>.base_model.model.*.lora_A.*); nothing to merge")
    lora: Any = None
    if model is None:
        if cfg_path is None:
            raise ConfigError("merge-lora: --cfg-path (the model's config) is required")
        from videollm.config import load_config
        from videollm.registry import registry

        cfg = load_config(cfg_path, options)
        lora = cfg.model.get("lora")
        if not lora:
            raise ConfigError(f"{cfg_path}: model.lora is not set; the adapter's r and alpha are needed to merge")
        model = registry.get_model_class(str(cfg.model.arch)).from_config(cfg.model)
    lora = getattr(model, "lora", None) or lora
    if lora is None:
        raise ConfigError("model.lora: not set on the model; the adapter's r and alpha are needed to merge")
    if not isinstance(lora, LoRAConfig):
        lora = LoRAConfig.from_dict(OmegaConf.to_container(lora) if isinstance(lora, DictConfig) else dict(lora))
    llm_attr = getattr(model, "llm_attr", None) or attrs[0]
    if attrs != [llm_attr]:
        raise CheckpointError(f"{src}: LoRA tensors under {attrs}, but the model's LLM is '{llm_attr}'")
    llm = getattr(model, llm_attr)
    if is_lora(llm):
        llm = llm.unload()  # drops the adapter layers; LoRA never changes the base weights
        setattr(model, llm_attr, llm)
    merged = merge_lora_state_dict(state, adapter_scaling(state, lora), base=model.state_dict(), llm_attr=llm_attr)
    out = {k: v for k, v in ckpt.items() if k not in TRAINING_ENTRIES}
    out["model"] = merged
    config = out.get("config")
    if isinstance(config, Mapping) and isinstance(config.get("model"), Mapping) and "lora" in config["model"]:
        out["config"] = copy.deepcopy(dict(config))
        out["config"]["model"] = {k: v for k, v in config["model"].items() if k != "lora"}
    out["merged_lora"] = {"source": str(src), "r": int(lora.r), "alpha": float(lora.alpha)}
    if dst is not None:
        write_checkpoint(out, dst, layout)
    if hf_out is not None:
        result = model.load_state_dict(merged, strict=False)
        if result.unexpected_keys:
            raise CheckpointError(f"{src}: keys the model does not have: {result.unexpected_keys[:5]}")
        llm.save_pretrained(str(hf_out))
        tokenizer = getattr(model, "tokenizer", None)
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(hf_out))
            from videollm.templates import TEMPLATES, write_chat_template

            if getattr(model, "default_template", None) in TEMPLATES:
                try:  # apply_chat_template for transformers users
                    write_chat_template(hf_out, model.default_template)
                except ConfigError as exc:
                    logger.warning("no chat_template written: %s", exc)
        logger.info("wrote the merged LLM to %s", hf_out)
    return out


# ----------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------

LINK_MODES = ("hardlink", "symlink", "copy")


def _place(src: Path, dst: Path, mode: str, key: str) -> Path:
    """Put file or folder ``src`` (named by config key ``key``) at ``dst``: hard links (copies
    across filesystems), a symlink, or a copy."""
    if not src.exists():
        raise ConfigError(f"model.{key}: {src} not found")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if mode == "symlink":
        os.symlink(src.resolve(), dst, target_is_directory=src.is_dir())
        return dst

    def copy_one(a: str, b: str) -> None:
        if mode == "hardlink":
            with contextlib.suppress(OSError):
                os.link(a, b)
                return
        shutil.copy2(a, b)

    if src.is_dir():
        shutil.copytree(src, dst, copy_function=copy_one)
    else:
        copy_one(str(src), str(dst))
    return dst


def _sub_state(state: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """The tensors of ``state`` under ``prefix``, with the prefix removed (a submodule's state dict)."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _random_parts(m: Mapping[str, Any]) -> List[str]:
    """The parts a model built from config ``m`` would get random weights for (or may, when not strict)."""
    parts = [key for key in ("llama_model", "vit_ckpt", "q_former_model", "ckpt") if not m.get(key)]
    if m.get("equip_audio_branch"):
        parts += [key for key in ("imagebind_ckpt_path", "ckpt_2") if not m.get(key)]
    if not m.get("strict_load", True):
        parts.append("strict_load=false (a checkpoint may leave parts random)")
    return parts


def export_folder(
    cfg_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    options: Optional[Sequence[str]] = None,
    link: str = "hardlink",
    overwrite: bool = False,
) -> Path:
    """Export the model of an eval config as a self-contained folder; returns ``out_dir/config.yaml``.

    Layout of ``out_dir``::

        config.yaml            model section with every path pointing inside out_dir, written
                               relative to it (``./llm``; see :func:`videollm.config.load_config`)
                               so that the folder can be moved or copied and still serves; plus
                               the config's datasets/run sections
        tokenizer/             tokenizer.model, added_tokens.json, special_tokens_map.json, and the
                               chat template in Jinja (chat_template.jinja, tokenizer_config.json)
        llm/                   the HF folder of model.llama_model (linked/copied), or
                               save_pretrained of the random-init LLM
        encoders/              EVA ViT, BLIP-2 Q-Former (+ ln_vision) and ImageBind weights: the
                               configured files (linked/copied) or the built model's weights
        adapter.safetensors    branch weights (video branch + llama_proj, audio branch when
                               equipped), loaded as model.ckpt
        prompts/               the prompt file, when model.prompt_path is set

    The model is built (on the CPU) only when some part has no file, i.e. gets random weights;
    the folder then reproduces exactly that model. A glob in ``ckpt``/``ckpt_2`` is resolved to
    its latest match, as the demo does. ``link``: ``hardlink`` (default; copies where links are
    impossible), ``symlink`` (small, but not self-contained) or ``copy``.

    Everything is written into a hidden sibling folder that is renamed to ``out_dir`` only when
    complete; with ``overwrite`` the earlier export is moved aside and deleted only after that. A
    failure (a bad path in the config, a full disk: :class:`~videollm.errors.StorageError`) leaves
    the earlier export as it was and no partial folder.
    """
    from omegaconf import OmegaConf

    from videollm.chat import resolve_checkpoint_pattern
    from videollm.config import load_config
    from videollm.models.imagebind import CHECKPOINT_FILENAME
    from videollm.models.video_llama import AUDIO_BRANCH, PACKAGE_DIR, VIDEO_BRANCH, template_for_model_type
    from videollm.registry import registry
    from videollm.tokenizer import load_tokenizer

    arch = str(OmegaConf.select(load_config(cfg_path, options), "model.arch") or "video_llama")
    if arch != "video_llama":
        raise ConfigError(f"convert export: model.arch '{arch}' is not supported yet (export writes the "
                          "Video-LLaMA layout: LLM folder, encoder files, branch adapter)")

    if link not in LINK_MODES:
        raise ConfigError(f"--link: '{link}' unknown; choose one of {', '.join(LINK_MODES)}")
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder")
    replace = out.exists() and any(out.iterdir())
    if replace:
        if not overwrite:
            raise ConfigError(f"{out}: export folder exists and is not empty (pass --overwrite to replace it)")
        if not ((out / "config.yaml").is_file() and (out / "adapter.safetensors").is_file()):
            raise ConfigError(f"{out}: not an earlier export (no config.yaml + adapter.safetensors); refusing to delete it")
    cfg = load_config(cfg_path, options)
    m: Dict[str, Any] = OmegaConf.to_container(cfg.model, resolve=True)
    for key in ("ckpt", "ckpt_2"):
        m[key], notice = resolve_checkpoint_pattern(str(m.get(key) or ""))
        if notice:
            logger.warning("%s", notice)
    if link == "symlink":
        for key in ("llama_model", "vit_ckpt", "q_former_model", "imagebind_ckpt_path", "llama_proj_model"):
            if m.get(key) and Path(m[key]).resolve().is_relative_to(out):
                raise ConfigError(f"model.{key}: {m[key]} is inside the export folder {out}; symlinks to it "
                                  "would break when it is replaced (use --link hardlink or copy)")
    # Written into a hidden sibling folder, moved to out_dir when complete (replacing an earlier
    # export only then): a failure or a full disk leaves the earlier export as it was.
    with atomic_folder(out, replace=replace) as work:
        def final(path: Path) -> str:
            """Where ``path`` (inside the temporary folder) will be, relative to the finished export."""
            return "./" + Path(path).relative_to(work).as_posix()

        random_parts = _random_parts(m)
        model = None
        if random_parts:
            logger.info("building the model to export its weights (no file for: %s)", ", ".join(random_parts))
            build = dict(m, low_resource=False, load_in_4bit=False, device_map=None)
            model = registry.get_model_class(str(m.get("arch", "video_llama"))).from_config(OmegaConf.create(build)).eval()
            state = model.state_dict()

        # LLM and tokenizer.
        if m.get("llama_model"):
            _place(Path(m["llama_model"]), work / "llm", link, "llama_model")
        else:
            model.language_model.save_pretrained(str(work / "llm"))
        tok_source = m.get("tokenizer") if m.get("tokenizer") is not None else m.get("llama_model")
        load_tokenizer(tok_source).save_pretrained(work / "tokenizer")
        from videollm.templates import write_chat_template

        write_chat_template(work / "tokenizer", str(m.get("conv_template") or template_for_model_type(str(m.get("model_type", "")))))
        m["llama_model"], m["tokenizer"] = "./llm", "./tokenizer"

        # Frozen encoders: the configured files, or the built (random) weights in the same layouts.
        enc = work / "encoders"
        enc.mkdir()
        if m.get("vit_ckpt"):
            m["vit_ckpt"] = final(_place(Path(m["vit_ckpt"]), enc / Path(m["vit_ckpt"]).name, link, "vit_ckpt"))
        else:  # load_eva_vit_weights reads a bare ViT state dict with torch.load
            save_atomic(_sub_state(state, "visual_encoder."), enc / "eva_vit_g.pth")
            m["vit_ckpt"] = final(enc / "eva_vit_g.pth")
        if m.get("q_former_model"):
            m["q_former_model"] = final(_place(Path(m["q_former_model"]), enc / Path(m["q_former_model"]).name, link, "q_former_model"))
        else:
            qformer = {k: v for k, v in state.items() if _matches(k, ("Qformer.", "query_tokens", "ln_vision."))}
            write_checkpoint({"model": qformer}, enc / "qformer.safetensors", layout="state_dict")
            m["q_former_model"] = final(enc / "qformer.safetensors")
        if m.get("equip_audio_branch"):
            ib_dir = enc / "imagebind"
            if m.get("imagebind_ckpt_path"):
                src = Path(m["imagebind_ckpt_path"])
                src = src / CHECKPOINT_FILENAME if src.is_dir() else src
                m["imagebind_ckpt_path"] = final(_place(src, ib_dir / src.name, link, "imagebind_ckpt_path"))
            else:  # load_imagebind_weights reads a bare state dict with torch.load
                save_atomic(_sub_state(state, "audio_encoder."), ib_dir / CHECKPOINT_FILENAME)
                m["imagebind_ckpt_path"] = final(ib_dir)

        # Branch weights, loaded as model.ckpt. Every key the configured ckpt/ckpt_2 carried is kept
        # (a file may also set weights outside the branches), with the values the model ended up with.
        sources: Dict[str, torch.Tensor] = {}
        for key in ("ckpt", "ckpt_2"):
            if m.get(key):
                sources.update(read_checkpoint(m[key])[0]["model"])
        if model is not None:
            adapter = {k: v for k, v in state.items() if _matches(k, VIDEO_BRANCH + AUDIO_BRANCH) or k in sources}
        else:
            adapter = sources
        write_checkpoint(
            {"model": adapter, "config": {"exported_from": str(cfg_path), "ckpt": m.get("ckpt"), "ckpt_2": m.get("ckpt_2")}},
            work / "adapter.safetensors",
        )
        m["ckpt"], m["ckpt_2"] = "./adapter.safetensors", ""
        if "llama_proj.weight" in adapter:
            m["llama_proj_model"] = ""
        elif m.get("llama_proj_model"):
            m["llama_proj_model"] = final(_place(Path(m["llama_proj_model"]), enc / Path(m["llama_proj_model"]).name, link, "llama_proj_model"))

        if m.get("prompt_path"):
            prompt = Path(m["prompt_path"])
            if not prompt.is_absolute() and not prompt.is_file():
                prompt = PACKAGE_DIR / prompt  # the model's own rule for relative prompt paths
            m["prompt_path"] = final(_place(prompt, work / "prompts" / prompt.name, "copy", "prompt_path"))

        full = {"model": m}
        for root in ("datasets", "run"):
            if root in cfg:
                full[root] = OmegaConf.to_container(cfg[root], resolve=True)
        header = (
            f"# Exported by `python -m videollm.convert export --cfg-path {cfg_path}`.\n"
            "# Every path below is inside this folder, written relative to it (./...): the folder can be\n"
            "# moved or copied to another machine and loaded from there.\n"
            f"#   python demo.py --cfg-path {out / 'config.yaml'}\n"
        )
        (work / "config.yaml").write_text(header + OmegaConf.to_yaml(OmegaConf.create(full)))
    logger.info("exported %s (%d adapter tensors)", out, len(adapter))
    return out / "config.yaml"


# ----------------------------------------------------------------------------------------------
# inspect
# ----------------------------------------------------------------------------------------------


def _meta_model(node: Any):
    """The model of config ``node`` on the meta device, with the audio branch, loading no file."""
    from omegaconf import OmegaConf

    from videollm.models.video_llama import VideoLLAMA

    m = OmegaConf.to_container(node, resolve=True) if not isinstance(node, dict) else dict(node)
    m.update(
        llama_model="", vit_ckpt="", q_former_model="", imagebind_ckpt_path="", ckpt="", ckpt_2="",
        llama_proj_model="", tokenizer="tiny", prompt_path="", equip_audio_branch=True,
        low_resource=False, load_in_4bit=False, device_map=None,
    )
    with torch.device("meta"):
        return VideoLLAMA.from_config(m)


def _preset_node(name: str):
    from omegaconf import OmegaConf

    from videollm.models.video_llama import PACKAGE_DIR, VideoLLAMA

    presets = VideoLLAMA.PRETRAINED_MODEL_CONFIG_DICT
    if name not in presets:
        from videollm.errors import closest

        raise ConfigError(f"--preset: unknown preset '{name}'{closest(name, presets)}; known: {', '.join(sorted(presets))}")
    return OmegaConf.load(PACKAGE_DIR / presets[name]).model


def fit_report(state: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """How ``state`` would load into a model whose state dict is ``model_state`` (shapes only)."""
    from videollm.models.video_llama import AUDIO_BRANCH, TOLERATED_UNEXPECTED, VIDEO_BRANCH

    mismatches = [
        {"key": k, "file": list(v.shape), "model": list(model_state[k].shape)}
        for k, v in state.items()
        if k in model_state and tuple(v.shape) != tuple(model_state[k].shape)
    ]
    not_in_model = [k for k in state if k not in model_state]
    tolerated = [k for k in not_in_model if any(re.search(p, k) for p in TOLERATED_UNEXPECTED)]
    unexpected = [k for k in not_in_model if k not in tolerated]
    missing = {
        role: [k for k in model_state if _matches(k, prefixes) and k not in state]
        for role, prefixes in (("ckpt", VIDEO_BRANCH), ("ckpt_2", AUDIO_BRANCH))
    }
    clean = not mismatches and not unexpected
    return {
        "shape_mismatches": mismatches,
        "unexpected": unexpected,
        "tolerated_unexpected": len(tolerated),
        "missing_as_ckpt": missing["ckpt"],
        "missing_as_ckpt_2": missing["ckpt_2"],
        "loads_as": [role for role in ("ckpt", "ckpt_2") if clean and not missing[role]],
    }


def summarize_state(state: Mapping[str, torch.Tensor]) -> Dict[str, Dict[str, Any]]:
    """Keys grouped by top-level module: ``{module: {keys, params, buffer_elements, dtypes, tensors}}``.

    ``params`` counts the elements of weights; the persistent buffers every runner checkpoint
    carries (``position_ids``, ``inv_freq``, ...) are counted apart, so a VL 7B file's ``params``
    total is the original's 22,104,064 trainable parameters.
    """
    groups: Dict[str, Dict[str, Any]] = {}
    for key, t in state.items():
        g = groups.setdefault(key.split(".", 1)[0], {"keys": 0, "params": 0, "buffer_elements": 0, "dtypes": [], "tensors": {}})
        g["keys"] += 1
        g["buffer_elements" if key.endswith(_BUFFER_SUFFIXES) else "params"] += t.numel()
        dtype = str(t.dtype).replace("torch.", "")
        if dtype not in g["dtypes"]:
            g["dtypes"].append(dtype)
        g["tensors"][key] = {"shape": list(t.shape), "dtype": dtype}
    return groups


def inspect_checkpoint(
    path: str | os.PathLike,
    cfg_path: Optional[str | os.PathLike] = None,
    preset: Optional[str] = None,
    options: Optional[Sequence[str]] = None,
) -> Dict[str, Any]:
    """Describe a checkpoint and check it against model configs (built on the meta device).

    Candidates: the model of ``cfg_path`` (an eval/train config), or ``preset``, or else every
    preset of :data:`KNOWN_PRESETS`. ``fits`` lists the candidates with no shape mismatch.
    Returns a JSON-able dict (what ``inspect --json`` prints).
    """
    from videollm.config import load_config

    if cfg_path is not None and preset is not None:
        raise ConfigError("inspect: give --cfg-path or --preset, not both")
    path = Path(path)
    ckpt, layout = read_checkpoint(path)
    state = ckpt["model"]
    groups = summarize_state(state)
    entries = {}
    for key, value in ckpt.items():
        if key == "model":
            continue
        if isinstance(value, Mapping):
            entries[key] = f"dict with {len(value)} entries"
        elif isinstance(value, (list, tuple)):
            entries[key] = f"list of {len(value)}"
        else:
            entries[key] = value if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__

    if cfg_path is not None:
        candidates = {str(cfg_path): load_config(cfg_path, options).model}
    elif preset is not None:
        candidates = {preset: _preset_node(preset)}
    else:
        candidates = {name: _preset_node(name) for name in KNOWN_PRESETS}
    reports = {}
    for name, node in candidates.items():
        model_state = _meta_model(node).state_dict()
        reports[name] = fit_report(state, model_state)
    kind = branch_kind(list(state))
    return {
        "file": str(path),
        "layout": layout,
        "entries": entries,
        "branch": kind,
        "role": {"VL": "ckpt", "AL": "ckpt_2", "VL+AL": "ckpt"}.get(kind),
        "groups": groups,
        "total_keys": len(state),
        "total_params": sum(g["params"] for g in groups.values()),
        "total_buffer_elements": sum(g["buffer_elements"] for g in groups.values()),
        "candidates": reports,
        "fits": [name for name, r in reports.items() if not r["shape_mismatches"]],
    }


def format_inspect(report: Mapping[str, Any], show_keys: bool = True, limit: int = 5) -> str:
    """Human-readable text of an :func:`inspect_checkpoint` report."""
    lines = [f"{report['file']} ({report['layout']} layout)"]
    for key, value in report["entries"].items():
        lines.append(f"  {key}: {value}")
    branch = {"VL": "vision-language branch (load as model.ckpt)", "AL": "audio-language branch (load as model.ckpt_2)",
              "VL+AL": "both branches (merged; load as model.ckpt)", "other": "no branch weights (not a VL/AL checkpoint)"}
    lines.append(f"branch: {report['branch']}: {branch[report['branch']]}")
    lines.append(f"{'module':<34} {'keys':>6} {'params':>14} {'buffers':>10}  dtypes")
    for name, g in report["groups"].items():
        lines.append(f"{name:<34} {g['keys']:>6} {g['params']:>14,} {g['buffer_elements']:>10,}  {', '.join(g['dtypes'])}")
        if show_keys:
            for key, t in g["tensors"].items():
                lines.append(f"    {key:<70} {str(tuple(t['shape'])):<20} {t['dtype']}")
    lines.append(f"{'total':<34} {report['total_keys']:>6} {report['total_params']:>14,} {report['total_buffer_elements']:>10,}")

    def short(keys: List[str]) -> str:
        return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")

    for name, r in report["candidates"].items():
        verdict = "fits" if not r["shape_mismatches"] else f"{len(r['shape_mismatches'])} shape mismatches"
        loads = f"; loads cleanly as {' and '.join(r['loads_as'])}" if r["loads_as"] else ""
        lines.append(f"model {name}: {verdict}{loads}")
        if not show_keys and r["shape_mismatches"]:
            continue  # --no-keys: the verdict line only, for the candidates that do not fit
        for mm in r["shape_mismatches"][:limit]:
            lines.append(f"    {mm['key']}: file {tuple(mm['file'])} vs model {tuple(mm['model'])}")
        if r["unexpected"]:
            lines.append(f"    unexpected (not in the model): {short(r['unexpected'])}")
        if r["tolerated_unexpected"]:
            lines.append(f"    tolerated old buffers: {r['tolerated_unexpected']}")
        for role in (report["role"],) if report["role"] else ("ckpt", "ckpt_2"):
            missing = r[f"missing_as_{role}"]
            lines.append(f"    missing as {role}: " + (short(missing) if missing else "none"))
    lines.append("fits: " + (", ".join(report["fits"]) if report["fits"] else "none of the candidates"))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m videollm.convert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("strip", help="drop optimizer/scaler for release")
    s.add_argument("src", metavar="IN")
    s.add_argument("dst", metavar="OUT")
    s = sub.add_parser("merge", help="merge a VL (ckpt) and an AL (ckpt_2) checkpoint into one file")
    s.add_argument("vl", metavar="VL")
    s.add_argument("al", metavar="AL")
    s.add_argument("dst", metavar="OUT")
    for name, help_ in (("to-safetensors", ".pth -> .safetensors"), ("to-pth", ".safetensors -> .pth")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("src", metavar="IN")
        s.add_argument("dst", metavar="OUT")
    s = sub.add_parser("export", help="self-contained folder (config.yaml, tokenizer, LLM, encoders, adapter)")
    s.add_argument("--cfg-path", required=True, help="eval config to export")
    s.add_argument("--options", nargs="+", default=None, help="override config keys: key=value ...")
    s.add_argument("--link", choices=LINK_MODES, default="hardlink", help="how to bring big files in (default: hardlink)")
    s.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    s.add_argument("out_dir", metavar="OUT_DIR")
    s = sub.add_parser("merge-lora", help="fold a LoRA adapter of a training checkpoint into the LLM weights")
    s.add_argument("src", metavar="IN")
    s.add_argument("dst", metavar="OUT", nargs="?", default=None, help="merged checkpoint (plain LLM names)")
    s.add_argument("--cfg-path", required=True, help="config of the model (with model.lora) that was trained")
    s.add_argument("--options", nargs="+", default=None, help="override config keys: key=value ...")
    s.add_argument("--hf-out", default=None, help="also write the merged LLM as a Hugging Face folder")
    s = sub.add_parser("inspect", help="keys, shapes, parameter counts; which model config it fits")
    s.add_argument("file", metavar="FILE")
    group = s.add_mutually_exclusive_group()
    group.add_argument("--cfg-path", default=None, help="check against the model of this config")
    group.add_argument("--preset", default=None, help=f"check against this preset (default: {', '.join(KNOWN_PRESETS)})")
    s.add_argument("--options", nargs="+", default=None, help="with --cfg-path: key=value overrides")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--no-keys", action="store_true", help="only the per-module summary")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.command == "strip":
            strip_checkpoint(args.src, args.dst)
        elif args.command == "merge":
            merge_checkpoints(args.vl, args.al, args.dst)
        elif args.command == "to-safetensors":
            to_safetensors(args.src, args.dst)
        elif args.command == "to-pth":
            to_pth(args.src, args.dst)
        elif args.command == "export":
            path = export_folder(args.cfg_path, args.out_dir, args.options, link=args.link, overwrite=args.overwrite)
            print(path)
        elif args.command == "merge-lora":
            merge_lora_checkpoint(args.src, args.dst, args.cfg_path, args.options, hf_out=args.hf_out)
        elif args.command == "inspect":
            pkg_logger = logging.getLogger("videollm")
            previous = pkg_logger.level
            pkg_logger.setLevel(logging.WARNING)  # meta builds log a lot
            try:
                report = inspect_checkpoint(args.file, args.cfg_path, args.preset, args.options)
            finally:
                pkg_logger.setLevel(previous)  # main() may be called in-process
            print(json.dumps(report, indent=1) if args.json else format_inspect(report, show_keys=not args.no_keys))
    except VideoLLMError as e:
        message = " ".join(str(e).split())
        print(f"error: {type(e).__name__}: {message}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError) as e:
        if not is_storage_error(e):
            raise
        error = storage_error(e, getattr(e, "filename", None) or "output", "cannot read or write", atomic=False)
        print(f"error: StorageError: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

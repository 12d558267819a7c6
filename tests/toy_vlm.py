"""A minimal second architecture for the contract tests: a patch-linear vision tower + an MLP
projector into any transformers causal LM with an ``auto`` (BPE) tokenizer.

It exists to prove that the runner, the Chat, the CLI, batch inference and the evaluation work
for a model that is not Video-LLaMA with no special case for it anywhere: everything it does is
in this file, through :class:`videollm.models.base.VideoLLM`. Registered as ``toy_vlm`` when
imported. Tokens per medium: ``patches per frame x frames`` (``token_count = "per_frame"``); one
``<image>`` placeholder per medium, expanded by the merge path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from videollm.conversation import Conversation, SeparatorStyle
from videollm.errors import PromptError
from videollm.models.base import FreezePlan, Media, VideoLLM, WeightSource
from videollm.models.merge import IGNORE_INDEX, Segment, merge_segments, segments_from_ids, segments_from_prompt
from videollm.registry import registry
from videollm.templates import TEMPLATES, ChatTemplate, register_template

PLACEHOLDER = "<image>"
EOS = "<|endoftext|>"
CAPTION_QUESTION = "Describe the video."

if "toy_chat" not in TEMPLATES:
    register_template(ChatTemplate(
        name="toy_chat",
        conversation=Conversation(system="A chat.", roles=("USER", "ASSISTANT"), sep_style=SeparatorStyle.TWO,
                                  sep=" ", sep2=EOS),
        placeholder=PLACEHOLDER,
        media_messages={"video": PLACEHOLDER + "\n", "image": PLACEHOLDER + "\n"},
        media_markers=(PLACEHOLDER,),
        question_join="",
        stop=EOS,
        stop_on_eos=True,
    ))


@dataclass
class ToyVLMConfig:
    arch: str = "toy_vlm"
    tokenizer: str = ""  # a local tokenizer folder (auto kind)
    llm_model: str = ""  # a local HF folder; empty: random weights from llm_config
    llm_config: Dict[str, Any] = field(default_factory=dict)
    image_size: int = 16
    patch: int = 8
    vision_dim: int = 32
    n_frms: int = 2
    freeze_vision: bool = True
    freeze_llm: bool = False
    lora: Dict[str, Any] = field(default_factory=dict)
    ckpt: str = ""
    strict_load: bool = True


class ToyProcessor:
    """Caption or conversation batches -> ids with one ``<image>`` per medium, assistant-only labels."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def _ids(self, text: str) -> List[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, turns: Sequence[Dict[str, str]]):
        conv = TEMPLATES["toy_chat"].conversation
        ids, labels = self._ids(conv.system + conv.sep), None
        labels = [IGNORE_INDEX] * len(ids)
        seps = [conv.sep, conv.sep2]
        for i, turn in enumerate(turns):
            value = turn["value"].replace("<video>", PLACEHOLDER)
            if turn["from"] == "human":
                piece = self._ids(f"{conv.roles[0]}: {value}{seps[0]}")
                ids += piece
                labels += [IGNORE_INDEX] * len(piece)
            else:
                head, body = self._ids(f"{conv.roles[1]}:"), self._ids(f" {value}{seps[1]}")
                ids += head + body
                labels += [IGNORE_INDEX] * len(head) + body
        return torch.tensor(ids), torch.tensor(labels)

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        if "input_ids" in batch:
            return batch
        if "conversations" in batch:
            convs, images = batch["conversations"], batch["images"]
        else:
            convs = [[{"from": "human", "value": PLACEHOLDER + "\n" + CAPTION_QUESTION}, {"from": "gpt", "value": t}]
                     for t in batch["text_input"]]
            images = batch["image"]
        rows = [self.encode(c) for c in convs]
        pad = self.tokenizer.pad_token_id
        ids = torch.nn.utils.rnn.pad_sequence([r[0] for r in rows], batch_first=True, padding_value=pad)
        labels = torch.nn.utils.rnn.pad_sequence([r[1] for r in rows], batch_first=True, padding_value=IGNORE_INDEX)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r[0]) for r in rows], batch_first=True)
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "images": images,
                "bad_samples": batch.get("bad_samples", []), "num_samples": len(rows)}


@registry.register_model("toy_vlm")
class ToyVLM(VideoLLM):
    """frames (3, T, s, s) -> patches -> ``vision_tower`` -> ``projector`` -> LLM tokens (T * P, H)."""

    arch = "toy_vlm"
    config_schema = ToyVLMConfig
    llm_attr = "language_model"
    media_placeholder = PLACEHOLDER
    token_count = "per_frame"
    default_template = "toy_chat"
    weight_keys = {"llm_model": "a Hugging Face causal LM folder", "ckpt": "a training checkpoint"}

    def __init__(self, cfg: ToyVLMConfig) -> None:
        super().__init__()
        from videollm.models.llm import build_language_model, build_tokenizer

        self.cfg = cfg
        self.tokenizer = build_tokenizer("auto", cfg.tokenizer, added_tokens=[PLACEHOLDER])
        self.placeholder_id = self.tokenizer.convert_tokens_to_ids(PLACEHOLDER)
        self.vision_tower = nn.Linear(3 * cfg.patch * cfg.patch, cfg.vision_dim)
        self.language_model = build_language_model(cfg.llm_model, config=cfg.llm_config or None, dtype="fp32",
                                                   key="model.llm_model")
        hidden = self.language_model.config.hidden_size
        self.projector = nn.Sequential(nn.Linear(cfg.vision_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        if cfg.lora:
            from videollm.models.lora import apply_lora

            apply_lora(self, self.llm_attr, cfg.lora)
        if cfg.ckpt:
            self.load_weight_sources([WeightSource(cfg.ckpt, provides=("projector.",))])
        self.apply_freeze_plan()
        self._processor = ToyProcessor(self.tokenizer)

    def freeze_plan(self) -> FreezePlan:
        plan = FreezePlan().add("vision_tower.", not self.cfg.freeze_vision).add("language_model.", not self.cfg.freeze_llm)
        if self.cfg.lora:
            plan.add_pattern(r"\.lora_", True, "model.lora")
        return plan

    # ------------------------------------------------------------------ media
    def _tokens(self, frames: torch.Tensor) -> torch.Tensor:
        """(3, T, s, s) -> (T * P, H)."""
        p = self.cfg.patch
        c, t, h, w = frames.shape
        x = frames.permute(1, 2, 3, 0).reshape(t, h // p, p, w // p, p, c).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(t * (h // p) * (w // p), p * p * c)
        return self.projector(self.vision_tower(x.to(self.vision_tower.weight.dtype)))

    def num_media_tokens(self, medium: Media) -> int:
        frames = 1 if medium.kind == "image" else medium.data.shape[1]
        return frames * (self.cfg.image_size // self.cfg.patch) ** 2

    def encode_media(self, media: Sequence[Media], text: Optional[str] = None) -> List[torch.Tensor]:
        out = []
        for m in media:
            data = m.data.to(self.device)
            if m.kind == "image":
                data = data.unsqueeze(1)
            elif m.kind != "video":
                raise PromptError(f"toy_vlm cannot encode {m.kind!r}")
            out.append(self._tokens(data))
        return out

    def load_media(self, source: Any, kind: str, *, timeout: Optional[float] = 30.0, **options: Any) -> Media:
        from videollm.processors.image_processors import load_image
        from videollm.processors.transforms import CLIP_MEAN, CLIP_STD
        from videollm.processors.video_loader import load_video

        s = self.cfg.image_size
        mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1, 1)
        if kind == "video":
            frames, msg = load_video(source, n_frms=self.cfg.n_frms, height=s, width=s, sampling="uniform",
                                     return_msg=True, timeout=timeout)
            return Media("video", (frames.float() / 255 - mean) / std, {"path": str(source), "msg": msg})
        if kind == "image":
            img = load_image(source).resize((s, s))
            x = torch.tensor(list(img.getdata()), dtype=torch.float32).view(s, s, 3).permute(2, 0, 1)
            return Media("image", ((x.unsqueeze(1) / 255 - mean) / std)[:, 0], {"path": str(source)})
        raise PromptError(f"toy_vlm has no loader for {kind!r}")

    # ------------------------------------------------------------------ training
    def batch_processor(self) -> ToyProcessor:
        return self._processor

    def _media_of(self, images: torch.Tensor) -> List[Media]:
        kind = "video" if images.dim() == 5 else "image"
        return [Media(kind, x) for x in images]

    def forward(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        batch = self.prepare_batch(batch)
        embeds = self.encode_media(self._media_of(batch["images"]))
        rows = [segments_from_ids(ids, self.placeholder_id, [e], attention_mask=m, labels=lab, where=f"sample {i}")
                for i, (ids, m, lab, e) in enumerate(zip(batch["input_ids"], batch["attention_mask"], batch["labels"], embeds))]
        merged = merge_segments(rows, self.embed_tokens, dtype=self.llm_dtype, device=self.device,
                                pad_token_id=self.tokenizer.pad_token_id)
        out = self.language_model(inputs_embeds=merged.inputs_embeds, attention_mask=merged.attention_mask,
                                  labels=merged.labels)
        return {"loss": out.loss, "num_tokens": (merged.labels[:, 1:] != IGNORE_INDEX).sum(),
                "seq_len": merged.labels.shape[1]}

    # ------------------------------------------------------------------ evaluation
    def generation_inputs(self, batch: Dict[str, Any]):
        conv = TEMPLATES["toy_chat"].new_conversation()
        conv.append_message(conv.roles[0], PLACEHOLDER + "\n" + CAPTION_QUESTION)
        conv.append_message(conv.roles[1], None)
        prompt = conv.get_prompt()
        embeds = self.encode_media(self._media_of(batch["image"]))
        rows = [segments_from_prompt(self.tokenizer, prompt, PLACEHOLDER, [e], bos_on_first=False) for e in embeds]
        merged = merge_segments(rows, self.embed_tokens, dtype=self.llm_dtype, device=self.device, padding_side="left")
        return merged.inputs_embeds, merged.attention_mask

    def decode_caption(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids)).split(EOS)[0].strip()


__all__ = ["ToyVLM", "ToyVLMConfig", "Segment"]

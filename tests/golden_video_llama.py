"""Golden values of the tiny Video-LLaMA, shared by ``tests/test_golden_video_llama.py`` and the
script that wrote ``tests/golden/video_llama_tiny.json`` (``python tests/golden_video_llama.py``).

The values were computed once, before the model-contract redesign, and are compared exactly
(ids, labels, prompts) or to 1e-6 (losses) ever after: any difference is a regression of
Video-LLaMA's behaviour. Only stable public entry points are used: dataset builders and their
collater, ``model.prepare_batch`` where the model has it (the model-owned processor), ``model(batch)``,
and the Chat API.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any, Dict

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "videollm/configs/models/video_llama_tiny.yaml"
GOLDEN = REPO / "tests/golden/video_llama_tiny.json"
N_FRMS, SIZE, NQ = 4, 32, 8
VIDEO_PROC = {"train": {"name": "alpro_video_eval", "image_size": SIZE, "n_frms": N_FRMS}}
IMAGE_PROC = {"train": {"name": "blip2_image_eval", "image_size": SIZE}}
TEMPLATES = {"vicuna": "pretrain_vicuna", "llama_v2": "pretrain_llama_v2"}
PROMPT_TEMPLATES = {"vicuna": "###Human: {} ###Assistant: ", "llama_v2": "[INST] {} [/INST] "}


def tiny_model(seed: int = 0, **overrides):
    from videollm.registry import registry

    cfg = OmegaConf.load(TINY).model
    for k, v in overrides.items():
        cfg[k] = v
    torch.manual_seed(seed)
    return registry.get_model_class("video_llama").from_config(cfg).eval()


def build(name: str, **cfg):
    from videollm.registry import registry

    return registry.get_builder_class(name).from_config(OmegaConf.create(cfg)).build_datasets()["train"]


def pipeline_batch(ds, indices, model) -> Dict[str, Any]:
    batch = ds.collater([ds[i] for i in indices])
    prepare = getattr(model, "prepare_batch", None)
    return prepare(batch) if prepare is not None else batch


def instruct_datasets(root: Path, model_type: str, fix_label_mask: bool = False):
    common = dict(num_video_query_token=NQ, tokenizer_name="tiny", model_type=model_type, fix_label_mask=fix_label_mask)
    llava = build("llava_instruct", vis_processor=IMAGE_PROC, **common,
                  build_info=dict(anno_dir=str(root / "llava/llava_instruct.json"), videos_dir=str(root / "llava/train2014")))
    videochat = build("webvid_instruct", vis_processor=VIDEO_PROC, **common,
                      build_info=dict(anno_dir=str(root / "videochat/videochat_instruct.json"), videos_dir=str(root / "videos")))
    return {"llava": llava, "videochat": videochat}


def caption_batch(root: Path) -> Dict[str, Any]:
    ds = build("webvid", vis_processor=VIDEO_PROC, text_processor={"train": {"name": "blip_caption"}},
               build_info=dict(anno_dir=str(root / "webvid/train"), videos_dir=str(root / "videos")))
    return ds.collater([ds[i] for i in range(3)])


def compute(root: Path) -> Dict[str, Any]:
    from videollm.chat import Chat, new_conversation

    out: Dict[str, Any] = {"datasets": {}, "instruct_loss": {}, "caption_loss": {}, "chat": {}}
    # dataset pipeline: ids and labels (both templates, original and corrected masks)
    for template, model_type in TEMPLATES.items():
        model = tiny_model(model_type=model_type)
        for fix in (False, True):
            for name, ds in instruct_datasets(root, template, fix).items():
                batch = pipeline_batch(ds, [0, 1, 2], model)
                key = f"{name}/{template}/{'fixed' if fix else 'original'}"
                out["datasets"][key] = {
                    "input_ids": batch["input_ids"].tolist(),
                    "labels": batch["labels"].tolist(),
                    "attention_mask": batch["attention_mask"].long().tolist(),
                }
                if not fix:
                    model.train()
                    torch.manual_seed(1)
                    loss = model(batch)["loss"].item()
                    model.eval()
                    out["instruct_loss"][key] = loss
    # caption path: no prompt, vicuna-style and llama_v2-style prompts; audio branch on frames
    cap = caption_batch(root)
    variants = {"plain": {}}
    for template, tpl in PROMPT_TEMPLATES.items():
        variants[template] = {"prompt_path": "prompts/alignment_image.txt", "prompt_template": tpl}
    variants["audio_branch_on_frames"] = {"equip_audio_branch": True, "frozen_video_Qformer": True,
                                          "frozen_llama_proj": True, "frozen_audio_Qformer": False}
    for name, overrides in variants.items():
        model = tiny_model(**overrides)
        model.train()
        random.seed(3)
        torch.manual_seed(1)
        out["caption_loss"][name] = model(cap)["loss"].item()
    # chat: prompt strings and greedy ids of a video, an image and an audio+video turn
    manifest = json.loads((root / "manifest.json").read_text())
    with_audio = next(v for v in manifest["videos"] if v["has_audio"] and v["num_frames"] == 16)
    silent = next(v for v in manifest["videos"] if not v["has_audio"] and v["num_frames"] == 16)
    image = manifest["images"][0]
    chat = Chat(tiny_model(equip_audio_branch=True))
    for template in TEMPLATES:
        for kind in ("video", "image", "audio_video"):
            conv, imgs = new_conversation(template, "image" if kind == "image" else "video"), []
            if kind == "video":
                chat.upload_video_without_audio(str(root / silent["path"]), conv, imgs)
            elif kind == "image":
                chat.upload_img(str(root / image["path"]), conv, imgs)
            else:
                chat.upload_video(str(root / with_audio["path"]), conv, imgs)
            chat.ask("What is moving in the video?", conv)
            torch.manual_seed(0)
            text, ids = chat.answer(conv, imgs, max_new_tokens=12, do_sample=False)
            prompt = conv.copy()
            prompt.messages[-1][1] = None
            out["chat"][f"{template}/{kind}"] = {"prompt": prompt.get_prompt(), "ids": [int(i) for i in ids], "text": text}
    return out


if __name__ == "__main__":
    import tempfile

    from videollm.synthetic import generate

    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp), seed=0)
        values = compute(Path(tmp))
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(values, indent=1) + "\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)

"""Parity of videollm's LLaMA-VID with the original code (dvlab-research/LLaMA-VID ``llamavid/``) at tiny size.

Our tiny preset (``videollm/configs/models/llama_vid_tiny.yaml``, every parameter perturbed by a
seeded N(0, 0.02) so that zero biases and unit norms are exercised too) is loaded strictly into the
original's ``LlavaLlamaAttForCausalLM`` built at the same sizes, and compared on:

* ``batch``: the original's ``preprocess_multimodal`` + ``preprocess_imgsp_v1`` (+ LLaVA's
  ``tokenizer_image_token``) + ``DataCollatorForSupervisedDataset`` on a video sample (two turns,
  the second gets its ``<image>`` at random, same seed both sides), an image sample and a text-only
  sample, against our batch processor: input_ids, labels, attention_mask, Q-Former prompts (exact);
  the same for ``preprocess_plain_guided`` (stage 1), for a feature-file sample
  (``preprocess_multimodal_movie``, stage 3) and for the batch at a ``model_max_length`` (195) that
  its media tokens take it past;
* ``media``: a video file's frames (decord, step ``round(avg_fps / 1)``) and a 3:2 image (padded to a
  square with the mean colour) through a ``CLIPImageProcessor`` configured as the original's
  ``llamavid/processor/clip-patch14-224`` (at the tiny size) against our ``load_media``;
* ``bert_ids``: the Q-Former's instruction ids (the toy WordPiece vocabulary + ``[DEC]``, left
  truncation at 256, one prompt longer than that);
* ``eva``: the EVA tower's outputs; ``tokens``: the [context ; content] tokens of a 3-frame video and
  of an image for two questions and ``compress_type`` mean / grid:2 / none, and of a 70-frame long
  video (feature path, chunks of 64);
* ``train``: the loss and the logits of every attended position of that training batch, and the
  loss of the cut batch; ``long``: the same for a two-movie feature-file batch (stage 3) on a second
  pair of models with a 1024-wide EVA (the original takes an input for features, not pixels, when
  its last dimension exceeds 1000);
* ``greedy``: 8 greedy tokens (and the first step's logits) from a chat prompt as our chat writes it
  (``llamavid_llava_v1`` with a video file, ``llamavid_vicuna_v1`` with an image), the prompt text
  against the original's ``llava_v1`` / ``vicuna_v1`` conversation built as its CLI does; the
  ``llava_v1`` one again with both models in fp16 (the released inference precision).

Setup (PyPI only; the original pins transformers 4.31)::

    .venv/bin/python -m pip install --no-deps --target /tmp/tf431 transformers==4.31.0 \
        tokenizers==0.13.3 huggingface_hub==0.16.4 safetensors
    .venv/bin/python scripts/llama_vid_parity.py --setup   # sources -> /tmp/orig_llamavid
    .venv/bin/python scripts/llama_vid_parity.py           # step 1 here, step 2 in a child

``--setup`` copies the original's ``llamavid/`` sources from its git mirror, and from LLaVA at the
commit LLaMA-VID pins (1619889) ``llava/mm_utils.py`` + ``llava/constants.py`` (``tokenizer_image_token``)
with an EMPTY ``llava/__init__.py`` (the real one imports LLaVA's model zoo, unused here). The
original imports timm (not installable here: no torchvision) for ``drop_path``, ``to_2tuple``,
``trunc_normal_`` and the ``register_model`` decorator in ``eva_vit.py``: the child gets a tiny shim
``timm`` package (written by ``--setup``) with those four; nothing else is shimmed (no flash-attn
or deepspeed import is on the path used).

Harness adaptations, all at construction (the forward code of the original runs unchanged):
the original's EVA builder hard-codes ViT-g (1408 wide, 39 blocks), so its ``VisionTransformer``
is built directly at the tiny size inside an ``EVAVisionTowerLavis`` shell; ``init_bert`` reads
bert-base-uncased from the hub, so its steps are done by hand (``BertTokenizer`` on the toy vocab,
``qformer.BertConfig`` at the tiny size, ``BertLMHeadModel``, ``cls`` removed, word embeddings sized
as ours, 256 rows: the original resizes to ``len(tokenizer)``, only the first 117 rows are ever
read); its ``att_feat_size`` is hard-coded 1408 for ``qformer_pretrain``, so at tiny size it is
taken equal to the EVA width (as at full size, where both are 1408 and ``vlm_att_bert_proj`` is
None). The LLaMA tokenizer is transformers 4.31's slow ``LlamaTokenizer`` on our tiny
``tokenizer.model`` (pad := unk, as train.py).

Step 1 (this interpreter, transformers 5) writes the weights, inputs and our outputs to ``--data``;
step 2 (``--child``, transformers 4.31 first on ``sys.path``) runs the original and compares.
Prints one ``PARITY OK`` / ``PARITY FAIL`` line per item and a JSON summary; exit status 1 on any FAIL.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEED = 3
TOL = 1e-5  # fp32 everywhere; measured differences are ~1e-7
QUESTIONS = ("What is the red circle doing?", "which colour " * 150 + "is it")  # the second exceeds 256 BERT ids
CONVS = [
    [{"from": "human", "value": "What is the red circle doing?\n<image>"}, {"from": "gpt", "value": "It is moving left."},
     {"from": "human", "value": "What color is it?"}, {"from": "gpt", "value": "It is red."},
     {"from": "human", "value": "Is it big?"}, {"from": "gpt", "value": "No, small."}],
    [{"from": "human", "value": "<image>\nDescribe the picture."}, {"from": "gpt", "value": "A blue square."}],
    [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello there."}],
]
MOVIE_INPUTS = "<image>Hello there.<image><image>... Where is it going?<image>"  # a feature file's ``inputs``
MOVIE_CONV = [{"from": "human", "value": "<image>\nWhat happens in the movie?"}, {"from": "gpt", "value": "A circle moves."}]
MOVIE_INPUTS_2 = "<image>Bye.<image>"
LONG_WIDTH = 1024  # > 1000: the original's test for "these are features, not pixels"
CAPTION = [{"from": "human", "value": "Describe the image briefly.\n<image>"}, {"from": "gpt", "value": "a red circle"}]
CUT = 195  # model_max_length of the cut batch (its longest sample: 189 ids, 204 positions with media)
COMPRESS = ("mean", "grid:2", None)
LLAMAVID_MIRROR = "/work/.mirror/dvlab-research+LLaMA-VID/repo"
LLAVA_MIRROR = "/work/.mirror/haotian-liu+LLaVA/repo"
LLAVA_COMMIT = "1619889"  # LLaMA-VID's pinned LLaVA

TIMM_SHIM = {
    "timm/__init__.py": "",
    "timm/models/__init__.py": "",
    "timm/models/registry.py": "def register_model(fn):\n    return fn\n",
    "timm/models/layers.py": '''"""The three timm helpers LLaMA-VID's eva_vit.py imports (parity harness shim)."""
import collections.abc
import itertools

import torch


def to_2tuple(x):
    if isinstance(x, collections.abc.Iterable) and not isinstance(x, str):
        return tuple(x)
    return tuple(itertools.repeat(x, 2))


def drop_path(x, drop_prob=0.0, training=False, scale_by_keep=True):
    if drop_prob == 0.0 or not training:
        return x
    keep = 1 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep if scale_by_keep else x * mask


def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
    return torch.nn.init.trunc_normal_(tensor, mean, std, a, b)
''',
}


# ------------------------------------------------------------------ setup
def setup(orig: Path, shim: Path, llamavid_mirror: str, llava_mirror: str) -> None:
    def show(git_dir: str, rev: str, path: str) -> str:
        return subprocess.run(["git", "--git-dir", git_dir, "show", f"{rev}:{path}"], capture_output=True, text=True,
                              check=True).stdout

    names = subprocess.run(["git", "--git-dir", llamavid_mirror, "ls-tree", "-r", "HEAD", "--name-only", "llamavid"],
                           capture_output=True, text=True, check=True).stdout.split()
    for name in names:
        if name.endswith(".py"):
            (orig / name).parent.mkdir(parents=True, exist_ok=True)
            (orig / name).write_text(show(llamavid_mirror, "HEAD", name))
    (orig / "llava").mkdir(parents=True, exist_ok=True)
    for name in ("mm_utils.py", "constants.py"):
        (orig / "llava" / name).write_text(show(llava_mirror, LLAVA_COMMIT, f"llava/{name}"))
    (orig / "llava" / "__init__.py").write_text("")
    for rel, text in TIMM_SHIM.items():
        (shim / rel).parent.mkdir(parents=True, exist_ok=True)
        (shim / rel).write_text(text)
    print(f"original sources in {orig}, timm shim in {shim}")


# ------------------------------------------------------------------ step 1: ours
def ours(out: Path, tmp: Path) -> None:
    sys.path.insert(0, str(REPO))
    import random

    import numpy as np
    import torch
    from omegaconf import OmegaConf
    from PIL import Image

    from videollm.chat import Chat
    from videollm.models.base import Media
    from videollm.models.llama_vid import TINY_BERT_DIR, LLaMAVID, LLaMAVIDProcessor, content_tokens, to_released_key
    from videollm.synthetic import ClipSpec, write_clip
    from videollm.templates import get_template
    from videollm.tokenizer import TINY_TOKENIZER_DIR

    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "videollm/configs/models/llama_vid_tiny.yaml").model)
    g = torch.Generator().manual_seed(1)

    def build(**overrides):
        torch.manual_seed(0)
        built = LLaMAVID.from_config({**cfg, **overrides}).eval()
        with torch.no_grad():
            for p in built.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        return built

    def describe(m):
        llm, vit, qf = m.llm.config, m.model.vision_tower.vision_tower, m.model.vlm_att_encoder.config
        return {
            "llm": {k: getattr(llm, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                 "num_attention_heads", "num_key_value_heads", "vocab_size",
                                                 "max_position_embeddings", "rms_norm_eps")},
            "vit": {"img_size": m.image_size, "patch_size": vit.patch_embed.patch_size[0], "embed_dim": vit.num_features,
                    "depth": len(vit.blocks), "num_heads": vit.blocks[0].attn.num_heads,
                    "mlp_ratio": vit.blocks[0].mlp.fc1.out_features / vit.num_features},
            "qformer": {k: getattr(qf, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                                    "intermediate_size", "max_position_embeddings", "cross_attention_freq")},
            "num_query": m.num_query, "compress_type": m.compress_type, "mm_projector_type": cfg["mm_projector_type"],
            "model_max_length": m.cfg.model_max_length, "tokenizer_model": str(TINY_TOKENIZER_DIR / "tokenizer.model"),
            "bert_dir": str(TINY_BERT_DIR), "pad_token_id": m.tokenizer.pad_token_id,
        }

    def logits_of(m, batch):
        rows = [m.sample_segments(batch["input_ids"][i, :n], batch["labels"][i, :n], batch["media"][i],
                                  batch["prompts"][i], f"sample {i}") for i, n in enumerate(batch["lengths"])]
        merged = m._merge(rows)
        return m.llm(inputs_embeds=merged.inputs_embeds, attention_mask=merged.attention_mask).logits, merged.attention_mask

    model = build()
    size = model.image_size
    video = torch.randn(3, 3, size, size, generator=g)  # (C, F, H, W)
    image = torch.randn(3, size, size, generator=g)
    feats = torch.randn(70, model.patches, model.model.vlm_att_ln.normalized_shape[0], generator=g)  # long video
    res = {}
    with torch.no_grad():
        res["eva"] = model.encode_frames(video.permute(1, 0, 2, 3))
        res["bert_ids"] = {q: model.bert_inputs([q])[0][0] for q in QUESTIONS}
        tokens = {}
        for compress in COMPRESS:
            model.compress_type = compress
            model.tokens_per_frame = 1 + content_tokens(compress, model.patches)
            for qi, q in enumerate(QUESTIONS):
                tokens[f"video/{compress}/q{qi}"] = model.encode_media([Media("video", video)], q)[0]
                tokens[f"image/{compress}/q{qi}"] = model.encode_media([Media("image", image)], q)[0]
        model.compress_type = cfg["compress_type"]
        model.tokens_per_frame = 1 + content_tokens(model.compress_type, model.patches)
        tokens["long/mean/q0"] = model.vlm_attention(feats, [QUESTIONS[0]], long_video=True)[0]
        res["tokens"] = tokens

        random.seed(SEED)
        batch = model.prepare_batch({"media": [Media("video", video), Media("image", image), None],
                                     "conversations": [[dict(t) for t in c] for c in CONVS]})
        res["batch"] = {k: batch[k] for k in ("input_ids", "labels", "attention_mask", "prompts")}
        res["loss"] = model(dict(batch))["loss"]
        res["logits"], res["mask"] = logits_of(model, batch)
        plain = LLaMAVIDProcessor(cfg["tokenizer"], "plain_guided", cfg["model_max_length"], model.cfg.video_token)(
            {"media": [Media("image", image)], "conversations": [[dict(t) for t in CAPTION]]})
        res["plain"] = {k: plain[k] for k in ("input_ids", "labels", "attention_mask", "prompts")}
        # a model_max_length that cuts the batch (before and after the media tokens are inserted)
        random.seed(SEED)
        cut = LLaMAVIDProcessor(cfg["tokenizer"], "imgsp_v1", CUT, model.cfg.video_token)(
            {"media": [Media("video", video), Media("image", image), None], "conversations": [[dict(t) for t in c] for c in CONVS]})
        full_length, model.cfg.model_max_length = model.cfg.model_max_length, CUT
        res["cut"] = {**{k: cut[k] for k in ("input_ids", "labels", "attention_mask", "prompts")},
                      "loss": model(dict(cut))["loss"]}
        model.cfg.model_max_length = full_length
        movie = Media("features", feats, {"inputs": MOVIE_INPUTS})
        movie_batch = model.prepare_batch({"media": [movie], "conversations": [[dict(t) for t in MOVIE_CONV]]})
        res["movie"] = {k: movie_batch[k] for k in ("input_ids", "labels", "attention_mask", "prompts")}

        # chat: a video file with llava_v1 (the CLI's), an image with vicuna_v1 (the eval scripts')
        clip = tmp / "llama_vid_parity.mp4"  # 2:1 (decord needs a width multiple of 32 here): resize + centre crop
        write_clip(clip, ClipSpec("p", "circle", "red", "left", "slow"), width=size * 2, height=size, fps=4,
                   duration=3)
        png = tmp / "llama_vid_parity.png"  # noise, 3:2 (padding to a square, bicubic resize)
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size * 3 // 2, 3), dtype=np.uint8)).save(png)
        res["media_files"] = {"video": str(clip), "image": str(png), "fps": model.cfg.video_fps,
                              "video_pixels": model.load_media(str(clip), "video").data.permute(1, 0, 2, 3),
                              "image_pixels": model.load_media(str(png), "image", pad=True).data}
        chats = []
        for template, kind in (("llamavid_llava_v1", "video"), ("llamavid_vicuna_v1", "image")):
            chat = Chat(model)
            conv = get_template(template).new_conversation()
            media = []
            if kind == "video":
                chat.upload_video_without_audio(str(clip), conv, media)
            else:
                chat.upload_img(image, conv, media)
            chat.ask(QUESTIONS[0], conv)
            embs = chat.prepare(conv, media, max_new_tokens=8)
            first = model.llm(inputs_embeds=embs).logits[0, -1]
            gen = model.generate(inputs_embeds=embs, attention_mask=torch.ones(embs.shape[:2], dtype=torch.long),
                                 max_new_tokens=8, min_new_tokens=8, do_sample=False)
            pixels = media[0].media.data
            chats.append({"template": template, "prompt": conv.get_prompt(), "question": QUESTIONS[0],
                          "pixels": pixels.permute(1, 0, 2, 3) if kind == "video" else pixels[None],
                          "first_logits": first, "generated": gen[0, -8:]})
        res["chats"] = chats

        # the released inference precision: everything in fp16 (the original's builder + for_eval casts)
        half = LLaMAVID.from_config({**cfg, "llm_dtype": "fp16", "vit_precision": "fp16"}).eval()
        half.load_state_dict(model.state_dict())
        chat = Chat(half)
        conv = get_template("llamavid_llava_v1").new_conversation()
        media = []
        chat.upload_video_without_audio(str(clip), conv, media)
        chat.ask(QUESTIONS[0], conv)
        embs = chat.prepare(conv, media, max_new_tokens=8)
        res["fp16"] = {"prompt": conv.get_prompt(), "question": QUESTIONS[0], "pixels": media[0].media.data.permute(1, 0, 2, 3),
                       "first_logits": half.llm(inputs_embeds=embs).logits[0, -1],
                       "generated": half.generate(inputs_embeds=embs, attention_mask=torch.ones(embs.shape[:2], dtype=torch.long),
                                                  max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, -8:]}

    res["state"] = {to_released_key(k): v for k, v in model.state_dict().items()}
    res["inputs"] = {"video": video.permute(1, 0, 2, 3), "image": image, "feats": feats}
    res["config"] = describe(model)

    # long video through training (stage 3): the original takes features for pixels when their last
    # dimension exceeds 1000, so this pair of models has a 1024-wide EVA (the rest as the preset)
    wide = build(vit={**cfg["vit"], "embed_dim": LONG_WIDTH}, stage=3)
    movies = [Media("features", torch.randn(len(inputs.split("<image>")) - 1, wide.patches, LONG_WIDTH, generator=g),
                    {"inputs": inputs}) for inputs in (MOVIE_INPUTS, MOVIE_INPUTS_2)]
    with torch.no_grad():
        long_batch = wide.prepare_batch({"media": movies, "conversations": [[dict(t) for t in MOVIE_CONV]] * 2})
        long_logits, long_mask = logits_of(wide, long_batch)
        res["long"] = {"state": {to_released_key(k): v for k, v in wide.state_dict().items()}, "config": describe(wide),
                       "feats": [m.data for m in movies], "loss": wide(dict(long_batch))["loss"], "logits": long_logits,
                       "mask": long_mask, **{k: long_batch[k] for k in ("input_ids", "labels", "attention_mask", "prompts")}}
    torch.save(res, out)


# ------------------------------------------------------------------ step 2: the original
def _functions(path: Path, names) -> str:
    """Source of the named top-level functions/classes of a file (decorators included)."""
    src = path.read_text()
    parts = []
    for node in ast.parse(src).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in names:
            start = min([d.lineno for d in node.decorator_list] + [node.lineno])
            parts.append("\n".join(src.splitlines()[start - 1: node.end_lineno]))
    return "\n\n".join(parts)


def build_original(c, state):
    import torch
    from functools import partial
    from torch import nn
    from transformers import BertTokenizer

    from llamavid.model.language_model.llava_llama_vid import LlavaConfig, LlavaLlamaAttForCausalLM
    from llamavid.model.multimodal_encoder.eva_vit import EVAVisionTowerLavis, VisionTransformer
    from llamavid.model.multimodal_projector.builder import build_vision_projector
    from llamavid.model.qformer import BertConfig, BertLMHeadModel

    v = c["vit"]
    config = LlavaConfig(**c["llm"], pad_token_id=c["pad_token_id"], mm_hidden_size=v["embed_dim"],
                         mm_projector_type=c["mm_projector_type"], mm_vision_select_feature="patch",
                         mm_vision_select_layer=-2, bert_type="qformer_pretrain", num_query=c["num_query"],
                         compress_type=c["compress_type"], tune_mm_mlp_adapter=False, mm_use_im_start_end=False,
                         image_aspect_ratio="pad")
    model = LlavaLlamaAttForCausalLM(config)  # no mm_vision_tower: the vision modules are added below
    m = model.model
    tower = EVAVisionTowerLavis.__new__(EVAVisionTowerLavis)  # its load_model hard-codes ViT-g
    nn.Module.__init__(tower)
    tower.is_loaded, tower.patch_size, tower.out_channel = True, v["patch_size"], v["embed_dim"]
    tower.vision_tower = VisionTransformer(img_size=v["img_size"], patch_size=v["patch_size"], use_mean_pooling=False,
                                           embed_dim=v["embed_dim"], depth=v["depth"], num_heads=v["num_heads"],
                                           mlp_ratio=v["mlp_ratio"], qkv_bias=True, drop_path_rate=0.0,
                                           norm_layer=partial(nn.LayerNorm, eps=1e-6))
    tower.vision_tower.requires_grad_(False)
    m.vision_tower = tower
    m.mm_projector = build_vision_projector(config)
    # initialize_attention_modules + init_bert, without the hub
    q = c["qformer"]
    tok = BertTokenizer.from_pretrained(c["bert_dir"], truncation_side="left")
    tok.add_special_tokens({"bos_token": "[DEC]"})
    enc_cfg = BertConfig(vocab_size=q["vocab_size"], hidden_size=q["hidden_size"], num_hidden_layers=q["num_hidden_layers"],
                         num_attention_heads=q["num_attention_heads"], intermediate_size=q["intermediate_size"],
                         max_position_embeddings=q["max_position_embeddings"])
    att_feat_size = v["embed_dim"]  # the original: 1408 for qformer_pretrain (= mm_hidden_size at full size)
    enc_cfg.encoder_width = att_feat_size
    enc_cfg.add_cross_attention = True
    enc_cfg.cross_attention_freq = q["cross_attention_freq"]
    encoder = BertLMHeadModel(enc_cfg)
    encoder.resize_token_embeddings(q["vocab_size"])  # the original: len(tokenizer) (30523 at full size)
    encoder.cls = None
    m.vlm_att_tokenlizer, m.vlm_att_encoder = tok, encoder
    m.vlm_att_query = nn.Parameter(torch.zeros(1, c["num_query"], q["hidden_size"]))
    m.vlm_att_projector = nn.Linear(q["hidden_size"], config.mm_hidden_size)
    m.vlm_att_key_projector = nn.Linear(config.mm_hidden_size, config.mm_hidden_size)
    m.vlm_att_val_projector = nn.Linear(config.mm_hidden_size, config.hidden_size)
    m.vlm_att_bert_proj = None
    m.vlm_att_ln = nn.LayerNorm(att_feat_size)
    result = model.load_state_dict(state, strict=False)
    return model.eval(), result


def original(data: Path) -> None:
    import copy
    import random
    import types
    from dataclasses import dataclass
    from typing import Dict, Sequence

    import torch
    import transformers

    import llamavid
    from llamavid import conversation as conversation_lib
    from llamavid.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX
    from llava.mm_utils import tokenizer_image_token

    d = torch.load(data, weights_only=False)
    c = d["config"]
    model, loaded = build_original(c, d["state"])
    report, fails = {"transformers": transformers.__version__, "missing": loaded.missing_keys,
                     "unexpected": loaded.unexpected_keys}, []

    def item(name: str, ok: bool, detail: str) -> None:
        print(f"{name:<34} {detail:<46} PARITY {'OK' if ok else 'FAIL'}")
        report[name] = detail
        if not ok:
            fails.append(name)

    def close(name: str, a, b) -> None:
        if a.shape != b.shape:
            item(name, False, f"shapes {tuple(a.shape)} vs {tuple(b.shape)}")
            return
        diff = (a.float() - b.float()).abs().max().item()
        item(name, diff < TOL, f"max abs diff {diff:.2e} {tuple(a.shape)}")

    # transformers 4.31 keeps RoPE's inv_freq as a persistent buffer (computed, not trained; the
    # released files hold it and we tolerate it on load); every other key must match
    missing = [k for k in loaded.missing_keys if not k.endswith("rotary_emb.inv_freq")]
    item("state dict (strict)", not missing and not loaded.unexpected_keys,
         f"{len(d['state'])} keys, missing {len(missing)} (+{len(loaded.missing_keys) - len(missing)} inv_freq), "
         f"unexpected {len(loaded.unexpected_keys)}")

    # as train.py's AutoTokenizer.from_pretrained(use_fast=False) on a folder holding tokenizer.model
    # (from_pretrained, not the constructor: only it registers <s>, </s>, <unk> as unsplittable in 4.31)
    folder = data.parent / "llama_vid_parity_tokenizer"
    folder.mkdir(exist_ok=True)
    (folder / "tokenizer.model").write_bytes(Path(c["tokenizer_model"]).read_bytes())
    tokenizers = {}
    for legacy in (None, False):
        kw = {} if legacy is None else {"legacy": legacy}
        tok = transformers.LlamaTokenizer.from_pretrained(str(folder), model_max_length=c["model_max_length"],
                                                          padding_side="right", **kw)
        tok.pad_token = tok.unk_token  # train.py, v1 templates
        tokenizers["default" if legacy is None else "legacy=False"] = tok
    tok = tokenizers["default"]
    tok_cut = transformers.LlamaTokenizer.from_pretrained(str(folder), model_max_length=CUT, padding_side="right")
    tok_cut.pad_token = tok_cut.unk_token

    # ---- the batch: train.py's functions, extracted from its source and run as they are
    ns = {"torch": torch, "random": random, "copy": copy, "transformers": transformers, "dataclass": dataclass,
          "Dict": Dict, "Sequence": Sequence, "conversation_lib": conversation_lib, "IGNORE_INDEX": IGNORE_INDEX,
          "IMAGE_TOKEN_INDEX": IMAGE_TOKEN_INDEX, "DEFAULT_IMAGE_TOKEN": DEFAULT_IMAGE_TOKEN,
          "DEFAULT_IM_START_TOKEN": "<im_start>", "DEFAULT_IM_END_TOKEN": "<im_end>",
          "tokenizer_image_token": tokenizer_image_token}
    train_py = Path(llamavid.__file__).parent / "train" / "train.py"
    exec(_functions(train_py, {"preprocess_multimodal", "preprocess_multimodal_movie", "preprocess_imgsp_v1",
                               "preprocess_plain_guided", "DataCollatorForSupervisedDataset"}), ns)
    data_args = types.SimpleNamespace(is_multimodal=True, mm_use_im_start_end=False)
    inputs = d["inputs"]

    def original_batch(tokenizer, convs, media, template):
        conversation_lib.default_conversation = conversation_lib.conv_templates[template]
        instances = []
        for conv, medium in zip(convs, media):
            sources = copy.deepcopy([conv])
            if medium is not None:
                sources = ns["preprocess_multimodal"](sources, data_args)
            if template == "plain_guided":
                out = ns["preprocess_plain_guided"](sources, tokenizer)
            else:
                out = ns["preprocess_imgsp_v1"](sources, tokenizer, has_image=medium is not None)
            image = medium if medium is not None else torch.zeros_like(inputs["image"])  # multimodal: a zero image
            instances.append({"input_ids": out["input_ids"][0], "labels": out["labels"][0], "image": image,
                              "prompt": out["prompt"]})
        return ns["DataCollatorForSupervisedDataset"](tokenizer=tokenizer)(instances)

    def compare_batch(name, theirs, mine):
        for k in ("input_ids", "labels", "attention_mask"):
            a, b = theirs[k], mine[k].to(theirs[k].dtype)
            same = a.shape == b.shape and bool(torch.equal(a, b))
            item(f"{name} {k}", same, f"exact, shape {tuple(a.shape)}" if same else f"{tuple(a.shape)} vs {tuple(b.shape)}")
        item(f"{name} Q-Former prompts", theirs["prompts"] == mine["prompts"], json.dumps(theirs["prompts"])[:46])

    media = [inputs["video"], inputs["image"], None]
    random.seed(SEED)
    theirs = original_batch(tok, CONVS, media, "imgsp_v1")
    compare_batch("imgsp_v1 batch", theirs, d["batch"])
    # information only: a tokenizer_config.json saying "legacy": false would change 4.31's ids
    # (no prefix space after special tokens); our tokenizer and the folder-less default are legacy
    print("(info) the same batch with LlamaTokenizer(legacy=False), not compared:")
    random.seed(SEED)
    legacy_off = original_batch(tokenizers["legacy=False"], CONVS, media, "imgsp_v1")
    report["(info) legacy=False gives the same ids"] = (
        legacy_off["input_ids"].shape == theirs["input_ids"].shape and bool(torch.equal(legacy_off["input_ids"], theirs["input_ids"])))
    print(f"(info) legacy=False gives the same ids: {report['(info) legacy=False gives the same ids']}")
    plain = original_batch(tok, [CAPTION], [inputs["image"]], "plain_guided")
    compare_batch("plain_guided batch", plain, d["plain"])
    # stage 3: a feature file (LazySupervisedDataset's .pkl branch, video_token 2)
    conversation_lib.default_conversation = conversation_lib.conv_templates["imgsp_v1"]
    movie_prompt = MOVIE_INPUTS.replace("...", "").replace(DEFAULT_IMAGE_TOKEN, DEFAULT_IMAGE_TOKEN * 2)
    sources, query = ns["preprocess_multimodal_movie"](copy.deepcopy([MOVIE_CONV]), data_args, movie_prompt)
    out = ns["preprocess_imgsp_v1"](sources, tok, has_image=True)
    movie = ns["DataCollatorForSupervisedDataset"](tokenizer=tok)(
        [{"input_ids": out["input_ids"][0], "labels": out["labels"][0], "image": inputs["feats"], "prompt": [query]}])
    compare_batch("movie (stage 3) batch", movie, d["movie"])

    # ---- media: LazySupervisedDataset's video branch (decord, step round(avg_fps / video_fps)) and
    # image branch (expand2square with the mean colour) through a CLIPImageProcessor as the
    # original's llamavid/processor/clip-patch14-224 folder configures it, at the tiny size
    from decord import VideoReader, cpu
    from PIL import Image

    files = d["media_files"]
    size = c["vit"]["img_size"]
    processor = transformers.CLIPImageProcessor(size=size, crop_size=size, do_center_crop=True, do_normalize=True,
                                                do_resize=True, resample=3, image_mean=[0.48145466, 0.4578275, 0.40821073],
                                                image_std=[0.26862954, 0.26130258, 0.27577711])
    vr = VideoReader(files["video"], ctx=cpu(0))
    step = round(vr.get_avg_fps() / files["fps"])
    frames = vr.get_batch([i for i in range(0, len(vr), step)]).asnumpy()
    close("video frames (decord + CLIP)", processor.preprocess(frames, return_tensors="pt")["pixel_values"],
          files["video_pixels"])
    image = Image.open(files["image"]).convert("RGB")
    width, height = image.size
    square = Image.new(image.mode, (max(width, height),) * 2, tuple(int(x * 255) for x in processor.image_mean))
    square.paste(image, (0, (width - height) // 2) if width > height else ((height - width) // 2, 0))
    close("image (pad + CLIP)", processor.preprocess(square, return_tensors="pt")["pixel_values"][0],
          files["image_pixels"])

    with torch.no_grad():
        # ---- Q-Former instruction ids, EVA, per-frame tokens
        for qi, (q, ids) in enumerate(d["bert_ids"].items()):
            got = model.model.vlm_att_tokenlizer([q], padding="longest", truncation=True, max_length=256,
                                                 return_tensors="pt").input_ids[0]
            item(f"bert ids q{qi}", got.tolist() == ids.tolist(), f"exact, {len(got)} ids")
        close("eva features (video)", model.get_model().get_vision_tower()(inputs["video"]), d["eva"])
        for key, mine in d["tokens"].items():
            kind, compress, qi = key.split("/")
            model.config.compress_type = None if compress == "None" else compress
            prompts = [[QUESTIONS[int(qi[1:])]]]
            if kind == "video":
                got = model.encode_images(inputs["video"], prompts, image_counts=[inputs["video"].shape[0]])[0][0]
            elif kind == "image":
                got = model.encode_images(inputs["image"][None], prompts)[0][0]
            else:
                got = model.encode_images(inputs["feats"], prompts, image_counts=[inputs["feats"].shape[0]],
                                          long_video=True)[0][0]
            close(f"tokens {key}", got, mine)
        model.config.compress_type = c["compress_type"]

        # ---- loss and logits of the training batch
        out = model(input_ids=theirs["input_ids"], attention_mask=theirs["attention_mask"], labels=theirs["labels"],
                    images=theirs["images"], prompts=theirs["prompts"], return_dict=True)
        _, mask, _, _, _ = model.prepare_inputs_labels_for_multimodal(
            theirs["input_ids"], theirs["attention_mask"], None, theirs["labels"], theirs["images"], theirs["prompts"])
        same_mask = mask.shape == d["mask"].shape and bool(torch.equal(mask.long(), d["mask"].long()))
        item("train attention mask", same_mask, f"exact, shape {tuple(mask.shape)}" if same_mask else "differs")
        diff = abs(out.loss.item() - d["loss"].item())
        item("train loss", diff < TOL, f"{out.loss.item():.6f} vs {d['loss'].item():.6f} ({diff:.1e})")
        if same_mask:
            keep = mask.bool()
            close("train logits (attended)", out.logits[keep], d["logits"][keep])

        random.seed(SEED)
        cut = original_batch(tok_cut, CONVS, media, "imgsp_v1")
        compare_batch(f"cut batch (max_length {CUT})", cut, d["cut"])
        out = model(input_ids=cut["input_ids"], attention_mask=cut["attention_mask"], labels=cut["labels"],
                    images=cut["images"], prompts=cut["prompts"], return_dict=True)
        diff = abs(out.loss.item() - d["cut"]["loss"].item())
        item("cut batch loss", diff < TOL, f"{out.loss.item():.6f} vs {d['cut']['loss'].item():.6f} ({diff:.1e})")

        # ---- a long-video (feature file) training batch through the original's forward
        lv = d["long"]
        wide, wide_loaded = build_original(lv["config"], lv["state"])
        missing = [k for k in wide_loaded.missing_keys if not k.endswith("rotary_emb.inv_freq")]
        item("long: state dict (strict)", not missing and not wide_loaded.unexpected_keys,
             f"missing {len(missing)}, unexpected {len(wide_loaded.unexpected_keys)}")
        instances = []
        for inputs, feats in zip((MOVIE_INPUTS, MOVIE_INPUTS_2), lv["feats"]):
            movie_prompt = inputs.replace("...", "").replace(DEFAULT_IMAGE_TOKEN, DEFAULT_IMAGE_TOKEN * 2)
            sources, query = ns["preprocess_multimodal_movie"](copy.deepcopy([MOVIE_CONV]), data_args, movie_prompt)
            out = ns["preprocess_imgsp_v1"](sources, tok, has_image=True)
            instances.append({"input_ids": out["input_ids"][0], "labels": out["labels"][0], "image": feats,
                              "prompt": [query]})
        long_batch = ns["DataCollatorForSupervisedDataset"](tokenizer=tok)(instances)
        compare_batch("long batch", long_batch, lv)
        out = wide(input_ids=long_batch["input_ids"], attention_mask=long_batch["attention_mask"],
                   labels=long_batch["labels"], images=long_batch["images"], prompts=long_batch["prompts"], return_dict=True)
        diff = abs(out.loss.item() - lv["loss"].item())
        item("long loss", diff < TOL, f"{out.loss.item():.6f} vs {lv['loss'].item():.6f} ({diff:.1e})")
        keep = lv["mask"].bool()
        if keep.shape == long_batch["attention_mask"].shape and torch.equal(keep, long_batch["attention_mask"].bool()):
            close("long logits (attended)", out.logits[keep], lv["logits"][keep])
        else:
            item("long logits (attended)", False, "attention masks differ")

        # ---- chat prompts and greedy tokens
        for chat in d["chats"]:
            name = chat["template"].replace("llamavid_", "")
            conv = conversation_lib.conv_templates[name].copy()
            conv.append_message(conv.roles[0], DEFAULT_IMAGE_TOKEN + "\n" + chat["question"])  # as serve/cli.py
            conv.append_message(conv.roles[1], None)
            prompt = conv.get_prompt()
            item(f"chat {name} prompt text", prompt == chat["prompt"], f"exact, {len(prompt)} chars")
            ids = tokenizer_image_token(chat["prompt"], tok, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
            model.update_prompt([[chat["question"]]])
            images = [chat["pixels"]]
            first = model(input_ids=ids, attention_mask=torch.ones_like(ids), images=images, return_dict=True).logits[0, -1]
            close(f"chat {name} first-step logits", first, chat["first_logits"])
            gen = model.generate(ids, images=images, do_sample=False, max_new_tokens=8, min_new_tokens=8,
                                 use_cache=True)[0, ids.shape[1]:]
            item(f"chat {name} 8 greedy tokens", gen.tolist() == chat["generated"].tolist(),
                 f"{gen.tolist()} vs {chat['generated'].tolist()}"[:46])
            report[f"chat {name} greedy"] = {"original": gen.tolist(), "videollm": chat["generated"].tolist()}
        # ---- fp16 (CPU kernels: agreement to fp16 rounding, not bit-exact)
        f16 = d["fp16"]
        model.half()
        ids = tokenizer_image_token(f16["prompt"], tok, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
        model.update_prompt([[f16["question"]]])
        images = [f16["pixels"].half()]  # serve/cli.py: image_tensor.half()
        first = model(input_ids=ids, attention_mask=torch.ones_like(ids), images=images, return_dict=True).logits[0, -1]
        diff = (first.float() - f16["first_logits"].float()).abs().max().item()
        scale = first.float().abs().max().item()
        item("fp16 chat first-step logits", diff < 2e-2 * scale, f"max abs diff {diff:.2e} (max |logit| {scale:.2f})")
        gen = model.generate(ids, images=images, do_sample=False, max_new_tokens=8, min_new_tokens=8, use_cache=True)
        gen = gen[0, ids.shape[1]:]
        item("fp16 chat 8 greedy tokens", gen.tolist() == f16["generated"].tolist(),
             f"{gen.tolist()} vs {f16['generated'].tolist()}"[:46])
    report["failed"] = fails
    print(json.dumps(report, indent=1, default=str))
    sys.exit(1 if fails else 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orig", default="/tmp/orig_llamavid", help="the original's sources (--setup writes them)")
    parser.add_argument("--shim", default="/tmp/orig_llamavid_shim", help="the timm shim (--setup writes it)")
    parser.add_argument("--site", default="/tmp/tf431", help="transformers 4.31 (pip --target)")
    parser.add_argument("--data", default="/tmp/llama_vid_parity.pt")
    parser.add_argument("--setup", action="store_true", help="copy the original's sources and write the shim")
    parser.add_argument("--mirror", default=LLAMAVID_MIRROR, help="git dir of dvlab-research/LLaMA-VID")
    parser.add_argument("--llava-mirror", default=LLAVA_MIRROR, help="git dir of haotian-liu/LLaVA")
    parser.add_argument("--child", action="store_true")
    args = parser.parse_args()
    if args.setup:
        setup(Path(args.orig), Path(args.shim), args.mirror, args.llava_mirror)
        return 0
    if args.child:
        original(Path(args.data))
        return 0
    for path, what in ((args.orig, "--setup"), (args.site, "the pip install in the docstring")):
        if not Path(path).is_dir():
            print(f"{path} is missing: run {what} first", file=sys.stderr)
            return 2
    ours(Path(args.data), Path(args.data).parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([args.site, args.shim, args.orig]))
    return subprocess.run([sys.executable, __file__, "--child", "--data", args.data], env=env, cwd=args.orig).returncode


if __name__ == "__main__":
    sys.exit(main())

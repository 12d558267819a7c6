"""Parity of videollm's PLLaVA with the original code (magic-research/PLLaVA ``models/pllava/``) at
tiny size: the same weights (our state dict loaded strictly into the original's
``PllavaForConditionalGeneration`` + PEFT 0.10), the same batch (our batch processor's ids, labels
and mask; frames as ``pixel_values``), the loss and the logits of every attended position compared.

    python -m pip install --no-deps --target /tmp/tf437 transformers==4.37.1 tokenizers==0.15.2 \
        peft==0.10.0 einops huggingface_hub==0.20.3
    git --git-dir=<PLLaVA mirror> show HEAD:models/pllava/...  -> /tmp/orig_pllava/models/pllava/
    python scripts/pllava_parity.py --orig /tmp/orig_pllava --site /tmp/tf437 [--what preprocess]

``--what tokenize``: the original's process_qa + training preprocess (from its git source) against our
batch processor (no second transformers needed). ``--what preprocess``: PllavaProcessor (resize_crop_longshort + CLIPImageProcessor) on two videos of
different sizes against :class:`videollm.processors.pllava_processors.PllavaVideoEvalProcessor`.

Step 1 (this interpreter, transformers 5) writes the weights, the batch and our outputs; step 2 runs
the original under transformers 4.37.1 in a child process (``--child``) and compares. The original
hard-wires flash-attention 2; the child builds its LLM with eager attention instead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def ours(out: Path) -> None:
    sys.path.insert(0, str(REPO))
    import torch
    from omegaconf import OmegaConf

    from videollm.models.base import Media
    from videollm.models.merge import merge_segments
    from videollm.models.pllava import PLLaVA

    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "videollm/configs/models/pllava_tiny.yaml").model)
    cfg.update(pooling_shape="4-2-2", lora={"r": 8, "alpha": 16, "dropout": 0.0})
    torch.manual_seed(0)
    model = PLLaVA.from_config(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        # the pad row (padding_idx) starts at zero; the original's merge takes all-zero embeddings
        # for image positions, so a zero pad embedding would be miscounted there (never so in trained weights)
        model.embed_tokens(torch.tensor([0]))  # noqa: B018 - just checks the path
        model.language_model.get_input_embeddings().weight[0].normal_(generator=g)
    convs = [
        [{"from": "human", "value": "<video>What is moving in the video?"}, {"from": "gpt", "value": "A red circle is moving right."}],
        [{"from": "human", "value": "<video>What color is it?"}, {"from": "gpt", "value": "It is blue."},
         {"from": "human", "value": "Which direction?"}, {"from": "gpt", "value": "It is moving up."}],
    ]
    videos = torch.randn(2, 3, 8, 32, 32, generator=g)
    batch = model.prepare_batch({"images": videos, "conversations": convs})
    with torch.no_grad():
        loss = model(dict(batch))["loss"]
        merged = model.training_inputs(batch)
        mask = merged.attention_mask
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        logits = model.language_model(inputs_embeds=merged.inputs_embeds, attention_mask=mask, position_ids=pos).logits
        # greedy generation through the chat path (the whole prompt tokenised, <image> expanded)
        prompt = "USER:<image>\nWhat is moving in the video?</s>ASSISTANT:"
        emb = model.encode_media([Media("video", videos[0])])[0]
        merged_p = merge_segments([model.prompt_segments(prompt, [emb])], model.embed_tokens, dtype=model.llm_dtype,
                                  device=model.device, padding_side="left")
        gen = model.generate(inputs_embeds=merged_p.inputs_embeds, attention_mask=merged_p.attention_mask,
                             max_new_tokens=8, do_sample=False, min_new_tokens=8)
        prompt_ids = model.tokenizer(prompt, return_tensors="pt")["input_ids"]
    text = model.language_model.get_base_model().config
    vis = model.vision_tower.config
    torch.save({"state": model.state_dict(), "input_ids": batch["input_ids"], "labels": batch["labels"],
                "attention_mask": batch["attention_mask"],
                "pixel_values": videos.permute(0, 2, 1, 3, 4).reshape(-1, 3, 32, 32),
                "loss": loss, "logits": logits, "mask": mask, "prompt_ids": prompt_ids, "generated": gen,
                "config": {"vision": {k: getattr(vis, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                                   "num_attention_heads", "patch_size", "image_size",
                                                                   "projection_dim")},
                           "text": {k: getattr(text, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                                  "num_attention_heads", "num_key_value_heads", "vocab_size",
                                                                  "max_position_embeddings", "rms_norm_eps")},
                           "image_token_index": model.image_token_index, "pad_token_id": model.tokenizer.pad_token_id,
                           "num_frames": model.num_frames, "pooling_shape": list(model.pooling_shape)}}, out)


def original(data: Path) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    real = AutoModelForCausalLM.from_config.__func__

    def from_config(cls, config, **kwargs):  # the original asks for flash-attention 2
        kwargs["attn_implementation"] = "eager"
        return real(cls, config, **kwargs)

    AutoModelForCausalLM.from_config = classmethod(from_config)
    from peft import LoraConfig, TaskType, get_peft_model

    from models.pllava import PllavaConfig, PllavaForConditionalGeneration

    d = torch.load(data, weights_only=False)
    c = d["config"]
    config = PllavaConfig(vision_config={"model_type": "clip_vision_model", **c["vision"]},
                          text_config={"model_type": "llama", **c["text"], "pad_token_id": c["pad_token_id"]},
                          image_token_index=c["image_token_index"], pooling_shape=tuple(c["pooling_shape"]),
                          num_frames=c["num_frames"], vocab_size=c["text"]["vocab_size"], pad_token_id=c["pad_token_id"],
                          frame_shape=(4, 4), register=False)  # read by the original's _init_weights, absent from its config class
    model = PllavaForConditionalGeneration(config)
    model.language_model = get_peft_model(model.language_model, LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    result = model.load_state_dict(d["state"], strict=False)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=d["input_ids"], pixel_values=d["pixel_values"], attention_mask=d["attention_mask"],
                    labels=d["labels"], media_type="video", return_dict=True)
        ids = d["prompt_ids"]
        gen = model.generate(input_ids=ids, pixel_values=d["pixel_values"][: c["num_frames"]],
                             attention_mask=torch.ones_like(ids), media_type="video", max_new_tokens=8,
                             min_new_tokens=8, do_sample=False)[:, ids.shape[1]:]
    keep = d["mask"].bool()
    diff = (out.logits[keep] - d["logits"][keep]).abs().max().item()
    print(json.dumps({"transformers": transformers.__version__, "missing": result.missing_keys,
                      "unexpected": result.unexpected_keys, "loss_original": out.loss.item(),
                      "loss_videollm": d["loss"].item(), "max_abs_logit_diff": diff,
                      "attended_positions": int(keep.sum()), "greedy_original": gen[0].tolist(),
                      "greedy_videollm": d["generated"][0].tolist(),
                      "greedy_equal": gen[0].tolist() == d["generated"][0].tolist()}, indent=1))


def ours_preprocess(out: Path) -> None:
    sys.path.insert(0, str(REPO))
    import numpy as np
    import torch

    from videollm.processors.pllava_processors import PllavaVideoEvalProcessor

    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 256, (4, 480, 854, 3), dtype=np.uint8), rng.integers(0, 256, (4, 360, 480, 3), dtype=np.uint8)]
    clips = [torch.from_numpy(v).permute(3, 0, 1, 2).float() for v in videos]
    got = PllavaVideoEvalProcessor(image_size=336, n_frms=4).transform_batch(clips)
    torch.save({"videos": videos, "ours": [g.permute(1, 0, 2, 3) for g in got]}, out)


def original_preprocess(data: Path) -> None:
    import torch
    from PIL import Image
    from transformers import CLIPImageProcessor

    from models.pllava import PllavaProcessor

    d = torch.load(data, weights_only=False)
    proc = object.__new__(PllavaProcessor)  # no tokenizer needed for images
    proc.image_processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    proc.shortest_edge, proc.longest_edge, proc.center_pad = 336, 762, False
    videos = [[Image.fromarray(f) for f in v] for v in d["videos"]]
    pixel = torch.from_numpy(proc(images=videos, return_tensors=None)["pixel_values"])
    ours = torch.cat(d["ours"])
    print(json.dumps({"shape_original": list(pixel.shape), "shape_videollm": list(ours.shape),
                      "max_abs_diff": float((pixel - ours).abs().max())}, indent=1))


def tokenize_parity(mirror: str) -> None:
    """The original's ``process_qa`` (it_dataset.py) and ``preprocess`` (train_pllava_nframe_accel.py),
    extracted from its source and run with our tokenizer, against our batch processor."""
    import ast
    import itertools
    import random
    import subprocess as sp
    import types
    from typing import Optional, Union

    sys.path.insert(0, str(REPO))
    import torch

    from videollm.datasets.pllava_datasets import qa_turns
    from videollm.models.pllava import PllavaBatchProcessor

    def functions(path: str, names):
        src = sp.run(["git", "--git-dir", mirror, "show", f"HEAD:{path}"], capture_output=True, text=True, check=True).stdout
        tree = ast.parse(src)
        found = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name in names and node.name not in found:
                found[node.name] = ast.get_source_segment(src, node)
        return found

    ns = {"itertools": itertools, "torch": torch, "random": random, "IMAGE_TOKEN": "<image>", "Optional": Optional,
          "Union": Union, "TensorType": types.SimpleNamespace(PYTORCH="pt")}
    train = functions("tasks/train/train_pllava_nframe_accel.py", {"split_and_record_separators", "preprocess"})
    exec(train["split_and_record_separators"], ns)
    exec(train["preprocess"].replace("return_tensors: Optional[Union[str, TensorType]] = TensorType.PYTORCH",
                                     "return_tensors=None"), ns)
    process_qa_src = functions("dataset/it_dataset.py", {"process_qa"})["process_qa"]
    exec("\n".join(line[4:] if line.startswith("    ") else line for line in process_qa_src.splitlines()), ns)
    ours = PllavaBatchProcessor("llama_exact", "tiny", max_txt_l=64, pad_to_max_length=True)
    tok = ours.tokenizer
    # the scripts' preprocess settings: mm_alone False, roles USER:/ASSISTANT:, end_signal (' ', '</s>')
    ds = types.SimpleNamespace(random_shuffle=False, end_signal=[" ", "</s>"], begin_signal=["", ""], system="",
                               mm_alone=False, role=("USER:", "ASSISTANT:"), start_token="<Video>", end_token="</Video>")
    args = types.SimpleNamespace(max_txt_l=64, dataset_video_placeholder="<Video></Video>",
                                 dataset_image_placeholder="<Image></Image>", roles=["USER:", "ASSISTANT:"],
                                 ignore_index=-100, num_frames=8, clip_transform=False)

    def collate(rows):
        return {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}

    samples = [[{"i": "", "q": "What is moving in the video?", "a": "A red circle is moving right."}],
               [{"i": "Watch the clip.", "q": "What color is it?", "a": "Blue."}, {"q": "Which way?", "a": "Up."}]]
    batch = [(torch.zeros(8, 3, 4, 4), ns["process_qa"](ds, [dict(q) for q in qa])[0], "", i)
             for i, qa in enumerate(samples)]
    theirs = ns["preprocess"](batch, args, types.SimpleNamespace(tokenizer=tok), collate)
    mine = ours({"images": torch.zeros(2, 3, 8, 4, 4), "conversations": [qa_turns(qa, "video") for qa in samples],
                 "instructions": [qa[0].get("i", "") for qa in samples]})
    same = {k: bool(torch.equal(theirs[k], mine[k].to(theirs[k].dtype))) for k in ("input_ids", "labels", "attention_mask")}
    print(json.dumps({"texts_original": [b[1] for b in batch], "equal": same}, indent=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orig", default="/tmp/orig_pllava")
    parser.add_argument("--site", default="/tmp/tf437")
    parser.add_argument("--data", default="/tmp/pllava_parity.pt")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--what", choices=("model", "preprocess", "tokenize"), default="model")
    parser.add_argument("--mirror", default="/work/.mirror/magic-research+PLLaVA/repo", help="git dir of the original")
    args = parser.parse_args()
    if args.what == "tokenize":  # runs here: the original's functions need only a tokenizer
        tokenize_parity(args.mirror)
        return 0
    if args.child:
        (original if args.what == "model" else original_preprocess)(Path(args.data))
        return 0
    (ours if args.what == "model" else ours_preprocess)(Path(args.data))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([args.site, args.orig]))
    return subprocess.run([sys.executable, __file__, "--child", "--what", args.what, "--data", args.data, "--orig",
                           args.orig, "--site", args.site], env=env, cwd=args.orig).returncode


if __name__ == "__main__":
    sys.exit(main())

"""Tiny LLaMA-VID models for tests: a WordPiece vocabulary and the tiny preset."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("what is the color shape of moving object in video image which first second third then after "
         "before appears at point red green blue yellow circle square triangle left right up down describe "
         "a an it this that ? . , ! how many frames time minute movie").split()


def write_bert_vocab(folder: Path) -> Path:
    """A tiny bert-base-uncased-style WordPiece vocabulary (specials at bert's ids 0, 100-103 order kept)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(dict.fromkeys(WORDS)) + ["##s", "##ing", "##ed"]
    tokens += [ch for ch in "abcdefghijklmnopqrstuvwxyz0123456789"] + ["##" + ch for ch in "abcdefghijklmnopqrstuvwxyz"]
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(tokens)) + "\n")
    return folder


def tiny_cfg(bert_dir: Path, **overrides: Any) -> Dict[str, Any]:
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "videollm/configs/models/llama_vid_tiny.yaml"))["model"]
    cfg["bert_tokenizer"] = str(bert_dir)
    cfg.update(overrides)
    return cfg


def build_tiny(bert_dir: Path, seed: int = 0, **overrides: Any):
    from videollm.models.llama_vid import LLaMAVID

    torch.manual_seed(seed)
    model = LLaMAVID.from_config(tiny_cfg(bert_dir, **overrides))
    model.eval()
    return model

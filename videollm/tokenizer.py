"""LLaMA tokenizer with the exact behaviour Video-LLaMA was trained with.

The original uses transformers-4.28's slow, SentencePiece-based ``LlamaTokenizer``. Its rules
decide every input id and label of training and chat, so we reproduce them here on top of
``sentencepiece`` directly instead of depending on whichever tokenizer a newer transformers
release builds:

* Text is split at special tokens (``<s>``, ``</s>``, ``<unk>``) and at added tokens
  (``<ImageHere>``, ``<AudioHere>``, ``[PAD]``), and every remaining chunk is
  SentencePiece-encoded on its own, so each chunk starts with the dummy-prefix piece "▁".
* Added tokens that were added as plain strings strip whitespace on BOTH sides of themselves
  from the neighbouring chunks; ``<s>``, ``</s>``, ``<unk>`` keep it.
* ``add_special_tokens=True`` prepends BOS (no EOS); padding is on the right.

The same class loads a real LLaMA/Vicuna/LLaMA-2 folder (``tokenizer.model`` plus the optional
``added_tokens.json`` / ``special_tokens_map.json``) and the project's tiny tokenizer in
``videollm/assets/tiny_tokenizer``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

import sentencepiece as spm
import torch

from videollm.errors import ConfigError

TINY_TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tiny_tokenizer"
IMAGE_PATCH_TOKEN = "<ImageHere>"
AUDIO_PATCH_TOKEN = "<AudioHere>"


class LlamaTokenizer:
    """SentencePiece LLaMA tokenizer (transformers-4.28 slow semantics).

    Ids: the SentencePiece vocabulary first (``<unk>``=0, ``<s>``=1, ``</s>``=2 for LLaMA),
    then added tokens in the order they were added (``len(sp)``, ``len(sp)+1``, ...).
    """

    def __init__(
        self,
        vocab_file: Union[str, os.PathLike],
        added_tokens: Optional[Dict[str, int]] = None,
        pad_token: Optional[str] = None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
    ) -> None:
        vocab_file = Path(vocab_file)
        if not vocab_file.is_file():
            raise ConfigError(f"{vocab_file}: tokenizer model file not found")
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor(model_file=str(vocab_file))
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.unk_token, self.bos_token, self.eos_token = "<unk>", "<s>", "</s>"
        self.unk_token_id = self.sp.unk_id()
        self.bos_token_id = self.sp.bos_id()
        self.eos_token_id = self.sp.eos_id()
        # added tokens: content -> id (ids above the sp vocabulary)
        self.added_tokens_encoder: Dict[str, int] = {}
        for tok, idx in sorted((added_tokens or {}).items(), key=lambda kv: kv[1]):
            if idx != len(self):
                raise ConfigError(
                    f"added token {tok!r} has id {idx}, expected {len(self)} (ids must follow the "
                    "SentencePiece vocabulary without gaps)"
                )
            self.added_tokens_encoder[tok] = idx
        self.pad_token: Optional[str] = None
        self.pad_token_id: Optional[int] = None
        if pad_token is not None:
            self.set_pad_token(pad_token)
        self.padding_side = "right"

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike]) -> "LlamaTokenizer":
        """Load from a folder holding ``tokenizer.model`` (HF LLaMA layout) or a .model file."""
        path = Path(path)
        if path.is_file():
            return cls(path)
        model_file = path / "tokenizer.model"
        if not model_file.is_file():
            raise ConfigError(
                f"{path}: no tokenizer.model found; point llama_model/tokenizer_name at a LLaMA "
                "folder in the Hugging Face layout"
            )
        added: Dict[str, int] = {}
        if (path / "added_tokens.json").is_file():
            added = json.loads((path / "added_tokens.json").read_text())
        pad = None
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            f = path / name
            if f.is_file() and pad is None:
                value = json.loads(f.read_text()).get("pad_token")
                if isinstance(value, dict):
                    value = value.get("content")
                pad = value or None
        sp_size = spm.SentencePieceProcessor(model_file=str(model_file)).get_piece_size()
        added = {k: v for k, v in added.items() if v >= sp_size}
        tok = cls(model_file, added_tokens=added)
        if pad is not None and (pad in added or pad in ("<unk>", "<s>", "</s>")):
            tok.set_pad_token(pad)
        return tok

    @classmethod
    def tiny(cls) -> "LlamaTokenizer":
        """The project's built-in tiny tokenizer (no downloads)."""
        return cls.from_pretrained(TINY_TOKENIZER_DIR)

    def save_pretrained(self, path: Union[str, os.PathLike]) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.vocab_file, path / "tokenizer.model")
        if self.added_tokens_encoder:
            (path / "added_tokens.json").write_text(json.dumps(self.added_tokens_encoder, indent=2))
        special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        if self.pad_token is not None:
            special["pad_token"] = self.pad_token
        (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2))

    # ------------------------------------------------------------------ vocabulary
    def __len__(self) -> int:
        return self.sp.get_piece_size() + len(self.added_tokens_encoder)

    @property
    def special_tokens(self) -> List[str]:
        return [self.unk_token, self.bos_token, self.eos_token]

    def add_tokens(self, tokens: Union[str, Sequence[str]], special_tokens: bool = False) -> int:
        """Add tokens after the vocabulary (existing ones are kept); returns how many were new."""
        if isinstance(tokens, str):
            tokens = [tokens]
        added = 0
        for tok in tokens:
            if tok in self.added_tokens_encoder or self.sp.piece_to_id(tok) != self.unk_token_id:
                continue
            self.added_tokens_encoder[tok] = len(self)
            added += 1
        return added

    def set_pad_token(self, token: str) -> None:
        self.pad_token = token
        self.pad_token_id = self.convert_tokens_to_ids(token)

    def convert_tokens_to_ids(self, token: Union[str, Sequence[str]]):
        if not isinstance(token, str):
            return [self.convert_tokens_to_ids(t) for t in token]
        if token in self.added_tokens_encoder:
            return self.added_tokens_encoder[token]
        return self.sp.piece_to_id(token)

    def convert_ids_to_tokens(self, ids: Union[int, Sequence[int]]):
        if isinstance(ids, int):
            return self._id_to_piece(ids)
        return [self._id_to_piece(int(i)) for i in ids]

    def _id_to_piece(self, idx: int) -> str:
        if idx < self.sp.get_piece_size():
            return self.sp.id_to_piece(idx)
        for tok, i in self.added_tokens_encoder.items():
            if i == idx:
                return tok
        raise IndexError(f"token id {idx} is outside the vocabulary of size {len(self)}")

    # ------------------------------------------------------------------ encoding
    def _split(self, text: str) -> List[str]:
        """Split at special/added tokens, longest match first, applying the strip rules."""
        no_split = sorted(set(self.special_tokens) | set(self.added_tokens_encoder), key=len, reverse=True)
        pieces: List[str] = []
        i = start = 0
        while i < len(text):
            for tok in no_split:
                if text.startswith(tok, i):
                    pieces.append(text[start:i])
                    pieces.append(tok)
                    i += len(tok)
                    start = i
                    break
            else:
                i += 1
        pieces.append(text[start:])
        # Strip rules: added tokens (plain strings) strip both neighbours; <s>, </s>, <unk> keep.
        for j, piece in enumerate(pieces):
            if piece in self.added_tokens_encoder and piece not in self.special_tokens:
                if j + 1 < len(pieces):
                    pieces[j + 1] = pieces[j + 1].lstrip()
                if j > 0:
                    pieces[j - 1] = pieces[j - 1].rstrip()
        return pieces

    def tokenize(self, text: str) -> List[str]:
        specials = set(self.special_tokens) | set(self.added_tokens_encoder)
        out: List[str] = []
        for chunk in self._split(text):
            if not chunk:
                continue
            if chunk in specials:
                out.append(chunk)
            else:
                out.extend(self.sp.encode(chunk, out_type=str))
        return out

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        ids = [self.convert_tokens_to_ids(t) for t in self.tokenize(text)]
        if add_special_tokens:
            if self.add_bos_token:
                ids = [self.bos_token_id] + ids
            if self.add_eos_token:
                ids = ids + [self.eos_token_id]
        return ids

    def __call__(
        self,
        text: Union[str, Sequence[str]],
        padding: Union[bool, str] = False,
        truncation: bool = False,
        max_length: Optional[int] = None,
        add_special_tokens: bool = True,
        return_tensors: Optional[str] = None,
    ) -> Dict[str, Union[List, torch.Tensor]]:
        """Tokenize one text or a batch, like a transformers tokenizer call.

        ``padding="longest"`` (or True) right-pads with ``pad_token_id``; ``truncation`` keeps the
        first ``max_length`` ids. ``return_tensors="pt"`` returns LongTensors (batch, seq).
        """
        single = isinstance(text, str)
        batch = [text] if single else list(text)
        ids = [self.encode(t, add_special_tokens=add_special_tokens) for t in batch]
        if truncation and max_length is not None:
            ids = [x[:max_length] for x in ids]
        masks = [[1] * len(x) for x in ids]
        if padding in (True, "longest", "max_length"):
            target = max((len(x) for x in ids), default=0)
            if padding == "max_length" and max_length is not None:
                target = max_length
            if self.pad_token_id is None:
                raise ConfigError("tokenizer has no pad token; set one with set_pad_token()")
            for x, m in zip(ids, masks):
                n = target - len(x)
                if self.padding_side == "right":
                    x.extend([self.pad_token_id] * n)
                    m.extend([0] * n)
                else:
                    x[:0] = [self.pad_token_id] * n
                    m[:0] = [0] * n
        if return_tensors == "pt":
            return {
                "input_ids": torch.tensor(ids, dtype=torch.long),
                "attention_mask": torch.tensor(masks, dtype=torch.long),
            }
        if single:
            return {"input_ids": ids[0], "attention_mask": masks[0]}
        return {"input_ids": ids, "attention_mask": masks}

    # ------------------------------------------------------------------ decoding
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Decode ids; special and added tokens are written literally unless skipped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        specials = {self.unk_token_id, self.bos_token_id, self.eos_token_id}
        parts: List[str] = []
        run: List[int] = []
        for idx in ids:
            idx = int(idx)
            is_added = idx >= self.sp.get_piece_size()
            if idx in specials or is_added:
                if run:
                    parts.append(self.sp.decode(run))
                    run = []
                if not skip_special_tokens:
                    parts.append(self._id_to_piece(idx))
            else:
                run.append(idx)
        if run:
            parts.append(self.sp.decode(run))
        return " ".join(p for p in parts if p) if not skip_special_tokens else "".join(parts)


def load_tokenizer(path: Optional[Union[str, os.PathLike]] = None) -> LlamaTokenizer:
    """``None``/``"tiny"`` -> the built-in tiny tokenizer, otherwise a LLaMA folder."""
    if path in (None, "", "tiny"):
        return LlamaTokenizer.tiny()
    return LlamaTokenizer.from_pretrained(path)


def load_model_tokenizer(path: Optional[Union[str, os.PathLike]] = None) -> LlamaTokenizer:
    """The model-side tokenizer of the original: pad := unk if none, plus the patch tokens."""
    tok = load_tokenizer(path)
    if tok.pad_token is None:
        tok.set_pad_token(tok.unk_token)
    tok.add_tokens([IMAGE_PATCH_TOKEN], special_tokens=True)
    tok.add_tokens([AUDIO_PATCH_TOKEN], special_tokens=True)
    return tok


def load_dataset_tokenizer(path: Optional[Union[str, os.PathLike]] = None) -> LlamaTokenizer:
    """The dataset-side tokenizer of the original: pad := unk always, only ``<ImageHere>`` added."""
    tok = load_tokenizer(path)
    tok.set_pad_token(tok.unk_token)
    tok.add_tokens([IMAGE_PATCH_TOKEN], special_tokens=True)
    return tok

"""The one merge path from text ids plus media embeddings to ``inputs_embeds`` / mask / labels.

Every model, and every caller (training, chat, batch inference, evaluation), builds the LLM's
input the same way: a sample is a list of :class:`Segment` s, each either token ids (embedded by
the LLM's input embeddings) or media embeddings (already at LLM width), with an optional
attention mask and labels per position. :func:`merge_segments` embeds, concatenates and pads a
batch of such samples:

* right padding for training, left padding for generation (every row's last prompt position
  is then the last column);
* padding positions get attention 0 and label -100; their embedding is the pad token's
  embedding (what the original Video-LLaMA pads with in training) or zeros;
* any number of media segments per sample, each of any length, so that images and videos,
  fixed-size and per-frame token counts mix in one batch.

Builders of segments: :func:`segments_from_prompt` (a prompt string split at a placeholder, as
the chat does) and :func:`segments_from_ids` (token ids holding placeholder ids, as datasets
tokenise them: either runs of N placeholder ids that the media replace position for position,
or single placeholder ids that each expand into a medium's tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Optional, Sequence

import torch

from videollm.errors import PromptError

IGNORE_INDEX = -100


@dataclass
class Segment:
    """A piece of one sample: ``ids`` (n,) token ids OR ``embeds`` (n, H) media embeddings.

    ``mask`` (n,) defaults to ones; ``labels`` (n,) default to -100 (not supervised).
    """

    ids: Optional[torch.Tensor] = None
    embeds: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if (self.ids is None) == (self.embeds is None):
            raise ValueError("a Segment holds either ids or embeds")

    def __len__(self) -> int:
        return int(self.ids.shape[0] if self.ids is not None else self.embeds.shape[0])


class MergedInputs(NamedTuple):
    inputs_embeds: torch.Tensor  # (B, L, H)
    attention_mask: torch.Tensor  # (B, L) long
    labels: torch.Tensor  # (B, L) long, -100 where not supervised


def merge_segments(
    samples: Sequence[Sequence[Segment]],
    embed_tokens: Callable[[torch.Tensor], torch.Tensor],
    *,
    dtype: torch.dtype,
    device: torch.device,
    padding_side: str = "right",
    pad_token_id: Optional[int] = None,
) -> MergedInputs:
    """Embed and concatenate each sample's segments, then pad the batch.

    ``pad_token_id``: pad with that token's embedding (None: zero embeddings). Media embeddings
    are cast to ``dtype`` (the LLM's embedding dtype).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    rows_e: List[torch.Tensor] = []
    rows_m: List[torch.Tensor] = []
    rows_l: List[torch.Tensor] = []
    for segments in samples:
        embeds, masks, labels = [], [], []
        for seg in segments:
            n = len(seg)
            if seg.ids is not None:
                embeds.append(embed_tokens(seg.ids.to(device).unsqueeze(0))[0].to(dtype))
            else:
                embeds.append(seg.embeds.to(device, dtype))
            masks.append(seg.mask.to(device).long() if seg.mask is not None else torch.ones(n, dtype=torch.long, device=device))
            labels.append(seg.labels.to(device).long() if seg.labels is not None
                          else torch.full((n,), IGNORE_INDEX, dtype=torch.long, device=device))
        rows_e.append(torch.cat(embeds))
        rows_m.append(torch.cat(masks))
        rows_l.append(torch.cat(labels))
    longest = max(r.shape[0] for r in rows_e)
    hidden = rows_e[0].shape[-1]
    if pad_token_id is not None:
        pad_vec = embed_tokens(torch.tensor([[pad_token_id]], device=device))[0, 0].to(dtype)
    else:
        pad_vec = torch.zeros(hidden, dtype=dtype, device=device)
    out_e, out_m, out_l = [], [], []
    for e, m, lab in zip(rows_e, rows_m, rows_l):
        extra = longest - e.shape[0]
        if extra:
            pe = pad_vec.expand(extra, hidden)
            pm = torch.zeros(extra, dtype=torch.long, device=device)
            pl = torch.full((extra,), IGNORE_INDEX, dtype=torch.long, device=device)
            if padding_side == "right":
                e, m, lab = torch.cat([e, pe]), torch.cat([m, pm]), torch.cat([lab, pl])
            else:
                e, m, lab = torch.cat([pe, e]), torch.cat([pm, m]), torch.cat([pl, lab])
        out_e.append(e)
        out_m.append(m)
        out_l.append(lab)
    return MergedInputs(torch.stack(out_e), torch.stack(out_m), torch.stack(out_l))


def segments_from_prompt(
    tokenizer,
    prompt: str,
    placeholder: str,
    media_embeds: Sequence[torch.Tensor],
    *,
    bos_on_first: bool = True,
) -> List[Segment]:
    """A prompt string with one ``placeholder`` per medium -> segments.

    Each text piece is tokenised on its own; only the first gets the tokenizer's special tokens
    (BOS) when ``bos_on_first`` (the Video-LLaMA chat rule). ``media_embeds[i]``: (n_i, H).
    """
    pieces = prompt.split(placeholder)
    if len(pieces) != len(media_embeds) + 1:
        raise PromptError(
            f"the prompt has {len(pieces) - 1} {placeholder} placeholders but {len(media_embeds)} media "
            "were given; each medium needs exactly one placeholder"
        )
    segments: List[Segment] = []
    for i, piece in enumerate(pieces):
        ids = tokenizer(piece, return_tensors="pt", add_special_tokens=bos_on_first and i == 0)["input_ids"][0]
        if ids.numel():
            segments.append(Segment(ids=ids.long()))
        if i < len(media_embeds):
            segments.append(Segment(embeds=media_embeds[i]))
    return segments


def segments_from_ids(
    input_ids: torch.Tensor,
    placeholder_id: int,
    media_embeds: Sequence[torch.Tensor],
    *,
    attention_mask: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    where: str = "sample",
) -> List[Segment]:
    """Token ids (L,) holding placeholder ids -> segments with the media in their place.

    Each maximal run of ``placeholder_id`` belongs to one medium, in order. A run as long as its
    medium's tokens is replaced position for position, keeping the ids' mask and labels there
    (Video-LLaMA's N x ``<ImageHere>``); a run of one id expands into all of the medium's tokens
    (one ``<image>`` per medium: LLaVA-style models), masked 1 and labelled -100. Any other
    length is an error naming the sample. Placeholder ids are never embedded.
    """
    ids = input_ids
    mask = attention_mask if attention_mask is not None else torch.ones_like(ids)
    labs = labels if labels is not None else torch.full_like(ids, IGNORE_INDEX)
    is_ph = ids == placeholder_id
    runs: List[tuple] = []
    pos = 0
    n = ids.shape[0]
    flags = is_ph.tolist()
    while pos < n:
        if flags[pos]:
            start = pos
            while pos < n and flags[pos]:
                pos += 1
            runs.append((start, pos))
        else:
            pos += 1
    if len(runs) != len(media_embeds):
        raise PromptError(f"{where}: {len(runs)} placeholder runs in the token ids but {len(media_embeds)} media")
    segments: List[Segment] = []
    cursor = 0
    for (start, end), emb in zip(runs, media_embeds):
        if start > cursor:
            segments.append(Segment(ids=ids[cursor:start], mask=mask[cursor:start], labels=labs[cursor:start]))
        length = end - start
        if length == emb.shape[0]:
            segments.append(Segment(embeds=emb, mask=mask[start:end], labels=labs[start:end]))
        elif length == 1:
            segments.append(Segment(embeds=emb))
        else:
            raise PromptError(
                f"{where}: a run of {length} placeholder ids for a medium of {emb.shape[0]} tokens "
                "(the dataset's token count and the model's must agree)"
            )
        cursor = end
    if cursor < n:
        segments.append(Segment(ids=ids[cursor:], mask=mask[cursor:], labels=labs[cursor:]))
    return segments

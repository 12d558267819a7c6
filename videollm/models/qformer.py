"""The BLIP-2 Q-Former: a BERT whose learned queries cross-attend to encoder features.

Video-LLaMA uses three of them, all built here with :func:`build_qformer`:

* ``Qformer``: the frozen image Q-Former of BLIP-2 (12 layers, cross-attention on every 2nd
  layer, encoder width 1408 = EVA ViT-g), 32 queries, weights from ``blip2_pretrained_flant5xxl.pth``;
* ``video_Qformer``: 2 layers, cross-attention in both, encoder width 768, random init;
* ``audio_Qformer``: the same with encoder width 1024 (ImageBind).

Architecture (BERT-base defaults; see the project's reference notes, item M2):

* embeddings with queries only: ``dropout(LayerNorm(query_embeds))``; the word and position
  embeddings exist only with ``with_text=True`` (Video-LLaMA deletes them, as it deletes the
  text feed-forward ``intermediate``/``output`` of each layer and the ``cls`` LM head);
* each layer: bidirectional self-attention over all positions; then, at query positions only,
  cross-attention to the encoder states on layers with ``idx % cross_attention_freq == 0`` (its
  key/value project from ``encoder_width``) and the query feed-forward
  ``intermediate_query``/``output_query``; text positions (if any) use ``intermediate``/``output``;
* post-norm residual blocks, exact GELU, LayerNorm eps 1e-12, dropout 0.1 (hidden and attention);
* masks: self-attention adds ``(1 - m) * -10000`` to the scores, cross-attention adds
  ``(1 - m) * finfo(dtype).min``.

State-dict key names are part of the public interface and equal the original's (the parent model
adds ``Qformer.`` / ``video_Qformer.`` / ``audio_Qformer.``): ``bert.embeddings.LayerNorm.*``,
``bert.embeddings.position_ids`` (an int64 (1, 512) buffer that is **persistent**, because it is in
the original's state dicts and checkpoints), ``bert.encoder.layer.N.attention.self.{query,key,value}.*``,
``bert.encoder.layer.N.attention.output.{dense,LayerNorm}.*``, ``...crossattention.self.*``,
``...crossattention.output.*``, ``...intermediate_query.dense.*``, ``...output_query.{dense,LayerNorm}.*``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from videollm.errors import ConfigError, closest

__all__ = ["QFormer", "QFormerBert", "QFormerConfig", "build_qformer"]

# The original adds -10000 (not -inf) for masked self-attention keys (BERT's extended mask).
SELF_ATTENTION_MASK_VALUE = -10000.0


@dataclass
class QFormerConfig:
    """Q-Former hyper-parameters; the defaults are bert-base-uncased plus BLIP-2's image Q-Former additions."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    max_position_embeddings: int = 512
    encoder_width: int = 1408
    cross_attention_freq: int = 2
    query_length: int = 32
    vocab_size: int = 30522
    with_text: bool = False
    initializer_range: float = 0.02
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"qformer hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.cross_attention_freq < 1:
            raise ConfigError(f"qformer cross_attention_freq must be >= 1, got {self.cross_attention_freq}")


class QFormerEmbeddings(nn.Module):
    """LayerNorm + dropout over [queries; text]; word/position embeddings only with ``with_text``."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        if config.with_text:
            self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        else:
            self.word_embeddings = None
            self.position_embeddings = None
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # Persistent on purpose: the original's state dicts and checkpoints carry it.
        self.register_buffer(
            "position_ids", torch.arange(config.max_position_embeddings, dtype=torch.long).unsqueeze(0), persistent=True
        )

    def forward(self, query_embeds: torch.Tensor | None = None, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """query_embeds (B, Q, H) and/or input_ids (B, L) -> (B, Q + L, H)."""
        if input_ids is not None:
            if self.word_embeddings is None:
                raise ConfigError("Q-Former got input_ids but was built without text embeddings; build it with with_text=True")
            positions = self.position_ids[:, : input_ids.shape[1]]
            embeddings = self.word_embeddings(input_ids) + self.position_embeddings(positions)
            if query_embeds is not None:
                embeddings = torch.cat((query_embeds.to(embeddings.dtype), embeddings), dim=1)
        elif query_embeds is not None:
            embeddings = query_embeds
        else:
            raise ConfigError("Q-Former needs query_embeds or input_ids; both are None")
        return self.dropout(self.LayerNorm(embeddings))


class QFormerSelfAttention(nn.Module):
    """Multi-head attention; with ``is_cross_attention`` its key/value read encoder states of width ``encoder_width``."""

    def __init__(self, config: QFormerConfig, is_cross_attention: bool) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.is_cross_attention = is_cross_attention
        kv_width = config.encoder_width if is_cross_attention else config.hidden_size
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_width, config.hidden_size)
        self.value = nn.Linear(kv_width, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # (B, N, H) -> (B, heads, N, head_dim)
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self, hidden_states: torch.Tensor, key_mask: torch.Tensor | None, kv_states: torch.Tensor | None = None
    ) -> torch.Tensor:
        """hidden_states (B, N, H); kv_states (B, M, E) for cross-attention (else M = N);
        key_mask (B, M) with 1 = attend, 0 = ignore, or None. Returns (B, N, H)."""
        source = kv_states if self.is_cross_attention else hidden_states
        q = self._heads(self.query(hidden_states))
        k = self._heads(self.key(source))
        v = self._heads(self.value(source))
        bias = None
        if key_mask is not None:
            fill = torch.finfo(q.dtype).min if self.is_cross_attention else SELF_ATTENTION_MASK_VALUE
            bias = ((1.0 - key_mask.to(q.dtype)) * fill)[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.dropout_p if self.training else 0.0
        )
        return out.transpose(1, 2).reshape(hidden_states.shape[0], hidden_states.shape[1], -1)


class QFormerSelfOutput(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual)."""

    def __init__(self, config: QFormerConfig, in_size: int | None = None) -> None:
        super().__init__()
        self.dense = nn.Linear(in_size or config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class QFormerAttention(nn.Module):
    """Attention block: ``self`` (the attention proper) then ``output`` (projection + residual + norm)."""

    def __init__(self, config: QFormerConfig, is_cross_attention: bool = False) -> None:
        super().__init__()
        self.self = QFormerSelfAttention(config, is_cross_attention)
        self.output = QFormerSelfOutput(config)

    def forward(
        self, hidden_states: torch.Tensor, key_mask: torch.Tensor | None, kv_states: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, N, H) -> (B, N, H)."""
        return self.output(self.self(hidden_states, key_mask, kv_states), hidden_states)


class QFormerIntermediate(nn.Module):
    """dense (H -> intermediate) -> exact GELU."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(hidden_states))


class QFormerLayer(nn.Module):
    """One Q-Former layer. Positions ``[:query_length]`` are queries, the rest (if any) text."""

    def __init__(self, config: QFormerConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attention = QFormerAttention(config)
        self.has_cross_attention = layer_idx % config.cross_attention_freq == 0
        self.crossattention = QFormerAttention(config, is_cross_attention=True) if self.has_cross_attention else None
        if config.with_text:
            self.intermediate = QFormerIntermediate(config)
            self.output = QFormerSelfOutput(config, in_size=config.intermediate_size)
        else:
            self.intermediate = None
            self.output = None
        self.intermediate_query = QFormerIntermediate(config)
        self.output_query = QFormerSelfOutput(config, in_size=config.intermediate_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        self_mask: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor | None,
        encoder_mask: torch.Tensor | None,
        query_length: int,
    ) -> torch.Tensor:
        """hidden_states (B, Q + L, H); self_mask (B, Q + L) or None; encoder_hidden_states (B, M, E);
        encoder_mask (B, M) or None. Returns (B, Q + L, H)."""
        attended = self.attention(hidden_states, self_mask)
        queries, text = attended[:, :query_length], attended[:, query_length:]
        parts = []
        if query_length > 0:
            if self.crossattention is not None:
                if encoder_hidden_states is None:
                    raise ConfigError(
                        f"Q-Former layer {self.layer_idx} has cross-attention but encoder_hidden_states is None"
                    )
                queries = self.crossattention(queries, encoder_mask, encoder_hidden_states)
            parts.append(self.output_query(self.intermediate_query(queries), queries))
        if text.shape[1] > 0:
            if self.intermediate is None:
                raise ConfigError("Q-Former got text positions but was built without the text feed-forward (with_text=False)")
            parts.append(self.output(self.intermediate(text), text))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class QFormerEncoder(nn.Module):
    """The stack of :class:`QFormerLayer` (attribute ``layer``, as in the original's key names)."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(config, i) for i in range(config.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        self_mask: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor | None,
        encoder_mask: torch.Tensor | None,
        query_length: int,
    ) -> torch.Tensor:
        for layer in self.layer:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                hidden_states = checkpoint(
                    layer, hidden_states, self_mask, encoder_hidden_states, encoder_mask, query_length,
                    use_reentrant=False,
                )
            else:
                hidden_states = layer(hidden_states, self_mask, encoder_hidden_states, encoder_mask, query_length)
        return hidden_states


class QFormerBert(nn.Module):
    """``embeddings`` + ``encoder`` (the original's ``BertModel`` without pooler), encoder mode only.

    ``forward(query_embeds, encoder_hidden_states, encoder_attention_mask=None, input_ids=None,
    attention_mask=None)``:

    * query_embeds: (B, Q, H) learned queries (Q may be 0 when only text is given);
    * encoder_hidden_states: (B, M, encoder_width) features the queries cross-attend to;
    * encoder_attention_mask: (B, M), 1 = attend, 0 = padding; None means all ones;
    * input_ids: (B, L) text token ids (needs ``with_text=True``), appended after the queries;
    * attention_mask: (B, Q + L) self-attention mask; None means all ones.

    Returns the last hidden state (B, Q + L, H). Self-attention is bidirectional (the original's
    ``is_decoder=False``); its causal text-decoding mode is not implemented.
    """

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = QFormerEmbeddings(config)
        self.encoder = QFormerEncoder(config)

    def forward(
        self,
        query_embeds: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = self.embeddings(query_embeds=query_embeds, input_ids=input_ids)
        query_length = query_embeds.shape[1] if query_embeds is not None else 0
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
            raise ConfigError(
                f"Q-Former attention_mask has shape {tuple(attention_mask.shape)}, expected "
                f"{tuple(hidden.shape[:2])} (batch, queries + text tokens)"
            )
        if encoder_hidden_states is not None:
            if encoder_hidden_states.shape[-1] != self.config.encoder_width:
                raise ConfigError(
                    f"Q-Former encoder_hidden_states has width {encoder_hidden_states.shape[-1]} but the model "
                    f"was built with encoder_width={self.config.encoder_width}"
                )
            if encoder_attention_mask is not None and tuple(encoder_attention_mask.shape) != tuple(
                encoder_hidden_states.shape[:2]
            ):
                raise ConfigError(
                    f"Q-Former encoder_attention_mask has shape {tuple(encoder_attention_mask.shape)}, expected "
                    f"{tuple(encoder_hidden_states.shape[:2])} (batch, encoder tokens)"
                )
        # An all-ones mask adds exactly zero in the original; None skips the addition (same result).
        return self.encoder(hidden, attention_mask, encoder_hidden_states, encoder_attention_mask, query_length)


class _PredictionHeadTransform(nn.Module):
    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class _LMPredictionHead(nn.Module):
    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.transform = _PredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        # One tensor under two names, as in the original (both keys appear in its state dicts).
        self.decoder.bias = self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))


class _OnlyMLMHead(nn.Module):
    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.predictions = _LMPredictionHead(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictions(x)


class QFormer(nn.Module):
    """A Q-Former: attribute ``bert`` (:class:`QFormerBert`) and, with ``with_text``, the ``cls`` LM head.

    ``forward(query_embeds (B, Q, H), encoder_hidden_states (B, N, E), encoder_attention_mask (B, N) or None)
    -> (B, Q, H)``, the last hidden state at the query positions.
    """

    def __init__(self, config: QFormerConfig | None = None) -> None:
        super().__init__()
        self.config = config or QFormerConfig()
        self.bert = QFormerBert(self.config)
        if self.config.with_text:
            self.cls = _OnlyMLMHead(self.config)
            # Tied to the word embeddings, as in the original (HF tie_word_embeddings).
            self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        else:
            self.cls = None
        self.apply(self._init_weights)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # BERT init: normal(0, initializer_range) for Linear/Embedding weights, zero biases, LayerNorm 1/0.
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.zero_()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each layer in the backward pass (only while grads are enabled)."""
        self.bert.encoder.gradient_checkpointing = enable

    def forward(
        self,
        query_embeds: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query_embeds (B, Q, H), encoder_hidden_states (B, N, E), mask (B, N) -> (B, Q, H)."""
        return self.bert(
            query_embeds=query_embeds,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
        )


def build_qformer(
    num_query_token: int,
    vision_width: int,
    num_hidden_layers: int = 12,
    cross_attention_freq: int = 2,
    **overrides,
) -> tuple[QFormer, nn.Parameter]:
    """Build a Q-Former and its learned query tokens, as the original's ``init_Qformer``/``init_video_Qformer``.

    * image Q-Former: ``build_qformer(32, 1408)`` (12 layers, cross-attention every 2nd layer);
    * video Q-Former: ``build_qformer(32, 768, num_hidden_layers=2, cross_attention_freq=1)``;
    * audio Q-Former: ``build_qformer(8, 1024, num_hidden_layers=2, cross_attention_freq=1)``.

    ``overrides`` are any other :class:`QFormerConfig` fields (e.g. ``hidden_size=32`` for tests,
    ``with_text=True`` to keep the text parts). Returns ``(qformer, query_tokens)`` with
    ``query_tokens`` an ``nn.Parameter`` of shape (1, num_query_token, hidden_size) ~ N(0, 0.02).
    """
    names = {f.name for f in dataclasses.fields(QFormerConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(
            f"build_qformer: unknown option {unknown[0]!r}{closest(unknown[0], names)}; valid: {sorted(names)}"
        )
    config = QFormerConfig(
        num_hidden_layers=num_hidden_layers,
        encoder_width=vision_width,
        cross_attention_freq=cross_attention_freq,
        query_length=num_query_token,
        **overrides,
    )
    model = QFormer(config)
    query_tokens = nn.Parameter(torch.zeros(1, num_query_token, config.hidden_size))
    with torch.no_grad():
        query_tokens.normal_(mean=0.0, std=config.initializer_range)
    return model, query_tokens

"""Tiny local models and tokenizers for tests (no downloads, a few hundred kB each).

- :func:`tiny_llm_config` / :func:`write_tiny_llm`: a random-weight transformers causal LM
  (``llama``, ``mistral``, ``opt``, ``gpt2``, ...) as a config dict or as a model folder.
- :func:`write_tiny_bpe_tokenizer`: a byte-level BPE tokenizer folder trained on a few sentences
  with the ``tokenizers`` library, in OPT style (``</s>`` as BOS, prepended; ``<pad>`` = 1) or
  GPT-2 style (one ``<|endoftext|>`` token, nothing prepended, no pad).
- :func:`write_llama_auto_tokenizer`: the project's tiny SentencePiece model as a folder that
  ``transformers.AutoTokenizer`` loads as a LLaMA tokenizer.

A 4-bit (bitsandbytes) tiny LLM that runs inference on the CPU needs ``hidden_size`` and
``intermediate_size`` multiples of 64: the CPU kernels repack weights in 64-wide input blocks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import torch

PathLike = Union[str, Path]

SENTENCES = (
    "a red ball moves to the left",
    "the blue square moves right quickly",
    "a green triangle turns slowly on a white background",
    "what is moving in the video?",
    "the small yellow circle jumps up and down",
)


def tiny_llm_config(
    model_type: str = "llama",
    vocab_size: int = 128,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 64,
    max_positions: int = 256,
    **overrides: Any,
) -> Dict[str, Any]:
    """``{"model_type": ..., **kwargs}`` of a tiny causal LM, as ``build_language_model(config=)`` takes it."""
    if model_type == "opt":
        cfg: Dict[str, Any] = {
            "hidden_size": hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "ffn_dim": intermediate_size,
            "word_embed_proj_dim": hidden_size,
            "max_position_embeddings": max_positions,
            "pad_token_id": 1,
            "bos_token_id": 2,
            "eos_token_id": 2,
        }
    elif model_type == "gpt2":
        cfg = {"n_embd": hidden_size, "n_layer": num_layers, "n_head": num_heads, "n_positions": max_positions,
               "n_inner": intermediate_size, "bos_token_id": 0, "eos_token_id": 0}
    else:  # llama-like: llama, mistral, qwen2, ...
        cfg = {
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_heads,
            "max_position_embeddings": max_positions,
        }
    cfg.update(vocab_size=vocab_size, **overrides)
    return {"model_type": model_type, **cfg}


def write_tiny_llm(
    out_dir: PathLike,
    model_type: str = "llama",
    vocab_size: int = 128,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **config_kwargs: Any,
) -> Path:
    """Save a random-weight causal LM (seeded) as a Hugging Face folder; returns the folder.

    ``config_kwargs`` go to :func:`tiny_llm_config` (hidden_size, num_layers, ...).
    """
    import transformers

    cfg = tiny_llm_config(model_type, vocab_size, **config_kwargs)
    cfg.pop("model_type")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(model_type, **cfg), dtype=dtype
    )
    out = Path(out_dir)
    model.save_pretrained(out)
    return out


def write_tiny_bpe_tokenizer(
    out_dir: PathLike,
    style: str = "opt",
    vocab_size: int = 300,
    texts: Optional[Sequence[str]] = None,
) -> Path:
    """Train a byte-level BPE tokenizer on ``texts`` and save it as a transformers folder.

    ``style="opt"``: specials ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3; BOS = EOS = ``</s>``,
    prepended to every sequence (as OPT's tokenizer does). ``style="gpt2"``: one special
    ``<|endoftext|>``=0 serving as BOS, EOS and unk; nothing prepended; no pad token.
    """
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if style == "opt":
        specials = ["<s>", "<pad>", "</s>", "<unk>"]
        names = {"bos_token": "</s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    elif style == "gpt2":
        specials = ["<|endoftext|>"]
        names = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    else:
        raise ValueError(f"style: '{style}' unknown; choose opt or gpt2")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(list(texts or SENTENCES), trainer)
    if style == "opt":
        bos = tk.token_to_id("</s>")
        tk.post_processor = processors.TemplateProcessing(
            single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", bos)]
        )
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, **names)
    out = Path(out_dir)
    fast.save_pretrained(out)
    return out


def write_llama_auto_tokenizer(out_dir: PathLike) -> Path:
    """The built-in tiny SentencePiece model as a LLaMA folder for ``AutoTokenizer``."""
    from videollm.tokenizer import TINY_TOKENIZER_DIR

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(TINY_TOKENIZER_DIR / "tokenizer.model", out / "tokenizer.model")
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out

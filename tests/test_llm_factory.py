"""LLM and tokenizer factory (videollm.models.llm): any causal LM, 8/4-bit on the CPU, tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from videollm.errors import ConfigError
from videollm.models.llm import build_language_model, build_tokenizer, is_checkpointing, quantization_config
from videollm.testing import (
    tiny_llm_config,
    write_llama_auto_tokenizer,
    write_tiny_bpe_tokenizer,
    write_tiny_llm,
)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return write_tiny_llm(tmp_path_factory.mktemp("llama"), "llama", 300, hidden_size=64, intermediate_size=128)


def _ids(vocab: int = 300, length: int = 9) -> torch.Tensor:
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------ language models


def test_random_weights_are_the_same_call_as_before() -> None:
    """config= builds exactly what Video-LLaMA's from_config call built (same weights, same dtype)."""
    import transformers

    cfg = tiny_llm_config("llama", 128)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        torch.manual_seed(0)
        ours = build_language_model("", config=cfg, dtype=name)
        kwargs = dict(cfg)
        kwargs.pop("model_type")
        torch.manual_seed(0)
        ref = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model("llama", **kwargs), dtype=dtype
        )
        assert type(ours) is type(ref)
        ref_state = ref.state_dict()
        for key, value in ours.state_dict().items():
            assert value.dtype == ref_state[key].dtype
            assert torch.equal(value, ref_state[key]), key


@pytest.mark.parametrize("model_type", ["llama", "opt", "mistral"])
def test_any_causal_lm_from_a_folder(tmp_path: Path, model_type: str) -> None:
    import transformers

    folder = write_tiny_llm(tmp_path / model_type, model_type, 300, seed=3)
    llm = build_language_model(str(folder), dtype="fp32")
    assert llm.config.model_type == model_type
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(llm(ids).logits, ref(ids).logits, rtol=0, atol=0)
    # the tiny folders differ by architecture: a seeded model is not a copy of another type's
    assert llm.get_input_embeddings().weight.shape == (300, 32)


def test_clear_errors_name_the_key(tmp_path: Path, llama_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.llm\.path: .*does not exist"):
        build_language_model(str(tmp_path / "nope"), key="model.llm.path")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"model\.llama_model: .*no config\.json"):
        build_language_model(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match=r"model\.llm_dtype: 'fp8' unknown"):
        build_language_model(str(llama_dir), dtype="fp8")
    with pytest.raises(ConfigError, match=r"model\.llama_model: empty"):
        build_language_model("")
    with pytest.raises(ConfigError, match=r"llm_config"):
        build_language_model("", config={"model_type": "no_such_model"})


def test_8bit_on_cpu(llama_dir: Path) -> None:
    import bitsandbytes as bnb

    full = build_language_model(str(llama_dir), dtype="fp32")
    q8 = build_language_model(str(llama_dir), dtype="fp32", load_in_8bit=True)
    assert q8.is_loaded_in_8bit
    layer = q8.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear8bitLt) and layer.weight.dtype == torch.int8
    assert q8.model.layers[0].self_attn.q_proj.weight.device.type == "cpu"
    ids = _ids()
    with torch.no_grad():
        ref, out = full(ids).logits, q8(ids).logits
    assert torch.isfinite(out).all()
    err = (out - ref).abs().max() / ref.abs().max()
    assert err < 0.05, err  # int8 rounding, not a different model


def test_4bit_on_cpu_is_nf4_with_double_quant(llama_dir: Path) -> None:
    import bitsandbytes as bnb

    q = quantization_config(load_in_8bit=False, load_in_4bit=True, dtype=torch.bfloat16, on_cuda=False)
    assert (q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant, q.bnb_4bit_compute_dtype) == ("nf4", True, torch.bfloat16)
    assert quantization_config(load_in_8bit=False, load_in_4bit=True, dtype=torch.float16, on_cuda=True).bnb_4bit_compute_dtype == torch.float16
    assert quantization_config(load_in_8bit=False, load_in_4bit=True, dtype=torch.float16, on_cuda=False).bnb_4bit_compute_dtype == torch.float32
    assert quantization_config(load_in_8bit=True, load_in_4bit=False, dtype=torch.float16, on_cuda=True).load_in_8bit
    assert quantization_config(load_in_8bit=False, load_in_4bit=False, dtype=torch.float16, on_cuda=True) is None

    full = build_language_model(str(llama_dir), dtype="fp32")
    q4 = build_language_model(str(llama_dir), dtype="fp32", load_in_4bit=True, load_in_8bit=True)  # 4-bit wins
    assert q4.is_loaded_in_4bit and not getattr(q4, "is_loaded_in_8bit", False)
    layer = q4.model.layers[1].mlp.down_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    assert layer.weight.quant_state.quant_type == "nf4" and layer.weight.quant_state.nested
    assert layer.compute_dtype == torch.float32
    ids = _ids()
    with torch.no_grad():
        ref, out = full(ids).logits, q4(ids).logits
    err = (out - ref).abs().max() / ref.abs().max()
    assert torch.isfinite(out).all() and 0 < err < 0.3, err


def test_device_map(llama_dir: Path) -> None:
    """A layer map reaches from_pretrained: layer 1 offloaded (accelerate hooks), same logits."""
    full = build_language_model(str(llama_dir), dtype="fp32")
    layout = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
              "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    llm = build_language_model(str(llama_dir), dtype="fp32", device_map=layout)
    assert llm.hf_device_map == layout
    assert llm.model.layers[1].self_attn.q_proj.weight.device.type == "meta"  # weights live on disk
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(llm(ids).logits, full(ids).logits, rtol=1e-5, atol=1e-5)
    auto = build_language_model(str(llama_dir), dtype="fp32", device_map="auto")
    assert all(p.device.type == "cpu" for p in auto.parameters())


def test_gradient_checkpointing_gives_the_same_gradients(llama_dir: Path) -> None:
    ids = _ids()
    grads, saved = [], []
    for ckpt in (False, True):
        llm = build_language_model(str(llama_dir), dtype="fp32", grad_checkpointing=ckpt)
        assert is_checkpointing(llm) == ckpt
        llm.train()
        llm.get_input_embeddings().weight.requires_grad_(False)  # frozen embeddings, as with LoRA
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(1) or t, lambda t: t):
            loss = llm(ids, labels=ids).loss
        loss.backward()
        saved.append(len(packed))
        grads.append({n: p.grad.clone() for n, p in llm.named_parameters() if p.grad is not None})
    assert saved[1] < saved[0] / 3  # the layers' activations are not kept for backward
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) > 10
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ tokenizers


def test_llama_exact_is_the_model_tokenizer() -> None:
    from videollm.tokenizer import load_model_tokenizer

    ours, ref = build_tokenizer("llama_exact", "tiny"), load_model_tokenizer("tiny")
    text = "Hello <ImageHere> world </s> ok"
    assert ours(text)["input_ids"] == ref(text)["input_ids"]
    assert (ours.pad_token_id, len(ours)) == (ref.pad_token_id, len(ref))
    assert build_tokenizer("llama_exact", None)(text)["input_ids"] == ref(text)["input_ids"]
    extra = build_tokenizer("llama_exact", "tiny", added_tokens=["<ImageHere>", "<vid>"], pad_token="[PAD]")
    assert extra.convert_tokens_to_ids("<ImageHere>") == ref.convert_tokens_to_ids("<ImageHere>")
    assert extra.pad_token_id == len(ref) and extra.convert_tokens_to_ids("<vid>") == len(ref) + 1


def test_auto_tokenizer_on_an_opt_style_bpe_folder(tmp_path: Path) -> None:
    folder = write_tiny_bpe_tokenizer(tmp_path / "opt", "opt", vocab_size=300)
    tok = build_tokenizer("auto", str(folder), added_tokens=["<ImageHere>"])
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (2, 2, 1, 3)
    ids = tok("a red ball moves").input_ids
    assert ids[0] == 2 and 2 not in ids[1:]  # OPT prepends </s> as BOS, no EOS
    assert tok.decode(ids, skip_special_tokens=True) == "a red ball moves"
    image = tok.convert_tokens_to_ids("<ImageHere>")
    assert image == 300 and len(tok) == 301
    assert tok("look <ImageHere> here").input_ids.count(image) == 1
    assert build_tokenizer("auto", str(folder), pad_token="<unk>").pad_token_id == 3


def test_auto_tokenizer_gpt2_style_pads_with_eos(tmp_path: Path) -> None:
    folder = write_tiny_bpe_tokenizer(tmp_path / "gpt2", "gpt2", vocab_size=280)
    tok = build_tokenizer("auto", str(folder))
    assert tok.eos_token_id == 0 and tok.pad_token_id == 0  # pad := unk (the same <|endoftext|>)
    ids = tok("a red ball").input_ids
    assert 0 not in ids
    new = build_tokenizer("auto", str(folder), pad_token="<pad>")
    assert new.pad_token == "<pad>" and new.pad_token_id == len(tok)


def test_auto_tokenizer_llama_is_not_legacy(tmp_path: Path) -> None:
    from videollm.tokenizer import load_tokenizer

    tok = build_tokenizer("auto", str(write_llama_auto_tokenizer(tmp_path / "llama")))
    assert tok.legacy is False
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)  # pad := unk
    exact = load_tokenizer("tiny")
    assert tok("a red ball moves").input_ids == exact("a red ball moves")["input_ids"]
    # legacy=False: no extra "▁" after a special token (the 4.28 rule the exact tokenizer keeps)
    after = tok("hello</s> world", add_special_tokens=False).input_ids
    legacy = exact("hello</s> world", add_special_tokens=False)["input_ids"]
    assert len(after) == len(legacy) - 1


def test_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.tokenizer: tokenizer kind 'bpe' unknown"):
        build_tokenizer("bpe", "x")
    with pytest.raises(ConfigError, match=r"model\.tokenizer: .*does not exist"):
        build_tokenizer("auto", str(tmp_path / "none"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "NoSuchTokenizer"}))
    with pytest.raises(ConfigError, match=r"cannot load a tokenizer"):
        build_tokenizer("auto", str(tmp_path / "junk"))

"""LoRA / QLoRA on the LLM of a tiny video-LLM-shaped module (videollm.models.lora)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pytest
import torch
from torch import nn

from videollm.errors import CheckpointError, ConfigError
from videollm.models.llm import build_language_model
from videollm.models.lora import (
    LoRAConfig,
    apply_lora,
    is_lora,
    load_adapter,
    lora_state_dict,
    merge_lora,
    merge_lora_state_dict,
    save_adapter,
    set_lora_alpha,
)
from videollm.testing import write_tiny_llm

VOCAB, HIDDEN, FEAT, R = 300, 32, 8, 4


class TinyVLM(nn.Module):
    """Media features -> connector -> LLM, the shape of every video LLM here."""

    llm_attr = "llama_model"

    def __init__(self, llm: nn.Module, lora: Optional[LoRAConfig] = None) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.connector = nn.Linear(FEAT, HIDDEN)
        self.llama_model = llm
        for p in llm.parameters():
            p.requires_grad_(False)  # the LLM is frozen; LoRA makes its adapter trainable
        self.lora = lora
        if lora is not None:
            apply_lora(self, self.llm_attr, lora)

    def forward(self, feats: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """feats (B, M, FEAT), ids (B, L) -> logits (B, M + L, vocab)."""
        llm = getattr(self, self.llm_attr)
        embeds = torch.cat([self.connector(feats).to(llm.dtype), llm.get_input_embeddings()(ids)], dim=1)
        return llm(inputs_embeds=embeds).logits.float()

    def loss(self, feats: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        logits = self(feats, ids)[:, feats.shape[1] - 1 : -1]
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1))


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory) -> Path:
    return write_tiny_llm(tmp_path_factory.mktemp("llm"), "llama", VOCAB, hidden_size=HIDDEN, seed=0)


def _batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, FEAT, generator=g), torch.randint(0, VOCAB, (2, 7), generator=g)


def _model(llm_dir: Path, lora: Optional[LoRAConfig] = None, **kwargs) -> TinyVLM:
    return TinyVLM(build_language_model(str(llm_dir), dtype="fp32", **kwargs), lora)


def _randomize_lora_b(model: nn.Module, seed: int = 5) -> None:
    """LoRA B starts at zero (the adapter is a no-op); give it values so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_only_lora_and_connector_get_gradients(llm_dir: Path) -> None:
    model = _model(llm_dir, LoRAConfig(r=R, alpha=8, dropout=0.0))
    assert is_lora(model.llama_model)
    keys = list(model.state_dict())
    assert "llama_model.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight" in keys
    assert "llama_model.base_model.model.model.layers.1.self_attn.v_proj.lora_A.default.weight" in keys
    assert "llama_model.base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight" in keys
    model.loss(*_batch()).backward()
    got = {n: p.grad.numel() for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(got) == trainable
    lora = {n for n in got if ".lora_" in n}
    assert set(got) - lora == {"connector.weight", "connector.bias"}
    # 2 layers x (q_proj, v_proj) x (A: r x 32 + B: 32 x r)
    assert len(lora) == 8 and sum(got[n] for n in lora) == 2 * 2 * (R * HIDDEN + HIDDEN * R) == 1024
    assert sum(got.values()) == 1024 + FEAT * HIDDEN + HIDDEN
    assert set(lora_state_dict(model)) == lora


def test_lora_config_checks() -> None:
    with pytest.raises(ConfigError, match=r"model\.lora\.alpah: unknown key \(did you mean alpha\?\)"):
        LoRAConfig.from_dict({"alpah": 8})
    with pytest.raises(ConfigError, match=r"model\.lora\.r: 0"):
        LoRAConfig.from_dict({"r": 0})
    cfg = LoRAConfig.from_dict({"r": 16, "alpha": 32, "target_modules": ("q_proj", "k_proj")})
    assert cfg.scaling == 2.0 and cfg.target_modules == ["q_proj", "k_proj"]


def test_unknown_target_module_is_named(llm_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"\['qkv'\] not found .*q_proj"):
        _model(llm_dir, LoRAConfig(target_modules=["qkv"]))
    suffix = _model(llm_dir, LoRAConfig(r=R, target_modules=["self_attn.q_proj", "down_proj"]))
    adapted = {k.split(".lora_A")[0].rsplit(".", 1)[-1] for k in lora_state_dict(suffix) if ".lora_A." in k}
    assert adapted == {"q_proj", "down_proj"}
    regex = _model(llm_dir, LoRAConfig(r=R, target_modules=r".*\.1\.self_attn\.k_proj"))
    assert [k for k in lora_state_dict(regex) if ".lora_A." in k] == [
        "llama_model.base_model.model.model.layers.1.self_attn.k_proj.lora_A.default.weight"]


def test_adapter_save_load_gives_identical_logits(llm_dir: Path, tmp_path: Path) -> None:
    model = _model(llm_dir, LoRAConfig(r=R, alpha=8, dropout=0.0)).eval()
    _randomize_lora_b(model)
    feats, ids = _batch()
    with torch.no_grad():
        ref = model(feats, ids)
    out = save_adapter(model, "llama_model", tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    saved = json.loads((out / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], sorted(saved["target_modules"])) == (R, 8, ["q_proj", "v_proj"])

    plain = _model(llm_dir)  # no LoRA yet: load_adapter wraps it
    plain.connector.load_state_dict(model.connector.state_dict())
    load_adapter(plain, "llama_model", out)
    wrapped = _model(llm_dir, LoRAConfig(r=R, alpha=8, dropout=0.0))  # fresh adapter (B = 0) replaced
    wrapped.connector.load_state_dict(model.connector.state_dict())
    load_adapter(wrapped, "llama_model", out, is_trainable=True)
    with torch.no_grad():
        for other in (plain.eval(), wrapped.eval()):
            torch.testing.assert_close(other(feats, ids), ref, rtol=0, atol=0)
    assert not any(p.requires_grad for p in plain.llama_model.parameters())
    assert {n for n, p in wrapped.llama_model.named_parameters() if p.requires_grad} == {
        n for n in dict(wrapped.llama_model.named_parameters()) if ".lora_" in n}

    with pytest.raises(CheckpointError, match="not a PEFT adapter folder"):
        load_adapter(plain, "llama_model", tmp_path)
    other_rank = _model(llm_dir, LoRAConfig(r=2, alpha=8))
    with pytest.raises(CheckpointError, match=r"shape .*r differs"):
        load_adapter(other_rank, "llama_model", out)


def test_merged_logits_equal_unmerged(llm_dir: Path) -> None:
    model = _model(llm_dir, LoRAConfig(r=R, alpha=8, dropout=0.0)).eval()
    _randomize_lora_b(model)
    feats, ids = _batch()
    base = _model(llm_dir).eval()
    with torch.no_grad():
        unmerged, plain = model(feats, ids), base(feats, ids)
        assert (unmerged - plain).abs().max() > 1e-2  # the adapter changes the output
        merge_lora(model, "llama_model")
        merged = model(feats, ids)
    assert not is_lora(model.llama_model)
    assert set(model.state_dict()) == set(base.state_dict())  # plain LLM names again
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)


def test_alpha_scales_the_lora_delta(llm_dir: Path) -> None:
    model = _model(llm_dir, LoRAConfig(r=R, alpha=8, dropout=0.0)).eval()
    _randomize_lora_b(model)
    layer = model.llama_model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        delta8 = layer(x) - layer.base_layer(x)
        assert layer.scaling["default"] == 8 / R
        assert set_lora_alpha(model, 4) == 4  # 2 layers x (q, v)
        assert layer.scaling["default"] == 4 / R
        delta4 = layer(x) - layer.base_layer(x)
        torch.testing.assert_close(delta4, delta8 * (4 / 8), rtol=1e-5, atol=1e-6)
        # alpha 0 switches the adapter off in the whole forward
        feats, ids = _batch()
        set_lora_alpha(model, 0)
        torch.testing.assert_close(model(feats, ids), _model(llm_dir).eval()(feats, ids), rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="no LoRA layer"):
        set_lora_alpha(_model(llm_dir), 4)


def test_gradient_checkpointing_with_lora(llm_dir: Path) -> None:
    from videollm.models.llm import is_checkpointing

    feats, ids = _batch()
    grads = []
    for ckpt in (False, True):
        model = _model(llm_dir, LoRAConfig(r=R, alpha=8, dropout=0.0), grad_checkpointing=ckpt).train()
        _randomize_lora_b(model)
        assert is_checkpointing(model.llama_model) == ckpt
        model.loss(feats, ids).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1])
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6)


def _train(model: TinyVLM, steps: int, lr: float = 1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    feats, ids = _batch()
    losses = []
    for _ in range(steps):
        loss = model.loss(feats, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_qlora_4bit_trains_on_cpu(llm_dir: Path, tmp_path: Path) -> None:
    import bitsandbytes as bnb

    model = _model(llm_dir, LoRAConfig(r=R, alpha=8, dropout=0.05), load_in_4bit=True).train()
    layer = model.llama_model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
    before = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" in k or "base_layer.weight" in k}
    losses = _train(model, 3)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    after = model.state_dict()
    lora = [k for k in before if ".lora_" in k]
    assert lora and all(not torch.equal(before[k], after[k]) for k in lora)
    frozen = [k for k in before if "base_layer.weight" in k]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # 4-bit base untouched
    with pytest.raises(ConfigError, match="merge into a 16/32-bit base"):
        merge_lora(model, "llama_model")
    # the QLoRA release path: the adapter trained on the 4-bit base, merged into a full-precision one
    full = _model(llm_dir)
    load_adapter(full, "llama_model", save_adapter(model, "llama_model", tmp_path / "qlora"))
    lora_after = {k: v for k, v in full.state_dict().items() if ".lora_" in k}
    assert all(torch.equal(lora_after[k], after[k]) for k in lora)
    feats, ids = _batch()
    with torch.no_grad():
        unmerged = full.eval()(feats, ids)
        merge_lora(full, "llama_model")
        torch.testing.assert_close(full(feats, ids), unmerged, rtol=0, atol=1e-5)


def test_lora_on_an_8bit_base_on_cpu(llm_dir: Path) -> None:
    model = _model(llm_dir, LoRAConfig(r=R, alpha=8, dropout=0.0), load_in_8bit=True).train()
    losses = _train(model, 2)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(p.grad is not None for n, p in model.named_parameters() if ".lora_A." in n)


def test_merge_lora_state_dict_folds_a_training_checkpoint(llm_dir: Path) -> None:
    """state dict in (connector + PEFT LoRA keys, no base weights) -> plain merged state dict out."""
    model = _model(llm_dir, LoRAConfig(r=R, alpha=8, dropout=0.0))
    _train(model, 2)  # B != 0 now
    model.eval()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    ckpt = {k: v for k, v in model.state_dict().items() if k in trainable}
    feats, ids = _batch()
    with torch.no_grad():
        ref = model(feats, ids)

    fresh = _model(llm_dir).eval()  # the plain model the merged checkpoint loads into
    merged = merge_lora_state_dict(ckpt, 8 / R, base=fresh.state_dict())
    q = "llama_model.model.layers.0.self_attn.q_proj.weight"
    assert set(merged) == {"connector.weight", "connector.bias"} | {
        f"llama_model.model.layers.{i}.self_attn.{m}.weight" for i in (0, 1) for m in ("q_proj", "v_proj")}
    assert not torch.equal(merged[q], fresh.state_dict()[q])
    result = fresh.load_state_dict(merged, strict=False)
    assert not result.unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(fresh(feats, ids), ref, rtol=0, atol=1e-5)

    with pytest.raises(CheckpointError, match="base weight .*q_proj.weight found neither"):
        merge_lora_state_dict(ckpt, 2.0)
    with pytest.raises(CheckpointError, match="no LoRA tensors"):
        merge_lora_state_dict({"connector.weight": ckpt["connector.weight"]}, 2.0)


def test_convert_merge_lora_checkpoint(llm_dir: Path, tmp_path: Path, capsys) -> None:
    """merge-lora: a runner checkpoint with PEFT keys -> plain merged checkpoint and HF folder."""
    import transformers

    from videollm.checkpoint import load_file
    from videollm.convert import main, merge_lora_checkpoint

    model = _model(llm_dir, LoRAConfig(r=R, alpha=8, dropout=0.0))
    _train(model, 2)
    model.eval()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    src = tmp_path / "checkpoint_1.pth"
    config = {"model": {"arch": "tiny_vlm", "lora": {"r": R, "alpha": 8}}}
    torch.save({"model": {k: v for k, v in model.state_dict().items() if k in trainable},
                "optimizer": {"state": {}}, "config": config, "epoch": 1}, src)
    feats, ids = _batch()
    with torch.no_grad():
        ref = model(feats, ids)

    target = _model(llm_dir, LoRAConfig(r=R, alpha=8))  # as the model of --cfg-path is built
    merge_lora_checkpoint(src, tmp_path / "merged.pth", model=target, hf_out=tmp_path / "hf")
    out = load_file(tmp_path / "merged.pth")
    assert "optimizer" not in out and out["epoch"] == 1 and "lora" not in out["config"]["model"]
    assert out["merged_lora"]["r"] == R
    assert not any("base_model" in k or "lora_" in k for k in out["model"])
    plain = _model(llm_dir).eval()
    assert not plain.load_state_dict(out["model"], strict=False).unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(plain(feats, ids), ref, rtol=0, atol=1e-5)
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
        torch.testing.assert_close(hf(ids).logits, plain.llama_model(ids).logits, rtol=0, atol=1e-5)

    wrong_r = _model(llm_dir, LoRAConfig(r=2, alpha=8))
    with pytest.raises(ConfigError, match=r"model\.lora\.r: 2, but the checkpoint's LoRA rank is \[4\]"):
        merge_lora_checkpoint(src, tmp_path / "x.pth", model=wrong_r)
    # the command line: a config without model.lora is refused with a message, no traceback
    assert main(["merge-lora", str(src), str(tmp_path / "y.pth"), "--cfg-path", "eval_configs/tiny.yaml"]) == 1
    assert "model.lora is not set" in capsys.readouterr().err
    bare = tmp_path / "bare.pth"
    torch.save({"connector.weight": torch.zeros(2, 2)}, bare)
    assert main(["merge-lora", str(bare), str(tmp_path / "z.pth"), "--cfg-path", "eval_configs/tiny.yaml"]) == 1
    assert "holds no LoRA tensors" in capsys.readouterr().err


def test_modules_to_save_train_save_and_merge(llm_dir: Path, tmp_path: Path) -> None:
    """A module trained in full next to LoRA (lm_head) is saved with the adapter and merged under its plain name."""
    cfg = LoRAConfig(r=R, alpha=8, dropout=0.0, modules_to_save=["lm_head"])
    model = _model(llm_dir, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "llama_model.base_model.model.lm_head.modules_to_save.default.weight" in trainable
    _train(model, 2)
    model.eval()
    feats, ids = _batch()
    with torch.no_grad():
        ref = model(feats, ids)
    fresh = _model(llm_dir, cfg)
    fresh.connector.load_state_dict(model.connector.state_dict())
    load_adapter(fresh, "llama_model", save_adapter(model, "llama_model", tmp_path / "a"))
    ckpt = {k: v for k, v in model.state_dict().items() if k in trainable}
    plain = _model(llm_dir).eval()
    merged = merge_lora_state_dict(ckpt, cfg.scaling, base=plain.state_dict())
    assert "llama_model.lm_head.weight" in merged
    plain.load_state_dict(merged, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(feats, ids), ref, rtol=0, atol=0)
        torch.testing.assert_close(plain(feats, ids), ref, rtol=0, atol=1e-5)

"""apply_delta / make_delta on tiny LLaMAs: FastChat v0 semantics, exact round trips, streaming I/O."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file as st_load
from transformers import LlamaConfig, LlamaForCausalLM

from videollm.checkpoint import load_model_state
from videollm.delta import _add, _subtract, apply_delta, make_delta
from videollm.errors import CheckpointError

REPO = Path(__file__).resolve().parents[1]
BASE_VOCAB, DELTA_VOCAB = 100, 101  # the delta adds [PAD], like Vicuna v0's 32000 -> 32001


def _config(vocab: int, intermediate: int = 32) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, intermediate_size=intermediate, max_position_embeddings=64)


def _save_model(folder: Path, vocab: int, seed: int, *, grid: bool = True, intermediate: int = 32,
                tokenizer: bool = True) -> LlamaForCausalLM:
    """A random tiny LLaMA saved in sharded safetensors (several shards), with fake tokenizer files.

    ``grid=True`` puts every weight on multiples of 2**-12, so fp32 sums and differences are exact
    and round trips can be compared bit for bit.
    """
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_config(vocab, intermediate)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
            if grid:
                p.copy_(torch.round(p * 4096) / 4096)
    model.save_pretrained(folder, max_shard_size="8KB")
    assert len(list(folder.glob("model-*.safetensors"))) > 2
    if tokenizer:  # contents differ per folder, so the test can tell whose files were copied
        (folder / "tokenizer.model").write_bytes(os.urandom(64))
        (folder / "tokenizer_config.json").write_text(json.dumps({"seed": seed, "pad_token": "[PAD]"}))
        (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "[PAD]", "seed": seed}))
    return model


def _to_bin(folder: Path, extra: dict[str, torch.Tensor] | None = None) -> None:
    """Rewrite a safetensors model folder as ``pytorch_model-*.bin`` shards + index, as older
    checkpoints ship (``extra`` tensors go into the first shard)."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    weight_map = {}
    for i, shard in enumerate(shards):
        state = st_load(folder / shard)
        if i == 0 and extra:
            state.update(extra)
        name = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        torch.save(state, folder / name)
        weight_map.update({k: name for k in state})
        (folder / shard).unlink()
    (folder / "model.safetensors.index.json").unlink()
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("delta")
    base = _save_model(root / "base", BASE_VOCAB, seed=0)
    delta = _save_model(root / "delta", DELTA_VOCAB, seed=1)
    return root, base, delta


def _naive_target(base: LlamaForCausalLM, delta: LlamaForCausalLM) -> LlamaForCausalLM:
    """What the original script does: resize the base embeddings, zero the new rows, add in place."""
    target = LlamaForCausalLM(_config(BASE_VOCAB)).eval()
    target.load_state_dict(base.state_dict())
    target.resize_token_embeddings(DELTA_VOCAB)
    with torch.no_grad():
        target.get_input_embeddings().weight[BASE_VOCAB:] = 0
        target.get_output_embeddings().weight[BASE_VOCAB:] = 0
        delta_state = delta.state_dict()
        for name, param in target.state_dict().items():
            param += delta_state[name]
    return target


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_apply_matches_original_method_and_loads(models, tmp_path, fmt, monkeypatch):
    root, base_model, delta_model = models
    # read/compute 3 rows at a time, so chunks also end inside and past the base's vocab
    monkeypatch.setattr("videollm.delta.CHUNK_ELEMENTS", 48)
    base_dir, delta_dir = root / "base", root / "delta"
    if fmt == "bin":  # .bin shards for both inputs, the base with old persistent inv_freq buffers
        for src, name in ((base_dir, "base_bin"), (delta_dir, "delta_bin")):
            (tmp_path / name).mkdir()
            for f in src.iterdir():
                (tmp_path / name / f.name).write_bytes(f.read_bytes())
        inv_freq = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(4) for i in range(2)}
        _to_bin(tmp_path / "base_bin", extra=inv_freq)
        _to_bin(tmp_path / "delta_bin")
        base_dir, delta_dir = tmp_path / "base_bin", tmp_path / "delta_bin"

    result = apply_delta(base_dir, tmp_path / "target", delta_dir, max_shard_size=6000)
    target_dir = tmp_path / "target"
    assert result.vocab_size == DELTA_VOCAB and result.num_tensors == len(base_model.state_dict())
    assert (target_dir / "model.safetensors.index.json").is_file() and len(list(target_dir.glob("model-*"))) > 2

    # tensor by tensor: zero-padded base + delta, exactly; inv_freq dropped
    out = load_model_state(target_dir)
    base_sd, delta_sd = base_model.state_dict(), delta_model.state_dict()
    assert out.keys() == base_sd.keys()
    for name, tensor in out.items():
        b = base_sd[name]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert tensor.shape == (DELTA_VOCAB, 16)
            assert torch.equal(tensor[BASE_VOCAB:], delta_sd[name][BASE_VOCAB:])  # new [PAD] row: 0 + delta
            b = torch.cat([b, torch.zeros(1, 16)])
        assert tensor.dtype == torch.float32 and torch.equal(tensor, b + delta_sd[name]), name

    # the delta's tokenizer files and config, not the base's
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
        assert (target_dir / name).read_bytes() == (root / "delta" / name).read_bytes(), name

    # loads in transformers and gives the logits of the original in-memory method
    loaded = LlamaForCausalLM.from_pretrained(target_dir).eval()
    naive = _naive_target(base_model, delta_model)
    ids = torch.tensor([[1, 5, 99, 100, 42, 7]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, naive(ids).logits)


def test_make_delta_round_trips_exactly(models, tmp_path, monkeypatch):
    root, _, delta_model = models
    monkeypatch.setattr("videollm.delta.CHUNK_ELEMENTS", 64)
    apply_delta(root / "base", tmp_path / "target", root / "delta")
    assert (tmp_path / "target" / "model.safetensors").is_file()  # one shard at the default size
    result = make_delta(root / "base", tmp_path / "target", tmp_path / "delta2", max_shard_size=5000)
    assert result.inexact_elements == 0 and result.vocab_size == DELTA_VOCAB
    delta2 = load_model_state(tmp_path / "delta2")
    for name, tensor in delta_model.state_dict().items():
        assert torch.equal(delta2[name], tensor), name
    apply_delta(root / "base", tmp_path / "target2", tmp_path / "delta2")
    assert (tmp_path / "target2" / "model.safetensors").read_bytes() == (tmp_path / "target" / "model.safetensors").read_bytes()


def test_make_delta_then_apply_off_grid(tmp_path):
    """Off the grid in fp32: a target made by adding to the base round-trips bit for bit; for an
    unrelated target, the elements that cannot are counted exactly and are off by a rounding."""
    base = _save_model(tmp_path / "base", BASE_VOCAB, seed=2, grid=False)
    unrelated = _save_model(tmp_path / "unrelated", DELTA_VOCAB, seed=3, grid=False)
    tuned = LlamaForCausalLM(_config(DELTA_VOCAB)).eval()
    tuned.load_state_dict(unrelated.state_dict())
    with torch.no_grad():  # a fine-tune: base + a small change, in fp32
        for name, p in tuned.named_parameters():
            b = base.state_dict()[name]
            p[: b.shape[0]] = b + 0.01 * p[: b.shape[0]]
    tuned.save_pretrained(tmp_path / "tuned", max_shard_size="8KB")

    for name, target in (("tuned", tuned), ("unrelated", unrelated)):
        result = make_delta(tmp_path / "base", tmp_path / name, tmp_path / f"delta_{name}")
        apply_delta(tmp_path / "base", tmp_path / f"out_{name}", tmp_path / f"delta_{name}")
        out = load_model_state(tmp_path / f"out_{name}")
        missed = sum(int((out[n] != t).sum()) for n, t in target.state_dict().items())
        assert missed == result.inexact_elements
        if name == "tuned":
            assert missed == 0
        else:
            assert missed > 0  # (t - b) + b != t in fp32 for unrelated t and b
            for n, t in target.state_dict().items():
                torch.testing.assert_close(out[n], t, rtol=0, atol=1e-6)


def test_fp16_delta_inexact_is_reported_fp32_delta_is_exact():
    torch.manual_seed(0)
    base = (torch.randn(300, 64) * 0.02).half()
    target = torch.cat([(base.float() + torch.randn(300, 64) * 2e-4).half(), torch.randn(1, 64).half()])
    delta16, inexact16 = _subtract(target, base, torch.float16)
    assert delta16.dtype == torch.float16
    assert inexact16 == int((_add(base, delta16, torch.float16) != target).sum()) > 0
    delta32, inexact32 = _subtract(target, base, torch.float32)
    assert inexact32 == 0 and torch.equal(_add(base, delta32, torch.float16), target)


def test_output_dtype_follows_delta_or_flag(models, tmp_path):
    root, _, _ = models
    apply_delta(root / "base", tmp_path / "t16", root / "delta", dtype=torch.float16)
    out = load_model_state(tmp_path / "t16")
    assert {t.dtype for t in out.values()} == {torch.float16}
    assert LlamaForCausalLM.from_pretrained(tmp_path / "t16").config.vocab_size == DELTA_VOCAB


def _assert_nothing_written(target: Path) -> None:
    assert not target.exists() or not any(target.iterdir())


def test_mismatched_shape_fails_before_writing(models, tmp_path):
    root, _, _ = models
    _save_model(tmp_path / "wide", DELTA_VOCAB, seed=4, intermediate=48)
    with pytest.raises(CheckpointError, match=r"wide: delta tensor model\.layers\.0\.mlp\.(gate|up)_proj\.weight has "
                                              r"shape \(48, 16\) but the base .*base has \(32, 16\)"):
        apply_delta(root / "base", tmp_path / "target", tmp_path / "wide")
    _assert_nothing_written(tmp_path / "target")
    # a delta whose vocab is smaller than the base's (arguments swapped)
    (tmp_path / "empty_target").mkdir()
    with pytest.raises(CheckpointError, match=r"embed_tokens\.weight has shape \(100, 16\) but the base .* \(101, 16\)"):
        apply_delta(root / "delta", tmp_path / "empty_target", root / "base")
    _assert_nothing_written(tmp_path / "empty_target")


def test_missing_or_extra_tensor_fails_before_writing(models, tmp_path):
    root, _, _ = models
    bad = tmp_path / "bad_delta"
    bad.mkdir()
    state = load_model_state(root / "delta")
    state["model.layers.1.mlp.up_proj.weights"] = state.pop("model.layers.1.mlp.up_proj.weight")  # renamed
    torch.save(state, bad / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"base tensor model\.layers\.1\.mlp\.up_proj\.weight is missing from "
                                              r"the delta .*did you mean model\.layers\.1\.mlp\.up_proj\.weights"):
        apply_delta(root / "base", tmp_path / "target", bad)
    _assert_nothing_written(tmp_path / "target")
    state = load_model_state(root / "delta")
    state["model.vision_tower.weight"] = torch.zeros(2)
    torch.save(state, bad / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"delta has 1 tensors the base .* lacks \(first: model\.vision_tower\.weight\)"):
        apply_delta(root / "base", tmp_path / "target", bad)
    _assert_nothing_written(tmp_path / "target")


def test_config_fallback_and_vocab_check(models, tmp_path):
    root, _, _ = models
    delta = tmp_path / "delta"
    delta.mkdir()
    for f in (root / "delta").iterdir():
        if f.name != "config.json":
            (delta / f.name).write_bytes(f.read_bytes())
    apply_delta(root / "base", tmp_path / "target", delta)  # no delta config: the base's, vocab updated
    config = json.loads((tmp_path / "target" / "config.json").read_text())
    assert config["vocab_size"] == DELTA_VOCAB and config["hidden_size"] == 16
    assert LlamaForCausalLM.from_pretrained(tmp_path / "target").config.vocab_size == DELTA_VOCAB
    (delta / "config.json").write_text(json.dumps({**config, "vocab_size": 32001}))
    with pytest.raises(CheckpointError, match=r"delta/config\.json: vocab_size 32001 disagrees with the delta's embedding rows \(101\)"):
        apply_delta(root / "base", tmp_path / "target2", delta)
    _assert_nothing_written(tmp_path / "target2")


def test_non_empty_target_refused(models, tmp_path):
    root, _, _ = models
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="target folder exists and is not empty"):
        apply_delta(root / "base", tmp_path / "target", root / "delta")
    assert os.listdir(tmp_path / "target") == ["keep.txt"]
    with pytest.raises(CheckpointError, match="must differ from the base folder"):
        apply_delta(root / "base", root / "base", root / "delta")


def test_cli_original_spellings_and_errors(models, tmp_path):
    root, _, _ = models
    cmd = [sys.executable, str(REPO / "apply_delta.py"), "--base-model-path", str(root / "base"),
           "--target-model-path", str(tmp_path / "vicuna"), "--delta-path", str(root / "delta")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "vocab 101" in done.stdout
    assert LlamaForCausalLM.from_pretrained(tmp_path / "vicuna").config.vocab_size == DELTA_VOCAB
    cmd = [sys.executable, str(REPO / "apply_delta.py"), "--make-delta", "--base", str(root / "base"),
           "--target", str(tmp_path / "vicuna"), "--delta", str(root / "delta")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 1 and "CheckpointError" in done.stderr and "not empty" in done.stderr


@pytest.mark.slow
def test_streamed_apply_peak_memory_stays_below_one_model(tmp_path):
    """~58 M-param fp16 LLaMA in 50 MB safetensors shards: the apply's peak RSS above the child's
    post-import baseline must stay under one model's size (the original method needs over two)."""
    cmd = [sys.executable, str(REPO / "bench" / "apply_delta_memory.py"), "--hidden", "512", "--layers", "8",
           "--intermediate", "1376", "--heads", "8", "--shard-mb", "50", "--methods", "stream", "--json",
           "--workdir", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    run = summary["results"]["stream"]
    assert summary["params"] > 50e6
    above = run["peak"] - run["baseline"]
    assert 0 < above < summary["base_bytes"] < summary["base_bytes"] + summary["delta_bytes"]
    assert LlamaForCausalLM.from_pretrained(tmp_path / "target_stream").config.vocab_size == 32001

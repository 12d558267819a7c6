"""Safe checkpoint I/O: weights-only loading, atomic saving, HF shard listing, load reports."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from videollm import checkpoint as ck
from videollm.errors import CheckpointError


def _training_checkpoint() -> dict:
    """The layout of the original runner's checkpoints, with a real AdamW state."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    config = {"model": {"arch": "video_llama", "num_query_token": 32, "llama_model": "/ckpt/llama"},
              "run": {"init_lr": 1e-4, "betas": [0.9, 0.999], "amp": True, "resume_ckpt_path": None}}
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "config": config, "scaler": None, "epoch": 2}


def test_training_checkpoint_loads_weights_only(tmp_path):
    ckpt = _training_checkpoint()
    torch.save(ckpt, tmp_path / "checkpoint_2.pth")
    out = ck.load_file(tmp_path / "checkpoint_2.pth")
    assert out["epoch"] == 2 and out["config"] == ckpt["config"] and out["scaler"] is None
    assert out["optimizer"]["param_groups"][0]["weight_decay"] == 0.05
    torch.testing.assert_close(out["optimizer"]["state"][0]["exp_avg"], ckpt["optimizer"]["state"][0]["exp_avg"])
    state = ck.load_model_state(tmp_path / "checkpoint_2.pth")
    assert state.keys() == ckpt["model"].keys()
    assert all(torch.equal(state[k], ckpt["model"][k]) for k in state)


def test_bare_state_dict_and_safetensors(tmp_path):
    sd = {"a.weight": torch.randn(3, 2), "b": torch.arange(4)}
    torch.save(sd, tmp_path / "sd.bin")
    save_file(sd, tmp_path / "sd.safetensors")
    for name in ("sd.bin", "sd.safetensors"):
        state = ck.load_model_state(tmp_path / name)
        assert state.keys() == sd.keys() and torch.equal(state["a.weight"], sd["a.weight"])


def test_not_a_state_dict(tmp_path):
    torch.save({"model": {"w": torch.zeros(1), "step": 3}}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match=r"x\.pth.*'step' is a int"):
        ck.load_model_state(tmp_path / "x.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match=r"list\.pth: holds a list"):
        ck.load_file(tmp_path / "list.pth")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling it would create a directory
        return (os.mkdir, (self.marker,))


def test_unsafe_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {"w": torch.zeros(2)}, "x": _Payload(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused: .*arbitrary code.*mkdir") as info:
        ck.load_file(tmp_path / "evil.pth")
    assert "add_safe_globals" in str(info.value) and "convert" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_plain_pickle_needing_code_is_refused_not_called_corrupt(tmp_path, protocol):
    # pickle.dump (not torch.save) with a modern protocol: torch's safe unpickler stops at an
    # opcode it does not parse, so the refusal comes from the static scan of the pickle.
    marker = tmp_path / "pwned"
    path = tmp_path / f"plain{protocol}.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": 1}, "x": _Payload(str(marker))}, f, protocol=protocol)
    with pytest.raises(CheckpointError, match=r"refused: .*mkdir") as info:
        ck.load_file(path)
    assert "corrupt" not in str(info.value)
    assert not marker.exists()


def test_omegaconf_config_is_refused_with_hint(tmp_path):
    from omegaconf import OmegaConf

    torch.save({"model": {}, "config": OmegaConf.create({"a": 1})}, tmp_path / "omega.pth")
    with pytest.raises(CheckpointError, match=r"omega\.pth: refused.*DictConfig.*OmegaConf\.to_container"):
        ck.load_file(tmp_path / "omega.pth")


def test_missing_corrupt_and_unknown_files(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pth: checkpoint does not exist"):
        ck.load_file(tmp_path / "nope.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all" * 5)
    with pytest.raises(CheckpointError, match=r"garbage\.pth: corrupt"):
        ck.load_file(tmp_path / "garbage.pth")
    torch.save({"w": torch.zeros(1000)}, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "half.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"half\.pth: corrupt or truncated"):
        ck.load_file(tmp_path / "half.pth")
    save_file({"w": torch.zeros(1000)}, tmp_path / "full.safetensors")
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "half.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"half\.safetensors: corrupt or truncated"):
        ck.load_file(tmp_path / "half.safetensors")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"w\.npz: unknown checkpoint type"):
        ck.load_file(tmp_path / "w.npz")


def test_save_atomic_roundtrip(tmp_path):
    path = tmp_path / "sub" / "ckpt.pth"
    ck.save_atomic({"model": {"w": torch.ones(3)}, "epoch": 1}, path)
    assert torch.equal(ck.load_model_state(path)["w"], torch.ones(3))
    ck.save_safetensors_atomic({"w": torch.ones(2, 2).t()}, tmp_path / "w.safetensors", metadata={"note": "x"})
    from safetensors import safe_open

    with safe_open(tmp_path / "w.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}
    assert sorted(os.listdir(tmp_path)) == ["sub", "w.safetensors"]
    assert os.listdir(tmp_path / "sub") == ["ckpt.pth"]


def test_save_atomic_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_0.pth"
    ck.save_atomic({"epoch": 0, "model": {"w": torch.zeros(4)}}, path)
    old_bytes = path.read_bytes()
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)  # write half of the file, then die
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ck.save_atomic({"epoch": 1, "model": {"w": torch.ones(4)}}, path)
    monkeypatch.undo()
    assert path.read_bytes() == old_bytes
    assert ck.load_file(path)["epoch"] == 0
    assert os.listdir(tmp_path) == ["checkpoint_0.pth"]  # no temporary file lingers

    import safetensors.torch

    def dying_save_file(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", dying_save_file)
    with pytest.raises(OSError, match="disk full"):
        ck.save_safetensors_atomic({"w": torch.ones(1)}, tmp_path / "new.safetensors")
    assert os.listdir(tmp_path) == ["checkpoint_0.pth"]


def test_iter_checkpoint_shards(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="no model weights found"):
        ck.iter_checkpoint_shards(folder)
    torch.save({"a": torch.zeros(1)}, folder / "pytorch_model.bin")
    assert ck.iter_checkpoint_shards(folder) == [folder / "pytorch_model.bin"]
    names = ["model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors"]
    for i, n in enumerate(names):
        save_file({f"t{i}": torch.zeros(1)}, folder / n)
    index = {"metadata": {}, "weight_map": {"t0": names[0], "t1": names[1], "t2": names[0]}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    # safetensors is preferred over .bin; shards come in file order
    assert ck.iter_checkpoint_shards(folder) == [folder / names[1], folder / names[0]]
    state = ck.load_model_state(folder)
    assert sorted(state) == ["t0", "t1"]
    (folder / names[0]).unlink()
    with pytest.raises(CheckpointError, match="00002-of-00002.safetensors, which is missing"):
        ck.iter_checkpoint_shards(folder)
    with pytest.raises(CheckpointError, match="not a model folder"):
        ck.iter_checkpoint_shards(tmp_path / "absent")


def test_report_load(caplog):
    missing = [f"llama_model.model.layers.{i}.mlp.up_proj.weight" for i in range(5)] + ["visual_encoder.cls_token"]
    unexpected = [f"llama_model.model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(5)]
    kwargs = dict(expected_missing_prefixes=("llama_model.", "visual_encoder."),
                  expected_unexpected_patterns=(r"rotary_emb\.inv_freq$",), source="finetune.pth")
    summary = ck.report_load(missing, unexpected, **kwargs)  # all expected: no error
    assert "expected missing: 6" in summary and "expected unexpected: 5" in summary

    bad_missing = missing + ["llama_proj.weight", "llama_proj.bias", "video_query_tokens"]
    with pytest.raises(CheckpointError) as info:
        ck.report_load(bad_missing, unexpected, **kwargs)
    msg = str(info.value)
    assert msg.startswith("finetune.pth: loaded with 9 missing and 5 unexpected keys")
    assert "NOT expected, missing from the file (3): llama_proj: 2 [llama_proj.weight, llama_proj.bias]; video_query_tokens: 1" in msg

    with pytest.raises(CheckpointError, match=r"in the file but not in the model \(1\): Qformer: 1 \[Qformer\.x\]"):
        ck.report_load(missing, unexpected + ["Qformer.x"], **kwargs)

    with caplog.at_level(logging.WARNING, logger="videollm.checkpoint"):
        summary = ck.report_load(bad_missing, [], strict=False, **kwargs)
    assert "llama_proj: 2" in summary and "llama_proj: 2" in caplog.text

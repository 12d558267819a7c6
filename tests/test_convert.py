"""``python -m videollm.convert``: strip, merge, pth <-> safetensors, export, inspect, safe loading."""

import json
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from videollm import convert
from videollm.checkpoint import load_model_state
from videollm.config import load_config
from videollm.errors import CheckpointError, ConfigError
from videollm.models.video_llama import VideoLLAMA

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "videollm/configs/models/video_llama_tiny.yaml"
AUDIO = dict(equip_audio_branch=True, frozen_audio_Qformer=False, frozen_video_Qformer=True, frozen_llama_proj=True)


def tiny_cfg(**overrides):
    cfg = OmegaConf.load(TINY).model
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def build(seed=0, **overrides):
    torch.manual_seed(seed)
    return VideoLLAMA.from_config(tiny_cfg(**overrides)).eval()


def runner_ckpt(model, epoch):
    """A checkpoint in the original runner's layout, with a fake AdamW state."""
    state = model.trainable_state_dict()
    optim = {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 1e-4, "params": [0]}]}
    return {"model": state, "optimizer": optim, "config": {"run": {"init_lr": 1e-4, "max_epoch": 5}, "model": {"arch": "video_llama"}},
            "scaler": None, "epoch": epoch}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    vl, al = root / "vl.pth", root / "al.pth"
    torch.save(runner_ckpt(build(seed=1), epoch=3), vl)
    torch.save(runner_ckpt(build(seed=2, **AUDIO), epoch=1), al)
    return {"vl": vl, "al": al, "root": root}


def assert_same_state(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------ strip


def test_strip_drops_training_state_and_keeps_the_model(ckpts, tmp_path):
    out = tmp_path / "release.pth"
    convert.strip_checkpoint(ckpts["vl"], out)
    before = torch.load(ckpts["vl"], weights_only=True)
    after = torch.load(out, weights_only=True)
    assert set(after) == {"model", "config", "epoch"}
    assert after["epoch"] == 3 and after["config"] == before["config"]
    assert_same_state(after["model"], before["model"])
    # the released file still loads as ckpt
    m = VideoLLAMA.from_config(tiny_cfg(ckpt=str(out)))
    assert torch.equal(m.video_query_tokens, before["model"]["video_query_tokens"])


# ------------------------------------------------------------------------------------ merge


def test_merge_loads_like_ckpt_plus_ckpt_2(ckpts, tmp_path):
    out = tmp_path / "merged.pth"
    merged = convert.merge_checkpoints(ckpts["vl"], ckpts["al"], out)
    vl = torch.load(ckpts["vl"], weights_only=True)["model"]
    al = torch.load(ckpts["al"], weights_only=True)["model"]
    assert set(merged["model"]) == set(vl) | set(al)
    assert [s["role"] for s in merged["merged_from"]] == ["ckpt", "ckpt_2"]
    assert merged["merged_from"][0]["path"] == str(ckpts["vl"]) and merged["merged_from"][1]["epoch"] == 1
    stored = torch.load(out, weights_only=True)
    assert "optimizer" not in stored and stored["merged_from"] == merged["merged_from"]

    one = build(seed=0, **dict(AUDIO, ckpt=str(out))).state_dict()
    two = build(seed=0, **dict(AUDIO, ckpt=str(ckpts["vl"]), ckpt_2=str(ckpts["al"]))).state_dict()
    assert_same_state(one, two)
    # and both branches really came from the files, not from the shared seed
    assert torch.equal(one["video_query_tokens"], vl["video_query_tokens"])
    assert torch.equal(one["audio_query_tokens"], al["audio_query_tokens"])


def test_merge_conflict_names_the_key(ckpts, tmp_path):
    al = torch.load(ckpts["al"], weights_only=True)
    vl = torch.load(ckpts["vl"], weights_only=True)
    al["model"]["llama_proj.weight"] = vl["model"]["llama_proj.weight"] + 1  # disagrees with the VL file
    torch.save(al, tmp_path / "al_bad.pth")
    with pytest.raises(CheckpointError, match=r"llama_proj\.weight is also in .*vl\.pth with a different value"):
        convert.merge_checkpoints(ckpts["vl"], tmp_path / "al_bad.pth", tmp_path / "m.pth")
    assert not (tmp_path / "m.pth").exists()
    with pytest.raises(CheckpointError, match="swap the two arguments"):
        convert.merge_checkpoints(ckpts["al"], ckpts["vl"], tmp_path / "m.pth")


# ---------------------------------------------------------------------------- pth <-> safetensors


def test_pth_safetensors_pth_round_trip_is_exact(ckpts, tmp_path):
    src = torch.load(ckpts["vl"], weights_only=True)
    state = dict(src["model"])
    state["extra.half"] = torch.randn(4, 3).to(torch.bfloat16)
    state["extra.tied"] = state["llama_proj.weight"]  # two names, one tensor
    state["extra.view"] = state["video_query_tokens"][0, :2]  # a view into another tensor
    src["model"] = state
    torch.save(src, tmp_path / "in.pth")

    convert.to_safetensors(tmp_path / "in.pth", tmp_path / "a.safetensors")
    as_state = load_model_state(tmp_path / "a.safetensors")  # loads directly as a state dict
    assert set(as_state) == set(state)
    convert.to_pth(tmp_path / "a.safetensors", tmp_path / "out.pth")
    back = torch.load(tmp_path / "out.pth", weights_only=True)

    assert set(back) == {"model", "config", "epoch"}  # optimizer/scaler dropped
    assert back["config"] == src["config"] and back["epoch"] == src["epoch"]
    assert_same_state(back["model"], state)
    assert back["model"]["extra.tied"].data_ptr() == back["model"]["llama_proj.weight"].data_ptr()


def test_bare_state_dict_round_trip_stays_bare(tmp_path):
    state = {"a.weight": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)}
    torch.save(state, tmp_path / "bare.pth")
    convert.to_safetensors(tmp_path / "bare.pth", tmp_path / "bare.safetensors")
    convert.to_pth(tmp_path / "bare.safetensors", tmp_path / "bare2.pth")
    back = torch.load(tmp_path / "bare2.pth", weights_only=True)
    assert_same_state(back, state)
    with pytest.raises(CheckpointError, match="must end in .safetensors"):
        convert.to_safetensors(tmp_path / "bare.pth", tmp_path / "x.pth")


# ------------------------------------------------------------------------------------ export


def _batch():
    g = torch.Generator().manual_seed(0)
    return {"image": torch.randn(2, 3, 4, 32, 32, generator=g), "text_input": ["a red square moves", "two blue dots"]}


@torch.no_grad()
def _outputs(model):
    random.seed(0)  # the prompt is drawn with Python's random
    loss = model(_batch())["loss"]
    embeds, _ = model.encode_videoQformer_visual(_batch()["image"][:1])
    bos = model.embed_tokens(torch.tensor([[model.llama_tokenizer.bos_token_id]]))
    tokens = model.generate(torch.cat([bos, embeds], 1), max_new_tokens=6, do_sample=False, min_length=6)
    return loss, tokens


def test_export_round_trip_gives_identical_outputs(ckpts, tmp_path, monkeypatch):
    cfg_path = tmp_path / "eval.yaml"
    cfg_path.write_text(
        "model:\n  arch: video_llama\n  model_type: tiny\n"
        f"  ckpt: {ckpts['vl']}\n"
        "  prompt_path: prompts/alignment_image.txt\n  prompt_template: '###Human: {} ###Assistant: '\n  max_txt_len: 64\n"
        "datasets:\n  webvid:\n    vis_processor:\n      train: {name: alpro_video_eval, n_frms: 4, image_size: 32}\n"
        "    text_processor:\n      train: {name: blip_caption}\nrun:\n  task: video_text_pretrain\n"
    )
    torch.manual_seed(0)
    ref = VideoLLAMA.from_config(load_config(cfg_path).model).eval()
    torch.manual_seed(0)  # export builds the same random encoders and LLM
    out_cfg = convert.export_folder(cfg_path, tmp_path / "export")
    out = tmp_path / "export"
    assert out_cfg == out.resolve() / "config.yaml"
    assert (out / "adapter.safetensors").is_file() and (out / "llm" / "config.json").is_file()
    assert (out / "tokenizer" / "tokenizer.model").is_file() and (out / "prompts" / "alignment_image.txt").is_file()
    model_node = OmegaConf.load(out_cfg).model
    for key in ("llama_model", "tokenizer", "vit_ckpt", "q_former_model", "ckpt", "prompt_path"):
        assert model_node[key].startswith("./") and (out / model_node[key]).resolve().is_relative_to(out.resolve()), key
    adapter = load_model_state(out / "adapter.safetensors")
    assert convert.branch_kind(list(adapter)) == "VL" and "llama_model.lm_head.weight" not in adapter

    torch.manual_seed(123)  # weights must come from the folder, not the seed
    again = VideoLLAMA.from_config(load_config(out_cfg).model).eval()
    torch.manual_seed(321)
    with monkeypatch.context() as mp:  # the folder's relative paths, read as written from inside it
        mp.chdir(out)
        plain = VideoLLAMA.from_config(model_node).eval()
    assert_same_state(again.state_dict(), ref.state_dict())
    assert_same_state(plain.state_dict(), ref.state_dict())
    loss_ref, tokens_ref = _outputs(ref)
    loss_again, tokens_again = _outputs(again)
    assert torch.equal(loss_ref, loss_again) and torch.equal(tokens_ref, tokens_again)
    text = "###Human: <Video><ImageHere></Video> hello ###Assistant:"
    assert again.llama_tokenizer(text)["input_ids"] == ref.llama_tokenizer(text)["input_ids"]
    assert len(again.llama_tokenizer) == len(ref.llama_tokenizer)

    with pytest.raises(ConfigError, match="not empty"):
        convert.export_folder(cfg_path, out)

    # Re-exporting an export: every part has a file now, so nothing is built; links only.
    def no_build(*a, **k):
        raise AssertionError("export built a model although every part has a file")

    monkeypatch.setattr(VideoLLAMA, "from_config", no_build)
    cfg2 = convert.export_folder(out_cfg, tmp_path / "export2", link="symlink")
    assert (tmp_path / "export2" / "llm").is_symlink()
    monkeypatch.undo()
    third = VideoLLAMA.from_config(load_config(cfg2).model).eval()
    assert_same_state(third.state_dict(), ref.state_dict())


# ------------------------------------------------------------------------------------ inspect


def test_inspect_identifies_branch_and_fitting_preset(ckpts):
    report = convert.inspect_checkpoint(ckpts["vl"], preset="tiny")
    assert report["branch"] == "VL" and report["role"] == "ckpt"
    assert report["entries"]["epoch"] == 3 and "optimizer" in report["entries"]
    groups = report["groups"]
    assert "video_Qformer" in groups and "llama_proj" in groups and "audio_Qformer" not in groups
    assert groups["llama_proj"]["params"] == 64 * 64 + 64 and groups["llama_proj"]["dtypes"] == ["float32"]
    assert report["total_params"] == sum(g["params"] for g in groups.values())
    assert groups["Qformer"]["params"] == 0 and groups["Qformer"]["buffer_elements"] == 512  # position_ids only
    tiny = report["candidates"]["tiny"]
    assert tiny["shape_mismatches"] == [] and tiny["missing_as_ckpt"] == [] and tiny["unexpected"] == []
    assert tiny["missing_as_ckpt_2"]  # it does not hold the audio branch
    assert tiny["loads_as"] == ["ckpt"] and report["fits"] == ["tiny"]

    wrong = convert.inspect_checkpoint(ckpts["vl"], preset="vicuna7b")
    mism = {m["key"]: m for m in wrong["candidates"]["vicuna7b"]["shape_mismatches"]}
    assert mism["llama_proj.weight"]["model"] == [4096, 768] and mism["llama_proj.weight"]["file"] == [64, 64]
    assert wrong["fits"] == [] and wrong["candidates"]["vicuna7b"]["loads_as"] == []


VL_RUN = dict(frozen_video_Qformer=False, frozen_llama_proj=False)
AL_RUN = dict(equip_audio_branch=True, frozen_audio_Qformer=False, imagebind_ckpt_path="")


@pytest.mark.parametrize(
    "preset, run, kind, role, expected",
    [("vicuna7b", VL_RUN, "VL", "ckpt", 22_104_064), ("llama2_13b", VL_RUN, "VL", "ckpt", 22_891_520),
     ("vicuna7b", AL_RUN, "AL", "ckpt_2", 22_855_680)],
)
def test_parameter_count_of_full_size_checkpoints_matches_the_original(preset, run, kind, role, expected):
    """The original's checkpoints hold 22,104,064 (VL 7B) / 22,891,520 (VL 13B) / 22,855,680 (AL 7B) parameters."""
    node = OmegaConf.load(REPO / f"videollm/configs/models/video_llama_{preset}.yaml").model
    node.update(llama_model="", vit_ckpt="", q_former_model="", tokenizer="tiny", **run)
    with torch.device("meta"):
        state = VideoLLAMA.from_config(node).trainable_state_dict()
    groups = convert.summarize_state(state)
    assert sum(g["params"] for g in groups.values()) == expected
    assert convert.branch_kind(list(state)) == kind
    assert convert.fit_report(state, convert._meta_model(node).state_dict())["loads_as"] == [role]


def test_inspect_audio_checkpoint_json(ckpts, capsys):
    assert convert.main(["inspect", str(ckpts["al"]), "--preset", "tiny", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["branch"] == "AL" and report["role"] == "ckpt_2"
    assert report["candidates"]["tiny"]["loads_as"] == ["ckpt_2"]
    assert report["groups"]["audio_Qformer"]["tensors"]["audio_Qformer.bert.embeddings.position_ids"]["dtype"] == "int64"
    assert convert.main(["inspect", str(ckpts["vl"]), "--preset", "tiny", "--no-keys"]) == 0
    text = capsys.readouterr().out
    assert "branch: VL" in text and "model tiny: fits; loads cleanly as ckpt" in text


# ------------------------------------------------------------------------------------ safety, CLI


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.fixture
def evil(tmp_path):
    """A torch.save file whose unpickling would call ``print`` (any code could be there)."""
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "config": Evil()}, path)
    return path


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_unsafe_pickle_is_refused_everywhere(evil, tmp_path, capsys):
    for call in (
        lambda: convert.strip_checkpoint(evil, tmp_path / "o.pth"),
        lambda: convert.to_safetensors(evil, tmp_path / "o.safetensors"),
        lambda: convert.inspect_checkpoint(evil, preset="tiny"),
        lambda: convert.merge_checkpoints(evil, evil, tmp_path / "o.pth"),
    ):
        with pytest.raises(CheckpointError, match=r"evil\.pth: refused: unpickling it would run arbitrary code \(it needs print"):
            call()
    # a plain pickle (not torch's zip format) is refused too, though torch's reason is vaguer
    raw = tmp_path / "raw.pth"
    with open(raw, "wb") as f:
        pickle.dump({"model": Evil()}, f)
    with pytest.raises(CheckpointError, match=r"raw\.pth"):
        convert.strip_checkpoint(raw, tmp_path / "o.pth")
    assert "pwned" not in capsys.readouterr().out
    assert not (tmp_path / "o.pth").exists() and not (tmp_path / "o.safetensors").exists()


def test_cli_strip_and_error_exit(ckpts, evil, tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "videollm.convert", *map(str, a)], cwd=REPO, capture_output=True, text=True)
    ok = run("strip", ckpts["vl"], tmp_path / "s.safetensors")
    assert ok.returncode == 0, ok.stderr
    assert set(convert.read_checkpoint(tmp_path / "s.safetensors")[0]) == {"model", "config", "epoch"}
    bad = run("strip", evil, tmp_path / "o.pth")
    assert bad.returncode == 1
    assert "Traceback" not in bad.stderr
    last = bad.stderr.strip().splitlines()
    assert len(last) == 1 and last[0].startswith("error: CheckpointError: ") and "evil.pth: refused" in last[0]


def test_export_with_audio_branch_and_overwrite_safety(ckpts, tmp_path):
    cfg_path = tmp_path / "eval_audio.yaml"
    cfg_path.write_text(
        "model:\n  arch: video_llama\n  model_type: tiny\n  equip_audio_branch: true\n"
        f"  ckpt: {ckpts['vl']}\n  ckpt_2: {ckpts['al']}\n"
    )
    torch.manual_seed(0)
    ref = VideoLLAMA.from_config(load_config(cfg_path).model).eval()
    torch.manual_seed(0)
    out_cfg = convert.export_folder(cfg_path, tmp_path / "export")
    assert convert.branch_kind(list(load_model_state(tmp_path / "export" / "adapter.safetensors"))) == "VL+AL"
    torch.manual_seed(5)
    again = VideoLLAMA.from_config(load_config(out_cfg).model).eval()
    assert_same_state(again.state_dict(), ref.state_dict())
    audio = torch.randn(1, 2, 1, 128, 204, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ref.encode_audioQformer(audio)[0], again.encode_audioQformer(audio)[0])

    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not an earlier export"):
        convert.export_folder(cfg_path, other, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"

"""Common data formats (sharegpt, llava_video, videochat2_it): the published record shapes,
malformed records skipped and named, segments, fps sampling and the pixel cap, and one batch of
each format through every model's batch processor and forward pass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from videollm import synthetic
from videollm.datasets.bad_samples import BadSample
from videollm.datasets.formats import FormatDataset, FrameSampling
from videollm.registry import registry

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "videollm/configs/models"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """clips/a.mp4 (16 frames, 8 fps, 48x32), clips/b.mp4, images/c.png (40x24)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("media")
    for name, color in (("a", "red"), ("b", "blue")):
        spec = synthetic.ClipSpec(name=name, shape="circle", color=color, direction="left", speed="slow", seed=1)
        synthetic.write_clip(root / "clips" / f"{name}.mp4", spec, width=48, height=32, fps=8, duration=2.0)
    (root / "images").mkdir()
    Image.fromarray(np.full((24, 40, 3), 120, dtype=np.uint8)).save(root / "images" / "c.png")
    return root


def write(tmp_path: Path, records) -> str:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return str(path)


def build(name: str, ann: str, root: Path, **info):
    cfg = OmegaConf.create({"build_info": {"anno_path": ann, "media_dir": str(root), **info}})
    return registry.get_builder_class(name).from_config(cfg, merge_defaults=True).build_datasets()["train"]


def bad_of(ds):
    return {i: s.reason for i, s in enumerate(ds[i] for i in range(len(ds))) if isinstance(s, BadSample)}


# ------------------------------------------------------------------------ the published shapes
SHAREGPT = [
    {"messages": [{"role": "user", "content": "<video>What is moving?"},
                  {"role": "assistant", "content": "A red circle."}], "videos": ["clips/a.mp4"]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>Colour?"},
                  {"role": "assistant", "content": "Grey."}, {"role": "user", "content": "Sure?"},
                  {"role": "assistant", "content": "Yes."}], "images": ["images/c.png"]},
    {"conversations": [{"from": "human", "value": "<video>And this?"}, {"from": "gpt", "value": "Blue."}],
     "system": "Answer.", "videos": ["clips/b.mp4"]},
    # malformed: two tags but one path; a missing file; a video list without any tag; bad roles
    {"messages": [{"role": "user", "content": "<video><video>Both?"}, {"role": "assistant", "content": "x"}],
     "videos": ["clips/a.mp4"]},
    {"messages": [{"role": "user", "content": "<video>Here?"}, {"role": "assistant", "content": "x"}],
     "videos": ["clips/nope.mp4"]},
    {"messages": [{"role": "user", "content": "No tag"}, {"role": "assistant", "content": "x"}],
     "videos": ["clips/a.mp4"]},
    {"messages": [{"role": "assistant", "content": "<video>x"}, {"role": "user", "content": "y"}],
     "videos": ["clips/a.mp4"]},
    "not a record",
]


def test_sharegpt_records_and_malformed_ones(tmp_path, media):
    ds = build("sharegpt", write(tmp_path, SHAREGPT), media, n_frms=4, image_size=32)
    assert bad_of(ds) == {3: "bad_annotation", 4: "missing", 5: "bad_annotation", 6: "bad_annotation",
                          7: "bad_annotation"}
    s0, s1, s2 = ds[0], ds[1], ds[2]
    assert s0["kind"] == "video" and tuple(s0["image"].shape) == (3, 4, 32, 32)
    assert s0["conversations"] == [{"from": "human", "value": "<video>What is moving?"},
                                   {"from": "gpt", "value": "A red circle."}]
    assert s0["media_msg"].startswith("The video contains 4 frames sampled at")
    assert s1["kind"] == "image" and tuple(s1["image"].shape) == (3, 32, 32) and s1["instruction"] == "Be brief."
    assert [t["from"] for t in s1["conversations"]] == ["human", "gpt", "human", "gpt"]
    assert s2["instruction"] == "Answer." and s2["path"].endswith("clips/b.mp4")
    batch = ds.collater([ds[i] for i in range(len(ds))])
    assert batch["num_samples"] == 3 and len(batch["bad_samples"]) == 5
    assert [b[0].rsplit("#", 1)[1] for b in batch["bad_samples"]] == ["3", "4", "5", "6", "7"]  # named by record
    assert batch["media_kinds"] == ["video", "image", "video"] and "media" in batch  # shapes differ: a list
    two = ds.collater([ds[0], ds[2]])
    assert tuple(two["images"].shape) == (2, 3, 4, 32, 32)


def test_sharegpt_frames_form_keeps_every_medium_in_tag_order(tmp_path, media):
    rec = {"messages": [{"role": "user", "content": "<image>Look, then <video>: same colour?"},
                        {"role": "assistant", "content": "No."}],
           "images": ["images/c.png"], "videos": ["clips/a.mp4"]}
    ds = build("sharegpt", write(tmp_path, [rec]), media, media_form="frames", n_frms=4)
    s = ds[0]
    assert [m["kind"] for m in s["media"]] == ["image", "video"]
    assert s["media"][0]["frames"].dtype == torch.uint8 and tuple(s["media"][0]["frames"].shape) == (1, 24, 40, 3)
    assert tuple(s["media"][1]["frames"].shape) == (4, 32, 48, 3)
    tensor = build("sharegpt", write(tmp_path, [rec]), media, n_frms=4)
    assert bad_of(tensor) == {0: "bad_annotation"}  # two media do not fit one tensor per sample


LLAVA = [
    {"id": "v1", "video": "clips/a.mp4", "conversations": [{"from": "human", "value": "<video>\nWhat is moving?"},
                                                          {"from": "gpt", "value": "A circle."}]},
    {"id": "i1", "image": "images/c.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                           {"from": "gpt", "value": "Grey."}]},
    {"id": "bad1", "video": "clips/a.mp4", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                            {"from": "gpt", "value": "x"}]},
    {"id": "bad2", "video": "../a.mp4", "conversations": [{"from": "human", "value": "<video>"},
                                                         {"from": "gpt", "value": "x"}]},
    {"id": "bad3", "video": "clips/a.mp4", "conversations": [{"from": "human"}]},
]


def test_llava_video_records_match_llava_json(tmp_path, media):
    ann = write(tmp_path, LLAVA)
    ds = build("llava_video", ann, media, n_frms=8, sampling="linspace", media_form="frames")
    assert bad_of(ds) == {2: "bad_annotation", 3: "outside_root", 4: "bad_annotation"}
    # the llava_json builder (Video-LLaVA's) reads the same files to the same frames
    ref = registry.get_builder_class("llava_json").from_config(OmegaConf.create({"build_info": {
        "anno_path": ann, "image_dir": str(media), "video_dir": str(media), "n_frms": 8}}),
        merge_defaults=True).build_datasets()["train"]
    for i in (0, 1):
        ours, theirs = ds[i]["media"][0]["frames"], ref[i]["media"][0]["frames"]
        assert torch.equal(ours, theirs) and ds[i]["conversations"] == ref[i]["conversations"]


VIDEOCHAT2 = [
    {"video": "clips/a.mp4", "QA": [{"i": "Watch carefully.", "q": "What moves?", "a": "A circle."},
                                    {"q": "Which way?", "a": "Left."}]},
    {"video": "clips/b.mp4", "start": 1.0, "end": 1.5, "QA": [{"i": "", "q": "Colour?", "a": "Blue."}]},
    {"image": "images/c.png", "QA": [{"q": "Colour?", "a": "Grey."}]},
    {"video": "clips/a.mp4", "start": 3.0, "end": 1.0, "QA": [{"q": "?", "a": "x"}]},
    {"video": "clips/a.mp4", "start": 5.0, "end": 6.0, "QA": [{"q": "?", "a": "x"}]},  # after the clip's end
    {"video": "clips/gone.mp4", "QA": [{"q": "?", "a": "x"}]},
    {"video": "clips/a.mp4", "QA": []},
]


def test_videochat2_it_records_segments_and_malformed_ones(tmp_path, media):
    ds = build("videochat2_it", write(tmp_path, VIDEOCHAT2), media, n_frms=4)
    bad = bad_of(ds)
    assert bad == {3: "bad_annotation", 4: "corrupt", 5: "missing", 6: "bad_annotation"}, bad
    s0 = ds[0]
    assert s0["instruction"] == "Watch carefully." and s0["conversations"][0]["value"] == "<video>What moves?"
    assert s0["conversations"][2] == {"from": "human", "value": "Which way?"}
    seg = ds[1]  # frames 8..12 of 16 at 8 fps: 1.0 s .. 1.5 s
    times = [float(t) for t in seg["media_msg"].split("sampled at ")[1].split(" seconds")[0].split(", ")]
    assert len(times) == 4 and all(1.0 <= t <= 1.5 for t in times), seg["media_msg"]
    assert ds[2]["kind"] == "image" and ds[2]["conversations"][0]["value"] == "<image>Colour?"


def test_fps_sampling_max_frames_and_pixel_cap(tmp_path, media):
    ann = write(tmp_path, [SHAREGPT[0]])
    two_per_s = build("sharegpt", ann, media, sampling="fps", fps=2.0)[0]
    assert two_per_s["image"].shape[1] == 4  # 2 s at 2 fps
    assert "sampled at 0.0, 0.5, 1.0, 1.5 seconds" in two_per_s["media_msg"]
    capped = build("sharegpt", ann, media, sampling="fps", fps=8.0, max_frames=5, max_frame_pixels=400)[0]
    c, t, h, w = capped["image"].shape
    assert t == 5 and h * w <= 400 and abs(w / h - 1.5) < 0.15  # aspect ratio kept
    with pytest.raises(Exception, match="sampling"):
        FormatDataset("sharegpt", ann, str(media), frames=FrameSampling(sampling="every_other"))


def test_llava_instruct_image_prefix_option(tmp_path, media):
    from videollm.datasets.instruct_datasets import LlavaInstructDataset

    recs = [{"id": "1", "image": "c.png", "conversations": [{"from": "human", "value": "<image>\nHi"},
                                                            {"from": "gpt", "value": "Hello"}]}]
    ann = write(tmp_path, recs)
    proc = registry.get_processor_class("blip2_image_eval").from_config(OmegaConf.create({"image_size": 32}))
    default = LlavaInstructDataset(proc, str(media / "images"), ann)
    assert isinstance(default[0], BadSample) and "COCO_train2014_c.png" in default[0].path
    plain = LlavaInstructDataset(proc, str(media / "images"), ann, image_prefix="")
    assert tuple(plain[0]["image"].shape) == (3, 32, 32)


# ------------------------------------------------------------------------ every model
def _video_llama():
    cfg = OmegaConf.load(PRESETS / "video_llama_tiny.yaml").model
    model = registry.get_model_class("video_llama").from_config(cfg)
    return model, {"vis_processor": {"train": {"name": "alpro_video_train", "image_size": 32, "n_frms": 4}}}, {}


def _pllava():
    cfg = OmegaConf.load(PRESETS / "pllava_tiny.yaml").model
    model = registry.get_model_class("pllava").from_config(cfg)
    return model, {"vis_processor": {"train": {"name": "pllava_video_train", "image_size": 32, "n_frms": 8}}}, \
        {"n_frms": 8}


def _video_llava():
    cfg = OmegaConf.load(PRESETS / "video_llava_tiny.yaml").model
    model = registry.get_model_class("video_llava").from_config(cfg)
    return model, {}, {"media_form": "frames", "n_frms": 8, "sampling": "linspace"}


def _llama_vid():
    cfg = OmegaConf.load(PRESETS / "llama_vid_tiny.yaml").model
    model = registry.get_model_class("llama_vid").from_config(cfg)
    return model, {}, {"media_form": "media", "video_marker": "<image>", "image_size": 32, "sampling": "fps",
                       "fps": 1.0}


def _toy(tmp_path_factory):
    import toy_vlm  # noqa: F401 - registers toy_vlm

    from videollm.testing import write_tiny_bpe_tokenizer

    words = ("What is moving? A red circle. Blue. Colour? Left. Which way? USER ASSISTANT",) * 20
    tok = write_tiny_bpe_tokenizer(tmp_path_factory.mktemp("tok"), style="gpt2", vocab_size=300, texts=words)
    llm = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 320, "max_position_embeddings": 256}
    model = registry.get_model_class("toy_vlm").from_config(
        OmegaConf.create({"arch": "toy_vlm", "tokenizer": str(tok), "llm_config": llm}))
    return model, {}, {"image_size": 16, "n_frms": 2, "video_marker": "<image>"}


MODELS = ["video_llama", "pllava", "video_llava", "llama_vid", "toy_vlm"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", MODELS)
def test_every_format_trains_every_model(arch, tmp_path, tmp_path_factory, media):
    """One batch of each format -> the model's own batch processor -> a finite loss with gradients."""
    torch.manual_seed(0)
    make = {"video_llama": _video_llama, "pllava": _pllava, "video_llava": _video_llava, "llama_vid": _llama_vid,
            "toy_vlm": lambda: _toy(tmp_path_factory)}[arch]
    model, extra, info = make()
    model.train()
    records = {
        "sharegpt": [SHAREGPT[0], SHAREGPT[2], SHAREGPT[3]],  # two good, one bad
        "llava_video": [LLAVA[0], LLAVA[2]],
        "videochat2_it": [VIDEOCHAT2[0], dict(VIDEOCHAT2[1], start=0.25, end=1.9), VIDEOCHAT2[5]],
    }
    for fmt, recs in records.items():
        cfg = OmegaConf.create({"build_info": {"anno_path": write(tmp_path, recs), "media_dir": str(media),
                                               "n_frms": 4, **info}, **extra})
        ds = registry.get_builder_class(fmt).from_config(cfg, merge_defaults=True).build_datasets()["train"]
        batch = ds.collater([ds[i] for i in range(len(ds))])
        good = len(recs) - 1
        assert batch["num_samples"] == good and len(batch["bad_samples"]) == 1, (fmt, batch["bad_samples"])
        out = model(batch)
        assert torch.isfinite(out["loss"]), (arch, fmt)
        out["loss"].backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
        model.zero_grad(set_to_none=True)


@pytest.mark.slow
def test_fps_sampling_at_inference_in_the_chat(media):
    """Chat(media_options=...) / --sampling fps --fps N --max-frames M reach the model's video loading."""
    from videollm.chat import Chat

    cfg = OmegaConf.load(PRESETS / "video_llama_tiny.yaml").model
    model = registry.get_model_class("video_llama").from_config(cfg).eval()
    clip = str(media / "clips" / "a.mp4")
    default = Chat(model, media_options={"isolate": False})._load(clip, "video")  # in-process decode: fast
    assert default.data.shape[1] == 8 and default.meta["msg"].startswith("The video contains 8 frames")
    chat = Chat(model, media_options={"sampling": "fps", "fps": 2.0, "max_frames": 3, "isolate": False})
    m = chat._load(clip, "video")
    assert m.data.shape[1] == 3 and "sampled at 0.0, 1.0, 1.5 seconds" in m.meta["msg"], m.meta["msg"]


@pytest.mark.slow
def test_runner_trains_on_a_sharegpt_file_with_bad_records(tmp_path, media):
    """The whole training path (config -> builder -> mixing loader in a worker -> the model's
    processor -> runner): the bad record is counted in the run's summary, the loss falls."""
    import sys

    from omegaconf import OmegaConf as OC

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_contract import LLM, WORDS, make_runner

    from videollm.config import RunConfig, with_defaults
    from videollm.testing import write_tiny_bpe_tokenizer

    tok = write_tiny_bpe_tokenizer(tmp_path / "tok", style="gpt2", vocab_size=300, texts=WORDS * 20)
    ann = write(tmp_path, [SHAREGPT[0], SHAREGPT[2], SHAREGPT[4]])  # two good, one missing file
    run = with_defaults({"output_dir": str(tmp_path / "run"), "max_epoch": 1, "iters_per_epoch": 6,
                         "batch_size_train": 3, "log_freq": 1, "init_lr": 3e-3, "min_lr": 3e-3, "warmup_steps": 0,
                         "seed": 0, "num_workers": 1, "plot_curves": False}, RunConfig)
    entry = OC.merge(registry.get_builder_class("sharegpt").default_config(), {"build_info": {
        "anno_path": ann, "media_dir": str(media), "n_frms": 2, "image_size": 16, "video_marker": "<image>"}})
    cfg = OC.create({"model": {"arch": "toy_vlm", "tokenizer": str(tok), "llm_config": LLM},
                     "datasets": {"sharegpt": entry}, "run": run})
    summary = make_runner(cfg).train()
    from videollm.runners.metrics import read_log

    losses = [r["loss"] for r in read_log(tmp_path / "run")]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert summary["bad_samples"]["by_reason"] == {"missing": 6}, summary["bad_samples"]

"""Dataset builders, bad-file handling and dataset mixing, on the synthetic data set."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset

from videollm.config import build_dataset_config, validate_config
from videollm.conversation import IGNORE_INDEX, expand_image_placeholders, tokenize_instruct, videochat_to_turns
from videollm.datasets import (
    BadSample,
    BadSampleTracker,
    build_train_loader,
    collate_caption,
    is_empty_batch,
)
from videollm.errors import ConfigError, DataError
from videollm.models.video_llama import VideoLLaMAProcessor
from videollm.processors.video_loader import load_video
from videollm.registry import registry
from videollm.synthetic import ClipSpec, write_clip
from videollm.tokenizer import load_dataset_tokenizer

N_FRMS, SIZE, NQ = 4, 32, 8
VIDEO_PROC = {"train": {"name": "alpro_video_train", "image_size": SIZE, "n_frms": N_FRMS},
              "eval": {"name": "alpro_video_eval", "image_size": SIZE, "n_frms": N_FRMS}}
IMAGE_PROC = {"train": {"name": "blip2_image_train", "image_size": SIZE},
              "eval": {"name": "blip2_image_eval", "image_size": SIZE}}
TEXT_PROC = {"train": {"name": "blip_caption"}, "eval": {"name": "blip_caption"}}


def build(name: str, **cfg):
    return registry.get_builder_class(name).from_config(OmegaConf.create(cfg)).build_datasets()


def webvid_cfg(root: Path, **extra):
    return dict(vis_processor=VIDEO_PROC, text_processor=TEXT_PROC,
                build_info=dict(anno_dir=str(root / "webvid/train"), videos_dir=str(root / "videos"),
                                **extra.pop("build_info", {})), **extra)


def manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def image_patch_positions(ids: torch.Tensor, tok) -> torch.Tensor:
    return (ids == tok.convert_tokens_to_ids("<ImageHere>")).nonzero().flatten()


# ----------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------


def test_webvid_samples_shapes_and_captions_match_manifest(synthetic_root):
    ds = build("webvid", **webvid_cfg(synthetic_root, build_info=dict(val_anno_dir=str(synthetic_root / "webvid/test"))))
    m = manifest(synthetic_root)
    train = {v["videoid"]: v["caption"] for v in m["videos"] if v["split"] == "train"}
    test = {v["videoid"]: v["caption"] for v in m["videos"] if v["split"] == "test"}
    assert len(ds["train"]) == len(train) and len(ds["val"]) == len(test)
    for i in (0, 5, len(ds["train"]) - 1):
        s = ds["train"][i]
        assert s["image"].shape == (3, N_FRMS, SIZE, SIZE) and s["image"].dtype == torch.float32
        assert s["type"] == "video"
        assert s["text_input"] == train[ds["train"].annotation[i]["videoid"]]
    v = ds["val"][0]
    assert v["image"].shape == (3, N_FRMS, SIZE, SIZE)
    assert v["text_input"] == test[ds["val"].annotation[0]["videoid"]]
    batch = ds["train"].collater([ds["train"][0], ds["train"][1]])
    assert batch["image"].shape == (2, 3, N_FRMS, SIZE, SIZE)
    assert batch["bad_samples"] == [] and batch["num_samples"] == 2 and batch["type"] == ["video", "video"]


def test_cc_sbu_align_raw_captions_and_image_shape(synthetic_root):
    ds = build("cc_sbu_align", vis_processor=IMAGE_PROC, text_processor=TEXT_PROC,
               build_info=dict(storage=str(synthetic_root / "cc_sbu_align")))["train"]
    captions = {im["name"]: im["caption"] for im in manifest(synthetic_root)["images"] if im["dataset"] == "cc_sbu_align"}
    assert len(ds) == len(captions)
    for i in range(len(ds)):
        s = ds[i]
        assert s["image"].shape == (3, SIZE, SIZE) and s["type"] == "image"
        assert s["text_input"] == captions[ds.annotation[i]["image_id"]]
    # Raw caption: an annotation with punctuation keeps it (the text processor is not applied).
    ds.annotation[0] = dict(ds.annotation[0], caption="A Red: Circle!")
    assert ds[0]["text_input"] == "A Red: Circle!"


@pytest.mark.parametrize("model_type", ["vicuna", "llama_v2"])
def test_llava_instruct_placeholders_and_labels(synthetic_root, model_type):
    ds = build("llava_instruct", vis_processor=IMAGE_PROC, num_video_query_token=NQ, model_type=model_type,
               build_info=dict(anno_dir=str(synthetic_root / "llava/llava_instruct.json"),
                               videos_dir=str(synthetic_root / "llava/train2014")))["train"]
    tok = load_dataset_tokenizer("tiny")
    ann = json.loads((synthetic_root / "llava/llava_instruct.json").read_text())
    assert len(ds) == len(ann)
    proc = VideoLLaMAProcessor("tiny", NQ, model_type, False)  # the model's processor tokenises
    for i in (0, 3):
        s = ds[i]
        assert set(s) == {"image", "conversations", "media_msg", "path"}  # datasets do not tokenise
        assert s["image"].shape == (3, SIZE, SIZE) and s["conversations"] == ann[i]["conversations"]
        out = proc(ds.collater([s]))
        ids, labels = out["input_ids"][0], out["labels"][0]
        pos = image_patch_positions(ids, tok)
        assert len(pos) == NQ and int(pos[-1] - pos[0]) == NQ - 1
        want_ids, want_labels = tokenize_instruct(expand_image_placeholders(ann[i]["conversations"], NQ), tok, model_type)
        assert torch.equal(ids, want_ids) and torch.equal(labels, want_labels)
        assert (labels != IGNORE_INDEX).any()
    batch = proc(ds.collater([ds[0], ds[1]]))
    assert batch["conv_type"] == "multi" and batch["images"].shape == (2, 3, SIZE, SIZE)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["bad_samples"] == [] and batch["num_samples"] == 2


@pytest.mark.parametrize("data_type", ["video", "video_cn"])
def test_webvid_instruct_message_placeholders_and_labels(synthetic_root, data_type):
    ds = build("webvid_instruct", vis_processor=VIDEO_PROC, num_video_query_token=NQ, data_type=data_type,
               build_info=dict(anno_dir=str(synthetic_root / "videochat/videochat_instruct.json"),
                               videos_dir=str(synthetic_root / "videos")))["train"]
    tok = load_dataset_tokenizer("tiny")
    ann = json.loads((synthetic_root / "videochat/videochat_instruct.json").read_text())
    s = ds[2]
    assert s["image"].shape == (3, N_FRMS, SIZE, SIZE)
    s = VideoLLaMAProcessor("tiny", NQ, "vicuna", False)(ds.collater([s]))
    s = {"input_ids": s["input_ids"][0], "labels": s["labels"][0]}
    pos = image_patch_positions(s["input_ids"], tok)
    assert len(pos) == NQ and int(pos[-1] - pos[0]) == NQ - 1
    _, msg = load_video(str(synthetic_root / "videos" / ann[2]["video"]), N_FRMS, SIZE, SIZE, "uniform", return_msg=True)
    assert msg.startswith(f"The video contains {N_FRMS} frames sampled at 0.0, ")
    ids, labels = tokenize_instruct(videochat_to_turns(ann[2]["QA"], NQ, "" if data_type == "video_cn" else msg), tok, "vicuna")
    assert torch.equal(s["input_ids"], ids) and torch.equal(s["labels"], labels)
    assert ("frames sampled at" in tok.decode(s["input_ids"])) == (data_type == "video")


def test_instruct_sample_without_image_token_is_a_bad_annotation(synthetic_root, tmp_path):
    ann = json.loads((synthetic_root / "llava/llava_instruct.json").read_text())[:2]
    ann[0]["conversations"][0]["value"] = ann[0]["conversations"][0]["value"].replace("<image>", "")
    del ann[1]["conversations"]
    (tmp_path / "a.json").write_text(json.dumps(ann))
    ds = build("llava_instruct", vis_processor=IMAGE_PROC, num_video_query_token=NQ,
               build_info=dict(anno_dir=str(tmp_path / "a.json"), videos_dir=str(synthetic_root / "llava/train2014")))["train"]
    assert ds[1].reason == "bad_annotation" and "conversations" in ds[1].detail
    # no <image>: found when the model's processor tokenises; the sample is dropped and named
    batch = VideoLLaMAProcessor("tiny", NQ, "vicuna", False)(ds.collater([ds[0], ds[1]]))
    assert batch["num_samples"] == 0
    assert [r for _, r in batch["bad_samples"]] == ["bad_annotation", "bad_annotation"]


def test_default_yamls_validate_and_name_placeholder_paths():
    for name in registry.list("builder"):
        builder_cls = registry.get_builder_class(name)
        builder = builder_cls.from_config(None)  # the default YAML passes its own schema
        assert builder.config.sample_ratio == 1
        if name.startswith("synthetic_"):  # renders its clips: needs no file at all
            assert set(builder.build_datasets()) == {"train"}
            continue
        with pytest.raises(DataError, match="/path/to"):
            builder.build_datasets()
    # The lead's validator accepts a user entry merged over the defaults, processors included.
    cfg = OmegaConf.create({"datasets": build_dataset_config(OmegaConf.create(
        {"webvid": {"sample_ratio": 100, "vis_processor": {"train": {"n_frms": 4}}}, "llava_instruct": {"model_type": "llama_v2"}}))})
    validate_config(cfg)
    assert cfg.datasets.webvid.vis_processor.train.name == "alpro_video_train"


def test_real_defaults_stay_in_yaml():
    node = registry.get_builder_class("webvid").default_config()
    assert node.vis_processor.train.image_size == 224 and node.vis_processor.train.n_frms == 8
    node = registry.get_builder_class("webvid_instruct").default_config()
    assert node.num_video_query_token == 32 and node.tokenizer_name == "tiny" and node.fix_label_mask is False


@pytest.mark.parametrize(
    "cfg, key",
    [
        ({"sample_ratoi": 2}, "datasets.webvid.sample_ratoi"),
        ({"build_info": {"anno_dirs": "x"}}, "datasets.webvid.build_info.anno_dirs"),
        ({"sample_ratio": "many"}, "datasets.webvid.sample_ratio"),
    ],
)
def test_unknown_or_mistyped_keys_are_rejected(cfg, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        registry.get_builder_class("webvid").from_config(OmegaConf.create(cfg), merge_defaults=True)


def test_unknown_model_type_is_a_config_error(synthetic_root):
    with pytest.raises(ConfigError, match="model_type"):
        build("llava_instruct", vis_processor=IMAGE_PROC, model_type="mistral",
              build_info=dict(anno_dir=str(synthetic_root / "llava/llava_instruct.json"), videos_dir="x"))


def test_annotation_dir_without_csv_is_a_data_error(tmp_path):
    (tmp_path / "0.tsv").write_text("videoid\tname\tpage_dir\n")
    with pytest.raises(DataError, match=r"no \*\.csv"):
        build("webvid", vis_processor=VIDEO_PROC, build_info=dict(anno_dir=str(tmp_path), videos_dir=str(tmp_path)))
    (tmp_path / "a.csv").write_text("videoid,caption\n1,x\n")
    with pytest.raises(DataError, match="missing column"):
        build("webvid", vis_processor=VIDEO_PROC, build_info=dict(anno_dir=str(tmp_path), videos_dir=str(tmp_path)))


# ----------------------------------------------------------------------------------------
# Bad files
# ----------------------------------------------------------------------------------------

EXPECTED_VIDEO_REASONS = {
    "zero_byte": "empty",
    "truncated": "corrupt",
    "text": "not_a_video",
    "audio_only": "no_video_stream",
    "one_frame": "too_few_frames",
    "short3": "too_few_frames",
    "nothere": "missing",
}


@pytest.fixture(scope="module")
def broken_webvid(synthetic_root, tmp_path_factory):
    """A WebVid layout whose rows name every broken video kind, plus two good clips."""
    root = tmp_path_factory.mktemp("broken_webvid")
    shutil.copytree(synthetic_root / "broken", root / "videos" / "broken")
    spec = ClipSpec(name="s", shape="circle", color="red", direction="left", speed="slow")
    write_clip(root / "videos" / "broken" / "short3.mp4", spec, width=32, height=32, num_frames=3)
    shutil.copytree(synthetic_root / "videos" / "000", root / "videos" / "000")
    (root / "ann").mkdir()
    with (root / "ann" / "a.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["videoid", "name", "page_dir"])
        for kind in EXPECTED_VIDEO_REASONS:
            w.writerow([kind, f"caption {kind}", "broken"])
        w.writerow(["1000", "good one", "000"])
        w.writerow(["1001", "good two", "000"])
    return root


def _broken_dataset(root: Path, **extra):
    return build("webvid", vis_processor=VIDEO_PROC, text_processor=TEXT_PROC,
                 build_info=dict(anno_dir=str(root / "ann"), videos_dir=str(root / "videos")), **extra)["train"]


def test_every_broken_video_kind_is_named_and_skipped(broken_webvid, caplog):
    ds = _broken_dataset(broken_webvid)
    with caplog.at_level(logging.WARNING, logger="videollm.datasets.bad_samples"):
        out = [ds[i] for i in range(len(ds))]
    kinds = list(EXPECTED_VIDEO_REASONS)
    for kind, sample in zip(kinds, out):
        assert isinstance(sample, BadSample), kind
        assert sample.reason == EXPECTED_VIDEO_REASONS[kind], (kind, sample)
        assert sample.path.endswith(f"broken/{kind}.mp4")
    assert out[-1]["text_input"] == "good two" and out[-1]["image"].shape == (3, N_FRMS, SIZE, SIZE)
    # One warning per bad file (this process has not seen these paths before), naming file and reason.
    warned = [r.getMessage() for r in caplog.records]
    for kind in kinds:
        hits = [m for m in warned if f"broken/{kind}.mp4" in m]
        assert len(hits) == 1 and EXPECTED_VIDEO_REASONS[kind] in hits[0]
    batch = ds.collater(out)
    assert batch["num_samples"] == 2 and batch["image"].shape[0] == 2
    assert [r for _, r in batch["bad_samples"]] == [EXPECTED_VIDEO_REASONS[k] for k in kinds]
    tracker = BadSampleTracker()
    tracker.update(batch)
    assert tracker.counts == Counter(EXPECTED_VIDEO_REASONS.values()) and tracker.good == 2


def test_pixel_limit_is_checked_before_decoding(broken_webvid):
    ds = _broken_dataset(broken_webvid, max_pixels=64 * 64 - 1)
    s = ds[len(ds) - 1]
    assert isinstance(s, BadSample) and s.reason == "too_large" and "64x64" in s.detail
    assert not isinstance(_broken_dataset(broken_webvid, max_pixels=64 * 64)[len(ds) - 1], BadSample)


def test_corrupt_missing_and_huge_images(synthetic_root, tmp_path):
    storage = tmp_path / "cc"
    (storage / "image").mkdir(parents=True)
    shutil.copy(synthetic_root / "broken" / "corrupt.jpg", storage / "image" / "bad.jpg")
    shutil.copy(synthetic_root / "cc_sbu_align" / "image" / "synth_000000.jpg", storage / "image" / "good.jpg")
    (storage / "image" / "empty.jpg").write_bytes(b"")
    anns = [{"image_id": i, "caption": f"c {i}"} for i in ("bad", "missing", "empty", "good")]
    (storage / "filter_cap.json").write_text(json.dumps({"annotations": anns}))
    ds = build("cc_sbu_align", vis_processor=IMAGE_PROC, build_info=dict(storage=str(storage)))["train"]
    assert [getattr(ds[i], "reason", None) for i in range(4)] == ["corrupt_image", "missing", "empty", None]
    small = build("cc_sbu_align", vis_processor=IMAGE_PROC, max_pixels=100, build_info=dict(storage=str(storage)))["train"]
    assert small[3].reason == "too_large"


def test_all_bad_batch_is_a_recognisable_empty_batch():
    bad = [BadSample("a.mp4", "missing"), BadSample("b.mp4", "empty")]
    batch = collate_caption(bad)
    assert is_empty_batch(batch) and batch["bad_samples"] == [("a.mp4", "missing"), ("b.mp4", "empty")]
    assert not is_empty_batch(collate_caption([{"image": torch.zeros(3, 2, 2), "text_input": "x", "type": "image"}]))


def test_tracker_check_summary_and_epochs():
    t = BadSampleTracker(max_fraction=0.2)
    t.add(9, [("a.mp4", "missing")])
    t.check()  # 10 % <= 20 %
    assert "1 of 10 samples bad (10.0%)" in t.summary() and "missing 1 (e.g. a.mp4)" in t.summary()
    t.add(2, [("b.mp4", "corrupt"), ("c.mp4", "corrupt")])
    t.check()  # 3 of 14 (21 %) is small-sample noise, not evidence of more than 20 % (bad_samples.py)
    t.add(6, [(f"d{i}.mp4", "corrupt") for i in range(14)])
    with pytest.raises(DataError, match=r"17 of 34 samples bad.*corrupt 16"):
        t.check()
    state = t.state_dict()
    t.new_epoch()
    assert t.bad == 0 and t.epoch == 1 and t.totals["corrupt"] == 16
    with pytest.raises(DataError):  # judged over the run, not the epoch
        t.check()
    t2 = BadSampleTracker(max_fraction=0.2)
    t2.load_state_dict(state)
    with pytest.raises(DataError):
        t2.check()
    t3 = BadSampleTracker(max_fraction=0.1, min_samples=10)
    t3.add(0, [("x", "missing")])
    t3.check()  # too few samples seen to judge


# ----------------------------------------------------------------------------------------
# Mixing
# ----------------------------------------------------------------------------------------


class Tagged(Dataset):
    """``n`` samples ``{"image": tensor holding (tag, index, noise), "text_input": tag}``; the noise
    comes from torch's global RNG, like a random augmentation."""

    def __init__(self, tag: int, n: int) -> None:
        self.tag, self.n = tag, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return {"image": torch.tensor([float(self.tag), float(i), torch.rand(()).item()]), "text_input": str(self.tag),
                "type": "image"}


def test_mixing_ratio_homogeneity_and_determinism():
    data = {"a": Tagged(0, 10), "b": Tagged(1, 7)}
    loader = build_train_loader(data, {"a": 3, "b": 1}, batch_size=2, num_workers=0, seed=0)
    names = []
    for _ in range(400):
        batch = next(loader)
        tags = set(batch["text_input"])
        assert len(tags) == 1  # homogeneous: every sample from one dataset
        assert {"a": "0", "b": "1"}[batch["dataset"]] in tags
        names.append(batch["dataset"])
    frac = names.count("a") / 400
    assert 0.68 < frac < 0.82  # 0.75 expected; sd ~0.022
    assert loader.stats == {"a": names.count("a"), "b": names.count("b")}
    # each pass over "a" visits every index once (5 batches of 2), reshuffled across passes
    again = build_train_loader(data, {"a": 3, "b": 1}, batch_size=2, num_workers=0, seed=0)
    first = [next(again) for _ in range(30)]
    same = build_train_loader(data, {"a": 3, "b": 1}, batch_size=2, num_workers=0, seed=0)
    for x in first:
        y = next(same)
        assert x["dataset"] == y["dataset"] and torch.equal(x["image"], y["image"])
    other = build_train_loader(data, {"a": 3, "b": 1}, batch_size=2, num_workers=0, seed=1)
    assert [next(other)["dataset"] for _ in range(30)] != [b["dataset"] for b in first]
    a_batches = [b for b in first if b["dataset"] == "a"]
    idx = [int(i) for b in a_batches[:5] for i in b["image"][:, 1]]
    assert sorted(idx) == list(range(10))
    idx2 = [int(i) for b in a_batches[5:10] for i in b["image"][:, 1]]
    assert sorted(idx2) == list(range(10)) and idx2 != idx


def test_ratio_zero_and_unknown_names():
    data = {"a": Tagged(0, 4), "b": Tagged(1, 4)}
    loader = build_train_loader(data, {"a": 1, "b": 0}, batch_size=2, seed=0)
    assert {next(loader)["dataset"] for _ in range(20)} == {"a"}
    with pytest.raises(ConfigError, match="unknown dataset"):
        build_train_loader(data, {"c": 1}, batch_size=2)
    with pytest.raises(DataError, match="cannot fill one batch"):
        build_train_loader({"a": Tagged(0, 3)}, None, batch_size=4)


def test_resume_reproduces_the_continuation_exactly(synthetic_root):
    def make():
        cc = build("cc_sbu_align", vis_processor=IMAGE_PROC, build_info=dict(storage=str(synthetic_root / "cc_sbu_align")))
        llava = build("llava_instruct", vis_processor=IMAGE_PROC, num_video_query_token=NQ,
                      build_info=dict(anno_dir=str(synthetic_root / "llava/llava_instruct.json"),
                                      videos_dir=str(synthetic_root / "llava/train2014")))
        return build_train_loader({"cc": cc["train"], "llava": llava["train"]}, {"cc": 2, "llava": 1},
                                  batch_size=4, num_workers=0, seed=7,
                                  batch_processor=VideoLLaMAProcessor("tiny", NQ, "vicuna", False))

    full = make()
    reference = [next(full) for _ in range(14)]  # passes of 3 batches: crosses epochs of both
    first = make()
    for _ in range(6):
        next(first)
    state = first.state_dict()
    torch.manual_seed(123)  # the caller's RNG must not matter
    resumed = make()
    resumed.load_state_dict(state)
    for ref in reference[6:]:
        got = next(resumed)
        assert got["dataset"] == ref["dataset"]
        key = "images" if ref["dataset"] == "llava" else "image"
        assert torch.equal(got[key], ref[key])  # same samples AND same random crops
        if ref["dataset"] == "llava":
            assert torch.equal(got["input_ids"], ref["input_ids"])
        else:
            assert got["text_input"] == ref["text_input"]
    assert resumed.stats == full.stats
    # the dataset RNG is forked: loading samples leaves the caller's torch RNG untouched
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    next(resumed)
    assert torch.equal(torch.rand(3), expected)


def test_workers_report_bad_samples_and_empty_batches_are_skipped(broken_webvid):
    ds = _broken_dataset(broken_webvid)  # 7 bad rows, 2 good ones
    # one batch = the whole data set, collated inside a worker process
    loader = build_train_loader({"w": ds}, None, batch_size=9, num_workers=2, seed=0)
    for _ in range(2):
        batch = next(loader)
        assert batch["num_samples"] == 2 and batch["image"].shape == (2, 3, N_FRMS, SIZE, SIZE)
        assert sorted(r for _, r in batch["bad_samples"]) == sorted(EXPECTED_VIDEO_REASONS.values())
        assert {Path(p).stem for p, _ in batch["bad_samples"]} == set(EXPECTED_VIDEO_REASONS)
    # batch size 1: the 7 all-bad batches of a pass are skipped and their reports carried into
    # the next good batch, so 4 good batches (2 passes) carry at least every bad file of pass 0.
    loader = build_train_loader({"w": ds}, None, batch_size=1, num_workers=2, seed=0)
    batches = [next(loader) for _ in range(4)]
    assert all(b["num_samples"] == 1 for b in batches)
    reported = [p for b in batches for p, _ in b["bad_samples"]]
    assert {Path(p).stem for p in reported} == set(EXPECTED_VIDEO_REASONS)
    assert 7 <= len(reported) <= 14
    assert loader.streams["w"].epoch == 1


def test_only_bad_data_raises_instead_of_looping(broken_webvid, tmp_path):
    (tmp_path / "a.csv").write_text("videoid,name,page_dir\nzero_byte,x,broken\ntext,y,broken\n")
    ds = build("webvid", vis_processor=VIDEO_PROC, build_info=dict(anno_dir=str(tmp_path),
                                                                  videos_dir=str(broken_webvid / "videos")))["train"]
    loader = build_train_loader({"w": ds}, None, batch_size=1, seed=0, max_empty_batches=5)
    with pytest.raises(DataError, match="only bad samples"):
        next(loader)


def test_datasets_section_to_loader(synthetic_root):
    from videollm.datasets import build_datasets_from_config, sample_ratios_from_config

    section = build_dataset_config(OmegaConf.create({
        "cc_sbu_align": {"sample_ratio": 24, "vis_processor": IMAGE_PROC,
                         "build_info": {"storage": str(synthetic_root / "cc_sbu_align")}},
        "webvid": {"sample_ratio": 100, "vis_processor": VIDEO_PROC, "text_processor": TEXT_PROC,
                   "build_info": {"anno_dir": str(synthetic_root / "webvid/train"),
                                  "videos_dir": str(synthetic_root / "videos")}},
    }))
    validate_config(OmegaConf.create({"datasets": section}))
    built = build_datasets_from_config(section)
    assert sample_ratios_from_config(section) == {"cc_sbu_align": 24.0, "webvid": 100.0}
    loader = build_train_loader({n: s["train"] for n, s in built.items()}, sample_ratios_from_config(section),
                                batch_size=2, seed=0)
    batch = next(loader)
    assert batch["image"].shape[1:] == ((3, N_FRMS, SIZE, SIZE) if batch["dataset"] == "webvid" else (3, SIZE, SIZE))

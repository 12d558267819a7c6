"""Shard writing (videollm.datasets.shards) and the shard datasets (cc_sbu, laion, video_shards)."""

from __future__ import annotations

import json
import tarfile
from collections import Counter

import pytest
import torch
from omegaconf import OmegaConf

from videollm.datasets import BadSample, build_train_loader
from videollm.datasets.shard_datasets import iter_tar_samples
from videollm.datasets.shards import ShardItem, main, write_shards
from videollm.errors import DataError
from videollm.registry import registry

N_FRMS, SIZE, NQ = 4, 32, 8
VIDEO_EVAL = {"train": {"name": "alpro_video_eval", "image_size": SIZE, "n_frms": N_FRMS}}
VIDEO_TRAIN = {"train": {"name": "alpro_video_train", "image_size": SIZE, "n_frms": N_FRMS}}
IMAGE_EVAL = {"train": {"name": "blip2_image_eval", "image_size": SIZE}}
TEXT = {"train": {"name": "blip_caption"}}


def build(name: str, **cfg):
    return registry.get_builder_class(name).from_config(OmegaConf.create(cfg)).build_datasets()["train"]


def samples(ds, epoch: int = 0):
    ds.set_epoch(epoch)
    return list(ds)


def assert_same_multiset(got, want, key):
    """Every sample of ``got`` equals a distinct sample of ``want`` (compared on ``key`` tensors)."""
    assert len(got) == len(want)
    pool = list(want)
    for s in got:
        match = next((i for i, w in enumerate(pool) if torch.equal(s[key], w[key])
                      and s.get("text_input") == w.get("text_input")
                      and torch.equal(s.get("input_ids", torch.zeros(0)), w.get("input_ids", torch.zeros(0)))), None)
        assert match is not None, "a shard sample has no identical file-based sample"
        pool.pop(match)


@pytest.fixture(scope="module")
def shard_dir(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    r = synthetic_root
    assert main(["webvid", "--anno-dir", str(r / "webvid/train"), "--videos-dir", str(r / "videos"),
                 "--out", str(out / "webvid"), "--samples-per-shard", "5"]) == 0
    assert main(["cc_sbu_align", "--storage", str(r / "cc_sbu_align"), "--out", str(out / "cc"),
                 "--samples-per-shard", "5", "--check"]) == 0
    assert main(["llava", "--anno-file", str(r / "llava/llava_instruct.json"), "--images-dir",
                 str(r / "llava/train2014"), "--out", str(out / "llava")]) == 0
    assert main(["videochat", "--anno-file", str(r / "videochat/videochat_instruct.json"), "--videos-dir",
                 str(r / "videos"), "--out", str(out / "vc"), "--samples-per-shard", "7"]) == 0
    return out


def test_cli_writes_deterministic_shards_and_prints_the_storage_pattern(synthetic_root, shard_dir, tmp_path, capsys):
    assert sorted(p.name for p in (shard_dir / "webvid").iterdir()) == [f"webvid-0000{i}.tar" for i in range(4)]
    with tarfile.open(shard_dir / "webvid" / "webvid-00000.tar") as tf:
        names = tf.getnames()
    assert names[:2] == ["00000000.json", "00000000.mp4"] and len(names) == 10
    main(["webvid", "--anno-dir", str(synthetic_root / "webvid/train"), "--videos-dir",
          str(synthetic_root / "videos"), "--out", str(tmp_path), "--samples-per-shard", "5"])
    assert f"build_info.storage: {tmp_path}/webvid-{{00000..00003}}.tar" in capsys.readouterr().out
    for i in range(4):  # same input, byte-identical shards
        assert (tmp_path / f"webvid-0000{i}.tar").read_bytes() == (shard_dir / "webvid" / f"webvid-0000{i}.tar").read_bytes()


def test_video_caption_shards_round_trip(synthetic_root, shard_dir):
    ds = build("video_shards", vis_processor=VIDEO_EVAL, text_processor=TEXT,
               build_info=dict(storage=str(shard_dir / "webvid" / "webvid-{00000..00003}.tar")))
    got = samples(ds)
    files = registry.get_builder_class("webvid").from_config(OmegaConf.create(dict(
        vis_processor=VIDEO_EVAL, text_processor=TEXT,
        build_info=dict(anno_dir=str(synthetic_root / "webvid/train"), videos_dir=str(synthetic_root / "videos"))))
    ).build_datasets()["train"]
    want = [files[i] for i in range(len(files))]
    assert all(s["image"].shape == (3, N_FRMS, SIZE, SIZE) and s["type"] == "video" for s in got)
    assert_same_multiset(got, want, "image")  # same captions AND same decoded frames
    m = json.loads((synthetic_root / "manifest.json").read_text())
    assert Counter(s["text_input"] for s in got) == Counter(v["caption"] for v in m["videos"] if v["split"] == "train")
    batch = ds.collater(got[:3])
    assert batch["image"].shape == (3, 3, N_FRMS, SIZE, SIZE) and batch["num_samples"] == 3


@pytest.mark.parametrize("builder", ["cc_sbu", "laion"])
def test_image_shards_round_trip_through_webdataset_builders(synthetic_root, shard_dir, builder):
    ds = build(builder, vis_processor=IMAGE_EVAL, text_processor=TEXT,
               build_info=dict(storage=[str(shard_dir / "cc" / "cc_sbu_align-{00000..00001}.tar"),
                                        str(shard_dir / "cc" / "cc_sbu_align-0000[2].tar")]))
    got = samples(ds)
    files = registry.get_builder_class("cc_sbu_align").from_config(OmegaConf.create(dict(
        vis_processor=IMAGE_EVAL, build_info=dict(storage=str(synthetic_root / "cc_sbu_align"))))).build_datasets()["train"]
    assert all(s["image"].shape == (3, SIZE, SIZE) and s["type"] == "image" for s in got)
    assert_same_multiset(got, [files[i] for i in range(len(files))], "image")


def test_txt_captions_are_read_like_laion(synthetic_root, tmp_path):
    import webdataset as wds

    jpg = (synthetic_root / "cc_sbu_align/image/synth_000000.jpg").read_bytes()
    with wds.TarWriter(str(tmp_path / "t.tar"), encoder=False) as w:
        w.write({"__key__": "a", "jpg": jpg, "txt": b"A Red Circle!"})
    ds = build("laion", vis_processor=IMAGE_EVAL, text_processor=TEXT, build_info=dict(storage=str(tmp_path / "t.tar")))
    (s,) = samples(ds)
    assert s["text_input"] == "a red circle" and s["image"].shape == (3, SIZE, SIZE)


@pytest.mark.parametrize("source, media", [("llava", "image"), ("vc", "video")])
def test_instruction_shards_match_file_datasets(synthetic_root, shard_dir, source, media):
    r = synthetic_root
    if media == "image":
        vis, storage = IMAGE_EVAL, str(shard_dir / "llava" / "llava-00000.tar")
        files = registry.get_builder_class("llava_instruct").from_config(OmegaConf.create(dict(
            vis_processor=IMAGE_EVAL, num_video_query_token=NQ,
            build_info=dict(anno_dir=str(r / "llava/llava_instruct.json"), videos_dir=str(r / "llava/train2014"))))
        ).build_datasets()["train"]
    else:
        # webvid_instruct uses the TRAIN transform (a random crop): compare with crops disabled
        vis = {"train": dict(VIDEO_TRAIN["train"], min_scale=1.0, max_scale=1.0)}
        storage = str(shard_dir / "vc" / "videochat-*.tar")
        files = registry.get_builder_class("webvid_instruct").from_config(OmegaConf.create(dict(
            vis_processor=vis, num_video_query_token=NQ,
            build_info=dict(anno_dir=str(r / "videochat/videochat_instruct.json"), videos_dir=str(r / "videos"))))
        ).build_datasets()["train"]
    ds = build("video_shards", format="instruct", vis_processor=vis, num_video_query_token=NQ,
               build_info=dict(storage=storage))
    got = samples(ds)
    want = [files[i] for i in range(len(files))]
    assert_same_multiset(got, want, "image")
    batch = ds.collater(got[:2])
    assert batch["conv_type"] == "multi" and batch["images"].shape[0] == 2


def test_shard_order_is_seeded_per_epoch_and_split_over_workers(shard_dir):
    ds = build("video_shards", vis_processor=IMAGE_EVAL, text_processor=TEXT, shuffle_buffer=4,
               build_info=dict(storage=str(shard_dir / "cc" / "*.tar")))
    e0 = [s["text_input"] for s in samples(ds, 0)]
    assert e0 == [s["text_input"] for s in samples(ds, 0)]
    e1 = [s["text_input"] for s in samples(ds, 1)]
    assert e1 != e0 and Counter(e1) == Counter(e0)
    # 3 shards over 2 workers (shard-level split) and 1 shard over 2 workers (sample-level split)
    for storage, n in ((shard_dir / "cc" / "*.tar", 12), (shard_dir / "llava" / "llava-00000.tar", 12)):
        ds = build("video_shards", vis_processor=IMAGE_EVAL, text_processor=TEXT,
                   build_info=dict(storage=str(storage)),
                   **({"format": "instruct", "num_video_query_token": NQ} if "llava" in str(storage) else {}))
        loader = build_train_loader({"s": ds}, None, batch_size=1, num_workers=2, seed=0)
        keys = []
        while loader.streams["s"].epoch == 0:
            b = next(loader)
            if loader.streams["s"].epoch == 0:
                keys.append(b["images"].sum().item() if "images" in b else b["image"].sum().item())
        assert len(keys) == n and len(set(keys)) == n  # every sample exactly once per pass


def test_shard_stream_resume_matches_uninterrupted_run(shard_dir):
    def make():
        ds = build("video_shards", vis_processor={"train": {"name": "blip2_image_train", "image_size": SIZE}},
                   text_processor=TEXT, shuffle_buffer=3, build_info=dict(storage=str(shard_dir / "cc" / "*.tar")))
        return build_train_loader({"s": ds}, None, batch_size=2, num_workers=0, seed=3)

    full = make()
    ref = [next(full) for _ in range(9)]  # 6 batches per pass: crosses into epoch 1
    part = make()
    for _ in range(4):
        next(part)
    resumed = make()
    resumed.load_state_dict(part.state_dict())
    for r in ref[4:]:
        got = next(resumed)
        assert torch.equal(got["image"], r["image"]) and got["text_input"] == r["text_input"]


def test_bad_media_and_corrupt_shards_are_named(synthetic_root, tmp_path):
    import webdataset as wds

    good = (synthetic_root / "videos/000/1000.mp4").read_bytes()
    with wds.TarWriter(str(tmp_path / "a.tar"), encoder=False) as w:
        w.write({"__key__": "k0", "mp4": good, "json": b'{"caption": "good"}'})
        w.write({"__key__": "k1", "mp4": b"not a video at all", "json": b'{"caption": "text"}'})
        w.write({"__key__": "k2", "mp4": (synthetic_root / "broken/audio_only.mp4").read_bytes(),
                 "json": b'{"caption": "audio"}'})
        w.write({"__key__": "k3", "mp4": good, "json": b"{broken json"})
        w.write({"__key__": "k4", "mp4": (synthetic_root / "broken/one_frame.mp4").read_bytes(),
                 "json": b'{"caption": "one"}'})
    with wds.TarWriter(str(tmp_path / "b.tar"), encoder=False) as w:
        w.write({"__key__": "m0", "mp4": good, "json": b'{"caption": "kept"}'})
        w.write({"__key__": "m1", "mp4": good * 8, "json": b'{"caption": "lost"}'})
    data = (tmp_path / "b.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(data[: len(data) // 2])  # truncated inside m1
    ds = build("video_shards", vis_processor=VIDEO_EVAL, text_processor=TEXT, shuffle_buffer=1,
               build_info=dict(storage=str(tmp_path / "[ab].tar")))
    out = list(ds)
    bad = {s.path: s.reason for s in out if isinstance(s, BadSample)}
    good_caps = sorted(s["text_input"] for s in out if not isinstance(s, BadSample))
    assert good_caps == ["good", "kept"]
    assert bad == {f"{tmp_path}/a.tar#k1": "not_a_video", f"{tmp_path}/a.tar#k2": "no_video_stream",
                   f"{tmp_path}/a.tar#k3": "bad_annotation", f"{tmp_path}/a.tar#k4": "too_few_frames",
                   f"{tmp_path}/b.tar": "corrupt_shard"}
    batch = ds.collater(out)
    assert batch["num_samples"] == 2 and len(batch["bad_samples"]) == 5


def test_writer_skips_missing_and_unreadable_media(synthetic_root, tmp_path):
    items = [ShardItem(str(synthetic_root / "videos/000/1000.mp4"), {"caption": "ok"}),
             ShardItem(str(tmp_path / "gone.mp4"), {"caption": "gone"}),
             ShardItem(str(synthetic_root / "broken/zero_byte.mp4"), {"caption": "zero"}),
             ShardItem(str(synthetic_root / "broken/text.mp4"), {"caption": "text"}),
             ShardItem(str(synthetic_root / "broken/corrupt.jpg"), {"caption": "jpg"}),
             ShardItem(str(synthetic_root / "manifest.json"), {"caption": "json"})]
    report = write_shards(items, str(tmp_path / "out"), prefix="x", check=True)
    assert report.written == 1 and report.shards == [str(tmp_path / "out" / "x-00000.tar")]
    assert [r for _, r in report.skipped] == ["missing", "empty", "not_a_video", "corrupt_image",
                                              "unsupported extension '.json'"]
    (sample,) = list(iter_tar_samples(report.shards[0]))
    assert json.loads(sample["json"]) == {"caption": "ok"}
    assert sample["mp4"] == (synthetic_root / "videos/000/1000.mp4").read_bytes()
    assert not list((tmp_path / "out").glob(".*tmp"))  # temp files renamed away


def test_missing_shards_are_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"shard\(s\) not found: .*x-00001\.tar"):
        (tmp_path / "x-00000.tar").write_bytes(b"")
        build("cc_sbu", vis_processor=IMAGE_EVAL, build_info=dict(storage=str(tmp_path / "x-{00000..00001}.tar")))

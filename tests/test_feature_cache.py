"""Frozen-encoder feature cache (videollm.feature_cache): round trip, exactness, stale caches,
resumed builds, corrupt shards, rank sharding, views, the CLI."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from videollm.config import load_config
from videollm.datasets import build_datasets_from_config
from videollm.datasets.bad_samples import BadSample
from videollm.errors import ConfigError, DataError
from videollm.feature_cache import (
    INDEX,
    FeatureCacheDataset,
    build_cache,
    check_feature_caches,
    check_front_frozen,
    read_shard_record,
    verify_cache,
    write_shard,
)
from videollm.models.base import FEATURES_KEY, Media
from videollm.registry import import_all
from videollm.tasks import setup_task

REPO = Path(__file__).resolve().parents[1]
N_GOOD = 9  # clips of the synthetic train split used here (+ 1 bad row)


@pytest.fixture(scope="module")
def data(synthetic_root, tmp_path_factory):
    """A WebVid annotation folder: N_GOOD synthetic clips and one row naming a missing clip."""
    anno = tmp_path_factory.mktemp("anno")
    with open(synthetic_root / "webvid/train/part_0.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rows = rows[:N_GOOD]
    rows.insert(3, dict(rows[0], videoid="999999", name="a clip that is not there"))
    with open(anno / "part_0.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return {"anno": anno, "videos": synthetic_root / "videos"}


def recipe(data, *extra):
    """tiny_stage1 with deterministic processing (alpro_video_eval, uniform frames) for training."""
    import_all()
    return load_config(REPO / "train_configs/tiny_stage1.yaml", [
        f"datasets.webvid.build_info.anno_dir={data['anno']}", f"datasets.webvid.build_info.videos_dir={data['videos']}",
        "datasets.webvid.vis_processor.train.name=alpro_video_eval", "run.num_workers=0", *extra])


@pytest.fixture(scope="module")
def built(data, tmp_path_factory):
    cfg = recipe(data)
    torch.manual_seed(0)
    task = setup_task(cfg)
    datasets = task.build_datasets(cfg)
    model = task.build_model(cfg)
    out = tmp_path_factory.mktemp("cache")
    counts = build_cache(cfg, out, shard_size=4, batch_size=4, model=model, datasets=datasets, progress=False)
    return {"cfg": cfg, "model": model, "raw": datasets, "out": out, "counts": counts}


def cached_datasets(cfg, out):
    cfg.datasets.webvid.feature_cache = str(out)
    try:
        return build_datasets_from_config(cfg.datasets)
    finally:
        cfg.datasets.webvid.feature_cache = ""


def test_build_counts_bad_clip_and_writes_index(built):
    counts = built["counts"]
    n = N_GOOD + 1
    assert counts["complete"] and counts["samples"] == n and counts["shards_written"] == 3
    assert counts["bad"] == 1 and sum(counts["bad_by_reason"].values()) == 1
    index = json.loads((built["out"] / INDEX).read_text())
    assert index["samples"] == n and index["bad"] == 1
    assert verify_cache(built["out"]) == {"shards": 3, "samples": n, "bad": 1}


def test_round_trip_is_bit_exact(built, tmp_path):
    raw = built["raw"]["webvid"]["train"]
    cached = cached_datasets(built["cfg"], built["out"])["webvid"]["train"]
    assert isinstance(cached, FeatureCacheDataset) and len(cached) == len(raw)
    model = built["model"]
    for i in range(len(raw)):
        a, b = raw[i], cached[i]
        if isinstance(a, BadSample):
            assert isinstance(b, BadSample) and (b.path, b.reason) == (a.path, a.reason)
            continue
        want = model.frozen_front([Media("video", a["image"])])[0]
        assert b["image"].dtype == want.dtype and torch.equal(b["image"], want)
        assert {k: v for k, v in b.items() if k != "image"} == {k: v for k, v in a.items() if k != "image"}
    # the shard format itself, over dtypes and an all-bad shard
    tensors = {"image": torch.randn(2, 3, 5).half(), "ids": torch.arange(7), "w": torch.randn(4).bfloat16()}
    write_shard(tmp_path, 0, 0, 0, [(0, dict(tensors, text="x", n=[1, 2]))])
    write_shard(tmp_path, 0, 1, 1, [(1, BadSample("p.mp4", "decode_error", "d"))])
    from safetensors.torch import load_file

    back = load_file(str(tmp_path / "v0-00000.safetensors"))
    assert all(back[f"0.{k}"].dtype == v.dtype and torch.equal(back[f"0.{k}"], v) for k, v in tensors.items())
    rec = read_shard_record(tmp_path, 0, 0)
    assert rec["samples"][0]["fields"] == {"text": "x", "n": [1, 2]}
    assert read_shard_record(tmp_path, 0, 1)["samples"][0]["bad"] == ["p.mp4", "decode_error", "d"]


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    loss = model(batch)["loss"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), grads


def test_training_step_from_cache_equals_raw(built):
    model = built["model"]
    model.train()
    raw = built["raw"]["webvid"]["train"]
    cached = cached_datasets(built["cfg"], built["out"])["webvid"]["train"]
    check_feature_caches(model, {"webvid": {"train": cached}}, built["cfg"].run)
    idx = [0, 3, 5, 8, 2]  # 3 is the bad row
    b_raw = raw.collater([raw[i] for i in idx])
    b_cache = cached.collater([cached[i] for i in idx])
    assert b_cache[FEATURES_KEY] is True and FEATURES_KEY not in b_raw
    assert b_cache["bad_samples"] == b_raw["bad_samples"] and len(b_raw["bad_samples"]) == 1
    assert b_cache["num_samples"] == b_raw["num_samples"] == 4
    loss_a, grads_a = _loss_and_grads(model, b_raw)
    loss_b, grads_b = _loss_and_grads(model, b_cache)
    assert abs(loss_a.item() - loss_b.item()) <= 1e-6
    assert grads_a.keys() == grads_b.keys() and any(n.startswith("video_Qformer.") for n in grads_a)
    assert not any(n.startswith(("visual_encoder.", "Qformer.")) for n in grads_a)
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6, rtol=0), name
    assert sum(g.abs().sum().item() for g in grads_a.values()) > 0
    # evaluation path: the same prompt embeddings from features as from pixels
    model.eval()
    with torch.no_grad():
        ea, ma = model.generation_inputs(b_raw)
        eb, mb = model.generation_inputs(b_cache)
        assert torch.equal(ma, mb) and torch.allclose(ea, eb, atol=1e-6, rtol=0)
        feats = b_cache["image"][0]
        assert torch.allclose(model.encode_media([Media("features", feats)])[0],
                              model.encode_media([Media("video", b_raw["image"][0])])[0], atol=1e-6, rtol=0)


def test_stale_cache_is_refused_naming_the_difference(built, data):
    cfg = recipe(data, "datasets.webvid.vis_processor.train.n_frms=3")
    with pytest.raises(ConfigError, match=r"datasets\.webvid\.vis_processor\.train\.n_frms: 2 in the cache, 3 now"):
        cached_datasets(cfg, built["out"])
    cached = cached_datasets(built["cfg"], built["out"])
    model = built["model"]
    other = setup_task(built["cfg"]).build_model(built["cfg"])  # other random ViT weights
    with pytest.raises(ConfigError, match=r"model\.weights: "):
        check_feature_caches(other, cached, built["cfg"].run)
    with pytest.raises(ConfigError, match=r"run\.autocast: \"none\" in the cache, \"bf16\" now"):
        check_feature_caches(model, cached, dict(built["cfg"].run, amp=True, amp_dtype="bf16"))
    check_feature_caches(model, cached, built["cfg"].run)  # the producer itself passes


def test_trainable_front_is_refused_naming_the_key(data):
    cfg = recipe(data, "model.freeze_vit=false")
    model = setup_task(cfg).build_model(cfg)
    with pytest.raises(ConfigError, match=r"model\.freeze_vit: visual_encoder\..* trains"):
        check_front_frozen(model)


def test_killed_build_resumes_without_duplicates_or_losses(built, tmp_path):
    cfg, model, raw = built["cfg"], built["model"], built["raw"]
    out = tmp_path / "c"
    first = build_cache(cfg, out, shard_size=4, model=model, datasets=raw, progress=False, max_shards=1)
    assert first["shards_written"] == 1 and not first["complete"] and not (out / INDEX).exists()
    with pytest.raises(ConfigError, match="incomplete"):
        cached_datasets(cfg, out)
    # a kill inside the next shard: its data file renamed, its record never written; plus a temp file
    d = out / "webvid/train"
    shutil.copy(d / "v0-00000.safetensors", d / "v0-00001.safetensors")
    (d / "v0-00002.safetensors.tmp999").write_bytes(b"partial")
    second = build_cache(cfg, out, shard_size=4, model=model, datasets=raw, progress=False)
    assert second["shards_skipped"] == 1 and second["shards_written"] == 2 and second["complete"]
    indices = []
    for shard in range(3):
        indices += [e["index"] for e in read_shard_record(d, 0, shard)["samples"]]
    assert indices == list(range(N_GOOD + 1))
    ref = built["out"] / "webvid/train"
    for shard in range(3):  # byte-identical to the uninterrupted build
        assert read_shard_record(d, 0, shard)["sha256"] == read_shard_record(ref, 0, shard)["sha256"]
    # a rerun of a complete cache writes nothing; another setting is refused
    assert build_cache(cfg, out, shard_size=4, model=model, datasets=raw, progress=False)["shards_written"] == 0
    with pytest.raises(ConfigError, match=r"shard_size: 4 in the cache, 5 now"):
        build_cache(cfg, out, shard_size=5, model=model, datasets=raw, progress=False)


def test_ranks_split_the_shards(built, tmp_path):
    cfg, model, raw = built["cfg"], built["model"], built["raw"]
    out = tmp_path / "r"
    r1 = build_cache(cfg, out, shard_size=4, model=model, datasets=raw, progress=False, rank=1, world_size=2)
    assert r1["shards_written"] == 1 and "complete" not in r1
    r0 = build_cache(cfg, out, shard_size=4, model=model, datasets=raw, progress=False, rank=0, world_size=2)
    assert r0["shards_written"] == 2 and r0["complete"]
    assert verify_cache(out)["samples"] == N_GOOD + 1


def test_corrupt_shard_is_named(built, tmp_path):
    out = tmp_path / "k"
    shutil.copytree(built["out"], out)
    path = out / "webvid/train/v0-00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"v0-00001\.safetensors: corrupt \(sha256"):
        verify_cache(out)
    cached = cached_datasets(built["cfg"], out)["webvid"]["train"]
    assert isinstance(cached[0], dict)  # shard 0 is intact
    with pytest.raises(DataError, match=r"v0-00001\.safetensors: corrupt"):
        cached[4]
    path.write_bytes(bytes(data[:100]))  # truncated
    with pytest.raises(DataError, match=r"shard v0-00001 (is )?missing or corrupt"):
        verify_cache(out)


def test_views_of_random_processing(data, built, tmp_path):
    cfg = recipe(data, "datasets.webvid.vis_processor.train.name=alpro_video_train")
    torch.manual_seed(0)
    raw = build_datasets_from_config(cfg.datasets)
    raw = {"webvid": {"train": torch.utils.data.Subset(raw["webvid"]["train"], range(4))}}
    raw["webvid"]["train"].collater = built["raw"]["webvid"]["train"].collater
    out = tmp_path / "v"
    counts = build_cache(cfg, out, views=2, shard_size=4, model=built["model"], datasets=raw, progress=False)
    assert counts["complete"] and counts["samples"] == 8
    from safetensors.torch import load_file

    v0 = load_file(str(out / "webvid/train/v0-00000.safetensors"))
    v1 = load_file(str(out / "webvid/train/v1-00000.safetensors"))
    assert not torch.equal(v0["0.image"], v1["0.image"])  # two different random crops


def test_cli_builds_and_verifies(data, tmp_path, capsys):
    from videollm.features import main

    cfg_path = tmp_path / "recipe.yaml"
    from omegaconf import OmegaConf

    OmegaConf.save(recipe(data), cfg_path)
    out = tmp_path / "cli"
    assert main(["cache", "--cfg-path", str(cfg_path), "--out", str(out), "--shard-size", "8"]) == 0
    text = capsys.readouterr().out
    assert "2 shards written, 0 already there, 10 samples this run (1 bad: " in text and "complete" in text
    assert main(["cache", "--cfg-path", str(cfg_path), "--out", str(out), "--verify"]) == 0
    assert "intact" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    OmegaConf.save(recipe(data, "model.freeze_qformer=false"), bad)
    assert main(["cache", "--cfg-path", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "model.freeze_qformer" in capsys.readouterr().err


def test_runner_trains_from_cache_as_from_files(built, tmp_path):
    """Three optimizer steps through the runner (shuffled loader, the bad row counted): the same
    losses and the same trained weights from the cache as from the files."""
    import copy

    from videollm.runners.runner_iter import RunnerIter

    results = []
    for source in ("files", "cache"):
        cfg = copy.deepcopy(built["cfg"])
        cfg.run.output_dir = str(tmp_path / source)
        cfg.run.iters_per_epoch, cfg.run.max_epoch, cfg.run.batch_size_train, cfg.run.warmup_steps = 3, 1, 3, 1
        datasets = built["raw"] if source == "files" else cached_datasets(cfg, built["out"])
        model = copy.deepcopy(built["model"])
        torch.manual_seed(7)
        runner = RunnerIter(cfg, setup_task(cfg), model, datasets)
        summary = runner.train()
        results.append((runner.losses, summary["bad_samples"], {n: p.detach().clone() for n, p in
                                                                model.named_parameters() if p.requires_grad}))
    (la, bad_a, wa), (lb, bad_b, wb) = results
    assert len(la) == 3 and all(abs(a - b) <= 1e-6 for a, b in zip(la, lb)), (la, lb)
    assert bad_a == bad_b
    assert all(torch.allclose(wa[n], wb[n], atol=1e-6, rtol=0) for n in wa)
    assert any(not torch.equal(wa[n], built["model"].state_dict()[n]) for n in wa)  # it trained


def test_instruction_and_image_batches_from_cache_equal_raw(synthetic_root, tmp_path):
    """Stage 2 (VideoChat video instructions through the model's processor; image captions with
    a drawn prompt): the same loss and gradients from the cache."""
    import random

    import_all()
    root = synthetic_root
    cfg = load_config(REPO / "train_configs/tiny_stage2.yaml", [
        f"datasets.cc_sbu_align.build_info.storage={root / 'cc_sbu_align'}",
        "datasets.cc_sbu_align.vis_processor.train.name=blip2_image_eval",
        f"datasets.llava_instruct.build_info.anno_dir={root / 'llava/llava_instruct.json'}",
        f"datasets.llava_instruct.build_info.videos_dir={root / 'llava/train2014'}",
        f"datasets.webvid_instruct.build_info.anno_dir={root / 'videochat/videochat_instruct.json'}",
        f"datasets.webvid_instruct.build_info.videos_dir={root / 'videos'}",
        "datasets.webvid_instruct.vis_processor.train.name=alpro_video_eval"])
    del cfg.datasets["llava_instruct"]
    torch.manual_seed(0)
    task = setup_task(cfg)
    raw = task.build_datasets(cfg)
    raw = {n: {"train": torch.utils.data.Subset(s["train"], range(4))} for n, s in raw.items()}
    for n, s in raw.items():
        s["train"].collater = s["train"].dataset.collater
    model = task.build_model(cfg)
    out = tmp_path / "s2"
    assert build_cache(cfg, out, shard_size=4, model=model, datasets=raw, progress=False)["complete"]
    model.train()
    for name in ("webvid_instruct", "cc_sbu_align"):
        ds = raw[name]["train"]
        cached = FeatureCacheDataset(out, name, "train", ds, cfg.datasets[name])
        results = []
        for d in (ds, cached):
            batch = model.prepare_batch(d.collater([d[i] for i in range(3)]))
            assert bool(batch.get(FEATURES_KEY)) is (d is cached)
            assert ("input_ids" in batch) is (name == "webvid_instruct")
            random.seed(5)  # the caption path draws its prompt with Python's random
            results.append(_loss_and_grads(model, batch))
        (la, ga), (lb, gb) = results
        assert abs(la.item() - lb.item()) <= 1e-6, name
        assert ga.keys() == gb.keys() and ga
        assert all(torch.allclose(ga[n], gb[n], atol=1e-6, rtol=0) for n in ga), name

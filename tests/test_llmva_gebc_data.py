"""Kinetic-GEBC data (builder gebc), GEBC metrics and submission file, and feature extraction."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import videollm.datasets  # noqa: F401
from videollm.datasets.bad_samples import BadSample
from videollm.datasets.llmva_gebc_datasets import GEBCDataset, resize_feature
from videollm.errors import DataError
from videollm.gebc_metrics import gebc_captioning_eval, spice_status, submission, write_submission
from videollm.registry import registry

V1, V2, V3, V4 = "aaaaaaaaaaa", "bbbbbbbbbbb", "ccccccccccc", "ddddddddddd"


def boundary(vid, k, ts, prev, nxt, label="Change of Action", caps=("the man", "running", "walking")):
    return {"boundary_id": f"{vid}_{k}", "timestamp": ts, "prev_timestamp": prev, "next_timestamp": nxt,
            "label": label, "subject": caps[0], "status_before": caps[1], "status_after": caps[2]}


@pytest.fixture()
def gebc_dir(tmp_path: Path) -> Path:
    ann = {
        V1: [boundary(V1, 0, 2.0, 0, 5.0, "Change of Color"), boundary(V1, 1, 5.0, 2.0, 10.0)],
        V2: [boundary(V2, 0, 3.0, 0, 8.0)],
        "zzzzzzzzzzz": [boundary("zzzzzzzzzzz", 0, 1.0, 0, 2.0)],  # not in video_info: skipped
        V3: [{"boundary_id": f"{V3}_0", "timestamp": 1.0}],  # malformed: skipped
        V4: [boundary(V4, 0, 1.0, 0, 4.0)],  # its features are mis-shaped
    }
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    (tmp_path / "info.json").write_text(json.dumps({V1: 10.0, V2: 8.0, V3: 4.0, V4: 4.0}))
    q, o = tmp_path / "q", tmp_path / "o"
    q.mkdir()
    o.mkdir()
    rng = np.random.default_rng(0)
    for vid in (V1, V2):
        np.save(q / f"{vid}.npy", rng.standard_normal((12, 8, 64)).astype(np.float32))
    np.save(q / f"{V4}.npy", rng.standard_normal((12, 8, 32)).astype(np.float32))  # wrong width
    with open(o / f"{V1}.pkl", "wb") as f:
        pickle.dump(rng.standard_normal((7, 48)).astype(np.float32), f)
    with open(o / f"{V4}.pkl", "wb") as f:
        pickle.dump(rng.standard_normal((7, 48)).astype(np.float32), f)
    # V2 has no .pkl: its samples are "missing"
    return tmp_path


def make(root: Path, **kw) -> GEBCDataset:
    return GEBCDataset(str(root / "ann.json"), str(root / "info.json"), str(root / "q"), ["pix"], [str(root / "o")],
                       max_seq_len=10, feature_dims={"pix": 48}, q_former_dim=64, **kw)


def test_three_samples_per_boundary_and_skips(gebc_dir):
    ds = make(gebc_dir)
    assert len(ds) == 3 * 4  # V1 (2 boundaries), V2, V4
    assert ds.skipped == {"video_not_in_video_info": 1, "bad_annotation": 1}
    s = [ds[i] for i in range(3)]
    assert [x["caption_type"] for x in s] == ["subject", "status_before", "status_after"]
    assert [x["text_input"] for x in s] == ["the man", "running", "walking"]
    assert s[0]["prompt"] == "This video describes the change of color.The subject is"
    assert s[1]["prompt"] == "This video describes the change of color.Status before change is"
    ref = s[0]["reference_points"]
    assert ref.dtype == torch.float64 and ref.tolist() == [2.0 / 10.0, 5.0 / 10.0]
    second = ds[3]  # V1_1: timestamp 5, prev 2, next 10, duration 10
    assert second["boundary_id"] == f"{V1}_1" and second["reference_points"].tolist() == [0.5, 0.8]
    # features are keyed by the video id = boundary_id[:11]: both boundaries of V1 share them
    assert torch.equal(second["image_query_tokens"], s[0]["image_query_tokens"])
    assert s[0]["image_query_tokens"].shape == (12, 8, 64)


def test_missing_and_misshaped_feature_files_are_named_counted_and_skipped(gebc_dir):
    ds = make(gebc_dir)
    missing = ds[6]  # V2: no .pkl
    bad_shape = ds[9]  # V4: tokens 32 wide
    assert isinstance(missing, BadSample) and missing.reason == "missing" and V2 in missing.path
    assert isinstance(bad_shape, BadSample) and bad_shape.reason == "corrupt"
    assert "shape (12, 8, 32)" in bad_shape.detail and f"{V4}.npy" in bad_shape.detail
    batch = ds.collater([ds[i] for i in (0, 6, 9, 4)])
    assert batch["num_samples"] == 2 and len(batch["bad_samples"]) == 2
    assert batch["image_query_tokens"].shape == (2, 12, 8, 64)
    assert batch["other_features_list"].shape == (2, 10, 1, 48)
    assert batch["boundary_id"] == [f"{V1}_0", f"{V1}_1"]
    assert ds.collater([ds[6]])["num_samples"] == 0


def test_pickles_run_no_code(gebc_dir, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    with open(gebc_dir / "o" / f"{V1}.pkl", "wb") as f:
        pickle.dump(Evil(), f)
    bad = make(gebc_dir)[0]
    assert isinstance(bad, BadSample) and bad.reason == "corrupt" and "not allowed" in bad.detail
    assert not marker.exists()


def test_nearest_resize_follows_scipy_interp1d():
    data = np.arange(3)[:, None] * 10.0  # rows 0, 10, 20
    # x_new = 0, 0.5, 1, 1.5, 2 -> half-way points round down -> rows 0, 0, 1, 1, 2
    assert resize_feature(data, 5)[:, 0].tolist() == [0, 0, 10, 10, 20]
    assert resize_feature(np.arange(4)[:, None] * 1.0, 3)[:, 0].tolist() == [0, 1, 3]  # x_new 0, 1.5, 3
    assert resize_feature(np.ones((1, 2)), 4).shape == (4, 2)


def test_builder_splits_and_test_without_captions(gebc_dir):
    test_ann = {V1: [{k: v for k, v in boundary(V1, 0, 2.0, 0, 5.0).items()
                      if k in ("boundary_id", "timestamp", "prev_timestamp", "next_timestamp", "label")}]}
    (gebc_dir / "test.json").write_text(json.dumps(test_ann))
    cfg = OmegaConf.create({"build_info": {
        "video_info_path": str(gebc_dir / "info.json"), "q_former_feature_folder": str(gebc_dir / "q"),
        "q_former_dim": 64, "other_feature_names": ["pix"], "other_feature_folders": [str(gebc_dir / "o")],
        "feature_dims": {"pix": 48}, "max_seq_len": 10,
        "annotations": {"train": {"annotation_path": str(gebc_dir / "ann.json")},
                        "test": {"annotation_path": str(gebc_dir / "test.json")}}}})
    out = registry.get_builder_class("gebc").from_config(cfg).build_datasets()
    assert set(out) == {"train", "test"}
    sample = out["test"][0]
    assert "text_input" not in sample and sample["caption_type"] == "subject"
    assert out["test"].boundary_ids() == [f"{V1}_0"]


# ---------------------------------------------------------------------------- metrics
GT = {
    "subject": {"v1_0": ["cat"], "v1_1": ["dog"], "v2_0": ["bird"]},
    "status_before": {"v1_0": ["red ball"], "v1_1": ["blue box"], "v2_0": ["green cup"]},
    "status_after": {"v1_0": ["red ball"], "v1_1": ["blue box"], "v2_0": ["green cup"]},
}
PRED = {
    "subject": {"v1_0": "Cat.", "v1_1": "dog", "v2_0": "fish"},  # PTB: lower case, "." dropped
    "status_before": {"v1_0": "red", "v1_1": "blue box", "v2_0": "cup green"},
    "status_after": {"v1_0": "red ball", "v1_1": "blue box", "v2_0": "green cup"},
}


def preds():
    return [{"boundary_id": b, "type": t, "caption": c} for t, d in PRED.items() for b, c in d.items()]


def rouge_l(p, r, beta=1.2):
    return (1 + beta ** 2) * p * r / (r + beta ** 2 * p) if p and r else 0.0


def test_metrics_on_a_hand_checked_three_boundary_example():
    scores = gebc_captioning_eval(preds(), GT)
    # subject: single words. ROUGE-L 1, 1, 0. CIDEr-D: only unigrams exist; each reference word has
    # document frequency 1 of 3, so an exact match has cosine 1 for n=1 and 0 for n=2..4:
    # 10 * (1 + 0 + 0 + 0) / 4 = 2.5 per hit -> (2.5 + 2.5 + 0) / 3.
    assert scores["subject_ROUGE_L"] == pytest.approx(100 * 2 / 3)
    assert scores["subject_CIDEr"] == pytest.approx(100 * 5 / 3)
    # before: "red" vs "red ball": LCS 1, P 1, R 1/2; "cup green" vs "green cup": LCS 1, P = R = 1/2
    before = (rouge_l(1, 0.5) + 1.0 + rouge_l(0.5, 0.5)) / 3
    assert scores["before_ROUGE_L"] == pytest.approx(100 * before)
    assert scores["after+ROUGE_L"] == pytest.approx(100.0)  # the original's key, typo kept
    mean_rouge = (2 / 3 + before + 1.0) / 3 * 100
    assert scores["mean_ROUGE_L"] == pytest.approx(mean_rouge)
    mean_cider = (scores["subject_CIDEr"] + scores["before_CIDEr"] + scores["after+CIDEr"]) / 3
    assert scores["mean_CIDEr"] == pytest.approx(mean_cider)
    assert scores["overall_score_without_spice"] == pytest.approx(mean_rouge + mean_cider)
    assert scores["num_boundaries"] == 3


def test_spice_is_reported_unavailable_never_zero():
    available, why = spice_status()
    scores = gebc_captioning_eval(preds(), GT)
    if available:
        assert all(isinstance(scores[k], float) for k in ("subject_SPICE", "mean_SPICE", "overall_score"))
        assert scores["overall_score"] == pytest.approx(scores["overall_score_without_spice"] + scores["mean_SPICE"])
        return
    # this machine has no Stanford CoreNLP jars: SPICE is None with the reason, never 0
    for key in ("subject_SPICE", "before_SPICE", "after+SPICE", "mean_SPICE", "overall_score", "mean_score"):
        assert scores[key] is None
    assert scores["spice"] == f"unavailable: {why}" and "stanford-corenlp-3.6.0" in why
    assert scores["agg_metrics"] == scores["overall_score_without_spice"] > 0


def test_missing_prediction_is_an_error_naming_it():
    with pytest.raises(DataError, match="v2_0"):
        gebc_captioning_eval([p for p in preds() if p["boundary_id"] != "v2_0"], GT)


def test_submission_file(tmp_path):
    path = write_submission(preds()[:4], ["v1_0", "v1_1", "v2_0", "v3_0"], tmp_path / "submit_test.pkl")
    with open(path, "rb") as f:
        sub = pickle.load(f)
    assert sub["v1_0"] == {"Subject": "Cat.", "Status_Before": "red", "Status_After": ""}
    assert sub["v2_0"] == {"Subject": "fish", "Status_Before": "", "Status_After": ""}
    assert sub["v3_0"] == {"Subject": "", "Status_Before": "", "Status_After": ""}
    assert set(sub) == {"v1_0", "v1_1", "v2_0", "v3_0"}
    full = submission(preds(), ["v1_0", "v1_1", "v2_0"])
    assert full["v2_0"] == {"Subject": "fish", "Status_Before": "cup green", "Status_After": "green cup"}


# ---------------------------------------------------------------------------- feature extraction
def test_feature_cli_writes_qformer_tokens(tmp_path):
    from videollm import features
    from videollm.gebc_synthetic import BoundaryClip, Segment, render, write_mp4

    vids = tmp_path / "videos"
    for i, vid in enumerate(("abcdefghijk", "lmnopqrstuv")):
        clip = BoundaryClip(vid, "circle", [Segment(0, "red", "left"), Segment(1.5, "blue", "left")], ["Change of Color"], 2.0)
        write_mp4(vids / f"{vid}_suffix.mp4", render(clip, size=32, fps=8))
    (vids / "broken00000.mp4").write_bytes(b"not a video")
    enc_cfg = Path(__file__).resolve().parents[1] / "videollm/configs/models/llmva_gebc_tiny_encoder.yaml"
    out = tmp_path / "q"
    code = features.main(["gebc-qformer", "--videos", str(vids), "--out", str(out), "--n-frms", "6",
                          "--encoder-config", str(enc_cfg), "--seed", "3", "--device", "cpu"])
    assert code == 1  # the broken file failed, and is named
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["videos"]) == {"abcdefghijk", "lmnopqrstuv"} and "broken00000" in manifest["failed"]
    arr = np.load(out / "abcdefghijk.npy")
    assert arr.shape == (6, 8, 64) and arr.dtype == np.float32
    # the same numbers as the encoder on the alpro_video_eval frames
    from videollm.processors.video_loader import load_video
    import videollm.processors  # noqa: F401

    torch.manual_seed(3)
    enc = features.encoder_from_config(str(enc_cfg), None).eval()
    proc = registry.get_processor_class("alpro_video_eval").from_config(OmegaConf.create({"image_size": 32, "n_frms": 6}))
    clip = proc.transform(load_video(vids / "abcdefghijk_suffix.mp4", n_frms=6, height=32, width=32))
    with torch.no_grad():
        want = enc(clip.permute(1, 0, 2, 3)).numpy()
    np.testing.assert_allclose(arr, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- the tiny recipe
@pytest.mark.slow
def test_tiny_recipe_end_to_end(tmp_path, monkeypatch):
    """Synthetic boundaries -> features -> 4 training iterations -> beam-search evaluation, result
    files, submission, and a checkpoint in the LAVIS layout that model.ckpt loads back."""
    import train as train_script
    from videollm import features
    from videollm.gebc_synthetic import generate

    repo = Path(__file__).resolve().parents[1]
    data = tmp_path / "data" / "gebc_synthetic"
    counts = generate(str(data), num_videos=6, seed=1)
    assert counts["val"] >= 1 and counts["test"] >= 1
    assert features.main(["gebc-qformer", "--videos", str(data / "videos"), "--out", str(data / "features" / "qformer"),
                          "--n-frms", "12", "--encoder-config", str(repo / "videollm/configs/models/llmva_gebc_tiny_encoder.yaml"),
                          "--device", "cpu"]) == 0
    monkeypatch.chdir(tmp_path)  # the recipe's paths are relative to the working directory
    out = tmp_path / "out"
    summary = train_script.main(["--cfg-path", str(repo / "train_configs/llmva_gebc_tiny_synthetic.yaml"), "--options",
                                 "run.max_epoch=1", "run.iters_per_epoch=4", "run.warmup_steps=1", f"run.output_dir={out}",
                                 "run.batch_size_train=4"])
    val = summary["eval"]["gebc/val"]["metrics"]
    assert val["num_boundaries"] == counts["val"] and val["missing_predictions"] == 0
    assert val["spice"].startswith(("unavailable", "computed")) and val["mean_ROUGE_L"] is not None
    preds = json.loads((out / "result" / "val.json").read_text())
    assert len(preds) == 3 * counts["val"] and {p["type"] for p in preds} == {"subject", "status_before", "status_after"}
    with open(out / "result" / "submit_test.pkl", "rb") as f:
        sub = pickle.load(f)
    assert len(sub) == counts["test"] and all(set(v) == {"Subject", "Status_Before", "Status_After"} for v in sub.values())
    ckpt = torch.load(out / "checkpoint_0.pth", map_location="cpu", weights_only=False)
    assert {"model", "optimizer", "config", "scaler", "epoch"} <= set(ckpt)
    assert "opt_proj.weight" in ckpt["model"] and "other_feat_Qformer.bert.embeddings.position_ids" in ckpt["model"]

"""Video-LLaMA's behaviour pinned: the values in tests/golden/video_llama_tiny.json were computed
before the model-contract redesign (see tests/golden_video_llama.py) and must never change."""

from __future__ import annotations

import json
import math

import pytest

from golden_video_llama import GOLDEN, compute


@pytest.fixture(scope="module")
def golden():
    return json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def current(synthetic_root):
    return compute(synthetic_root)


def test_dataset_pipeline_ids_and_labels_unchanged(golden, current):
    assert set(current["datasets"]) == set(golden["datasets"])
    for key, want in golden["datasets"].items():
        got = current["datasets"][key]
        for field in ("input_ids", "labels", "attention_mask"):
            assert got[field] == want[field], f"{key}: {field} changed"


def test_training_losses_unchanged(golden, current):
    for section in ("instruct_loss", "caption_loss"):
        assert set(current[section]) == set(golden[section])
        for key, want in golden[section].items():
            assert math.isclose(current[section][key], want, rel_tol=0, abs_tol=1e-6), f"{section}/{key}"


def test_chat_prompts_and_greedy_ids_unchanged(golden, current):
    assert set(current["chat"]) == set(golden["chat"])
    for key, want in golden["chat"].items():
        got = current["chat"][key]
        assert got["prompt"] == want["prompt"], key
        assert got["ids"] == want["ids"], key
        assert got["text"] == want["text"], key

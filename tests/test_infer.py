"""Batch inference survives bad inputs and kills: streamed output, resume, errors in the output,
exit status counting failures (issue 20, point 5)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from test_upload_safety import png_header_only

TINY_YAML = Path(__file__).resolve().parents[1] / "videollm" / "configs" / "models" / "video_llama_tiny.yaml"


@pytest.fixture(scope="module")
def chat():
    from videollm.chat import Chat
    from videollm.models.video_llama import VideoLLAMA

    cfg = OmegaConf.load(TINY_YAML).model
    torch.manual_seed(0)
    return Chat(VideoLLAMA.from_config(cfg).eval())


@pytest.fixture()
def job(synthetic_root, tmp_path, chat, monkeypatch):
    """Six questions: 4 clips, the good image, and a 16000x16000 PNG bomb in the middle."""
    from videollm import infer

    manifest = json.loads((synthetic_root / "manifest.json").read_text())
    clips = [str(synthetic_root / v["path"]) for v in manifest["videos"][:4]]
    image = str(synthetic_root / manifest["images"][0]["path"])
    bomb = str(png_header_only(tmp_path / "bomb.png", 16000, 16000))
    lines = [{"id": "c0", "video": clips[0], "question": "What?"},
             {"id": "c1", "video": clips[1], "question": "Which way?"},
             {"id": "bomb", "image": bomb, "question": "Shape?"},
             {"video": clips[2], "question": "Colour?"},  # no id: matched by line on resume
             {"id": "img", "image": image, "question": "Shape?"},
             {"id": "c3", "video": clips[3], "question": "Speed?"}]
    src = tmp_path / "questions.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    monkeypatch.setattr(infer, "build_chat_from_args", lambda args: (chat, "vicuna", []))
    out = tmp_path / "answers.jsonl"

    def run(*extra, err=None):
        return infer.main(["--cfg-path", "unused.yaml", "--input", str(src), "--output", str(out),
                           "--batch-size", "2", "--max-new-tokens", "6", *extra], err=err or io.StringIO())

    return run, out


def records(out: Path):
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_a_decompression_bomb_is_one_error_line_and_the_exit_status_counts_it(job):
    run, out = job
    err = io.StringIO()
    assert run(err=err) == 1  # one line failed
    recs = records(out)
    assert [r["line"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert "ImageDecodeError" in recs[2]["error"] and "bomb.png" in recs[2]["error"] and "too large" in recs[2]["error"]
    assert all("answer" in r for i, r in enumerate(recs) if i != 2)
    assert "6 lines (1 errors)" in err.getvalue()


def test_answers_are_written_as_produced_and_a_rerun_resumes(job, chat, monkeypatch):
    run, out = job
    assert run() == 1
    reference = {r["line"]: r for r in records(out)}
    out.unlink()
    real = chat.answer_batch
    calls = {"n": 0}

    def dies_in_the_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # a kill: nothing of this batch is written
        return real(*args, **kwargs)

    monkeypatch.setattr(chat, "answer_batch", dies_in_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run()
    assert [r["line"] for r in records(out)] == [1, 2]  # the first batch survived the kill
    with out.open("a") as f:
        f.write('{"id": "c1", "ans')  # and a half-written line, as a kill mid-write leaves
    monkeypatch.setattr(chat, "answer_batch", real)
    uploads = []
    real_upload = chat.upload_video
    monkeypatch.setattr(chat, "upload_video", lambda path, *a, **k: uploads.append(path) or real_upload(path, *a, **k))
    err = io.StringIO()
    assert run(err=err) == 1
    assert "2 answered line(s) kept" in err.getvalue() and "(2 answered earlier)" in err.getvalue()
    assert len(uploads) == 2  # clips 2 and 3 only: lines 1 and 2 were not redone
    final = records(out)
    assert sorted(r["line"] for r in final) == [1, 2, 3, 4, 5, 6]  # each line exactly once
    assert {r["line"]: r for r in final} == reference  # same answers as the run that was not killed
    # the failed line is retried on every rerun; answered ones are never redone
    uploads.clear()
    assert run() == 1 and uploads == [] and len(records(out)) == 6
    assert run("--overwrite") == 1 and len(uploads) == 4


def test_a_failing_row_does_not_fail_its_batch(job, chat, monkeypatch):
    run, out = job
    real = chat.answer_batch

    def fails_on_line_2(convs, img_lists, **kwargs):
        if any("Which way?" in str(c.messages) for c in convs):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(convs, img_lists, **kwargs)

    monkeypatch.setattr(chat, "answer_batch", fails_on_line_2)
    assert run() == 2  # the bomb and the row whose generation fails
    recs = {r["line"]: r for r in records(out)}
    assert "RuntimeError: CUDA out of memory" in recs[2]["error"] and "answer" not in recs[2]
    assert "answer" in recs[1] and "error" not in recs[1]  # same batch as line 2, still answered
    assert all("answer" in recs[n] for n in (4, 5, 6))


def test_cannot_start_is_exit_101(tmp_path):
    from videollm import infer

    err = io.StringIO()
    assert infer.main(["--cfg-path", "x.yaml", "--input", str(tmp_path / "none.jsonl"), "--output",
                       str(tmp_path / "o.jsonl")], err=err) == infer.EXIT_FATAL
    assert "none.jsonl: cannot read" in err.getvalue()
    with pytest.raises(SystemExit) as exc:
        infer.parse_args(["--input", "a.jsonl"])  # --output missing
    assert exc.value.code == infer.EXIT_FATAL


def test_chat_and_cli_refuse_huge_media_with_named_errors(chat, tmp_path, monkeypatch):
    from test_upload_safety import write_frames

    from videollm import cli
    from videollm.chat import new_conversation
    from videollm.errors import ImageDecodeError, VideoDecodeError

    bomb = png_header_only(tmp_path / "bomb.png", 16000, 16000)
    with pytest.raises(ImageDecodeError, match=r"bomb\.png: image too large"):
        chat.upload_img(str(bomb), new_conversation("vicuna", "image"), [])
    wide = write_frames(tmp_path / "wide.avi", 3840, 2176)  # one frame above the training pixel limit
    with pytest.raises(VideoDecodeError, match=r"wide\.avi: video too large: 3840x2176"):
        chat.upload_video(str(wide), new_conversation("vicuna", "video"), [], with_audio=False)
    monkeypatch.setattr(cli, "build_chat_from_args", lambda args: (chat, "vicuna", []))
    err = io.StringIO()
    assert cli.main(["--cfg-path", "x.yaml", "--image", str(bomb), "-q", "?"], out=io.StringIO(), err=err) == 2
    assert "bomb.png" in err.getvalue() and "Traceback" not in err.getvalue()

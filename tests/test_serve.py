"""The OpenAI-compatible server on a tiny random-weight Video-LLaMA: the openai client streams
answers about generated clips, requests batch, messages map onto the chat template, and every
bad request gets an OpenAI-style error object with its HTTP status (issue 17, part 3)."""

from __future__ import annotations

import base64
import glob
import json
import os
import tempfile
import threading
from pathlib import Path

import httpx
import pytest
import torch
from omegaconf import OmegaConf

from videollm.chat import Chat, new_conversation
from videollm.serve import (
    MediaFiles,
    ServeConfig,
    ServerThread,
    Turn,
    MediaRef,
    build_conversation,
    create_app,
    is_loopback,
    main,
    parse_request,
)
from videollm.synthetic import ClipSpec, ImageSpec, write_clip, write_image

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = REPO / "videollm" / "configs" / "models" / "video_llama_tiny.yaml"
MAX_LENGTH = 512  # the tiny LLM's positions: the server caps its context there


@pytest.fixture(scope="module")
def chat() -> Chat:
    from videollm.models.video_llama import VideoLLAMA

    torch.manual_seed(0)
    return Chat(VideoLLAMA.from_config(OmegaConf.load(TINY_YAML).model).eval())


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    clips = []
    for i, (color, shape, direction) in enumerate([("red", "circle", "right"), ("blue", "square", "up"),
                                                   ("green", "triangle", "left")]):
        path = root / f"clip{i}.mp4"
        write_clip(path, ClipSpec(name=f"clip{i}", shape=shape, color=color, direction=direction, speed="slow",
                                  seed=i), num_frames=16)
        clips.append(path)
    image = root / "still.jpg"
    write_image(image, ImageSpec(name="still", shape="triangle", color="yellow"))
    broken = root / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    outside = tmp_path_factory.mktemp("outside") / "secret.mp4"
    outside.write_bytes(clips[0].read_bytes())
    (root / "link.mp4").symlink_to(outside)
    return {"root": root, "clips": clips, "image": image, "broken": broken, "outside": outside}


SERVE = dict(model_name="tiny", max_body_bytes=200_000, max_media_bytes=60_000, max_media=2, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def server(chat, media):
    app = create_app(chat, ServeConfig(media_root=str(media["root"]), **SERVE))
    with ServerThread(app) as srv:
        yield srv
    assert not srv.thread.is_alive()  # shut down at the end


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def video_message(url: str, question: str) -> dict:
    return {"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                        {"type": "text", "text": question}]}


def body(messages, **kw) -> dict:
    return {"model": "tiny", "messages": messages, "max_tokens": 12, **kw}


def answer_directly(chat: Chat, clip: Path, question: str, max_tokens: int) -> str:
    """The answer the Chat API gives for one question about a clip, without the server."""
    conv = new_conversation("vicuna", "video")
    img_list: list = []
    chat.upload_video(str(clip), conv, img_list, with_audio=False)
    chat.ask(question, conv)
    return chat.answer(conv, img_list, max_new_tokens=max_tokens, max_length=MAX_LENGTH)[0]


# --------------------------------------------------------------------------------------------- protocol


def test_the_openai_client_streams_an_answer_about_a_generated_clip(server, chat, media):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=30, max_retries=0)
    clip = media["clips"][0]
    messages = [video_message(clip.as_uri(), "What is moving in the video?")]
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, stream=True))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert sum(1 for c in chunks if (c.choices[0].delta.content or "")) >= 2  # it came in pieces
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16)
    assert plain.choices[0].message.role == "assistant"
    assert streamed == plain.choices[0].message.content == answer_directly(chat, clip, "What is moving in the video?", 16)
    assert streamed  # random weights still write tokens
    usage = plain.usage
    assert usage.prompt_tokens > 8 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_models_endpoint_lists_the_served_model(server):
    from openai import NotFoundError, OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=10, max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(NotFoundError):
        client.models.retrieve("gpt-4")


def test_include_usage_adds_a_usage_chunk_and_the_stream_ends_with_done(http, media):
    lines = []
    with http.stream("POST", "/v1/chat/completions", json=body(
            [video_message(media["clips"][1].as_uri(), "Which way?")], stream=True,
            stream_options={"include_usage": True})) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] >= 1
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")


def test_concurrent_requests_are_batched_and_answer_as_they_would_alone(chat, media):
    """Four requests at once, each with its own max_tokens, form one batch; each answer equals
    the answer the same request gets alone."""
    app = create_app(chat, ServeConfig(media_root=str(media["root"]), batch_wait_ms=400, max_batch_size=4, **SERVE))
    questions = ["What is moving?", "Which direction?", "What colour is it?", "Describe the video."]
    requests = [body([video_message(media["clips"][i % 3].as_uri(), q)], max_tokens=6 + 3 * i)
                for i, q in enumerate(questions)]
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        alone = [client.post("/v1/chat/completions", json=r).json()["choices"][0]["message"]["content"]
                 for r in requests]
        results: list = [None] * len(requests)

        def send(i: int) -> None:
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                results[i] = c.post("/v1/chat/completions", json=requests[i]).json()

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        health = client.get("/health").json()
    assert health["recent_batches"][:4] == [1, 1, 1, 1] and max(health["recent_batches"][4:]) >= 2
    assert [r["choices"][0]["message"]["content"] for r in results] == alone
    lengths = [r["usage"]["completion_tokens"] for r in results]
    assert lengths[0] < lengths[-1]  # each row kept its own max_tokens


def test_requests_with_different_sampling_settings_are_never_batched_together(chat, media):
    app = create_app(chat, ServeConfig(media_root=str(media["root"]), batch_wait_ms=400, **SERVE))
    requests = [body([video_message(media["clips"][i % 3].as_uri(), "Q?")], **extra)
                for i, extra in enumerate([{}, {"temperature": 0.7}, {}, {"temperature": 0.7}])]
    with ServerThread(app) as srv:
        statuses: list = []

        def send(r: dict) -> None:
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                statuses.append(c.post("/v1/chat/completions", json=r).status_code)

        threads = [threading.Thread(target=send, args=(r,)) for r in requests]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        sizes = httpx.get(srv.url + "/health").json()["recent_batches"]
    assert statuses == [200] * 4 and sum(sizes) == 4 and max(sizes) <= 2


def test_multi_turn_messages_follow_the_chat_template(chat, media):
    """system / user (video + text) / assistant / user map onto the conversation the Chat API
    builds for the same dialogue; consecutive user messages become one turn."""
    clip = media["clips"][0]
    cfg = ServeConfig(media_root=str(media["root"]))
    turns = [Turn("system", "Answer briefly."),
             Turn("user", "What is moving?", [MediaRef("video", clip.as_uri(), "p")]),
             Turn("assistant", "A red circle."),
             Turn("user", "Which way"), Turn("user", "does it go?")]
    conv, img_list = build_conversation(chat, "vicuna", turns, MediaFiles(cfg))
    ref = new_conversation("vicuna", "video")
    ref.system = "Answer briefly."
    ref_imgs: list = []
    chat.upload_video(str(clip), ref, ref_imgs, with_audio=False)
    chat.ask("What is moving?", ref)
    ref.append_message(ref.roles[1], "A red circle.")
    chat.ask("Which way\ndoes it go?", ref)
    assert conv.get_prompt() == ref.get_prompt()
    assert conv.get_prompt().startswith("Answer briefly.###Human: <Video><ImageHere></Video> ")
    assert len(img_list) == 1
    # llama_v2 needs strictly alternating turns: the same dialogue renders without a PromptError
    conv2, _ = build_conversation(chat, "llama_v2", turns, MediaFiles(cfg))
    prompt = conv2.get_prompt()
    assert prompt.count("[INST]") == 2 and "<<SYS>>\nAnswer briefly.\n<</SYS>>" in prompt and "A red circle." in prompt
    # a text before the media in one message: the media come first (the template's order)
    conv3, _ = build_conversation(chat, "vicuna", [Turn("user", "Look:", [MediaRef("video", clip.as_uri(), "p")])],
                                  MediaFiles(cfg))
    assert conv3.messages[0][1].startswith("<Video><ImageHere></Video> ") and conv3.messages[0][1].endswith(" Look:")


def test_multi_turn_and_image_requests_are_answered(http, media):
    r = http.post("/v1/chat/completions", json=body([
        {"role": "system", "content": "Be brief."},
        video_message(media["clips"][0].as_uri(), "What is moving?"),
        {"role": "assistant", "content": "A red circle."},
        {"role": "user", "content": [{"type": "text", "text": "Which way?"}]}]))
    assert r.status_code == 200 and isinstance(r.json()["choices"][0]["message"]["content"], str)
    r = http.post("/v1/chat/completions", json=body([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": media["image"].as_uri()}}, {"type": "text", "text": "Shape?"}]}]))
    assert r.status_code == 200
    r = http.post("/v1/chat/completions", json=body([{"role": "user", "content": "Hello there"}]))
    assert r.status_code == 200  # text only


def test_a_data_url_answers_like_the_file_url_and_leaves_no_temporary_file(http, media):
    clip = media["clips"][2]
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "videollm-serve-*")))
    data = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
    by_data = http.post("/v1/chat/completions", json=body([video_message(data, "What is it?")]))
    by_file = http.post("/v1/chat/completions", json=body([video_message(clip.as_uri(), "What is it?")]))
    assert by_data.status_code == by_file.status_code == 200
    assert by_data.json()["choices"][0]["message"]["content"] == by_file.json()["choices"][0]["message"]["content"]
    with http.stream("POST", "/v1/chat/completions", json=body([video_message(data, "What is it?")], stream=True)) as r:
        assert [line for line in r.iter_lines() if line][-1] == "data: [DONE]"
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "videollm-serve-*"))) == before


def test_stop_sequences_cut_plain_and_streamed_answers(http, media):
    messages = [video_message(media["clips"][0].as_uri(), "What is moving?")]
    full = http.post("/v1/chat/completions", json=body(messages, max_tokens=20)).json()["choices"][0]["message"]["content"]
    assert len(full) >= 8
    stop = full[4:7]
    expected = full[: full.find(stop)]
    cut = http.post("/v1/chat/completions", json=body(messages, max_tokens=20, stop=[stop, "never-there"])).json()
    assert cut["choices"][0]["message"]["content"] == expected and cut["choices"][0]["finish_reason"] == "stop"
    with http.stream("POST", "/v1/chat/completions", json=body(messages, max_tokens=20, stop=stop, stream=True)) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == expected
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_without_max_tokens_a_long_prompt_gets_the_room_left(http):
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": [
        {"role": "user", "content": "lorem ipsum " * 30}]})  # ~290 tokens: less room than the default 256
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert MAX_LENGTH - 256 < usage["prompt_tokens"] < MAX_LENGTH and usage["total_tokens"] <= MAX_LENGTH


def test_max_tokens_and_sampling_settings(http, media):
    messages = [video_message(media["clips"][1].as_uri(), "What is moving?")]
    short = http.post("/v1/chat/completions", json=body(messages, max_tokens=2)).json()
    longer = http.post("/v1/chat/completions", json=body(messages, max_tokens=12)).json()
    assert short["choices"][0]["finish_reason"] == "length"
    assert longer["choices"][0]["message"]["content"].startswith(short["choices"][0]["message"]["content"])
    assert short["usage"]["completion_tokens"] < longer["usage"]["completion_tokens"]
    sampled = http.post("/v1/chat/completions", json=body(messages, temperature=0.9, top_p=0.5))
    assert sampled.status_code == 200 and isinstance(sampled.json()["choices"][0]["message"]["content"], str)


def test_a_client_that_leaves_mid_stream_does_not_hang_the_server(server, http, media):
    messages = [video_message(media["clips"][0].as_uri(), "Tell me everything.")]
    with http.stream("POST", "/v1/chat/completions", json=body(messages, max_tokens=400, stream=True)) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 3:
                break  # leaving the block closes the connection
    r = http.post("/v1/chat/completions", json=body(messages, max_tokens=4), timeout=20)
    assert r.status_code == 200


# --------------------------------------------------------------------------------------------- bad requests


def _bad_cases(media):
    root = media["root"]
    big_payload = base64.b64encode(os.urandom(90_000)).decode()
    garbage = base64.b64encode(os.urandom(3000)).decode()
    ok_text = {"role": "user", "content": "hi"}
    return {
        # name: (request body (dict) or raw bytes, status, code, text the message must contain)
        "missing file": (body([video_message((root / "nope.mp4").as_uri(), "Q?")]), 400, "media_not_found", "nope.mp4"),
        "unsupported scheme": (body([video_message("https://example.com/a.mp4", "Q?")]), 400,
                               "unsupported_url_scheme", "'https'"),
        "bare path": (body([video_message(str(media["clips"][0]), "Q?")]), 400, "unsupported_url_scheme",
                      "without a scheme"),
        "file outside the root": (body([video_message(media["outside"].as_uri(), "Q?")]), 403,
                                  "media_outside_root", "outside the media root"),
        "symlink out of the root": (body([video_message((root / "link.mp4").as_uri(), "Q?")]), 403,
                                    "media_outside_root", "link.mp4"),
        "corrupt video": (body([video_message(media["broken"].as_uri(), "Q?")]), 400, "invalid_media", "broken.mp4"),
        "corrupt data: video": (body([video_message("data:video/mp4;base64," + garbage, "Q?")]), 400, "invalid_media",
                                "VideoDecodeError"),
        "not base64": (body([video_message("data:video/mp4;base64,@@@@", "Q?")]), 400, "invalid_base64", "base64"),
        "data: medium over its limit": (body([video_message("data:video/mp4;base64," + big_payload, "Q?")]), 413,
                                        "media_too_large", "limit"),
        "oversized body": (b'{"model": "tiny", "pad": "' + b"x" * 300_000 + b'"}', 413, "request_too_large", "limit"),
        "malformed JSON": (b'{"model": "tiny", "messages": [', 400, "invalid_json", "not valid JSON"),
        "JSON that is not an object": (b"[1, 2]", 400, "invalid_json", "JSON object"),
        "unknown model": ({**body([ok_text]), "model": "gpt-4"}, 404, "model_not_found", "gpt-4"),
        "no model": ({"messages": [ok_text]}, 400, "missing_required_parameter", "model"),
        "too many media": (body([{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": c.as_uri()}} for c in media["clips"]]}]), 400,
            "too_many_media", "at most 2"),
        "max_tokens zero": (body([ok_text], max_tokens=0), 400, "invalid_value", "max_tokens"),
        "max_tokens over the context": (body([ok_text], max_tokens=10_000), 400, "invalid_value", "max_tokens"),
        "max_tokens not a number": (body([ok_text], max_tokens="many"), 400, "invalid_type", "max_tokens"),
        "temperature out of range": (body([ok_text], temperature=5), 400, "invalid_value", "temperature"),
        "n above 1": (body([ok_text], n=3), 400, "invalid_value", "n=1"),
        "empty messages": (body([]), 400, "invalid_value", "messages"),
        "last message from the assistant": (body([ok_text, {"role": "assistant", "content": "yes"}]), 400,
                                            "invalid_value", "last message"),
        "unknown role": (body([{"role": "tool", "content": "x"}]), 400, "invalid_value", "tool"),
        "unknown part type": (body([{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": "x"}}]}]),
                              400, "invalid_value", "audio_url"),
        "media in an assistant message": (body([ok_text, {"role": "assistant", "content": [
            {"type": "video_url", "video_url": {"url": "x"}}]}, ok_text]), 400, "invalid_value", "user messages"),
        "stop of the wrong type": (body([ok_text], stop=[1, 2]), 400, "invalid_value", "stop"),
        "messages and max_tokens over the context": (body([{"role": "user", "content": "lorem ipsum " * 50}],
                                                          max_tokens=100), 400, "context_length_exceeded",
                                                     "maximum context length is 512"),
        "deeply nested JSON": (b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json", "nested"),
    }


CASES = ["missing file", "unsupported scheme", "bare path", "file outside the root", "symlink out of the root",
         "corrupt video", "corrupt data: video", "not base64", "data: medium over its limit", "oversized body",
         "malformed JSON", "JSON that is not an object", "unknown model", "no model", "too many media",
         "max_tokens zero", "max_tokens over the context", "max_tokens not a number", "temperature out of range",
         "n above 1", "empty messages", "last message from the assistant", "unknown role", "unknown part type",
         "media in an assistant message", "stop of the wrong type", "messages and max_tokens over the context",
         "deeply nested JSON"]


def assert_error(response: httpx.Response, status: int, code, contains: str = "") -> dict:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code and contains in err["message"], err
    return err


@pytest.mark.parametrize("case", CASES)
def test_each_bad_request_gets_an_openai_error_object(http, media, case):
    request, status, code, contains = _bad_cases(media)[case]
    if isinstance(request, bytes):
        r = http.post("/v1/chat/completions", content=request, headers={"content-type": "application/json"})
    else:
        r = http.post("/v1/chat/completions", json=request)
    err = assert_error(r, status, code, contains)
    if case in ("missing file", "unsupported scheme", "file outside the root"):
        assert err["param"] == "messages[0].content[0].video_url.url"


def test_a_chunked_body_over_the_limit_is_refused_while_it_arrives(http):
    def chunks():
        for _ in range(40):
            yield b" " * 10_000  # 400 kB, no Content-Length header

    assert_error(http.post("/v1/chat/completions", content=chunks()), 413, "request_too_large", "limit")


def test_unknown_urls_and_methods_get_error_objects_and_the_server_keeps_serving(http, media):
    assert_error(http.get("/v1/nothing"), 404, "unknown_url", "/v1/nothing")
    assert_error(http.get("/v1/chat/completions"), 405, "method_not_allowed", "GET")
    ok = http.post("/v1/chat/completions", json=body([video_message(media["clips"][0].as_uri(), "Q?")]))
    assert ok.status_code == 200  # after every bad request above
    assert http.get("/health").json()["status"] == "ok"


def test_file_urls_are_refused_without_a_media_root(chat, media):
    app = create_app(chat, ServeConfig(**SERVE))
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        r = client.post("/v1/chat/completions", json=body([video_message(media["clips"][0].as_uri(), "Q?")]))
        assert_error(r, 403, "file_urls_disabled", "--media-root")


def test_an_api_key_is_required_when_one_is_set(chat, media):
    from openai import AuthenticationError, OpenAI

    app = create_app(chat, ServeConfig(media_root=str(media["root"]), api_key="s3cret", **SERVE))
    with ServerThread(app) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            assert_error(client.get("/v1/models"), 401, "missing_api_key", "API key")
            r = client.post("/v1/chat/completions", json=body([{"role": "user", "content": "hi"}]),
                            headers={"Authorization": "Bearer wrong"})
            err = assert_error(r, 401, "invalid_api_key", "Incorrect API key")
            assert r.headers["www-authenticate"] == "Bearer" and "s3cret" not in json.dumps(err)
            assert client.get("/health").status_code == 200  # liveness needs no key
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0, timeout=30)
        assert [m.id for m in good.models.list()] == ["tiny"]
        answer = good.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert answer.choices[0].finish_reason in ("stop", "length")
    assert not srv.thread.is_alive()


# --------------------------------------------------------------------------------------------- command line


def test_loopback_rule():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.com")


def test_an_exposed_host_without_an_api_key_does_not_start(capsys, monkeypatch):
    monkeypatch.delenv("VIDEOLLM_API_KEY", raising=False)
    assert main(["--cfg-path", str(REPO / "eval_configs" / "tiny.yaml"), "--host", "0.0.0.0"]) == 2
    assert "--api-key" in capsys.readouterr().err


def test_the_command_line_serves_the_eval_config(monkeypatch, media, tmp_path):
    """``main`` builds the model from eval_configs/tiny.yaml and the flags reach the app."""
    import uvicorn

    captured = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: captured.update(app=app, **kw))
    monkeypatch.chdir(tmp_path)  # no trained checkpoint here: random weights, with a notice
    assert main(["--cfg-path", str(REPO / "eval_configs" / "tiny.yaml"), "--host", "0.0.0.0", "--port", "8123",
                 "--api-key", "k", "--media-root", str(media["root"]), "--max-batch-size", "3"]) == 0
    assert captured["host"] == "0.0.0.0" and captured["port"] == 8123
    cfg = captured["app"].state.config
    assert (cfg.model_name, cfg.api_key, cfg.max_batch_size, cfg.template) == ("tiny", "k", 3, "vicuna")
    with ServerThread(captured["app"]) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        r = client.post("/v1/chat/completions", headers={"Authorization": "Bearer k"},
                        json=body([video_message(media["clips"][0].as_uri(), "What is moving?")], max_tokens=4))
        assert r.status_code == 200 and r.json()["model"] == "tiny"


def test_parse_request_defaults():
    req = parse_request(json.dumps({"model": "m", "messages": [{"role": "developer", "content": "sys"},
                                                               {"role": "user", "content": "q"}]}).encode(),
                        ServeConfig(model_name="m", default_max_tokens=77))
    assert req.max_tokens == 77 and not req.do_sample and not req.stream and req.stop == []
    assert [t.role for t in req.turns] == ["system", "user"]
    req = parse_request(json.dumps({"model": "m", "messages": [{"role": "user", "content": "q"}],
                                    "max_completion_tokens": 5, "temperature": 0.7}).encode(),
                        ServeConfig(model_name="m"))
    assert req.max_tokens == 5 and req.do_sample


# --------------------------------------------------------------------------------------------- failures


def test_a_failing_generation_is_a_500_error_object_and_the_next_request_is_served(http, chat, media, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    messages = [video_message(media["clips"][0].as_uri(), "Q?")]
    with monkeypatch.context() as m:
        m.setattr(chat, "answer_batch", broken)
        assert_error(http.post("/v1/chat/completions", json=body(messages)), 500, "internal_error", "RuntimeError")
    assert http.post("/v1/chat/completions", json=body(messages)).status_code == 200


def test_a_stream_that_fails_midway_ends_with_an_error_event(server, chat, media, monkeypatch):
    from openai import APIError, OpenAI

    def half(*args, **kwargs):
        yield "A red"
        raise RuntimeError("decoder fault (simulated)")

    monkeypatch.setattr(chat, "stream_answer", half)
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=30, max_retries=0)
    got = []
    with pytest.raises(APIError, match="RuntimeError"):
        for c in client.chat.completions.create(model="tiny", stream=True, max_tokens=8,
                                                messages=[video_message(media["clips"][0].as_uri(), "Q?")]):
            got.append(c.choices[0].delta.content or "")
    assert "".join(got) == "A red"


def test_a_request_past_its_timeout_gets_a_504(chat, media):
    app = create_app(chat, ServeConfig(media_root=str(media["root"]), request_timeout=0.01, **SERVE))
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        r = client.post("/v1/chat/completions", json=body([video_message(media["clips"][0].as_uri(), "Q?")],
                                                          max_tokens=100))
        assert_error(r, 504, "timeout", "no answer within")


def test_a_full_queue_answers_503_and_the_queued_request_is_still_served(chat, media):
    """A long stream keeps the worker busy; one request waits in the queue (max_queue=1); the
    next one is refused at once with a 503; closing the stream lets the queued one through."""
    app = create_app(chat, ServeConfig(media_root=str(media["root"]), max_queue=1, **SERVE))
    messages = [video_message(media["clips"][0].as_uri(), "Q?")]
    long = [video_message(media["clips"][0].as_uri(), "Tell me everything.")]  # 400 tokens, no early stop
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        queued: dict = {}

        def send_queued() -> None:
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                queued["r"] = c.post("/v1/chat/completions", json=body(messages, max_tokens=4))

        with client.stream("POST", "/v1/chat/completions", json=body(long, max_tokens=400, stream=True)) as s:
            assert s.status_code == 200
            lines = s.iter_lines()
            next(lines)  # the stream has started: the worker is generating it
            t = threading.Thread(target=send_queued)
            t.start()
            for _ in range(500):
                if client.get("/health").json()["queued"] == 1:
                    break
                threading.Event().wait(0.01)
            assert_error(client.post("/v1/chat/completions", json=body(messages, max_tokens=4)), 503, "queue_full",
                         "busy")
        t.join(30)  # the stream was closed: its generation is cancelled and the queued request runs
        assert queued["r"].status_code == 200

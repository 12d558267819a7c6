"""videollm.benchmarks: option parsing, each loader on small files in the published formats, the
judge client against a local fake OpenAI-compatible judge, and the metrics."""

from __future__ import annotations

import csv
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from videollm.benchmarks import extract_option, load_benchmark
from videollm.errors import ConfigError, DataError

COLORS = ["red", "green", "blue", "yellow"]
EVENTS = ["The man opened the door.", "The man closed the door.", "The woman sat down.", "Nothing happened."]


@pytest.mark.parametrize("reply, options, prefix, want, how", [
    ("B", COLORS, "", "B", "letter"),
    ("(C) blue", COLORS, "", "C", "letter"),
    ("C) blue", COLORS, "(", "C", "letter"),               # after the "Best option:(" cue
    ("d.", COLORS, "", "D", "letter"),
    ("A red circle is moving right.", COLORS, "", "A", "text"),   # "A" is an article here
    ("A green square is moving up.", COLORS, "", "B", "text"),
    ("The answer is (D).", COLORS, "", "D", "statement"),
    ("Answer: c", COLORS, "", "C", "statement"),
    ("I think the correct option is b, because it is green.", COLORS, "", "B", "statement"),
    ("I think the answer is a red one", COLORS, "", "A", "text"),  # "a" is an article, the text says red
    ("It is blue.", COLORS, "", "C", "text"),
    ("Best option: (B) green", COLORS, "", "B", "statement"),
    ("Option E", COLORS, "", None, "none"),                 # no option E among four
    ("yellowish?", COLORS, "", None, "none"),               # not a whole word
    ("red or green", COLORS, "", None, "none"),             # two options named: undecided
    ("the man closed the door", EVENTS, "", "B", "text"),
    ("A. The man opened the door.", ["A. The man opened the door.", "B. The man closed the door."], "", "A", "letter"),
    ("He picked it up and put it down", ["up", "down", "pick up"], "", None, "none"),
    ("The shape moves to the left (B).", ["right", "left"], "", "B", "marker"),
])
def test_option_letters_are_found_in_tricky_free_text(reply, options, prefix, want, how):
    got = extract_option(reply, options, prefix=prefix)
    assert (got.letter, got.how) == (want, how)


def test_the_random_fallback_is_reproducible_and_near_uniform():
    picks = [extract_option("???", COLORS, fallback="random", key=f"q{i}") for i in range(400)]
    assert all(p.how == "fallback" for p in picks)
    assert picks[7] == extract_option("???", COLORS, fallback="random", key="q7")
    counts = {c: sum(p.letter == c for p in picks) for c in "ABCD"}
    assert all(60 < n < 140 for n in counts.values()), counts


# --------------------------------------------------------------------------------------------- loaders


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00")
    return path


def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def test_mvbench_per_task_json_with_bounds_and_the_official_folders(tmp_path):
    _json(tmp_path / "json" / "action_sequence.json", [
        {"video": "ZS9XR.mp4", "question": "What happened after the person took the food?",
         "candidates": ["Ate the medicine.", "Tidied up the blanket.", "Put down the cup/glass/bottle.", "Took the box."],
         "answer": "Ate the medicine.", "start": 19.6, "end": 34.0}])
    _json(tmp_path / "json" / "moving_direction.json", [
        {"video": "video_10001.mp4", "question": "What direction is the cyan cube moving?",
         "candidates": ["up", "down", "left", "right"], "answer": "left"}])
    b = load_benchmark("mvbench", tmp_path)  # the other 18 task files are absent: skipped
    assert [s.id for s in b.samples] == ["Action Sequence/0", "Moving Direction/0"]
    s0, s1 = b.samples
    assert s0.video == str(tmp_path / "video" / "star" / "Charades_v1_480" / "ZS9XR.mp4")
    assert s1.video == str(tmp_path / "video" / "clevrer" / "video_validation" / "video_10001.mp4")
    assert (s0.answer, s1.answer) == ("A", "C") and s0.extra["bound"] == [19.6, 34.0]
    text = b.user_text(s1)
    assert text == "Question: What direction is the cyan cube moving?\nOptions:\n(A) up\n(B) down\n(C) left\n(D) right"
    assert b.answer_cue() == "Best option:(" and b.system_text().startswith("Carefully watch the video")
    _json(tmp_path / "json" / "moving_count.json", [{"video": "v.mp4", "question": "q", "candidates": ["1", "2"],
                                                     "answer": "3"}])
    with pytest.raises(DataError, match=r"moving_count.json: entry 0: answer '3' is not one of the candidates"):
        load_benchmark("mvbench", tmp_path)


def test_videomme_grouped_json_and_parquet_with_and_without_subtitles(tmp_path):
    rows = [{"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
             "url": "https://www.youtube.com/watch?v=fFjv93ACGo8", "videoID": "fFjv93ACGo8", "question_id": "001-1",
             "task_type": "Counting Problem", "question": "When demonstrating the Germany modern Christmas tree is "
             "initially decorated with apples, candles and berries, which kind of the decoration has the largest number?",
             "options": ["A. Apples.", "B. Candles.", "C. Berries.", "D. The three kinds are of the same number."],
             "answer": "C"}]
    grouped = [{k: rows[0][k] for k in ("video_id", "duration", "domain", "sub_category", "url", "videoID")}
               | {"questions": [{k: rows[0][k] for k in ("question_id", "task_type", "question", "options", "answer")}]}]
    _json(tmp_path / "videomme.json", grouped)
    (tmp_path / "subtitle").mkdir()
    (tmp_path / "subtitle" / "fFjv93ACGo8.srt").write_text(
        "1\n00:00:00,000 --> 00:00:02,500\n<font color=\"#fff\">In Germany</font>\n\n2\n00:00:02,500 --> 00:00:05,000\n"
        "the tree had apples\nand candles.\n")
    _touch(tmp_path / "data" / "fFjv93ACGo8.mp4")
    plain = load_benchmark("videomme", tmp_path)
    (s,) = plain.samples
    assert (s.id, s.answer, s.category, s.options[2]) == ("001-1", "C", "short", "Berries.")
    assert s.video == str(tmp_path / "data" / "fFjv93ACGo8.mp4") and s.extra["task_type"] == "Counting Problem"
    text = plain.user_text(s)
    assert text.startswith("Select the best answer") and "\nC. Berries.\n" in text and text.endswith("The best answer is:")
    assert "subtitles" not in text
    subs = load_benchmark("videomme_subtitles", tmp_path).samples[0]
    assert subs.extra["subtitles"] == "In Germany\nthe tree had apples and candles."
    assert "This video's subtitles are listed below:\nIn Germany\n" in load_benchmark("videomme_subtitles", tmp_path).user_text(subs)
    # the Hugging Face parquet layout gives the same samples
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "videomme.json").unlink()
    (tmp_path / "videomme").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "videomme" / "test-00000-of-00001.parquet")
    assert load_benchmark("videomme", tmp_path).samples[0].to_json() == s.to_json()


def test_egoschema_questions_and_the_public_answer_subset(tmp_path):
    qs = [{"q_uid": "0074f737-11cb-497d-8d07-77c3a8127391", "google_drive_id": "1XdHyN6y1XBeWrWg5Bs9ZRrtBRc8iTWah",
           "question": "Taking into account all the actions performed by c, what can you deduce about the primary "
           "objective and focus within the video content?",
           **{f"option {i}": f"C is option {i}." for i in range(5)}},
          {"q_uid": "hidden", "question": "q?", **{f"option {i}": str(i) for i in range(5)}}]
    _json(tmp_path / "questions.json", qs)
    _json(tmp_path / "subset_answers.json", {"0074f737-11cb-497d-8d07-77c3a8127391": 3})
    b = load_benchmark("egoschema", tmp_path)
    (s,) = b.samples  # the question without a public answer is left out
    assert s.answer == "D" and len(s.options) == 5 and s.video.endswith("videos/0074f737-11cb-497d-8d07-77c3a8127391.mp4")


def test_nextqa_csv_with_the_video_map_and_type_groups(tmp_path):
    with open(tmp_path / "val.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video", "frame_count", "width", "height", "question", "answer", "qid", "type", "a0", "a1", "a2", "a3", "a4"])
        w.writerow(["4010069381", "369", "640", "480", "how do the two man play the instrument", "0", "6", "CH",
                    "roll the handle", "tap their feet", "strum the string", "hit with sticks", "pat with hand"])
        w.writerow(["4010069381", "369", "640", "480", "what did the man do after he stood up", "4", "7", "TN",
                    "a", "b", "c", "d", "walk away"])
    _json(tmp_path / "map_vid_vidorID.json", {"4010069381": "1006/4010069381"})
    b = load_benchmark("nextqa", tmp_path)
    s0, s1 = b.samples
    assert s0.id == "4010069381_6" and s0.answer == "A" and s0.question.endswith("instrument?")
    assert s0.video == str(tmp_path / "NExTVideo" / "1006" / "4010069381.mp4")
    assert (s0.extra["group"], s1.extra["group"], s1.answer) == ("causal", "temporal", "E")
    assert tuple(b.category_fields) == ("type", "group")


def test_msvd_qa_with_the_youtube_mapping(tmp_path):
    _json(tmp_path / "test_qa.json", [{"answer": "man", "id": 0, "question": "who is cutting a tomato?", "video_id": 1},
                                      {"answer": "cut", "id": 1, "question": "what is a man doing?", "video_id": 1}])
    (tmp_path / "youtube_mapping.txt").write_text("-4wsuPCjDBc_5_15 vid1\n")
    clip = _touch(tmp_path / "YouTubeClips" / "-4wsuPCjDBc_5_15.avi")
    b = load_benchmark("msvd_qa", tmp_path)
    assert [s.video for s in b.samples] == [str(clip)] * 2 and [s.category for s in b.samples] == ["who", "what"]
    assert b.kind == "open" and b.user_text(b.samples[1]) == "what is a man doing?"
    (tmp_path / "youtube_mapping.txt").write_text("-4wsuPCjDBc_5_15 vid2\n")
    with pytest.raises(DataError, match="vid1 not in youtube_mapping.txt"):
        load_benchmark("msvd_qa", tmp_path)


def test_msrvtt_qa_activitynet_qa_and_tgif_qa(tmp_path):
    m = tmp_path / "msrvtt"
    _json(m / "test_qa.json", [{"answer": "cartoon", "category_id": 3, "id": 158581, "question": "what is being shown?",
                                "video_id": 7010}])
    _touch(m / "videos" / "all" / "video7010.mp4")
    (s,) = load_benchmark("msrvtt_qa", m).samples
    assert s.video == str(m / "videos" / "all" / "video7010.mp4") and s.extra["category_id"] == 3

    a = tmp_path / "anet"
    _json(a / "test_q.json", [{"video_name": "lKx3wTd1MtQ", "question": "is the person in the video indoors",
                               "question_id": "v_lKx3wTd1MtQ_1"}])
    _json(a / "test_a.json", [{"answer": "yes", "type": 3, "question_id": "v_lKx3wTd1MtQ_1"}])
    _touch(a / "videos" / "v_lKx3wTd1MtQ.mp4")
    (s,) = load_benchmark("activitynet_qa", a).samples
    assert (s.answer, s.category) == ("yes", "yes_no") and s.video.endswith("v_lKx3wTd1MtQ.mp4")

    t = tmp_path / "tgif"
    (t / "Test_frameqa_question.csv").parent.mkdir(parents=True, exist_ok=True)
    (t / "Test_frameqa_question.csv").write_text(
        "gif_name\tquestion\tanswer\ttype\tvid_id\tkey\n"
        "tumblr_no73q2fm0I1uuf348o1_250\twhat is the color of the hat\tblack\t2\tgif_1\t1\n")
    (s,) = load_benchmark("tgif_qa", t).samples
    assert (s.answer, s.category) == ("black", "color") and s.video.endswith("gifs/tumblr_no73q2fm0I1uuf348o1_250.mp4")
    with pytest.raises(DataError, match="TAB-separated"):
        (t / "Test_frameqa_question.csv").write_text("gif_name,question,answer\n")
        load_benchmark("tgif_qa", t)


def test_msrvtt_captions_and_unknown_benchmarks(tmp_path):
    _json(tmp_path / "test_videodatainfo.json", {
        "videos": [{"video_id": "video7010", "category": 9, "split": "test"}, {"video_id": "video1", "split": "train"}],
        "sentences": [{"caption": "a cartoon is playing", "video_id": "video7010", "sen_id": 0},
                      {"caption": "an animated show", "video_id": "video7010", "sen_id": 1}]})
    (s,) = load_benchmark("msrvtt_caption", tmp_path).samples
    assert s.references == ["a cartoon is playing", "an animated show"]
    with pytest.raises(ConfigError, match="did you mean msvd_qa"):
        load_benchmark("msvd_q", tmp_path)
    with pytest.raises(DataError, match="no such folder"):
        load_benchmark("mvbench", tmp_path / "nope")
    with pytest.raises(DataError, match="not valid JSON"):
        (tmp_path / "test_qa.json").write_text("[{")
        load_benchmark("msvd_qa", tmp_path)


# --------------------------------------------------------------------------------------------- judge


class FakeJudge:
    """A tiny OpenAI-compatible /v1/chat/completions on 127.0.0.1: "yes"/5 when the predicted answer
    contains the correct one, else "no"/1; replies as Video-ChatGPT's judge does (a dict string)."""

    def __init__(self, fail_first: int = 0, status: int = 200):
        self.requests = []
        self.fail_first = fail_first
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                if judge.fail_first > 0 or status != 200:
                    judge.fail_first -= 1
                    self.send_response(503 if status == 200 else status)
                    self.end_headers()
                    self.wfile.write(b'{"error": {"message": "busy"}}')
                    return
                user = body["messages"][-1]["content"]
                answer = user.split("Correct Answer: ")[1].split("\n")[0].strip().lower()
                pred = user.split("Predicted Answer: ")[1].split("\n")[0].strip().lower()
                verdict = "{'pred': 'yes', 'score': 5}" if answer in pred else "{'pred': 'no', 'score': 1}"
                data = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                                   "choices": [{"index": 0, "message": {"role": "assistant", "content": verdict},
                                                "finish_reason": "stop"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_the_judge_client_speaks_the_video_chatgpt_protocol_to_an_openai_compatible_server():
    from videollm.benchmarks.judge import USER_PROMPT, JudgeClient

    with FakeJudge(fail_first=1) as fake:
        client = JudgeClient(fake.url, model="judge-model", api_key="sk-test", timeout=5, retries=2, backoff=0.01)
        yes = client.judge("what color is the shape?", "red", "It is red.")
        no = client.judge("what color is the shape?", "red", "It is blue.")
    assert (yes.pred, yes.score, no.pred, no.score) == ("yes", 5.0, "no", 1.0)
    assert yes.raw == "{'pred': 'yes', 'score': 5}" and yes.model == "judge-model"
    assert len(fake.requests) == 3  # one 503, retried
    req = fake.requests[-1]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "judge-model" and req["body"]["temperature"] == 0
    assert req["body"]["messages"][1]["content"] == USER_PROMPT.format(question="what color is the shape?", answer="red",
                                                                       prediction="It is blue.")
    assert yes.messages[0]["role"] == "system" and "Python dictionary" in yes.messages[1]["content"]


def test_a_dead_or_refusing_judge_fails_fast_with_a_named_error():
    import socket
    import time

    from videollm.benchmarks.judge import JudgeClient, JudgeError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    t0 = time.perf_counter()
    with pytest.raises(JudgeError, match=rf"127.0.0.1:{port}/v1/chat/completions.*after 2 attempt"):
        JudgeClient(f"http://127.0.0.1:{port}/v1", timeout=2, retries=1, backoff=0.01).judge("q", "a", "p")
    assert time.perf_counter() - t0 < 10
    with FakeJudge(status=401) as fake:
        with pytest.raises(JudgeError, match="HTTP 401"):
            JudgeClient(fake.url, retries=3, backoff=0.01).judge("q", "a", "p")
        assert len(fake.requests) == 1  # an auth error is not retried
    with pytest.raises(JudgeError, match="expected an http"):
        JudgeClient("ftp://x")


@pytest.mark.parametrize("reply, want", [
    ("{'pred': 'yes', 'score': 4}", ("yes", 4.0)),
    ('{"pred": "no", "score": 0}', ("no", 0.0)),
    ("Sure! {'pred': 'yes', 'score': 4.8} is my answer", ("yes", 4.8)),
    ("pred: no, score: 2", ("no", 2.0)),
    ("I cannot judge this.", (None, None)),
])
def test_judge_replies_are_parsed(reply, want):
    from videollm.benchmarks.judge import parse_verdict

    assert parse_verdict(reply) == want


def test_open_qa_is_judged_once_and_summarised_with_the_judge_free_scores(tmp_path):
    from videollm.benchmarks import Sample
    from videollm.benchmarks.base import Benchmark
    from videollm.benchmarks.judge import JudgeClient
    from videollm.benchmarks.metrics import summarize
    from videollm.evaluate import EvalOptions, _judge_all, make_record

    bench = Benchmark("msvd_qa", "open", [Sample(id=str(i), video="v.mp4", question="what color?", answer=a, category="what")
                                          for i, a in enumerate(["red", "blue", "green"])])
    replies = ["Red.", "It is a blue one", "yellow"]
    recs = [make_record(bench, s, "prompt", r) for s, r in zip(bench.samples, replies)]
    assert [(r["exact"], r["contains"]) for r in recs] == [(True, True), (False, True), (False, False)]
    with FakeJudge() as fake:
        opts = EvalOptions(judge=JudgeClient(fake.url, timeout=5), judge_workers=2, progress=False)
        _judge_all(recs, tmp_path, opts)
        again = [make_record(bench, s, "prompt", r) for s, r in zip(bench.samples, replies)]
        _judge_all(again, tmp_path, opts)  # resumed from judge.jsonl: no new requests
    assert len(fake.requests) == 3
    assert [r["judge"]["pred"] for r in again] == ["yes", "yes", "no"] and again[0]["judge"]["raw"].startswith("{'pred'")
    s = summarize(again, "open", ("category",))
    assert (s["exact"], s["contains"], s["judge_accuracy"], s["judge_score"]) == (33.33, 66.67, 66.67, 3.667)


def test_caption_scores_with_pycocoevalcap():
    from videollm.benchmarks.metrics import caption_scores

    refs = [["a man is playing a guitar", "someone plays the guitar"], ["a cat sleeps on a sofa", "a cat is sleeping"]]
    good = caption_scores([{"references": r, "prediction": r[0]} for r in refs])
    bad = caption_scores([{"references": r, "prediction": "the weather is nice today"} for r in refs])
    assert good["BLEU-4"] > 50 and good["CIDEr"] > bad["CIDEr"] and good["ROUGE-L"] > bad["ROUGE-L"]
    assert bad["BLEU-4"] < 5 and good["tokenizer"] in ("ptb", "plain (no java)")

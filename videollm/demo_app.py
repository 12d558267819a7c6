"""The Gradio audio-video chat demo (``demo.py`` is a thin wrapper around :func:`main`).

Layout and flow follow the original Video-LLaMA ``demo_audiovideo.py``: a video and an image
input, "Upload & Start Chat" and "Restart" buttons, a beam slider (1-10), a temperature slider
(0.1-2.0), an "Audio" checkbox, and a chatbot; examples at the bottom. Written for gradio 6
(messages-format chatbot). Differences, all for robustness:

* every bad upload is answered with a message in the chat, never an exception or a hang:
  nothing given, both inputs given ("Currently, only one input is supported", the original's
  text), file too big (``--max-upload-mb``), video too long (``--max-video-seconds``), not a
  video / corrupt / truncated / audio-only / unreadable image (decoding runs under the loader's
  timeout), and "Audio" on for a video without an audio track (the chat goes on with the frames
  only and says so);
* answers stream token by token;
* the server listens on 127.0.0.1 unless ``--host`` or ``--share`` is given;
* examples are generated synthetic clips and an image (written to a cache folder at startup).

Upload size has two limits: ``--max-upload-mb`` is checked by our handler (a chat message), and
gradio itself refuses files above twice that (``max_file_size``) so a huge upload never fills the
disk; such a refusal is shown by gradio as an error toast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

# gradio must not try to reach its analytics server (offline machines, tests).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from videollm.chat import Chat, add_model_args, new_conversation  # noqa: E402
from videollm.errors import VideoLLMError

logger = logging.getLogger(__name__)

ONLY_ONE_INPUT = "Currently, only one input is supported"
UPLOAD_FIRST = "Please upload a video or an image first, then press 'Upload & Start Chat'."
TITLE = """<h1 align="center">videollm: Video-LLaMA chat</h1>
<p align="center">An audio-visual language model: upload a video (tick "Audio" to use its sound) or an image, then ask.</p>"""
NOTE = """### Note
Video-LLaMA is a prototype model: it may misread complex scenes, long videos or specific domains,
and it can hallucinate. Interpret the answers with caution."""
EXAMPLES_NOTE = "### Examples (generated synthetic media) are at the bottom of the page."
DEFAULT_EXAMPLES_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "videollm" / "demo_examples"


@dataclass
class DemoOptions:
    """What the app needs besides the chat."""

    model_type: str = "vicuna"
    max_upload_mb: float = 200.0
    max_video_seconds: float = 600.0
    max_new_tokens: int = 300
    max_length: int = 2000
    examples_dir: Optional[str] = None  # None: DEFAULT_EXAMPLES_DIR
    startup_notices: Sequence[str] = ()


# ---------------------------------------------------------------------------------------------
# Examples


def ensure_examples(folder: os.PathLike | str) -> Dict[str, Path]:
    """Write the example media into ``folder`` if absent; returns name -> path.

    Two 2-second 64x64 clips (one with a 220 Hz tone, one silent) and one image, from
    :mod:`videollm.synthetic`.
    """
    from videollm import synthetic
    from videollm.synthetic import ClipSpec, ImageSpec, write_clip, write_image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Regenerate when the generator's look or motion changed since the files were written.
    stamp = folder / "generator.json"
    wanted = json.dumps({"speeds": synthetic.SPEEDS, "shape_fraction": synthetic.SHAPE_FRACTION,
                         "colors": synthetic.COLORS, "background": synthetic.BACKGROUND}, sort_keys=True)
    stale = not stamp.is_file() or stamp.read_text() != wanted
    specs = {
        "red_circle_right_with_sound.mp4": ClipSpec("ex1", "circle", "red", "right", "slow", has_audio=True, tone="low", seed=1),
        "blue_square_up.mp4": ClipSpec("ex2", "square", "blue", "up", "fast", seed=2),
    }
    out: Dict[str, Path] = {}
    for name, spec in specs.items():
        path = folder / name
        if stale or not path.is_file() or path.stat().st_size == 0:
            tmp = path.with_suffix(".tmp.mp4")
            write_clip(tmp, spec)
            tmp.replace(path)
        out[name] = path
    image = folder / "yellow_triangle.jpg"
    if stale or not image.is_file() or image.stat().st_size == 0:
        write_image(image, ImageSpec("ex3", "triangle", "yellow", seed=3))
    out[image.name] = image
    if stale:
        stamp.write_text(wanted)
    return out


# ---------------------------------------------------------------------------------------------
# Upload checks


def _video_duration(path: str, timeout: Optional[float]) -> Optional[float]:
    """Duration in seconds from the container/stream metadata, or None if unknown/unreadable."""
    from videollm.processors.video_loader import run_with_timeout

    def probe() -> Optional[float]:
        import av

        with av.open(path, metadata_errors="ignore") as container:
            if container.streams.video:
                stream = container.streams.video[0]
                if stream.duration is not None and stream.time_base is not None:
                    return float(stream.duration * stream.time_base)
            if container.duration is not None:
                return container.duration / 1_000_000  # av.time_base
        return None

    try:
        return run_with_timeout(probe, timeout, path)
    except Exception:  # unreadable: the decoder will give the precise reason
        return None


def check_upload(path: str, kind: str, opts: DemoOptions, timeout: Optional[float]) -> Optional[str]:
    """A message if ``path`` must be refused before decoding (size, duration), else None."""
    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        return f"{name}: cannot read the uploaded file ({exc.strerror or exc})."
    limit = opts.max_upload_mb * 1024 * 1024
    if size > limit:
        return f"{name}: the file is {size / 2**20:.1f} MB, more than the {opts.max_upload_mb:g} MB limit (--max-upload-mb)."
    if kind == "video" and opts.max_video_seconds > 0:
        duration = _video_duration(path, timeout)
        if duration is not None and duration > opts.max_video_seconds:
            return (
                f"{name}: the video lasts {duration:.1f} s, longer than the {opts.max_video_seconds:g} s limit "
                "(--max-video-seconds); cut it shorter."
            )
    return None


def _error_text(exc: BaseException, path: Optional[str] = None) -> str:
    text = str(exc)
    if path:  # uploads live under gradio's temporary folder: show the file's own name
        text = text.replace(path, os.path.basename(path))
    if isinstance(exc, VideoLLMError):
        return f"Sorry, I cannot use this file: {text}"
    return f"Sorry, something went wrong ({type(exc).__name__}: {text}). The file was not used."


def _media_path(value: Any) -> Optional[str]:
    """A component value (path string, dict with "path"/"video", or None) -> a path."""
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value) or None
    if isinstance(value, dict):
        inner = value.get("video", value)
        if isinstance(inner, dict):
            return inner.get("path")
        return value.get("path")
    if isinstance(value, (list, tuple)) and value:
        return _media_path(value[0])
    return None


# ---------------------------------------------------------------------------------------------
# The app


def _path_image_class():
    """``gr.Image`` that hands the uploaded file's path to the handler WITHOUT decoding it.

    gradio's own ``Image.preprocess`` opens the file with PIL, so a corrupt image fails inside
    gradio, before our handler, and the user sees an error toast instead of a chat message.
    Here decoding happens in the Chat (ImageDecodeError -> chat message). ``is_template`` makes
    gradio use the stock image widget in the browser.
    """
    import gradio as gr

    class PathImage(gr.Image):
        is_template = True

        def preprocess(self, payload):
            if payload is None:
                return None
            return getattr(payload, "path", None)

    return PathImage


def build_demo(chat: Chat, opts: Optional[DemoOptions] = None):
    """Build the gradio Blocks app around ``chat`` (not launched)."""
    import gradio as gr

    opts = opts or DemoOptions()
    examples = ensure_examples(opts.examples_dir or DEFAULT_EXAMPLES_DIR)

    def assistant(text: str) -> Dict[str, Any]:
        return {"role": "assistant", "content": text}

    def reset_outputs(history: List[Dict[str, Any]]):
        return (
            history,
            history,
            gr.update(value=None, interactive=True),
            gr.update(value=None, interactive=True),
            gr.update(value="", placeholder="Please upload your video or image first", interactive=False),
            gr.update(value="Upload & Start Chat", interactive=True),
            None,
            None,
        )

    def upload(video, image, history, audio_flag):
        """-> chatbot, history, video, image, text_input, upload_button, chat_state, img_list."""
        chatbot = list(history or [])
        video_path, image_path = _media_path(video), _media_path(image)

        def refuse(message: str):
            chatbot.append(assistant(message))
            return (
                chatbot,
                chatbot,
                gr.update(interactive=True),
                gr.update(interactive=True),
                gr.update(interactive=False, placeholder="Upload a video or an image first"),
                gr.update(value="Upload & Start Chat", interactive=True),
                None,
                None,
            )

        if video_path is None and image_path is None:
            return refuse(UPLOAD_FIRST)
        if video_path is not None and image_path is not None:
            return refuse(ONLY_ONE_INPUT + ": clear the video or the image, then upload again.")
        kind, path = ("video", video_path) if video_path is not None else ("image", image_path)
        problem = check_upload(path, kind, opts, chat.timeout)
        if problem:
            return refuse(problem)
        conv = new_conversation(opts.model_type, kind)
        img_list: List[Any] = []
        notices: List[str] = []
        try:
            if kind == "video":
                chat.upload_video(path, conv, img_list, with_audio=bool(audio_flag), notices=notices)
            else:
                chat.upload_img(path, conv, img_list)
        except Exception as exc:  # every failure becomes a chat message
            if not isinstance(exc, VideoLLMError):
                logger.exception("upload of %s failed", path)
            return refuse(_error_text(exc, path))
        chatbot.append({"role": "user", "content": {"path": path}})
        what = "video and its sound" if kind == "video" and audio_flag and not notices else kind
        chatbot.append(assistant(f"Received the {what}. Ask me about it."))
        for notice in notices:
            chatbot.append(assistant(f"Notice: {notice.replace(path, os.path.basename(path))}"))
        return (
            chatbot,
            chatbot,
            gr.update(interactive=False),
            gr.update(interactive=False),
            gr.update(interactive=True, placeholder="Type and press Enter"),
            gr.update(value="Start Chatting", interactive=False),
            conv,
            img_list,
        )

    def ask(user_message, history, chat_state):
        """-> text_input, chatbot, history, chat_state."""
        chatbot = list(history or [])
        if not user_message or not user_message.strip():
            return gr.update(value="", placeholder="Input should not be empty!"), chatbot, chatbot, chat_state
        chatbot.append({"role": "user", "content": user_message})
        if chat_state is not None:
            chat.ask(user_message, chat_state)
        return "", chatbot, chatbot, chat_state

    def answer(history, chat_state, img_list, num_beams, temperature):
        """Streams -> chatbot, history, chat_state, img_list."""
        chatbot = list(history or [])
        if chat_state is None or not img_list:
            if chatbot and chatbot[-1]["role"] == "user":
                chatbot.append(assistant(UPLOAD_FIRST))
            yield chatbot, chatbot, chat_state, img_list
            return
        if not chat_state.messages or chat_state.messages[-1][0] != chat_state.roles[0]:
            yield chatbot, chatbot, chat_state, img_list  # nothing asked (e.g. an empty message)
            return
        chatbot.append(assistant(""))
        notices: List[str] = []
        text = ""
        try:
            for piece in chat.stream_answer(
                chat_state, img_list, num_beams=int(num_beams), temperature=float(temperature),
                max_new_tokens=opts.max_new_tokens, max_length=opts.max_length, notices=notices,
            ):
                text += piece
                chatbot[-1] = assistant(text)
                yield chatbot, chatbot, chat_state, img_list
            final = chat_state.messages[-1][1] or ""
            chatbot[-1] = assistant(final if final else "(empty answer)")
        except Exception as exc:
            logger.exception("answer failed")
            if chat_state.messages and chat_state.messages[-1][1] is None:
                chat_state.messages.pop()  # drop the unanswered assistant turn
            chatbot[-1] = assistant(_error_text(exc))
        for notice in notices:
            chatbot.append(assistant(f"Notice: {notice}"))
        yield chatbot, chatbot, chat_state, img_list

    def restart(chat_state, img_list):
        if chat_state is not None and img_list is not None:
            chat.reset(chat_state, img_list)
        return reset_outputs([])

    with gr.Blocks(title="videollm: Video-LLaMA chat") as demo:
        gr.Markdown(TITLE)
        with gr.Row():
            with gr.Column(scale=1):
                video = gr.Video(label="Video", sources=["upload"], elem_id="video_input")
                image = _path_image_class()(type="filepath", label="Image", sources=["upload"], elem_id="image_input")
                gr.Markdown(EXAMPLES_NOTE)
                upload_button = gr.Button(value="Upload & Start Chat", interactive=True, variant="primary", elem_id="upload_button")
                clear = gr.Button("Restart", elem_id="restart_button")
                num_beams = gr.Slider(minimum=1, maximum=10, value=1, step=1, interactive=True, label="beam search numbers")
                temperature = gr.Slider(minimum=0.1, maximum=2.0, value=1.0, step=0.1, interactive=True, label="Temperature")
                audio = gr.Checkbox(interactive=True, value=False, label="Audio", elem_id="audio_checkbox")
                gr.Markdown(NOTE)
            with gr.Column(scale=2):
                chat_state = gr.State(None)
                img_list = gr.State(None)
                startup = [assistant(f"Notice: {n}") for n in opts.startup_notices]
                # The chat history lives on the server (a State): the chatbot is output only.
                history = gr.State(startup)
                chatbot = gr.Chatbot(value=startup, label="Video-LLaMA", elem_id="chatbot", height=500)
                text_input = gr.Textbox(
                    label="User", elem_id="text_input", interactive=False,
                    placeholder="Upload your image/video first, or click the examples at the bottom of the page.",
                )
        gr.Examples(
            examples=[[str(examples["red_circle_right_with_sound.mp4"]), "What is moving in the video?"],
                      [str(examples["blue_square_up.mp4"]), "Which direction is the shape moving?"]],
            inputs=[video, text_input], label="Video examples",
        )
        gr.Examples(examples=[[str(examples["yellow_triangle.jpg"]), "What shape is this?"]],
                    inputs=[image, text_input], label="Image examples")

        upload_button.click(
            upload, [video, image, history, audio],
            [chatbot, history, video, image, text_input, upload_button, chat_state, img_list], api_name="upload",
        )
        text_input.submit(ask, [text_input, history, chat_state], [text_input, chatbot, history, chat_state], api_name="ask").then(
            answer, [history, chat_state, img_list, num_beams, temperature], [chatbot, history, chat_state, img_list],
            api_name="answer",
        )
        clear.click(restart, [chat_state, img_list],
                    [chatbot, history, video, image, text_input, upload_button, chat_state, img_list], api_name="restart")
    demo.queue(default_concurrency_limit=1)
    return demo


def launch(demo, *, host: Optional[str] = None, port: Optional[int] = None, share: bool = False,
           max_upload_mb: float = 200.0, block: bool = True):
    """Start the server: 127.0.0.1 unless ``host`` (or ``share``) says otherwise."""
    server_name = host or ("0.0.0.0" if share else "127.0.0.1")
    return demo.launch(
        server_name=server_name, server_port=port, share=share, prevent_thread_lock=not block,
        max_file_size=f"{int(max(1, 2 * max_upload_mb))}mb", show_error=True, quiet=not block,
    )


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="demo.py", description="Gradio chat with a Video-LLaMA model")
    add_model_args(parser)
    parser.add_argument("--port", type=int, default=None, help="server port (default: gradio's 7860 or the next free one)")
    parser.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (listens on 0.0.0.0)")
    parser.add_argument("--max-upload-mb", type=float, default=200.0, help="largest accepted upload in MB")
    parser.add_argument("--max-video-seconds", type=float, default=600.0, help="longest accepted video in seconds (0: no limit)")
    parser.add_argument("--examples-dir", default=None, help=f"where the example media are generated (default {DEFAULT_EXAMPLES_DIR})")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from videollm.chat import build_chat_from_args

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    logger.info("Initializing Chat")
    chat, model_type, notices = build_chat_from_args(args)
    logger.info("Initialization Finished")
    opts = DemoOptions(model_type=model_type, max_upload_mb=args.max_upload_mb, max_video_seconds=args.max_video_seconds,
                       examples_dir=args.examples_dir, startup_notices=notices)
    demo = build_demo(chat, opts)
    launch(demo, host=args.host, port=args.port, share=args.share, max_upload_mb=args.max_upload_mb)
    return 0

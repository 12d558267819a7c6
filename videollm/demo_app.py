"""The Gradio audio-video chat demo (``demo.py`` is a thin wrapper around :func:`main`).

Layout and flow follow the original Video-LLaMA ``demo_audiovideo.py``: a video and an image
input, "Upload & Start Chat" and "Restart" buttons, a beam slider (1-10), a temperature slider
(0.1-2.0), an "Audio" checkbox, and a chatbot; examples at the bottom. Written for gradio 6
(messages-format chatbot). Differences, all for robustness:

* every bad upload is answered with a message in the chat, never an exception or a hang:
  nothing given, both inputs given ("Currently, only one input is supported", the original's
  text), file too big (``--max-upload-mb``), video too long (``--max-video-seconds``; when the
  container declares no duration, as browser-recorded WebM, the packets are counted, with a
  cap on the work), too many pixels per frame (the training limit, checked before decoding),
  not a video / corrupt / truncated / audio-only / unreadable image (decoding runs under the
  loader's timeout), and "Audio" on for a video without an audio track (the chat goes on with
  the frames only and says so);
* uploads are probed in a child process that is killed at the timeout
  (:func:`videollm.processors.video_loader.run_isolated`), and up to ``upload_concurrency``
  uploads are handled at once, so one slow or hanging file does not hold up other users;
* answers stream token by token;
* the server listens on 127.0.0.1 unless ``--host`` or ``--share`` is given;
* examples are generated synthetic clips and an image (written to a cache folder at startup).

Upload size has one limit, ``--max-upload-mb``: gradio refuses larger files as they arrive
(``max_file_size``, an error toast naming that limit) and our handler checks it again (a chat
message, for files that reach it another way). The upload cache is bounded too (:class:`UploadCache`): refused files
are deleted at once, the files this app received are pruned oldest first whenever they total
more than ``--max-cache-mb`` (checked at each upload and every ``cache_check_s`` seconds, so the
bound can be exceeded by at most what arrives in that interval), and gradio's ``delete_cache``
removes them after ``--cache-max-age`` seconds. ``main`` gives gradio a cache folder of its own
(``GRADIO_TEMP_DIR``) unless one is set. A session whose file was pruned keeps its chat (the
media are already decoded), only the video shown in its chat history is gone.

Feature files: a model whose class sets ``reads_feature_files`` (LLaMA-VID) gets a third input,
"Feature file (.pkl)", for a long video prepared with ``python -m videollm.features llama-vid``
(a ``.pkl`` in the Video box is taken the same way). It goes through ``Chat.upload_video`` and
so the model's ``load_media``, which reads it only with
:func:`videollm.long_video.read_feature_file` (a restricted unpickler: numpy arrays and strings,
anything else refused with a message); ``--max-upload-mb`` applies. A ``.pkl`` given to any
other model is refused with a chat message.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

# gradio must not try to reach its analytics server (offline machines, tests).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from videollm.chat import Chat, add_model_args, new_conversation  # noqa: E402
from videollm.errors import VideoLLMError

logger = logging.getLogger(__name__)

ONLY_ONE_INPUT = "Currently, only one input is supported"
# One text for the "nothing uploaded yet" state, wherever it shows (chat message, placeholder).
UPLOAD_FIRST = "Upload a video or an image first, then press 'Upload & Start Chat'."
ASK_PLACEHOLDER = "Type a question and press Enter"
UPLOADED_LABEL = "Chat started (Restart for new media)"
IMAGE_ON_VIDEO = ("That file is an image: it was moved to the Image box. Press 'Upload & Start Chat' to chat about it.")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# The browser refuses an image dropped on (or chosen for) the Video box before any server code
# runs (gradio checks the file type and shows a passing toast). This page script catches such a
# file first, hands it to the Image box and says so under the boxes (IMAGE_ON_VIDEO).
REDIRECT_IMAGES_JS = """
() => {
  const message = %s;
  const suffixes = %s;
  const isImage = (f) => !!f && ((f.type || '').startsWith('image/')
      || suffixes.some((s) => f.name.toLowerCase().endsWith(s)));
  const redirect = (file) => {
    const hint = document.querySelector('#media_hint');
    if (hint) hint.innerText = message;
    const target = document.querySelector('#image_input input[type=file]');
    if (!target) return;
    const files = new DataTransfer();
    files.items.add(file);
    target.files = files.files;
    target.dispatchEvent(new Event('change', {bubbles: true}));
  };
  const onVideoBox = (e) => e.target && e.target.closest && e.target.closest('#video_input');
  document.addEventListener('change', (e) => {
    const input = e.target;
    if (!onVideoBox(e) || !(input instanceof HTMLInputElement) || input.type !== 'file') return;
    const file = input.files && input.files[0];
    if (!isImage(file)) return;
    e.stopImmediatePropagation();
    input.value = '';
    redirect(file);
  }, true);
  document.addEventListener('drop', (e) => {
    const file = e.dataTransfer && e.dataTransfer.files && e.dataTransfer.files[0];
    if (!onVideoBox(e) || !isImage(file)) return;
    e.preventDefault();
    e.stopImmediatePropagation();
    redirect(file);
  }, true);
}
""" % (json.dumps(IMAGE_ON_VIDEO), json.dumps(list(IMAGE_SUFFIXES)))
FEATURE_SUFFIX = ".pkl"  # a prepared long-video feature file (videollm.features llama-vid)
NO_FEATURES = ("{name}: this is a prepared feature file (.pkl), which the {model} model cannot read "
               "(only models trained on precomputed features, as LLaMA-VID, can); upload the video itself.")
TITLE = """<h1 style="text-align:center; font-variant:normal; text-transform:none">videollm chat</h1>
<p style="text-align:center">Model: {model}. Upload a video (tick "Audio" to use its sound) or an image, then ask.</p>"""
NOTE = """### Note
This is a research prototype: it may misread complex scenes, long videos or specific domains,
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
    max_cache_mb: float = 2000.0  # size bound of the uploads this app keeps (UploadCache)
    cache_max_age_s: float = 3600.0  # gradio's delete_cache age
    cache_check_s: float = 30.0  # how often the cache is checked (gradio and UploadCache)
    upload_concurrency: int = 4  # uploads handled at once (probing and decoding are isolated)
    probe_timeout_s: float = 10.0  # the duration / header probe of an upload


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


def _video_duration(path: str, opts: DemoOptions) -> Any:
    """:func:`~videollm.processors.video_loader.video_duration` of ``path`` in a killable child
    process; counting stops once the limit is passed. None if the probe fails (the decoder then
    gives the precise reason)."""
    from videollm.processors.video_loader import run_isolated, video_duration

    try:
        return run_isolated(video_duration, path, stop_after=opts.max_video_seconds, timeout=opts.probe_timeout_s,
                            what=path)
    except VideoLLMError as exc:
        if "timed out" in str(exc):
            raise
        return None


def check_upload(path: str, kind: str, opts: DemoOptions, timeout: Optional[float] = None) -> Optional[str]:
    """A message if ``path`` must be refused before decoding (size, duration), else None.

    ``timeout`` (seconds) overrides ``opts.probe_timeout_s`` for the duration probe.
    """
    if timeout is not None:
        opts = dataclasses.replace(opts, probe_timeout_s=timeout)
    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        return f"{name}: cannot read the uploaded file ({exc.strerror or exc})."
    limit = opts.max_upload_mb * 1024 * 1024
    if size > limit:
        return f"{name}: the file is {size / 2**20:.1f} MB, more than the {opts.max_upload_mb:g} MB limit (--max-upload-mb)."
    if kind == "video" and opts.max_video_seconds > 0:
        try:
            duration = _video_duration(path, opts)
        except VideoLLMError:
            return f"{name}: reading the video's length took more than {opts.probe_timeout_s:g} s; the file was not used."
        if duration is None or duration.seconds is None:
            return None
        if duration.seconds > opts.max_video_seconds:
            counted = "" if duration.source != "packets" else " (counted: the file declares no duration)"
            more = "more than " if not duration.complete else ""
            return (
                f"{name}: the video lasts {more}{duration.seconds:.1f} s{counted}, longer than the "
                f"{opts.max_video_seconds:g} s limit (--max-video-seconds); cut it shorter."
            )
        if not duration.complete:
            return (
                f"{name}: the file declares no duration and counting its frames stopped after "
                f"{duration.packets} frames ({duration.seconds:.1f} s); it was not used."
            )
    return None


class UploadCache:
    """Keeps the files a gradio app received under ``max_bytes`` (oldest deleted first).

    Only files the app itself recorded (``blocks.temp_file_sets``: every upload, whether or not
    a handler saw it) are counted and deleted, never other files of a shared gradio folder, and
    never files gradio keeps on purpose (examples, ``keep_in_cache``) or those in ``busy``.
    :meth:`prune` runs at each upload and every ``interval`` seconds in a daemon thread
    (:meth:`start`), so the disk use stays under ``max_bytes`` plus what arrives in one interval.
    """

    def __init__(self, blocks: Any, max_bytes: int, interval: float = 30.0) -> None:
        self.blocks = blocks
        self.max_bytes = int(max_bytes)
        self.interval = float(interval)
        self.busy: set = set()  # paths being handled right now
        self.deleted = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _files(self) -> List[str]:
        for _ in range(5):  # a set may change size while it is copied (another thread uploads)
            try:
                keep = set()
                for component in list(self.blocks.blocks.values()):
                    keep.update(getattr(component, "keep_in_cache", ()))
                files = set()
                for file_set in list(self.blocks.temp_file_sets):
                    files.update(list(file_set))
                return sorted(files - keep - self.busy)
            except RuntimeError:
                continue
        return []

    def total_bytes(self) -> int:
        return sum(size for _, size, _ in self._stat(self._files()))

    @staticmethod
    def _stat(paths: Iterable[str]) -> List[tuple]:
        out = []
        for path in paths:
            try:
                st = os.stat(path)
            except OSError:
                continue
            out.append((path, st.st_size, st.st_ctime))
        return out

    def forget(self, path: str) -> None:
        for file_set in list(self.blocks.temp_file_sets):
            file_set.discard(path)

    def delete(self, path: str) -> None:
        """Delete one file of this app now (a refused upload)."""
        try:
            os.remove(path)
            self.deleted += 1
        except OSError:
            pass
        self.forget(path)
        try:  # gradio puts each upload in a folder of its own
            os.rmdir(os.path.dirname(path))
        except OSError:
            pass

    def prune(self) -> int:
        """Delete the oldest files until the total is under the bound; returns how many."""
        with self._lock:
            entries = sorted(self._stat(self._files()), key=lambda e: e[2])
            total = sum(size for _, size, _ in entries)
            removed = 0
            for path, size, _ in entries:
                if total <= self.max_bytes:
                    break
                self.delete(path)
                total -= size
                removed += 1
            if removed:
                logger.info("upload cache: deleted %d oldest file(s); %.1f MB kept (bound %.1f MB)", removed,
                            total / 2**20, self.max_bytes / 2**20)
            return removed

    def start(self) -> "UploadCache":
        if self._thread is None:
            def loop() -> None:
                seen_running = False
                while not self._stop.wait(self.interval):
                    running = bool(getattr(self.blocks, "is_running", False))
                    if seen_running and not running:  # the app was closed
                        return
                    seen_running = seen_running or running
                    try:
                        self.prune()
                    except Exception:  # noqa: BLE001 - the server must go on
                        logger.exception("upload cache pruning failed")

            self._thread = threading.Thread(target=loop, name="videollm-upload-cache", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()


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


@functools.lru_cache(maxsize=None)
def _path_image_class():
    """A ``gr.Image`` class whose ``preprocess`` hands the uploaded file's path to the handler
    WITHOUT decoding it.

    gradio's own ``Image.preprocess`` opens the file with PIL, so a corrupt image fails inside
    gradio, before our handler, and the user sees an error toast instead of a chat message.
    Here decoding happens in the Chat (ImageDecodeError -> chat message). It must be a class, not
    a patched instance: every ``gr.update`` of the box (each upload, refusal and restart) makes
    gradio rebuild the session's copy with ``block.__class__(**kwargs)``. The class is made with
    ``ABCMeta.__new__`` because gradio's component metaclass would write a ``.pyi`` stub next to
    this module at import time (a read-only install would fail); its name stays ``Image`` so the
    browser uses the stock image widget.
    """
    from abc import ABCMeta

    import gradio as gr

    def preprocess(self, payload):
        if payload is None:
            return None
        return getattr(payload, "path", None)

    return ABCMeta.__new__(type(gr.Image), "Image", (gr.Image,),
                           {"preprocess": preprocess, "__module__": __name__, "__qualname__": "PathImage"})


def _path_image(**kwargs):
    """A path-passing image box (:func:`_path_image_class`)."""
    return _path_image_class()(**kwargs)


def build_demo(chat: Chat, opts: Optional[DemoOptions] = None):
    """Build the gradio Blocks app around ``chat`` (not launched)."""
    import gradio as gr

    from videollm.processors.video_loader import warm_up_isolation

    opts = opts or DemoOptions()
    examples = ensure_examples(opts.examples_dir or DEFAULT_EXAMPLES_DIR)
    logger.info("decoding process server started in %.1f s", warm_up_isolation())
    cache: Optional[UploadCache] = None  # set once the Blocks exist

    def assistant(text: str) -> Dict[str, Any]:
        return {"role": "assistant", "content": text}

    def reset_outputs(history: List[Dict[str, Any]]):
        return (
            history,
            history,
            gr.update(value=None, interactive=True),
            gr.update(value=None, interactive=True),
            gr.update(value="", placeholder=UPLOAD_FIRST, interactive=False),
            gr.update(value="Upload & Start Chat", interactive=True),
            None,
            None,
        )

    def upload(video, image, history, audio_flag, features=None):
        """-> chatbot, history, video, image, text_input, upload_button, chat_state, img_list."""
        video_path, image_path, features_path = _media_path(video), _media_path(image), _media_path(features)
        busy = [p for p in (video_path, image_path, features_path) if p]
        cache.busy.update(busy)
        try:
            cache.prune()
            return handle_upload(video_path, image_path, history, audio_flag, features_path)
        finally:
            cache.busy.difference_update(busy)

    def handle_upload(video_path, image_path, history, audio_flag, features_path=None):
        chatbot = list(history or [])

        def refuse(message: str, drop: Optional[str] = None):
            """Answer ``message``; ``drop``: a refused file, deleted now and cleared from its input."""
            chatbot.append(assistant(message))
            if drop is not None:
                cache.delete(drop)
            cleared = gr.update(value=None, interactive=True)
            return (
                chatbot,
                chatbot,
                cleared if drop is not None and drop == video_path else gr.update(interactive=True),
                cleared if drop is not None and drop == image_path else gr.update(interactive=True),
                gr.update(interactive=False, placeholder=UPLOAD_FIRST),
                gr.update(value="Upload & Start Chat", interactive=True),
                None,
                None,
            )

        given = [p for p in (video_path, image_path, features_path) if p is not None]
        if not given:
            return refuse(UPLOAD_FIRST)
        if len(given) > 1:
            return refuse(ONLY_ONE_INPUT + ": clear the video or the image, then upload again.")
        kind, path = ("video", video_path) if video_path is not None else ("image", image_path)
        if features_path is not None or path.lower().endswith(FEATURE_SUFFIX):
            kind, path = "features", features_path or path
            if not reads_features:
                return refuse(NO_FEATURES.format(name=os.path.basename(path), model=model_name), drop=path)
        problem = check_upload(path, kind, opts)
        if problem:
            logger.info("upload refused: %s: %s", os.path.basename(path), problem)
            return refuse(problem, drop=path)
        conv = new_conversation(opts.model_type, "image" if kind == "image" else "video")
        img_list: List[Any] = []
        notices: List[str] = []
        try:
            if kind == "features":  # read by the model's load_media (long_video.read_feature_file)
                chat.upload_video(path, conv, img_list, with_audio=False)
            elif kind == "video":
                chat.upload_video(path, conv, img_list, with_audio=bool(audio_flag), notices=notices)
            else:
                chat.upload_img(path, conv, img_list)
        except Exception as exc:  # every failure becomes a chat message
            if not isinstance(exc, VideoLLMError):
                logger.exception("upload of %s failed", path)
            else:
                logger.info("upload refused: %s: %s", os.path.basename(path), exc)
            return refuse(_error_text(exc, path), drop=path)
        if kind == "features":
            frames = getattr(getattr(img_list[0], "media", None), "data", None) if img_list else None
            count = f" ({frames.shape[0]} frames)" if frames is not None and hasattr(frames, "shape") else ""
            chatbot.append({"role": "user", "content": f"Feature file {os.path.basename(path)}{count}"})
        else:
            chatbot.append({"role": "user", "content": {"path": path}})
        what = "video and its sound" if kind == "video" and audio_flag and not notices else kind
        what = "feature file" if kind == "features" else what
        chatbot.append(assistant(f"Received the {what}. Ask me about it."))
        for notice in notices:
            chatbot.append(assistant(f"Notice: {notice.replace(path, os.path.basename(path))}"))
        return (
            chatbot,
            chatbot,
            gr.update(interactive=False),
            gr.update(interactive=False),
            gr.update(interactive=True, placeholder=ASK_PLACEHOLDER),
            gr.update(value=UPLOADED_LABEL, interactive=False),
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

    def video_changed(video, image, history):
        """An image dropped on the Video box moves to the Image box, with a message saying so."""
        path = _media_path(video)
        if path is None or not path.lower().endswith(IMAGE_SUFFIXES):
            return gr.update(), gr.update(), history, history
        chatbot = list(history or []) + [assistant(IMAGE_ON_VIDEO)]
        return gr.update(value=None), gr.update(value=path), chatbot, chatbot

    def answer(history, chat_state, img_list, num_beams, temperature, sample):
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
                do_sample=bool(sample), max_new_tokens=opts.max_new_tokens, max_length=opts.max_length,
                notices=notices,
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

    # gradio deletes this app's files older than cache_max_age_s; UploadCache bounds their size.
    delete_cache = (max(1, int(opts.cache_check_s)), max(1, int(opts.cache_max_age_s)))
    model_name = str(getattr(chat.model, "arch", "") or type(chat.model).__name__)
    reads_features = bool(getattr(chat.model, "reads_feature_files", False))
    with gr.Blocks(title=f"videollm chat ({model_name})", delete_cache=delete_cache) as demo:
        gr.Markdown(TITLE.format(model=model_name))
        with gr.Row():
            with gr.Column(scale=1):
                video = gr.Video(label="Video", sources=["upload"], elem_id="video_input", height=240)
                gr.Markdown("Videos go in the Video box, still images in the Image box.", elem_id="media_hint")
                image = _path_image(type="filepath", label="Image", sources=["upload"], elem_id="image_input", height=240)
                features = gr.File(label="Feature file (.pkl, from python -m videollm.features)", file_types=[FEATURE_SUFFIX],
                                   type="filepath", elem_id="features_input", visible=reads_features, height=120)
                gr.Markdown(EXAMPLES_NOTE)
                upload_button = gr.Button(value="Upload & Start Chat", interactive=True, variant="primary", elem_id="upload_button")
                clear = gr.Button("Restart", elem_id="restart_button")
                sample = gr.Checkbox(value=False, label="Sample (off: greedy, the same answer every time)",
                                     elem_id="sample_checkbox")
                num_beams = gr.Slider(minimum=1, maximum=10, value=1, step=1, interactive=True, label="beam search numbers")
                temperature = gr.Slider(minimum=0.1, maximum=2.0, value=1.0, step=0.1, interactive=True,
                                        label="Temperature (when sampling)")
                audio = gr.Checkbox(interactive=True, value=False, label="Audio", elem_id="audio_checkbox")
                gr.Markdown(NOTE)
            with gr.Column(scale=2):
                chat_state = gr.State(None)
                img_list = gr.State(None)
                startup = [assistant(f"Notice: {n}") for n in opts.startup_notices]
                # The chat history lives on the server (a State): the chatbot is output only.
                history = gr.State(startup)
                chatbot = gr.Chatbot(value=startup, label=model_name, elem_id="chatbot", height=500,
                                     group_consecutive_messages=False)
                text_input = gr.Textbox(label="User", elem_id="text_input", interactive=False, placeholder=UPLOAD_FIRST)
        gr.Examples(
            examples=[[str(examples["red_circle_right_with_sound.mp4"]), "What is moving in the video?"],
                      [str(examples["blue_square_up.mp4"]), "Which direction is the shape moving?"]],
            inputs=[video, text_input], label="Video examples",
        )
        gr.Examples(examples=[[str(examples["yellow_triangle.jpg"]), "What shape is this?"]],
                    inputs=[image, text_input], label="Image examples")

        started = upload_button.click(
            upload, [video, image, history, audio, features],
            [chatbot, history, video, image, text_input, upload_button, chat_state, img_list], api_name="upload",
            concurrency_limit=max(1, opts.upload_concurrency),
        )
        # the feature box follows the other inputs: locked while a chat runs, cleared when refused
        started.then(lambda state, value: gr.update(value=value if state is not None else None,
                                                    interactive=state is None),
                     [chat_state, features], [features], api_visibility="private")
        video.upload(video_changed, [video, image, history], [video, image, chatbot, history])
        text_input.submit(ask, [text_input, history, chat_state], [text_input, chatbot, history, chat_state], api_name="ask").then(
            answer, [history, chat_state, img_list, num_beams, temperature, sample], [chatbot, history, chat_state, img_list],
            api_name="answer",
        )
        clear.click(restart, [chat_state, img_list],
                    [chatbot, history, video, image, text_input, upload_button, chat_state, img_list], api_name="restart"
                    ).then(lambda: gr.update(value=None, interactive=True), None, [features], api_visibility="private")
    demo.queue(default_concurrency_limit=1)
    cache = UploadCache(demo, int(opts.max_cache_mb * 2**20), opts.cache_check_s)
    demo.upload_cache = cache  # started by launch()
    return demo


def launch(demo, *, host: Optional[str] = None, port: Optional[int] = None, share: bool = False,
           max_upload_mb: float = 200.0, block: bool = True):
    """Start the server: 127.0.0.1 unless ``host`` (or ``share``) says otherwise."""
    server_name = host or ("0.0.0.0" if share else "127.0.0.1")
    if getattr(demo, "upload_cache", None) is not None:
        demo.upload_cache.start()
    return demo.launch(
        server_name=server_name, server_port=port, share=share, prevent_thread_lock=not block,
        max_file_size=f"{int(max(1, max_upload_mb))}mb", show_error=True, quiet=not block,
        js=REDIRECT_IMAGES_JS,
    )


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="demo.py", description="Gradio chat with a video LLM (any registered model)",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--port", type=int, default=None, help="server port (default: gradio's 7860 or the next free one)")
    parser.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (listens on 0.0.0.0)")
    parser.add_argument("--max-upload-mb", type=float, default=200.0, help="largest accepted upload in MB")
    parser.add_argument("--max-video-seconds", type=float, default=600.0, help="longest accepted video in seconds (0: no limit)")
    parser.add_argument("--max-cache-mb", type=float, default=2000.0,
                        help="disk kept for uploads; the oldest are deleted beyond it")
    parser.add_argument("--cache-max-age", type=float, default=3600.0, help="uploads are deleted after this many seconds")
    parser.add_argument("--examples-dir", default=None, help=f"where the example media are generated (default {DEFAULT_EXAMPLES_DIR})")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from videollm.chat import build_chat_from_args

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if not os.environ.get("GRADIO_TEMP_DIR"):  # a folder of our own, not the machine-wide /tmp/gradio
        import tempfile

        os.environ["GRADIO_TEMP_DIR"] = tempfile.mkdtemp(prefix="videollm-demo-uploads-")
    logger.info("uploads are kept in %s (at most %g MB, %g s)", os.environ["GRADIO_TEMP_DIR"], args.max_cache_mb,
                args.cache_max_age)
    logger.info("Initializing Chat")
    chat, model_type, notices = build_chat_from_args(args)
    logger.info("Initialization Finished")
    opts = DemoOptions(model_type=model_type, max_upload_mb=args.max_upload_mb, max_video_seconds=args.max_video_seconds,
                       examples_dir=args.examples_dir, startup_notices=notices, max_cache_mb=args.max_cache_mb,
                       cache_max_age_s=args.cache_max_age)
    demo = build_demo(chat, opts)
    launch(demo, host=args.host, port=args.port, share=args.share, max_upload_mb=args.max_upload_mb)
    return 0

"""Chat about one video or image from the terminal.

    python -m videollm.cli --cfg-path eval_configs/tiny.yaml --video clip.mp4 --question "What moves?" --question "Which way?"
    python -m videollm.cli --cfg-path eval_configs/video_llama_eval_withaudio.yaml --video clip.mp4 --audio

With ``--question`` (repeatable) the questions are asked in order, as turns of one conversation,
and each answer is printed; without it the chat is interactive (``/reset`` starts over with the
same media, ``/quit`` or end-of-file leaves). Answers stream as they are generated. Notices
(audio fallback, context cut, random weights) go to stderr. Bad input exits with status 2 and a
one-line error naming the file.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional, Sequence, TextIO

from videollm.chat import (  # noqa: F401 - add_generation_args is re-exported for older imports
    Chat,
    add_generation_args,
    add_model_args,
    build_chat_from_args,
    generation_from_args,
    new_conversation,
)
from videollm.errors import VideoLLMError

logger = logging.getLogger(__name__)


def generation_kwargs(args: argparse.Namespace) -> dict:
    """The answer settings of the command line (:class:`~videollm.chat.GenerationSettings` fields)."""
    import dataclasses

    return dataclasses.asdict(generation_from_args(args))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m videollm.cli", description="Chat about a video or an image",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(parser)
    media = parser.add_mutually_exclusive_group(required=True)
    media.add_argument("--video", help="video file")
    media.add_argument("--image", help="image file")
    parser.add_argument("--audio", action="store_true", help="also use the video's sound (models with an audio branch)")
    parser.add_argument("--question", "-q", action="append", default=None, help="ask this (repeatable); none: interactive")
    add_generation_args(parser)
    return parser.parse_args(argv)


def start(chat: Chat, args: argparse.Namespace, model_type: str, err: TextIO):
    """Upload the media into a fresh conversation; returns (conv, img_list)."""
    kind = "video" if args.video else "image"
    conv = new_conversation(model_type, kind)
    img_list: List = []
    notices: List[str] = []
    if kind == "video":
        chat.upload_video(args.video, conv, img_list, with_audio=args.audio, notices=notices)
    else:
        chat.upload_img(args.image, conv, img_list)
    for notice in notices:
        print(f"notice: {notice}", file=err)
    return conv, img_list


def ask_and_print(chat: Chat, conv, img_list, question: str, args, out: TextIO, err: TextIO) -> str:
    chat.ask(question, conv)
    notices: List[str] = []
    pieces = []
    for piece in chat.stream_answer(conv, img_list, notices=notices, **generation_kwargs(args)):
        pieces.append(piece)
        out.write(piece)
        out.flush()
    out.write("\n")
    for notice in notices:
        print(f"notice: {notice}", file=err)
    return "".join(pieces)


def main(argv: Optional[Sequence[str]] = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr,
         stdin: TextIO = sys.stdin) -> int:
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        chat, model_type, notices = build_chat_from_args(args)
        for notice in notices:
            print(f"notice: {notice}", file=err)
        conv, img_list = start(chat, args, model_type, err)
        if args.question:
            for question in args.question:
                out.write(f"Q: {question}\nA: ")
                ask_and_print(chat, conv, img_list, question, args, out, err)
            return 0
        out.write("Type a question; /reset starts over, /quit leaves.\n")
        while True:
            out.write("You: ")
            out.flush()
            line = stdin.readline()
            if not line or line.strip() == "/quit":
                return 0
            question = line.strip()
            if not question:
                continue
            if question == "/reset":
                conv, img_list = start(chat, args, model_type, err)
                out.write("(new conversation)\n")
                continue
            out.write("Assistant: ")
            ask_and_print(chat, conv, img_list, question, args, out, err)
    except VideoLLMError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=err)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

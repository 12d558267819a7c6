"""Build the tiny SentencePiece tokenizer shipped in videollm/assets/tiny_tokenizer.

LLaMA-style: BPE, byte fallback, split digits, dummy prefix, whitespace kept, and the ids
<unk>=0, <s>=1, </s>=2. The corpus covers the words of the synthetic data set and of the
prompt templates, so tiny models see short token sequences. Deterministic:
``python scripts/build_tiny_tokenizer.py`` rewrites the same file.
"""

import io
import itertools
from pathlib import Path

import sentencepiece as spm

OUT = Path(__file__).resolve().parents[1] / "videollm" / "assets" / "tiny_tokenizer"

SHAPES = ["circle", "square", "triangle", "star", "shape"]
COLOURS = ["red", "green", "blue", "yellow", "white", "purple", "orange", "colour", "color"]
MOTIONS = ["left", "right", "up", "down", "slowly", "quickly", "slow", "fast", "moving", "motion", "still"]
SOUNDS = ["low", "high", "tone", "sound", "audio", "silent", "pitch", "beep", "hum"]
TEMPLATES = [
    "a {c} {s} moving {m}", "A {c} {s} is moving {m}.", "It is a {c} {s}.", "The {s} is {c}.",
    "The {s} moves {m}.", "a {c} {s}", "There is a {c} {s} in the image.",
    "What shape is in the image?", "What colour is the shape?", "Which direction does it move?",
    "What is moving in the video?", "Describe this video.", "Describe this image in detail.",
    "Take a look at this image and describe what you notice.",
    "Please provide a detailed description of the picture.",
    "Could you describe the contents of this image for me?",
    "The video contains 8 frames sampled at 0.0, 0.2, 0.5, 0.8, 1.0, 1.2, 1.5, 1.8 seconds.",
    "###Human: <Video><ImageHere></Video> What is it?###Assistant: It is a {c} {s}.###",
    "[INST] <<SYS>>\nYou are a helpful language and vision assistant.\n<</SYS>>\n\nWhat is it? [/INST] a {c} {s} </s>",
    "You are able to understand the visual content that the user provides.",
    "Follow the instructions carefully and explain your answers in detail.",
    "Close your eyes, open your ears and you imagine only based on the sound that",
    "Close your ears, open your eyes and you see that",
    "Now answer my question based on what you have just seen and heard.",
    "The clip has a {x} {t} and a {c} {s}.", "I hear a {x} {t}.",
    "USER: ASSISTANT: Human: Assistant: <Image></Image> <Video></Video>",
]
GENERIC = (
    "the of and to in is it that this was for on are with as be at by from or an have not "
    "you your what which when where who how yes no there here one two three four five six seven "
    "eight nine ten frame frames video image picture clip second seconds sampled contains "
    "background dark black object answer question describe description detail user assistant "
    "helpful language vision understand visual content provides natural variety tasks carefully "
    "explain answers look notice please provide could contents me shows appears across screen top "
    "bottom center middle from to toward towards"
).split()


def corpus() -> str:
    lines = []
    for t, (c, s, m) in itertools.product(TEMPLATES, itertools.product(COLOURS[:6], SHAPES[:4], MOTIONS[:4])):
        lines.append(t.format(c=c, s=s, m=m, x="low", t="tone"))
    for t in TEMPLATES:
        for x in ("low", "high"):
            lines.append(t.format(c="red", s="circle", m="left", x=x, t="tone"))
    lines += [" ".join(GENERIC[i:i + 12]) for i in range(0, len(GENERIC), 12)]
    lines += [" ".join(w.capitalize() for w in GENERIC[i:i + 6]) for i in range(0, len(GENERIC), 6)]
    lines += [w for w in SOUNDS + MOTIONS + COLOURS + SHAPES]
    return "\n".join(lines) + "\n"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus().splitlines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=512,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    (OUT / "tokenizer.model").write_bytes(model.getvalue())
    print(f"wrote {OUT / 'tokenizer.model'} ({len(model.getvalue())} bytes)")


if __name__ == "__main__":
    main()

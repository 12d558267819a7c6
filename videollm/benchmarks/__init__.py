"""Published video benchmarks for ``python -m videollm.evaluate``: loaders, parsing, judge, metrics.

========================  ======  ==========================================================
name                      kind    files under ``--data-root`` (see each loader's docstring)
========================  ======  ==========================================================
``mvbench``               mc      ``json/<task>.json``, ``video/<source>/`` (PLLaVA prompting)
``videomme``              mc      ``videomme/test-*.parquet`` or the JSON release, ``data/``
``videomme_subtitles``    mc      as above + ``subtitle/<videoID>.srt``
``egoschema``             mc      ``questions.json``, ``subset_answers.json``, ``videos/``
``nextqa``                mc      ``val.csv``, ``map_vid_vidorID.json``, ``NExTVideo/``
``msvd_qa``               open    ``test_qa.json``, ``youtube_mapping.txt``, ``YouTubeClips/``
``msrvtt_qa``             open    ``test_qa.json``, ``videos/video<N>.mp4``
``activitynet_qa``        open    ``test_q.json``, ``test_a.json``, ``videos/v_<name>.mp4``
``tgif_qa``               open    ``Test_frameqa_question.csv`` (TAB), ``gifs/``
``msrvtt_caption``        caption ``test_videodatainfo.json``, ``videos/``
``caption_jsonl``         caption ``captions.jsonl`` (``{"video", "captions"}``)
========================  ======  ==========================================================

The offline benchmark (:mod:`videollm.synthetic_bench`) writes the ``mvbench`` and ``msvd_qa``
layouts. Other modules register more with :func:`register_benchmark`.
"""

from videollm.benchmarks import caption, mc, openqa  # noqa: F401 - registers the loaders
from videollm.benchmarks.base import (
    Benchmark,
    PromptStyle,
    Sample,
    benchmark_names,
    load_benchmark,
    register_benchmark,
)
from videollm.benchmarks.options import Choice, extract_option

__all__ = ["Benchmark", "Choice", "PromptStyle", "Sample", "benchmark_names", "extract_option", "load_benchmark",
           "register_benchmark"]

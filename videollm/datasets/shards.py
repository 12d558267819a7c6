"""Write webdataset tar shards from the original annotation formats.

Shards hold the encoded media bytes as they are on disk (no re-encoding: an mp4 stays an mp4
and is decoded at load time, exactly like the file it came from) plus one json per sample.
Inside a shard, sample ``k`` is ``{k}.{ext}`` + ``{k}.json`` with ``k`` an 8-digit running
number (webdataset keys may not contain dots) and ``ext`` the media's lower-case extension
(``mp4``, ``webm``, ``mkv``, ``avi``, ``mov``, ``jpg``, ``jpeg``, ``png``, ``webp``). The json:

=============== ======== ================================================================
source          media    json
=============== ======== ================================================================
``webvid``      video    ``{"caption": name, "videoid", "page_dir", "source"}``
``cc_sbu_align`` image   ``{"caption", "image_id", "source"}``
``llava``       image    ``{"id", "image", "conversations": [...], "source"}``
``videochat``   video    ``{"video", "QA": [...], "source"}``
=============== ======== ================================================================

``source`` is the media path relative to its root. Shards are ``{out}/{prefix}-{i:05d}.tar``,
written atomically (temp name, then rename) with fixed tar metadata, so the same input gives
byte-identical shards. Missing or empty media files are skipped and reported, never written;
with ``check=True`` media whose header cannot be read (not a video, no video stream, corrupt
image) are skipped too. Read the shards with the ``video_shards`` builder (captions or
instructions, video or image), or ``cc_sbu``/``laion`` (image + caption).

Command line::

    python -m videollm.datasets.shards webvid --anno-dir ann/ --videos-dir videos/ --out shards/webvid
    python -m videollm.datasets.shards cc_sbu_align --storage cc_sbu_align/ --out shards/cc
    python -m videollm.datasets.shards llava --anno-file llava.json --images-dir train2014/ --out shards/llava
    python -m videollm.datasets.shards videochat --anno-file vc.json --videos-dir videos/ --out shards/vc
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from videollm.datasets.bad_samples import (
    BadInput,
    check_conversations,
    check_file,
    check_qa,
    field_of,
    name_field,
    open_image,
    probe_video,
    resolve_under,
    text_field,
)
from videollm.datasets.shard_datasets import IMAGE_EXTS, VIDEO_EXTS
from videollm.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

SOURCES = ("webvid", "cc_sbu_align", "llava", "videochat")


@dataclass
class ShardItem:
    """One sample to write: a media file plus its json metadata.

    A converter gives a malformed annotation entry as an item with ``error`` set (and the entry's
    name, e.g. ``anno.json#12``, as ``media_path``): it is skipped and reported, never written.
    """

    media_path: str
    meta: Dict[str, Any]
    error: Optional[str] = None


@dataclass
class ShardReport:
    """What :func:`write_shards` did."""

    shards: List[str] = field(default_factory=list)
    written: int = 0
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (path, reason)
    bytes: int = 0

    @property
    def pattern(self) -> str:
        """A brace pattern for ``build_info.storage`` covering every shard written."""
        if not self.shards:
            return ""
        first = Path(self.shards[0])
        prefix = first.name.rsplit("-", 1)[0]
        if len(self.shards) == 1:
            return str(first)
        return str(first.parent / f"{prefix}-{{00000..{len(self.shards) - 1:05d}}}.tar")


def media_ext(path: str) -> str:
    return Path(path).suffix.lower().lstrip(".")


def _check_media(path: str, check: bool) -> None:
    check_file(path)
    if not check:
        return
    ext = media_ext(path)
    if ext in VIDEO_EXTS:
        probe_video(path)
    elif ext in IMAGE_EXTS:
        open_image(path, max_pixels=None)


def write_shards(
    items: Iterable[ShardItem],
    out_dir: str,
    prefix: str = "shard",
    samples_per_shard: int = 1000,
    max_shard_bytes: Optional[int] = None,
    check: bool = False,
) -> ShardReport:
    """Write ``items`` into tar shards under ``out_dir``; see the module docstring."""
    import tarfile

    import webdataset as wds

    if samples_per_shard < 1:
        raise ConfigError(f"samples_per_shard={samples_per_shard}: must be at least 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = ShardReport()
    writer = None
    tmp_path = final_path = None
    in_shard = shard_bytes = 0

    def close() -> None:
        nonlocal writer
        if writer is not None:
            writer.close()
            os.replace(tmp_path, final_path)
            report.shards.append(str(final_path))
            writer = None

    for item in items:
        path = item.media_path
        if item.error is not None:
            report.skipped.append((path, "bad_annotation"))
            logger.warning("not written: %s: bad_annotation (%s)", path, item.error)
            continue
        ext = media_ext(path)
        if ext not in VIDEO_EXTS + IMAGE_EXTS:
            report.skipped.append((path, f"unsupported extension '.{ext}'"))
            continue
        try:
            _check_media(path, check)
        except BadInput as exc:
            report.skipped.append((path, exc.reason))
            logger.warning("not written: %s: %s (%s)", path, exc.reason, exc.detail)
            continue
        data = Path(path).read_bytes()
        meta = json.dumps(item.meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
        if writer is not None and (in_shard >= samples_per_shard
                                   or (max_shard_bytes and shard_bytes + len(data) > max_shard_bytes)):
            close()
        if writer is None:
            idx = len(report.shards)
            final_path = out / f"{prefix}-{idx:05d}.tar"
            tmp_path = out / f".{prefix}-{idx:05d}.tar.tmp"
            writer = wds.TarWriter(str(tmp_path), encoder=False, mtime=0, user="", group="",
                                   format=tarfile.USTAR_FORMAT)
            in_shard = shard_bytes = 0
        key = f"{report.written:08d}"
        writer.write({"__key__": key, ext: data, "json": meta})
        in_shard += 1
        shard_bytes += len(data) + len(meta)
        report.written += 1
        report.bytes += len(data) + len(meta)
    close()
    return report


# ----------------------------------------------------------------------------------------
# Converters: annotations -> ShardItems
# ----------------------------------------------------------------------------------------


def _entry_item(where: str, build: Any) -> ShardItem:
    """``build()`` -> ShardItem, or an error item for a malformed entry (see :class:`ShardItem`)."""
    try:
        return build()
    except BadInput as exc:
        return ShardItem(where, {}, error=exc.detail)


def webvid_items(anno_dir: str, videos_dir: str) -> Iterator[ShardItem]:
    from videollm.datasets.caption_datasets import read_webvid_annotations

    for row in read_webvid_annotations(anno_dir):
        def build() -> ShardItem:
            if "__error__" in row:
                raise BadInput("bad_annotation", row["__error__"])
            rel = os.path.join(name_field(row, "page_dir"), f"{name_field(row, 'videoid')}.mp4")
            resolve_under(videos_dir, rel)
            meta = {"caption": text_field(row, "name"), "videoid": row["videoid"], "page_dir": row["page_dir"],
                    "source": rel}
            return ShardItem(os.path.join(videos_dir, rel), meta)

        yield _entry_item(row["__where__"], build)


def cc_sbu_align_items(storage: str) -> Iterator[ShardItem]:
    ann = Path(storage) / "filter_cap.json"
    if not ann.is_file():
        raise DataError(f"{ann}: not found (--storage must hold filter_cap.json and image/)")
    try:
        entries = json.loads(ann.read_text(encoding="utf-8"))["annotations"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{ann}: expected {{\"annotations\": [{{\"image_id\", \"caption\"}}]}}: {exc}") from None
    for i, a in enumerate(entries):
        def build() -> ShardItem:
            rel = f"image/{name_field(a, 'image_id')}.jpg"
            resolve_under(storage, rel)
            return ShardItem(os.path.join(storage, rel),
                             {"caption": text_field(a, "caption"), "image_id": a["image_id"], "source": rel})

        yield _entry_item(f"{ann}#{i}", build)


def llava_items(anno_file: str, images_dir: str) -> Iterator[ShardItem]:
    from videollm.datasets.instruct_datasets import read_json_list

    for i, s in enumerate(read_json_list(anno_file, "LLaVA-Instruct")):
        def build() -> ShardItem:
            rel = "COCO_train2014_" + field_of(s, "image", str)
            resolve_under(images_dir, rel)
            convs = check_conversations(field_of(s, "conversations", list))
            meta = {"id": s.get("id"), "image": s["image"], "conversations": convs, "source": rel}
            return ShardItem(os.path.join(images_dir, rel), meta)

        yield _entry_item(f"{anno_file}#{i}", build)


def videochat_items(anno_file: str, videos_dir: str) -> Iterator[ShardItem]:
    from videollm.datasets.instruct_datasets import read_json_list

    for i, s in enumerate(read_json_list(anno_file, "VideoChat")):
        def build() -> ShardItem:
            video = field_of(s, "video", str)
            path = resolve_under(videos_dir, video)
            return ShardItem(path, {"video": video, "QA": check_qa(field_of(s, "QA", list)), "source": video})

        yield _entry_item(f"{anno_file}#{i}", build)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m videollm.datasets.shards",
                                     description="Convert WebVid / cc_sbu_align / LLaVA / VideoChat data into tar shards.")
    parser.add_argument("source", choices=SOURCES)
    parser.add_argument("--out", required=True, help="output directory for the .tar shards")
    parser.add_argument("--prefix", default=None, help="shard file prefix (default: the source name)")
    parser.add_argument("--anno-dir", help="webvid: directory of *.csv")
    parser.add_argument("--anno-file", help="llava / videochat: the json file")
    parser.add_argument("--videos-dir", help="webvid / videochat: video root")
    parser.add_argument("--images-dir", help="llava: the train2014 image folder")
    parser.add_argument("--storage", help="cc_sbu_align: folder with filter_cap.json and image/")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--max-shard-bytes", type=int, default=None)
    parser.add_argument("--check", action="store_true", help="skip media whose header cannot be read")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    def need(*names: str) -> None:
        for n in names:
            if not getattr(args, n.replace("-", "_")):
                parser.error(f"{args.source} needs --{n}")

    if args.source == "webvid":
        need("anno-dir", "videos-dir")
        items = webvid_items(args.anno_dir, args.videos_dir)
    elif args.source == "cc_sbu_align":
        need("storage")
        items = cc_sbu_align_items(args.storage)
    elif args.source == "llava":
        need("anno-file", "images-dir")
        items = llava_items(args.anno_file, args.images_dir)
    else:
        need("anno-file", "videos-dir")
        items = videochat_items(args.anno_file, args.videos_dir)
    t0 = time.perf_counter()
    report = write_shards(items, args.out, prefix=args.prefix or args.source, samples_per_shard=args.samples_per_shard,
                          max_shard_bytes=args.max_shard_bytes, check=args.check)
    print(f"wrote {report.written} samples ({report.bytes / 1e6:.1f} MB) into {len(report.shards)} shard(s) "
          f"in {time.perf_counter() - t0:.1f} s; skipped {len(report.skipped)}")
    for path, reason in report.skipped[:20]:
        print(f"  skipped {path}: {reason}")
    if report.shards:
        print(f"build_info.storage: {report.pattern}")
    return 0 if report.written else 1


if __name__ == "__main__":
    raise SystemExit(main())

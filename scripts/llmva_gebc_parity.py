"""Parity of videollm's llmva_gebc with the original LLMVA-GEBC code at tiny size.

Two steps, two environments (the original needs transformers 4.28, videollm runs on 5.x):

1. ``python scripts/llmva_gebc_parity.py export --out DIR`` (videollm's environment): builds the
   tiny model (seeded), writes its whole state dict, a 4.28-loadable OPT folder with slow
   tokenizer files (vocab.json / merges.txt from the tiny BPE), a batch of features with prompts
   of different lengths, and videollm's loss and beam-search / greedy captions on it.
2. ``PYTHONPATH=/path/to/transformers-4.28 python scripts/llmva_gebc_parity.py reference --out DIR
   --original GIT_DIR`` (an environment with transformers 4.28.0, tokenizers 0.13): runs the
   original's ``VideoBLIP2OPT`` (``video_llama/models/video_blip2_opt_gebc.py`` read from a
   checkout or a bare git dir of zjr2000/LLMVA-GEBC, with its ``Qformer.py``; its ``Blip2Base``
   and registry are replaced by small stand-ins, and ``BertConfig.from_pretrained`` returns the
   tiny BERT config, since nothing is downloaded), loads videollm's state dict STRICTLY (same key
   names), and compares the loss, the beam-search captions (the original's own call:
   ``opt_model.generate(..., num_beams=2, max_length=30, min_length=1)`` under transformers 4.28)
   and greedy captions. Prints a report; exit status 1 on a mismatch.
3. ``python scripts/llmva_gebc_parity.py metrics --out DIR --original GIT_DIR`` (videollm's
   environment, Java): the original's ``evaluation_utils.gebc_captioning_eval`` against ours.
4. ``PYTHONPATH=/path/to/scipy python scripts/llmva_gebc_parity.py data --out DIR --original GIT_DIR``:
   the original's ``GEBCDataset`` and collater against the ``gebc`` dataset on generated files.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

TINY_BERT = {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128}


def export(out: Path, cfg_path: str = "", ckpt: str = "", n: int = 16) -> int:
    from omegaconf import OmegaConf

    import videollm
    import videollm.models  # noqa: F401
    from videollm.config import build_model_config
    from videollm.datasets.llmva_gebc_datasets import build_prompt
    from videollm.registry import registry

    out.mkdir(parents=True, exist_ok=True)
    cfg = build_model_config(OmegaConf.create({"arch": "llmva_gebc", "model_type": "tiny", "ckpt": ckpt}))
    torch.manual_seed(0)
    model = registry.get_model_class("llmva_gebc").from_config(cfg).eval()
    if not ckpt:
        with torch.no_grad():  # larger weights than the init: peaked, decisive next-token distributions
            for name, p in model.named_parameters():
                if name.startswith("opt_model.") and p.dim() == 2:
                    p.mul_(8.0)
    torch.save(model.state_dict(), out / "state_dict.pt")
    # OPT folder for transformers 4.28 (config, .bin weights, slow tokenizer files)
    opt_dir = out / "opt"
    opt_dir.mkdir(exist_ok=True)
    model.opt_model.config.to_json_file(str(opt_dir / "config.json"))
    torch.save({k: v.contiguous() for k, v in model.opt_model.state_dict().items()}, opt_dir / "pytorch_model.bin")
    tok_json = json.loads((Path(videollm.__file__).resolve().parent / "assets/gebc_tiny_tokenizer/tokenizer.json").read_text())
    (opt_dir / "vocab.json").write_text(json.dumps(tok_json["model"]["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"]["merges"]]
    (opt_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (opt_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "bos_token": "</s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "add_prefix_space": False, "errors": "replace"}))
    g = torch.Generator().manual_seed(1)
    types_ = ["subject", "status_before", "status_after", "subject"]
    if cfg_path:  # a real batch: the first n samples of the recipe's val split (all three types)
        from videollm.config import load_config
        from videollm.datasets import build_datasets_from_config
        from videollm.registry import import_all

        import_all()
        val = build_datasets_from_config(load_config(cfg_path).datasets)["gebc"]["val"]
        real = val.collater([val[i] for i in range(n)])
        batch = {k: real[k] for k in ("image_query_tokens", "other_features_list", "reference_points", "prompt")}
        batch["text_input"] = [val.annotation[i]["caption"] for i in range(n)]
    else:
        batch = None
    batch = batch or {
        "image_query_tokens": torch.randn(4, 12, 8, 64, generator=g),
        "other_features_list": torch.randn(4, 32, 1, 48, generator=g),
        "reference_points": torch.tensor([[0.3, 0.5], [0.3, 0.5], [0.6, 0.4], [0.9, 0.2]], dtype=torch.float64),
        "prompt": [build_prompt(l, t) for l, t in zip(["Change of Color", "Change of Color", "Change of Direction",
                                                       "Shot change"], types_)],
        "text_input": ["the red circle", "the red circle is moving left", "a square", "the blue triangle is moving up"],
    }
    torch.save(batch, out / "batch.pt")
    with torch.no_grad():
        loss = float(model(dict(batch))["loss"])
        embeds, mask = model.generation_inputs(dict(batch))
        beam = model.generate(embeds, mask).tolist()
        greedy = model.generate(embeds, mask, num_beams=1).tolist()
    tok = model.tokenizer
    result = {"loss": loss, "beam": [tok.decode(r, skip_special_tokens=True) for r in beam],
              "greedy": [tok.decode(r, skip_special_tokens=True) for r in greedy], "beam_ids": beam, "greedy_ids": greedy,
              "cfg": {k: cfg[k] for k in ("q_former_hidden_size", "num_video_query_token", "num_other_feat_query_token",
                                          "max_frame_pos", "max_other_features_pos", "other_feat_total_size", "max_txt_len")}}
    (out / "videollm.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("loss", "beam", "greedy")}, indent=1))
    return 0


def _original_sources(original: str, dest: Path) -> Path:
    """The original's two model files under a stand-in ``video_llama`` package in ``dest``."""
    pkg = dest / "video_llama"
    (pkg / "common").mkdir(parents=True)
    (pkg / "models").mkdir(parents=True)
    for sub in ("", "common", "models"):
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "common" / "registry.py").write_text(
        "class _R:\n    def register_model(self, name):\n        return lambda cls: cls\nregistry = _R()\n")
    (pkg / "models" / "blip2.py").write_text(
        "import contextlib, torch\nfrom torch import nn\n"
        "def disabled_train(self, mode=True):\n    return self\n"
        "class Blip2Base(nn.Module):\n"
        "    def init_tokenizer(self):\n        return None\n"
        "    @property\n    def device(self):\n        return list(self.parameters())[0].device\n"
        "    def maybe_autocast(self, dtype=torch.float16):\n"
        "        if self.device != torch.device('cpu'):\n            return torch.cuda.amp.autocast(dtype=dtype)\n"
        "        return contextlib.nullcontext()\n")
    for name in ("Qformer.py", "video_blip2_opt_gebc.py"):
        rel = f"video_llama/models/{name}"
        src = Path(original) / rel
        if src.is_file():
            text = src.read_text()
        else:  # a bare git dir (e.g. from `fetch`)
            text = subprocess.run(["git", f"--git-dir={original}", "show", f"HEAD:{rel}"], check=True,
                                  capture_output=True, text=True).stdout
        (pkg / "models" / name).write_text(text)
    return dest


def reference(out: Path, original: str) -> int:
    import transformers

    if not transformers.__version__.startswith("4.28"):
        print(f"the reference step needs transformers 4.28 (found {transformers.__version__})")
        return 2
    ours = json.loads((out / "videollm.json").read_text())
    tmp = Path(tempfile.mkdtemp())
    sys.path.insert(0, str(_original_sources(original, tmp)))
    base_from_pretrained = transformers.BertConfig.from_pretrained

    def tiny_bert(name, *a, **kw):
        if name == "bert-base-uncased":
            return transformers.BertConfig(**TINY_BERT)
        return base_from_pretrained(name, *a, **kw)

    transformers.BertConfig.from_pretrained = tiny_bert  # no download: the tiny BERT dims
    from video_llama.models.video_blip2_opt_gebc import VideoBLIP2OPT

    c = ours["cfg"]
    model = VideoBLIP2OPT(opt_model=str(out / "opt"), max_txt_len=c["max_txt_len"], max_frame_pos=c["max_frame_pos"],
                          max_other_features_pos=c["max_other_features_pos"], num_video_query_token=c["num_video_query_token"],
                          num_other_feat_query_token=c["num_other_feat_query_token"],
                          q_former_hidden_size=c["q_former_hidden_size"], other_feat_total_size=c["other_feat_total_size"])
    model.opt_model.float()
    state = torch.load(out / "state_dict.pt", map_location="cpu")
    result = model.load_state_dict(state, strict=False)
    unexpected = [k for k in result.unexpected_keys]
    missing = [k for k in result.missing_keys]
    model.eval()
    batch = torch.load(out / "batch.pt")
    with torch.no_grad():
        loss = float(model(dict(batch))["loss"])
        beam = model.generate(dict(batch), num_beams=2, max_length=30, min_length=1)
        greedy = model.generate(dict(batch), num_beams=1, max_length=30, min_length=1)
    report = {
        "missing_keys": missing, "unexpected_keys": unexpected,
        "loss": {"original": loss, "videollm": ours["loss"], "abs_diff": abs(loss - ours["loss"])},
        "beam_equal": beam == ours["beam"], "greedy_equal": greedy == ours["greedy"],
        "beam": {"original": beam, "videollm": ours["beam"]}, "greedy": {"original": greedy, "videollm": ours["greedy"]},
    }
    print(json.dumps(report, indent=1))
    ok = not missing and not unexpected and report["loss"]["abs_diff"] < 1e-4 and report["beam_equal"] and report["greedy_equal"]
    print("PARITY OK" if ok else "PARITY MISMATCH")
    return 0 if ok else 1


def metrics(original: str) -> int:
    """The original's ``evaluation_utils.gebc_captioning_eval`` (its SPICE scorer replaced by a stub
    returning 0, since the CoreNLP jars are missing; scipy stubbed, it is only imported) against
    :func:`videollm.gebc_metrics.gebc_captioning_eval` on a small prediction/annotation pair."""
    import importlib.util

    from videollm.gebc_metrics import gebc_captioning_eval, split_gt

    rel = "video_llama/evaluation/gebc_evaluation/evaluation_utils.py"
    src = Path(original) / rel
    text = src.read_text() if src.is_file() else subprocess.run(
        ["git", f"--git-dir={original}", "show", f"HEAD:{rel}"], check=True, capture_output=True, text=True).stdout
    tmp = Path(tempfile.mkdtemp())
    (tmp / "evaluation_utils.py").write_text(text)
    scipy = types.ModuleType("scipy")
    scipy.ndimage = types.ModuleType("scipy.ndimage")
    scipy.ndimage.filters = None
    sys.modules.setdefault("scipy", scipy)
    sys.modules.setdefault("scipy.ndimage", scipy.ndimage)
    import pycocoevalcap.spice.spice as spice_mod

    class NoSpice:
        def method(self):
            return "SPICE"

        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

    spice_mod.Spice = NoSpice
    spec = importlib.util.spec_from_file_location("orig_eval", tmp / "evaluation_utils.py")
    orig = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(orig)
    gt = {"vid00000000": [{"boundary_id": "vid00000000_0", "subject": "a man", "status_before": "running on the road",
                           "status_after": "walking slowly"},
                          {"boundary_id": "vid00000000_1", "subject": "the man", "status_before": "walking slowly",
                           "status_after": "stops and looks back"}],
          "vid00000001": [{"boundary_id": "vid00000001_0", "subject": "a red ball", "status_before": "rolling left",
                           "status_after": "stopped near the wall."}]}
    caps = {"vid00000000_0": ("the man", "running on a road", "walking"), "vid00000000_1": ("a man", "walking", "stops"),
            "vid00000001_0": ("a blue ball", "rolling to the left", "stopped at the wall")}
    preds = [{"boundary_id": b, "type": t, "caption": c[i]} for b, c in caps.items()
             for i, t in enumerate(("subject", "status_before", "status_after"))]
    (tmp / "pred.json").write_text(json.dumps(preds))
    (tmp / "gt.json").write_text(json.dumps(gt))
    theirs = orig.gebc_captioning_eval(str(tmp / "pred.json"), str(tmp / "gt.json"))
    ours = gebc_captioning_eval(preds, split_gt(gt), use_spice=False)
    rows = []
    ok = True
    for key in ("subject_ROUGE_L", "subject_CIDEr", "before_ROUGE_L", "before_CIDEr", "after+ROUGE_L", "after+CIDEr",
                "mean_ROUGE_L", "mean_CIDEr"):
        same = abs(theirs[key] - ours[key]) < 1e-9
        ok &= same
        rows.append(f"{key:18s} original {theirs[key]:10.4f}  videollm {ours[key]:10.4f}  {'=' if same else 'DIFFERENT'}")
    # without SPICE (0 in the stub) the original's overall score is the sum of the other two means
    same = abs(theirs["overall_score"] - ours["overall_score_without_spice"]) < 1e-9
    ok &= same
    rows.append(f"overall (no SPICE) original {theirs['overall_score']:.4f}  videollm {ours['overall_score_without_spice']:.4f}")
    print("\n".join(rows))
    print("METRICS PARITY OK" if ok else "METRICS MISMATCH")
    return 0 if ok else 1


def data(out: Path, original: str) -> int:
    """The original's ``GEBCDataset`` (its ``BaseDataset`` replaced by a stand-in; needs scipy for
    ``interp1d``) against videollm's ``gebc`` dataset on generated files: the same samples, and
    the same collated tensors (nearest resampling of the other features included)."""
    import pickle

    import numpy as np

    from videollm.datasets.llmva_gebc_datasets import GEBCDataset as Ours

    rel = "video_llama/datasets/datasets/gebc_dataset.py"
    src = Path(original) / rel
    text = src.read_text() if src.is_file() else subprocess.run(
        ["git", f"--git-dir={original}", "show", f"HEAD:{rel}"], check=True, capture_output=True, text=True).stdout
    tmp = Path(tempfile.mkdtemp())
    pkg = tmp / "video_llama" / "datasets" / "datasets"
    pkg.mkdir(parents=True)
    for d in (tmp / "video_llama", tmp / "video_llama" / "datasets", pkg):
        (d / "__init__.py").write_text("")
    (pkg / "base_dataset.py").write_text(
        "class BaseDataset:\n    def __init__(self, vis_processor=None, text_processor=None, vis_root=None, ann_paths=[]):\n"
        "        self.annotation = []\n    def __len__(self):\n        return len(self.annotation)\n")
    (pkg / "gebc_dataset.py").write_text(text)
    sys.path.insert(0, str(tmp))
    from video_llama.datasets.datasets.gebc_dataset import GEBCDataset as Theirs

    rng = np.random.default_rng(0)
    root = out / "gebc_data"
    for sub in ("q", "intern", "omni"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ann, info = {}, {}
    lengths = [1, 2, 5, 7, 96, 150, 13, 40]
    for i, t in enumerate(lengths):
        vid = f"vid{i:08d}"
        info[vid] = float(rng.uniform(5, 12))
        ts = sorted(rng.uniform(0.5, info[vid] - 0.5, size=2).round(3).tolist())
        ann[vid] = [{"boundary_id": f"{vid}_{k}", "timestamp": ts[k], "prev_timestamp": ts[k - 1] if k else 0,
                     "next_timestamp": ts[k + 1] if k + 1 < 2 else info[vid], "label": "Change of Action",
                     "subject": f"s{i}{k}", "status_before": f"b{i}{k}", "status_after": f"a{i}{k}"} for k in range(2)]
        np.save(root / "q" / f"{vid}.npy", rng.standard_normal((12, 32, 768)).astype(np.float32))
        with open(root / "intern" / f"{vid}.pkl", "wb") as f:
            pickle.dump(rng.standard_normal((t, 768)).astype(np.float32), f)
        with open(root / "omni" / f"{vid}.pkl", "wb") as f:
            pickle.dump(rng.standard_normal((max(1, t // 2), 1536)).astype(np.float32), f)
    (root / "ann.json").write_text(json.dumps(ann))
    (root / "info.json").write_text(json.dumps(info))
    args = (str(root / "ann.json"), str(root / "info.json"), str(root / "q"), ["intern_video", "omni"],
            [str(root / "intern"), str(root / "omni")], 96)
    theirs, ours = Theirs(*args), Ours(*args)
    ok = len(theirs) == len(ours)
    for start in range(0, len(ours), 8):
        idx = range(start, min(len(ours), start + 8))
        a = theirs.collater([theirs[i] for i in idx])
        b = ours.collater([ours[i] for i in idx])
        for key in ("image_query_tokens", "other_features_list", "reference_points"):
            same = a[key].dtype == b[key].dtype and torch.equal(a[key], b[key])
            ok &= same
            if not same:
                print(f"batch {start}: {key} differs ({a[key].dtype} vs {b[key].dtype})")
        for key in ("prompt", "text_input", "boundary_id"):
            ok &= a[key] == b[key]
    print(f"{len(ours)} samples, other-feature lengths {lengths} -> 96")
    print("DATA PARITY OK" if ok else "DATA MISMATCH")
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("step", choices=("export", "reference", "metrics", "data"))
    p.add_argument("--out", required=True)
    p.add_argument("--original", default="", help="checkout or bare git dir of zjr2000/LLMVA-GEBC (reference step)")
    p.add_argument("--cfg-path", default="", help="export: take a real batch from this recipe's val split")
    p.add_argument("--ckpt", default="", help="export: weights of the tiny model (e.g. the trained tiny recipe)")
    args = p.parse_args(argv)
    if args.step == "export":
        return export(Path(args.out), args.cfg_path, args.ckpt)
    if args.step == "metrics":
        return metrics(args.original)
    if args.step == "data":
        return data(Path(args.out), args.original)
    return reference(Path(args.out), args.original)


if __name__ == "__main__":
    sys.exit(main())

"""The LLaMA tokenizer reproduces the transformers-4.28 slow-tokenizer rules Video-LLaMA used."""

import json

import sentencepiece as spm

from videollm.tokenizer import LlamaTokenizer, load_dataset_tokenizer, load_model_tokenizer


def sp():
    return spm.SentencePieceProcessor(model_file=str(LlamaTokenizer.tiny().vocab_file))


def test_llama_style_ids():
    tok = LlamaTokenizer.tiny()
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert tok.encode("a red circle")[0] == 1 and tok.encode("a red circle", add_special_tokens=False)[0] != 1


def test_model_and_dataset_tokenizers_agree_on_the_patch_id():
    model_tok, data_tok = load_model_tokenizer("tiny"), load_dataset_tokenizer("tiny")
    n = sp().get_piece_size()
    assert model_tok.convert_tokens_to_ids("<ImageHere>") == n == data_tok.convert_tokens_to_ids("<ImageHere>")
    assert model_tok.convert_tokens_to_ids("<AudioHere>") == n + 1
    assert len(model_tok) == n + 2 and len(data_tok) == n + 1
    assert model_tok.pad_token_id == data_tok.pad_token_id == 0  # pad := unk


def test_chunks_are_encoded_separately_and_placeholders_strip_both_sides():
    tok = load_model_tokenizer("tiny")
    s = sp()
    text = "Human: <Video><ImageHere><ImageHere></Video> What is it?"
    expected = (
        s.encode("Human: <Video>", out_type=str)  # trailing space stripped by <ImageHere>
        + ["<ImageHere>", "<ImageHere>"]
        + s.encode("</Video> What is it?", out_type=str)  # its own dummy prefix "▁"
    )
    assert tok.tokenize(text) == expected
    spaced = "a <ImageHere>   b"
    assert tok.tokenize(spaced) == s.encode("a", out_type=str) + ["<ImageHere>"] + s.encode("b", out_type=str)


def test_special_tokens_keep_neighbouring_whitespace():
    tok = LlamaTokenizer.tiny()
    s = sp()
    text = " answer </s><s>[INST] q"
    expected = s.encode(" answer ", out_type=str) + ["</s>", "<s>"] + s.encode("[INST] q", out_type=str)
    assert tok.tokenize(text) == expected
    ids = tok.encode(text)
    assert ids[0] == 1 and 2 in ids and ids.count(1) == 2


def test_padding_truncation_and_tensors():
    tok = load_model_tokenizer("tiny")
    out = tok(["a red circle", "a"], padding="longest", return_tensors="pt", add_special_tokens=False)
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 2
    assert mask[1].tolist() == [1] * int(mask[1].sum()) + [0] * (ids.shape[1] - int(mask[1].sum()))
    assert (ids[1][mask[1] == 0] == 0).all()
    cut = tok("a red circle moving left", truncation=True, max_length=3)["input_ids"]
    assert len(cut) == 3 and cut[0] == 1


def test_decode_round_trip():
    tok = LlamaTokenizer.tiny()
    text = "a red circle moving left"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text


def test_hf_folder_with_added_pad_token(tmp_path):
    base = LlamaTokenizer.tiny()
    n = base.sp.get_piece_size()
    folder = tmp_path / "vicuna"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(base.vocab_file.read_bytes())
    (folder / "added_tokens.json").write_text(json.dumps({"[PAD]": n}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "[PAD]", "bos_token": "<s>"}))
    tok = load_model_tokenizer(folder)
    # Vicuna v0: [PAD] = n, so the patch tokens come after it (32001/32002 with the real vocab)
    assert tok.pad_token_id == n
    assert tok.convert_tokens_to_ids("<ImageHere>") == n + 1
    assert tok.convert_tokens_to_ids("<AudioHere>") == n + 2
    tok.save_pretrained(tmp_path / "saved")
    again = LlamaTokenizer.from_pretrained(tmp_path / "saved")
    assert again.encode("a [PAD] b") == LlamaTokenizer.from_pretrained(folder).encode("a [PAD] b")


def test_tiny_tokenizer_is_rebuilt_identically(tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "build_tiny_tokenizer.py"
    spec = importlib.util.spec_from_file_location("build_tiny_tokenizer", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "OUT", tmp_path)
    mod.main()
    assert (tmp_path / "tokenizer.model").read_bytes() == LlamaTokenizer.tiny().vocab_file.read_bytes()

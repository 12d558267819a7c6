"""Video-LLaMA audio-language branch: training on frames, real audio at inference, ckpt + ckpt_2."""

import pytest
import torch
from omegaconf import OmegaConf

from videollm.models.video_llama import VideoLLAMA

TINY = "videollm/configs/models/video_llama_tiny.yaml"


def audio_cfg(**overrides):
    cfg = OmegaConf.load(TINY).model
    cfg.update(equip_audio_branch=True, frozen_audio_Qformer=False, frozen_video_Qformer=True, frozen_llama_proj=True)
    cfg.update(overrides)
    return cfg


def test_audio_branch_trains_on_frames_through_the_vision_tower():
    torch.manual_seed(0)
    m = VideoLLAMA.from_config(audio_cfg()).train()
    assert m.train_flag == 1
    trainable = {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"audio_Qformer", "audio_query_tokens", "audio_position_embedding", "audio_llama_proj"}
    video = torch.randn(2, 3, 4, 32, 32)
    inputs = m.caption_inputs({"image": video, "text_input": ["a red circle", "a blue square"]})
    assert (inputs["labels"][:, : 1 + m.num_audio_query_token] == -100).all()  # 8 audio tokens + BOS
    out = m({"image": video, "text_input": ["a red circle", "a blue square"]})
    out["loss"].backward()
    assert m.audio_Qformer.bert.encoder.layer[0].crossattention.self.key.weight.grad is not None
    assert m.video_Qformer.bert.encoder.layer[0].crossattention.self.key.weight.grad is None


def test_real_audio_tokens_and_scale(synthetic_root):
    import json

    from videollm.processors.audio import load_and_transform_audio

    torch.manual_seed(0)
    m = VideoLLAMA.from_config(audio_cfg(frozen_audio_Qformer=True)).eval()
    manifest = json.loads((synthetic_root / "manifest.json").read_text())
    clip = next(c for c in manifest["videos"] if c["has_audio"])
    audio = load_and_transform_audio(synthetic_root / clip["path"]).unsqueeze(0)
    assert audio.shape == (1, 8, 1, 128, 204)
    with torch.no_grad():
        embeds, atts = m.encode_audioQformer(audio, modality_type="audio")
        _, final = m.audio_encoder.get_audio_feature(audio, "audio")
        _, vision = m.audio_encoder.get_audio_feature(torch.randn(1, 4, 3, 32, 32), "vision")
    assert embeds.shape == (1, 8, 64) and atts.shape == (1, 8)
    # the original's train/inference scale mismatch: audio embeddings have norm 20, vision 1
    torch.testing.assert_close(final.norm(dim=-1), torch.full((1, 8), 20.0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(vision.norm(dim=-1), torch.ones(1, 4), rtol=1e-4, atol=1e-4)


def test_vl_ckpt_then_al_ckpt_2_merge(tmp_path):
    torch.manual_seed(0)
    vl = VideoLLAMA.from_config(audio_cfg(frozen_audio_Qformer=True, frozen_video_Qformer=False, frozen_llama_proj=False))
    al = VideoLLAMA.from_config(audio_cfg())
    with torch.no_grad():
        for p in list(vl.video_Qformer.parameters()) + list(al.audio_Qformer.parameters()):
            p.add_(0.05)
    torch.save({"model": {k: v for k, v in vl.trainable_state_dict().items() if not k.startswith("audio")}}, tmp_path / "vl.pth")
    torch.save({"model": {k: v for k, v in al.trainable_state_dict().items() if k.startswith("audio")}}, tmp_path / "al.pth")
    merged = VideoLLAMA.from_config(audio_cfg(frozen_audio_Qformer=True, ckpt=str(tmp_path / "vl.pth"), ckpt_2=str(tmp_path / "al.pth")))
    torch.testing.assert_close(merged.video_Qformer.state_dict(), vl.video_Qformer.state_dict())
    torch.testing.assert_close(merged.audio_Qformer.state_dict(), al.audio_Qformer.state_dict())
    assert merged.train_flag == 3


@pytest.mark.parametrize("preset, expected", [("vicuna7b", 22_855_680), ("llama2_13b", 23_643_136)])
def test_full_size_audio_branch_on_meta(preset, expected):
    cfg = OmegaConf.load(f"videollm/configs/models/video_llama_{preset}.yaml").model
    cfg.update(llama_model="", vit_ckpt="", q_former_model="", imagebind_ckpt_path="", tokenizer="tiny")
    cfg.update(equip_audio_branch=True, frozen_audio_Qformer=False)
    with torch.device("meta"):
        m = VideoLLAMA.from_config(cfg)
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == expected
    sd = m.state_dict()
    assert tuple(sd["audio_Qformer.bert.encoder.layer.1.crossattention.self.key.weight"].shape) == (768, 1024)
    assert tuple(sd["audio_query_tokens"].shape) == (1, 8, 768)
    assert tuple(sd["audio_position_embedding.weight"].shape) == (8, 1024)
    assert tuple(sd["audio_encoder.modality_preprocessors.audio.pos_embedding_helper.pos_embed"].shape) == (1, 229, 768)
    assert not any(k.startswith("audio_encoder.modality_trunks.text") for k in sd)  # unused towers not built
    built = sum(p.numel() for p in m.audio_encoder.parameters())
    assert built < 0.65 * 1_200_781_057  # vision + audio only, instead of all six modalities

"""Audio loading for ImageBind: Kaldi fbank parity, resampling, clip layout, quirk A3, errors."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import kaldi_native_fbank as knf
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from videollm.errors import AudioDecodeError, ConfigError
from videollm.processors.audio import (
    IMAGEBIND_AUDIO_MEAN,
    IMAGEBIND_AUDIO_STD,
    ImageBindAudioProcessor,
    NoAudioStreamError,
    clip_sample_ranges,
    decode_audio,
    kaldi_fbank,
    kaldi_mel_banks,
    load_and_transform_audio,
    load_and_transform_audio_batch,
    resample,
    waveform_to_clips,
)
from videollm.synthetic import ClipSpec, write_clip

# ------------------------------------------------------------------------------------------------
# Kaldi fbank parity with kaldi-native-fbank
# ------------------------------------------------------------------------------------------------


def knf_fbank(x: np.ndarray, *, sr: int = 16000, bins: int = 128, window: str = "hanning", frame_ms: float = 25.0):
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.window_type = window
    opts.frame_opts.samp_freq = sr
    opts.frame_opts.frame_length_ms = frame_ms
    opts.mel_opts.num_bins = bins
    opts.use_energy = False
    opts.htk_compat = True
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(sr, x.astype(np.float32).tolist())
    fb.input_finished()
    return torch.from_numpy(np.stack([fb.get_frame(i) for i in range(fb.num_frames_ready)]))


def _signals(sr: int):
    g = torch.Generator().manual_seed(0)
    n = 2 * sr
    t = torch.arange(n, dtype=torch.float64) / sr
    return {
        "noise": 0.1 * torch.randn(n, generator=g),
        "sine+noise": (0.5 * torch.sin(2 * math.pi * 440 * t)).float() + 0.01 * torch.randn(n, generator=g),
        "chirp": (0.3 * torch.sin(2 * math.pi * (100 + 2000 * t / 2) * t)).float(),
        "dc+noise": 0.5 + 0.05 * torch.randn(n, generator=g),
    }


# Kaldi itself refuses 128 bins with a 512-point FFT at 16 kHz (one triangle falls between FFT bins:
# "You may have set --num-mel-bins too large"), which torchaudio's fbank (used by the original)
# silently allows. So the 128-bin layout is checked with a finer FFT (50 ms frames, or 32 kHz).
CONFIGS = {
    "16k-120-hanning": dict(sr=16000, bins=120),
    "16k-80-povey": dict(sr=16000, bins=80, window="povey"),
    "16k-128-50ms": dict(sr=16000, bins=128, frame_ms=50.0),
    "32k-128-hanning": dict(sr=32000, bins=128),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("signal", ["noise", "sine+noise", "chirp", "dc+noise"])
def test_fbank_matches_kaldi_native_fbank(config, signal):
    kw = CONFIGS[config]
    x = _signals(kw["sr"])[signal]
    ours = kaldi_fbank(
        x, sample_rate=kw["sr"], num_mel_bins=kw["bins"], window_type=kw.get("window", "hanning"),
        frame_length_ms=kw.get("frame_ms", 25.0),
    )
    ref = knf_fbank(x.numpy(), **kw)
    assert ours.shape == ref.shape
    diff = (ours - ref).abs()
    assert diff.mean() < 1e-4
    # Tight wherever a bin holds more than 1e-4 of its frame's peak energy; below that both sides
    # are at the limit of float32 spectra (energies ~1e-8 of the peak) and differ by up to ~0.02.
    strong = ref > ref.max(dim=1, keepdim=True).values - math.log(1e4)
    assert diff[strong].max() < 2e-3
    assert diff.max() < 0.05


@pytest.mark.parametrize("bins,sr,frame_ms", [(120, 16000, 25.0), (128, 16000, 50.0), (128, 32000, 25.0)])
def test_mel_banks_match_kaldi_native_fbank(bins, sr, frame_ms):
    opts = knf.MelBanksOptions()
    opts.num_bins = bins
    frame = knf.FrameExtractionOptions()
    frame.samp_freq, frame.frame_length_ms, frame.window_type = sr, frame_ms, "hanning"
    ref = torch.tensor(np.array(knf.MelBanks(opts, frame, 1.0).get_matrix()))
    fft_size = 1 << (int(sr * frame_ms / 1000) - 1).bit_length()
    ours = kaldi_mel_banks(bins, fft_size, sr)
    torch.testing.assert_close(ours[:, : ref.shape[1]], ref, atol=1e-4, rtol=0)
    assert torch.all(ours[:, -1] == 0)  # Nyquist bin unused


def test_fbank_frame_count_snip_edges():
    assert kaldi_fbank(torch.randn(32000)).shape == (198, 128)  # a 2-s clip: 1 + (32000 - 400) // 160
    assert kaldi_fbank(torch.randn(31999)).shape == (198, 128)
    assert kaldi_fbank(torch.randn(400)).shape == (1, 128)
    assert kaldi_fbank(torch.randn(399)).shape == (0, 128)


# ------------------------------------------------------------------------------------------------
# Resampling and clip layout
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("orig,new", [(44100, 16000), (48000, 16000), (8000, 16000), (22050, 16000)])
def test_resample_reproduces_a_sine(orig, new):
    n = orig  # 1 s
    t = torch.arange(n, dtype=torch.float64) / orig
    x = torch.stack([torch.sin(2 * math.pi * 440 * t), 0.5 * torch.cos(2 * math.pi * 1000 * t)]).float()
    y = resample(x, orig, new)
    assert y.shape == (2, math.ceil(n * new / orig))
    tt = torch.arange(y.shape[1], dtype=torch.float64) / new
    expected = torch.stack([torch.sin(2 * math.pi * 440 * tt), 0.5 * torch.cos(2 * math.pi * 1000 * tt)])
    inner = slice(100, -100)  # the ends see zero padding
    assert (y[:, inner].double() - expected[:, inner]).abs().max() < 2e-3


def test_resample_removes_frequencies_above_new_nyquist_and_keeps_same_rate():
    x = torch.sin(2 * math.pi * 7000 * torch.arange(44100) / 44100)
    assert resample(x, 16000, 16000) is x
    y = resample(x, 44100, 8000)  # 7 kHz is above 4 kHz: filtered out, not aliased to 1 kHz
    assert y[100:-100].abs().max() < 0.01


def test_clip_ranges_follow_constant_clips_per_video_sampler():
    # 3 s at 16 kHz: starts k * (3 - 2) / 8 s
    assert clip_sample_ranges(48000, 16000) == [(2000 * k, 2000 * k + 32000) for k in range(8)]
    # shorter than 2 s: eight identical clips covering what there is
    assert clip_sample_ranges(20000, 16000) == [(0, 32000)] * 8
    # an awkward length: exact fractions, truncated to ints
    n = 50001
    step = Fraction(n / 16000 - 2) / 8
    ranges = clip_sample_ranges(n, 16000)
    assert ranges[7] == (int(7 * step * 16000), int((7 * step + 2) * 16000))
    assert all(e - s in (31999, 32000) for s, e in ranges)
    assert ranges[-1][1] < n  # divided by 8, not 7: the last clip ends before the track does


# ------------------------------------------------------------------------------------------------
# The quirk of in-place mean subtraction (A3)
# ------------------------------------------------------------------------------------------------


def _tone_with_offset(seconds: float, sr: int = 16000) -> torch.Tensor:
    t = torch.arange(int(seconds * sr), dtype=torch.float64) / sr
    ramp = 0.2 * t / seconds  # a slowly changing offset makes clip means differ
    return (0.3 * torch.sin(2 * math.pi * 330 * t) + ramp + 0.1).float()[None]


def test_inplace_mean_quirk_changes_later_overlapping_clips():
    wave = _tone_with_offset(3.0)
    original = wave.clone()
    quirk = waveform_to_clips(wave, 16000)
    assert not torch.equal(wave, original)  # the shared waveform was modified in place
    fixed_input = original.clone()
    fixed = waveform_to_clips(fixed_input, 16000, inplace_mean_quirk=False)
    assert torch.equal(fixed_input, original)
    assert quirk.shape == fixed.shape == (8, 1, 128, 204)
    torch.testing.assert_close(quirk[0], fixed[0], atol=0, rtol=0)  # clip 0 sees no earlier subtraction
    later = (quirk[1:] - fixed[1:]).abs().amax(dim=(1, 2, 3))
    assert (later > 1e-3).all()


def test_inplace_mean_quirk_has_no_effect_without_overlap():
    wave = _tone_with_offset(19.0)  # step (19 - 2) / 8 > 2 s: the clips do not overlap
    quirk = waveform_to_clips(wave.clone(), 16000)
    fixed = waveform_to_clips(wave.clone(), 16000, inplace_mean_quirk=False)
    torch.testing.assert_close(quirk, fixed, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------
# Files: decoding, shapes, errors
# ------------------------------------------------------------------------------------------------


def _write_wav(path: Path, channels: np.ndarray, sr: int) -> None:
    """int16 PCM WAV from an int16 array (channels, samples)."""
    layout = {1: "mono", 2: "stereo"}[channels.shape[0]]
    with av.open(str(path), mode="w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=sr)
        stream.codec_context.layout = layout
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(channels.T.reshape(1, -1)), format="s16", layout=layout)
        frame.sample_rate = sr
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    spec = dict(shape="circle", color="red", direction="left", speed="slow")
    write_clip(root / "with_audio.mp4", ClipSpec(name="a", has_audio=True, tone="low", sample_rate=44100, **spec), duration=3.0)
    write_clip(root / "silent.mp4", ClipSpec(name="b", has_audio=False, **spec), duration=1.0)
    (root / "garbage.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    t = np.arange(48000) / 16000
    left = np.round(8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    right = np.round(3000 * np.random.default_rng(1).standard_normal(48000)).astype(np.int16)
    _write_wav(root / "stereo.wav", np.stack([left, right]), 16000)
    _write_wav(root / "mono.wav", left[None], 16000)
    return root


def test_decode_keeps_channels_and_scales_int16(media):
    wave, sr = decode_audio(media / "stereo.wav")
    assert sr == 16000 and wave.shape == (2, 48000) and wave.dtype == torch.float32
    t = np.arange(48000) / 16000
    left = np.round(8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    torch.testing.assert_close(wave[0], torch.from_numpy(left / 32768.0).float(), atol=0, rtol=0)


def test_video_with_aac_track_gives_eight_clips(media):
    out = load_and_transform_audio(media / "with_audio.mp4")
    assert out.shape == (8, 1, 128, 204) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # a 2-s clip has 198 frames: the last 6 columns are zero padding, then normalised
    torch.testing.assert_close(out[..., 198:], torch.full_like(out[..., 198:], -IMAGEBIND_AUDIO_MEAN / IMAGEBIND_AUDIO_STD))
    # the 220 Hz tone puts most energy in a low mel band, the same in every clip
    peak_bins = out[:, 0, :, :198].mean(dim=-1).argmax(dim=-1)
    assert (peak_bins == peak_bins[0]).all() and peak_bins[0] < 40
    fixed = load_and_transform_audio(media / "with_audio.mp4", inplace_mean_quirk=False)
    torch.testing.assert_close(out[0], fixed[0], atol=0, rtol=0)
    batch = load_and_transform_audio_batch([media / "with_audio.mp4", media / "mono.wav"])
    assert batch.shape == (2, 8, 1, 128, 204)
    torch.testing.assert_close(batch[0], out)


def test_fbank_reads_channel_zero_only(media):
    kw = dict(inplace_mean_quirk=False)  # whole-clip centring is then a constant shift, removed per frame
    stereo = load_and_transform_audio(media / "stereo.wav", **kw)
    mono = load_and_transform_audio(media / "mono.wav", **kw)
    torch.testing.assert_close(stereo, mono, atol=1e-3, rtol=0)


def test_no_audio_stream_raises_distinct_error(media):
    with pytest.raises(NoAudioStreamError, match="silent.mp4"):
        load_and_transform_audio(media / "silent.mp4")
    assert issubclass(NoAudioStreamError, AudioDecodeError)


def test_unreadable_files_raise_audio_decode_error(media, tmp_path):
    with pytest.raises(AudioDecodeError, match="garbage.mp4") as info:
        load_and_transform_audio(media / "garbage.mp4")
    assert not isinstance(info.value, NoAudioStreamError)
    with pytest.raises(AudioDecodeError, match="missing.wav"):
        load_and_transform_audio(tmp_path / "missing.wav")


def test_too_short_track_raises(tmp_path):
    _write_wav(tmp_path / "blip.wav", np.full((1, 200), 1000, dtype=np.int16), 16000)
    with pytest.raises(AudioDecodeError, match="blip.wav.*shorter than one 25 ms window"):
        load_and_transform_audio(tmp_path / "blip.wav")


def test_processor_from_config(media):
    proc = ImageBindAudioProcessor.from_config(OmegaConf.create({"clips_per_video": 2, "target_length": 100}))
    assert proc(media / "mono.wav").shape == (2, 1, 128, 100)
    with pytest.raises(ConfigError, match="did you mean clips_per_video"):
        ImageBindAudioProcessor.from_config(OmegaConf.create({"clip_per_video": 2}))

"""Audio input for ImageBind's audio tower: decode, resample, cut clips, Kaldi log-mel, normalise.

A re-implementation, without torchaudio, of what the original Video-LLaMA does when the demo
is given a video with sound (ImageBind's ``load_and_transform_audio_data`` with 8 clips)::

    file --PyAV--> float waveform (channels, samples) in [-1, 1]
         --windowed-sinc resampler--> 16 kHz
         --8 clips of 2 s, starts k * (duration - 2) / 8--> per clip:
               subtract the clip's mean (IN PLACE on the shared waveform: quirk A3)
               Kaldi fbank of channel 0 (htk_compat, hanning, 25 ms / 10 ms, 128 mel bins,
               dither 0, no energy)  -> (frames, 128) -> transpose -> pad/crop to 204 frames
         --(x - (-4.268)) / 9.138--> (8, 1, 128, 204)

Facts reproduced from the original, with where they come from:

* Clip starts follow pytorchvideo's ``ConstantClipsPerVideoSampler`` (the Fraction version that
  ImageBind pins): ``step = Fraction(max(duration - clip_duration, 0)) / clips_per_video`` (note:
  divided by ``clips_per_video``, not ``clips_per_video - 1``, so the last clip ends before the
  end of the track), clip k spans ``[k * step, k * step + clip_duration)`` seconds, and the
  samples are ``waveform[int(start * sr) : int(end * sr)]``. ``duration`` is the float
  ``samples / sr``. There are always ``clips_per_video`` clips; short tracks give overlapping
  (or, under 2 s, identical and shorter) clips.
* Quirk A3: each clip is a *view* of the whole waveform and its mean is subtracted in place, so
  clips that overlap an earlier clip see that clip's subtraction too. Clip 0 is unaffected; later
  overlapping clips differ slightly from a per-clip copy. ``inplace_mean_quirk=False`` gives the
  corrected behaviour (each clip centred on its own copy).
* The mean is taken over all channels of the clip (a stereo track is centred as a whole), but
  Kaldi's fbank reads channel 0 only.
* The resampler is our own implementation of the windowed-sinc (Hann window, 6 zero crossings,
  roll-off 0.99) interpolation that torchaudio's ``functional.resample`` uses by default (same
  filters, same zero padding at the ends, same output length ``ceil(n * new / orig)``, kernels in
  the waveform's dtype), so it should agree with torchaudio to float32 rounding; that could not be
  checked here (no torchaudio), only against analytic sines. FFmpeg's libswresample (PyAV's
  resampler, default settings) uses a different filter: measured 44.1 -> 16 kHz, it agrees with
  ours to 1e-4 on a 440 Hz sine but differs by ~10 % rms on white noise (the two filters' transition
  bands near the new Nyquist frequency differ), which would change the top mel bins.
* The fbank follows Kaldi's ``compute-fbank-feats`` defaults except the options named above; it
  is tested against ``kaldi_native_fbank``.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from videollm.errors import AudioDecodeError, ConfigError
from videollm.registry import registry

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# Normalisation of ImageBind's audio inputs (AudioSet statistics, from the original's data.py).
IMAGEBIND_AUDIO_MEAN = -4.268
IMAGEBIND_AUDIO_STD = 9.138


class NoAudioStreamError(AudioDecodeError):
    """The file decodes but has no audio stream (e.g. a silent video): callers may go video-only."""


# ------------------------------------------------------------------------------------------------
# Decoding
# ------------------------------------------------------------------------------------------------

# Integer sample formats and the divisor that maps them to [-1, 1) (as torchaudio.load does).
_INT_SCALE = {"u8": 128.0, "s16": 32768.0, "s32": 2147483648.0, "s64": 9223372036854775808.0}


def _frame_to_planar_float(frame) -> np.ndarray:
    """A PyAV AudioFrame -> float32 array (channels, samples) in [-1, 1]."""
    fmt = frame.format
    data = frame.to_ndarray()
    channels = frame.layout.nb_channels
    if not fmt.is_planar:  # packed: (1, samples * channels), interleaved
        data = data.reshape(-1, channels).T
    base = fmt.name.rstrip("p")
    if base == "u8":
        return (data.astype(np.float32) - 128.0) / 128.0
    if base in _INT_SCALE:
        return (data.astype(np.float64) / _INT_SCALE[base]).astype(np.float32)
    return data.astype(np.float32)


def decode_audio(path: PathLike) -> Tuple[torch.Tensor, int]:
    """Decode the first audio stream of a video or audio file with PyAV.

    Returns:
        ``(waveform, sample_rate)``: float32 (channels, samples) in [-1, 1], all channels kept.

    Raises:
        NoAudioStreamError: the file opens but holds no audio stream.
        AudioDecodeError: the file is missing, unreadable, or its audio track is empty.
    """
    import av

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AudioDecodeError(f"{path}: no such file")
    try:
        container = av.open(path)
    except Exception as exc:  # PyAV raises many FFmpegError subclasses (and OSError)
        raise AudioDecodeError(f"{path}: cannot open as a media file ({exc})") from exc
    with container:
        if not container.streams.audio:
            raise NoAudioStreamError(f"{path}: no audio stream (a silent video?); use it without audio")
        stream = container.streams.audio[0]
        pieces: List[np.ndarray] = []
        sample_rate: Optional[int] = None
        try:
            for frame in container.decode(stream):
                if sample_rate is None:
                    sample_rate = frame.sample_rate
                elif frame.sample_rate != sample_rate:
                    raise AudioDecodeError(
                        f"{path}: the audio sample rate changes mid-stream ({sample_rate} -> "
                        f"{frame.sample_rate} Hz); re-encode the track at one rate"
                    )
                pieces.append(_frame_to_planar_float(frame))
        except AudioDecodeError:
            raise
        except Exception as exc:
            raise AudioDecodeError(f"{path}: audio decoding failed ({exc})") from exc
    if not pieces or sample_rate is None:
        raise AudioDecodeError(f"{path}: the audio stream holds no samples")
    waveform = torch.from_numpy(np.ascontiguousarray(np.concatenate(pieces, axis=1)))
    if waveform.shape[1] == 0:
        raise AudioDecodeError(f"{path}: the audio stream holds no samples")
    return waveform, int(sample_rate)


# ------------------------------------------------------------------------------------------------
# Resampling
# ------------------------------------------------------------------------------------------------


def resample(
    waveform: torch.Tensor,
    orig_freq: int,
    new_freq: int,
    *,
    lowpass_filter_width: int = 6,
    rolloff: float = 0.99,
) -> torch.Tensor:
    """Band-limited resampling by windowed-sinc interpolation: (..., n) -> (..., ceil(n * new / orig)).

    The rates are reduced by their gcd to ``orig -> new``; each of the ``new`` output phases gets
    its own filter, a sinc with cut-off ``rolloff * min(orig, new) / 2`` (in the reduced rates)
    tapered by a Hann window (``cos^2``) spanning ``lowpass_filter_width`` zero crossings either
    side. Input beyond the ends counts as zeros. These are the defaults of torchaudio's
    ``functional.resample`` (``sinc_interp_hann``).
    """
    if orig_freq <= 0 or new_freq <= 0:
        raise ConfigError(f"resample: sample rates must be positive, got {orig_freq} -> {new_freq}")
    if orig_freq == new_freq:
        return waveform
    g = math.gcd(int(orig_freq), int(new_freq))
    orig, new = int(orig_freq) // g, int(new_freq) // g

    base = min(orig, new) * rolloff  # filter cut-off, in cycles per `orig` input samples
    width = math.ceil(lowpass_filter_width * orig / base)  # filter half-length in input samples
    # Time (in input samples) from output phase j to each tap, scaled to zero crossings of the sinc.
    dtype = waveform.dtype if waveform.is_floating_point() else torch.float32
    taps = torch.arange(-width, width + orig, dtype=dtype) / orig
    phases = torch.arange(0, -new, -1, dtype=dtype)[:, None] / new
    t = ((phases + taps) * base).clamp(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / torch.where(t == 0, torch.ones_like(t), t))
    kernels = (sinc * window * (base / orig))[:, None, :]  # (new, 1, taps)

    shape = waveform.shape
    x = waveform.to(dtype).reshape(-1, 1, shape[-1])
    x = F.pad(x, (width, width + orig))
    y = F.conv1d(x, kernels, stride=orig)  # (batch, new phases, blocks)
    y = y.transpose(1, 2).reshape(x.shape[0], -1)
    target = math.ceil(new * shape[-1] / orig)
    return y[:, :target].reshape(*shape[:-1], target)


# ------------------------------------------------------------------------------------------------
# Kaldi-compatible filterbank
# ------------------------------------------------------------------------------------------------


def _mel(freq: torch.Tensor) -> torch.Tensor:
    return 1127.0 * torch.log1p(freq / 700.0)


def kaldi_mel_banks(
    num_bins: int, fft_size: int, sample_rate: float, low_freq: float = 20.0, high_freq: float = 0.0
) -> torch.Tensor:
    """Kaldi's triangular mel filters (no VTLN): float32 (num_bins, fft_size // 2 + 1).

    Triangles are evenly spaced on the mel scale ``1127 ln(1 + f / 700)`` between ``low_freq`` and
    ``high_freq`` (``<= 0`` means Nyquist plus that value) and are evaluated at the mel value of
    each FFT bin's centre frequency. The Nyquist bin gets weight 0, as in Kaldi.
    """
    nyquist = 0.5 * sample_rate
    high = high_freq if high_freq > 0 else nyquist + high_freq
    if not 0.0 <= low_freq < high <= nyquist:
        raise ConfigError(f"fbank: need 0 <= low_freq ({low_freq}) < high_freq ({high}) <= Nyquist ({nyquist})")
    num_fft_bins = fft_size // 2
    mel_low, mel_high = _mel(torch.tensor(low_freq, dtype=torch.float64)), _mel(torch.tensor(high, dtype=torch.float64))
    delta = (mel_high - mel_low) / (num_bins + 1)
    i = torch.arange(num_bins, dtype=torch.float64)[:, None]
    left, center, right = mel_low + i * delta, mel_low + (i + 1) * delta, mel_low + (i + 2) * delta
    mel = _mel(torch.arange(num_fft_bins, dtype=torch.float64) * (sample_rate / fft_size))[None, :]
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)
    return F.pad(banks, (0, 1)).to(torch.float32)


def _window(kind: str, length: int, dtype: torch.dtype) -> torch.Tensor:
    if kind == "hanning":  # Kaldi's "hanning" is the symmetric Hann window
        return torch.hann_window(length, periodic=False, dtype=dtype)
    if kind == "povey":  # Kaldi's default: Hann to the power 0.85
        return torch.hann_window(length, periodic=False, dtype=dtype).pow(0.85)
    if kind == "hamming":
        return torch.hamming_window(length, periodic=False, alpha=0.54, beta=0.46, dtype=dtype)
    if kind == "rectangular":
        return torch.ones(length, dtype=dtype)
    raise ConfigError(f"fbank: unknown window_type '{kind}'; use hanning, povey, hamming or rectangular")


def kaldi_fbank(
    waveform: torch.Tensor,
    *,
    sample_rate: float = 16000.0,
    num_mel_bins: int = 128,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    window_type: str = "hanning",
    preemphasis: float = 0.97,
    remove_dc_offset: bool = True,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
    energy_floor: float = float(torch.finfo(torch.float32).eps),
) -> torch.Tensor:
    """Kaldi log-mel filterbank of a mono signal: (samples,) -> float32 (frames, num_mel_bins).

    Kaldi options fixed here: ``snip_edges=True`` (frames = 1 + (n - window) // shift, none if the
    signal is shorter than one window), ``dither=0``, ``round_to_power_of_two=True``,
    ``use_power=True``, ``use_log_fbank=True``, ``use_energy=False`` (so ``htk_compat`` changes
    nothing). Per frame: remove the DC offset, pre-emphasise (the first sample against itself),
    window, zero-pad to a power of two, power spectrum, mel filters, ``log(max(x, eps))``.
    The signal's scale is kept as given (Kaldi tools usually see int16-range samples; ImageBind
    feeds [-1, 1] floats).
    """
    if waveform.ndim != 1:
        raise ConfigError(f"kaldi_fbank expects a mono signal (samples,), got shape {tuple(waveform.shape)}")
    x = waveform.to(torch.float32)
    window_size = int(sample_rate * frame_length_ms * 0.001)
    shift = int(sample_rate * frame_shift_ms * 0.001)
    fft_size = 1 << (window_size - 1).bit_length()  # next power of two
    if x.shape[0] < window_size:
        return x.new_zeros(0, num_mel_bins)
    frames = x.unfold(0, window_size, shift)  # (frames, window_size), a view
    if remove_dc_offset:
        frames = frames - frames.mean(dim=1, keepdim=True)
    if preemphasis != 0.0:
        previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
        frames = frames - preemphasis * previous
    frames = frames * _window(window_type, window_size, x.dtype)
    power = torch.fft.rfft(frames, n=fft_size).abs().pow(2)  # (frames, fft_size // 2 + 1)
    banks = kaldi_mel_banks(num_mel_bins, fft_size, sample_rate, low_freq, high_freq)
    mel_energies = power @ banks.T
    return torch.clamp(mel_energies, min=energy_floor).log()


# ------------------------------------------------------------------------------------------------
# Clips and the whole transform
# ------------------------------------------------------------------------------------------------


def clip_sample_ranges(
    num_samples: int, sample_rate: int, clip_duration: float = 2.0, clips_per_video: int = 8
) -> List[Tuple[int, int]]:
    """Sample ranges ``[start, end)`` of the clips, as pytorchvideo's ConstantClipsPerVideoSampler.

    ``step = Fraction(max(num_samples / sample_rate - clip_duration, 0)) / clips_per_video``; clip k
    spans ``int(k * step * sr) : int((k * step + clip_duration) * sr)`` (the end may pass the track's
    end; slicing then simply stops there).
    """
    if clips_per_video < 1 or clip_duration <= 0:
        raise ConfigError(
            f"audio clips: clips_per_video={clips_per_video} and clip_duration={clip_duration} must be positive"
        )
    duration = num_samples / sample_rate  # a float, as in the original
    step = Fraction(max(duration - clip_duration, 0)) / clips_per_video
    length = Fraction(clip_duration)
    return [(int(k * step * sample_rate), int((k * step + length) * sample_rate)) for k in range(clips_per_video)]


def _pad_or_crop(fbank: torch.Tensor, target_length: int) -> torch.Tensor:
    """(mels, frames) -> (mels, target_length): zero-pad on the right or keep the first frames."""
    n = fbank.shape[1]
    gap = target_length - n
    if n and abs(gap) / n > 0.2:
        logger.warning(
            "audio clip has %d fbank frames but target_length is %d; is the clip duration right?", n, target_length
        )
    if gap > 0:
        return F.pad(fbank, (0, gap))
    return fbank[:, :target_length]


def waveform_to_clips(
    waveform: torch.Tensor,
    sample_rate: int = 16000,
    *,
    clips_per_video: int = 8,
    clip_duration: float = 2.0,
    num_mel_bins: int = 128,
    target_length: int = 204,
    mean: float = IMAGEBIND_AUDIO_MEAN,
    std: float = IMAGEBIND_AUDIO_STD,
    inplace_mean_quirk: bool = True,
    source: str = "<waveform>",
) -> torch.Tensor:
    """A resampled waveform (channels, samples) -> normalised log-mel clips (clips, 1, mels, target_length).

    With ``inplace_mean_quirk`` (the default, as the original) the clip means are subtracted IN
    PLACE from ``waveform``, which is therefore modified; pass a copy to keep yours.
    """
    if waveform.ndim == 1:
        waveform = waveform[None]
    ranges = clip_sample_ranges(waveform.shape[1], sample_rate, clip_duration, clips_per_video)
    clips = []
    for index, (start, end) in enumerate(ranges):
        clip = waveform[:, start:end]  # a view: the quirk below writes through it
        if inplace_mean_quirk:
            clip -= clip.mean()
        else:
            clip = clip - clip.mean()
        fbank = kaldi_fbank(clip[0], sample_rate=sample_rate, num_mel_bins=num_mel_bins, window_type="hanning")
        if fbank.shape[0] == 0:
            raise AudioDecodeError(
                f"{source}: audio clip {index} has {clip.shape[1]} samples, shorter than one 25 ms window"
            )
        clips.append(_pad_or_crop(fbank.T, target_length))
    out = torch.stack(clips)[:, None]  # (clips, 1, mels, target_length)
    return (out - mean) / std


def load_and_transform_audio(
    path: PathLike,
    *,
    clips_per_video: int = 8,
    clip_duration: float = 2.0,
    sample_rate: int = 16000,
    num_mel_bins: int = 128,
    target_length: int = 204,
    mean: float = IMAGEBIND_AUDIO_MEAN,
    std: float = IMAGEBIND_AUDIO_STD,
    inplace_mean_quirk: bool = True,
) -> torch.Tensor:
    """Decode a video's or audio file's sound into ImageBind audio input (clips, 1, mels, target_length).

    With the defaults: (8, 1, 128, 204). See the module docstring for the steps.

    Raises:
        NoAudioStreamError: the file has no audio stream (a caller may fall back to video only).
        AudioDecodeError: the file cannot be read, or its audio is shorter than one 25 ms window.
    """
    waveform, rate = decode_audio(path)
    if rate != sample_rate:
        waveform = resample(waveform, rate, sample_rate)
    return waveform_to_clips(
        waveform,
        sample_rate,
        clips_per_video=clips_per_video,
        clip_duration=clip_duration,
        num_mel_bins=num_mel_bins,
        target_length=target_length,
        mean=mean,
        std=std,
        inplace_mean_quirk=inplace_mean_quirk,
        source=os.fspath(path),
    )


def load_and_transform_audio_batch(paths: Sequence[PathLike], **kwargs) -> torch.Tensor:
    """Several files -> (B, clips, 1, mels, target_length); keyword arguments as :func:`load_and_transform_audio`."""
    return torch.stack([load_and_transform_audio(p, **kwargs) for p in paths])


# ------------------------------------------------------------------------------------------------
# Registered processor
# ------------------------------------------------------------------------------------------------


@dataclass
class ImageBindAudioProcessorConfig:
    clips_per_video: int = 8
    clip_duration: float = 2.0
    sample_rate: int = 16000
    num_mel_bins: int = 128
    target_length: int = 204
    mean: float = IMAGEBIND_AUDIO_MEAN
    std: float = IMAGEBIND_AUDIO_STD
    inplace_mean_quirk: bool = True  # reproduce the original's in-place clip centring (quirk A3)


@registry.register_processor("imagebind_audio")
class ImageBindAudioProcessor:
    """Callable: path -> (clips_per_video, 1, num_mel_bins, target_length) float32."""

    config_schema = ImageBindAudioProcessorConfig

    def __init__(self, config: Optional[ImageBindAudioProcessorConfig] = None) -> None:
        self.config = config or ImageBindAudioProcessorConfig()

    @classmethod
    def from_config(cls, cfg=None) -> "ImageBindAudioProcessor":
        if cfg is None:
            return cls()
        from omegaconf import DictConfig, OmegaConf

        from videollm.errors import closest

        values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        known = set(ImageBindAudioProcessorConfig.__dataclass_fields__)
        for key in values:
            if key not in known:
                raise ConfigError(f"imagebind_audio.{key}: unknown key{closest(key, known)}")
        return cls(ImageBindAudioProcessorConfig(**values))

    def __call__(self, path: PathLike) -> torch.Tensor:
        c = self.config
        return load_and_transform_audio(
            path,
            clips_per_video=c.clips_per_video,
            clip_duration=c.clip_duration,
            sample_rate=c.sample_rate,
            num_mel_bins=c.num_mel_bins,
            target_length=c.target_length,
            mean=c.mean,
            std=c.std,
            inplace_mean_quirk=c.inplace_mean_quirk,
        )

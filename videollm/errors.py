"""The one error hierarchy of videollm.

Every error the project raises on purpose derives from :class:`VideoLLMError`, so a
caller can catch them all in one place. Messages name the offending file or key and
say what to do about it.
"""

from __future__ import annotations


class VideoLLMError(Exception):
    """Base class of every error videollm raises on purpose."""


class ConfigError(VideoLLMError):
    """A YAML config or a ``--options`` override is invalid (unknown key, wrong type, ...)."""


class RegistryError(ConfigError):
    """A registry name is unknown or registered twice."""


class VideoDecodeError(VideoLLMError):
    """A video file cannot be decoded (missing, empty, corrupt, no video stream, timeout)."""


class AudioDecodeError(VideoLLMError):
    """An audio track or audio file cannot be read."""


class ImageDecodeError(VideoLLMError):
    """An image file cannot be read."""


class CheckpointError(VideoLLMError):
    """A checkpoint cannot be loaded: missing file, unsafe pickle, mismatched keys or shapes."""


class StorageError(VideoLLMError):
    """A file or folder cannot be written: no space left on device, read-only file system,
    permission denied, I/O error. The message names the path and the cause; whatever was there
    before is left as it was. ``path`` and ``cause`` hold the two parts (None if unknown)."""

    def __init__(self, message: str, path: object = None, cause: str | None = None) -> None:
        super().__init__(message)
        self.path, self.cause = path, cause


class DataError(VideoLLMError):
    """A dataset or annotation file is malformed, or too many samples were bad."""


class TrainingError(VideoLLMError):
    """Training cannot go on (e.g. too many non-finite losses in a row)."""


class PromptError(VideoLLMError):
    """A prompt or an instruction sample does not fit the model (e.g. wrong placeholder count)."""


def closest(name: str, candidates) -> str:
    """Return ``" (did you mean X?)"`` for the closest candidate, or ``""`` if none is close."""
    import difflib

    match = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""

"""Deterministic, clearly different test clips for audio-cache tests.

Tones, a chirp, noise, a click train and a melody, at several sample rates and lengths, so that
llama-server's resampling and chunking both get exercised; `long_clip` is longer than one 30 s
encoder window, so Whisper-style models split it into two chunks::

    from vision_cache.synthetic.audio import sample_clips, long_clip
    for clip in sample_clips():
        wav = clip.wav()              # bytes, identical on every call
        b64 = clip.base64()           # for input_audio.data and multimodal_data

    python -m vision_cache.synthetic.audio --out DIR   # writes DIR/<name>.wav

Clips differ in spectrum and rhythm, not only in pitch: a random-weight model can give the same
answer for two clips that look alike to its encoder, which would make negative controls
meaningless.
"""

from __future__ import annotations

import argparse
import base64
import io
import math
import sys
import wave
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

F64Array = npt.NDArray[np.float64]
Signal = Callable[[F64Array], F64Array]

# llama.cpp's Whisper-style preprocessors take 30 s windows of 16 kHz audio.
WINDOW_SECONDS = 30.0


@dataclass(frozen=True)
class SampleClip:
    """A named test clip; `wav` gives the same bytes on every call (16-bit PCM)."""

    name: str
    seconds: float
    rate: int
    channels: int
    signal: Signal  # time axis in seconds -> samples in [-1, 1]

    def samples(self) -> F64Array:
        n = round(self.seconds * self.rate)
        t = np.arange(n, dtype=np.float64) / self.rate
        return np.clip(self.signal(t), -1.0, 1.0)

    def wav(self) -> bytes:
        frames = np.round(self.samples() * 32767.0).astype("<i2")
        if self.channels == 2:
            # the second channel reversed: a downmix must really mix, not pick one channel
            frames = np.stack([frames, frames[::-1]], axis=1).reshape(-1)
        buf = io.BytesIO()
        with wave.open(buf, "wb") as w:
            w.setnchannels(self.channels)
            w.setsampwidth(2)
            w.setframerate(self.rate)
            w.writeframes(frames.tobytes())
        return buf.getvalue()

    def base64(self) -> str:
        return base64.b64encode(self.wav()).decode("ascii")

    def data_url(self) -> str:
        return f"data:audio/wav;base64,{self.base64()}"


def _tone(freq: float, amp: float = 0.5) -> Signal:
    return lambda t: amp * np.sin(2 * math.pi * freq * t)


def _chirp(f0: float, f1: float, seconds: float) -> Signal:
    k = math.log(f1 / f0) / seconds  # exponential sweep from f0 to f1
    return lambda t: 0.5 * np.sin(2 * math.pi * f0 * (np.exp(k * t) - 1) / k)


def _noise(seed: int) -> Signal:
    def signal(t: F64Array) -> F64Array:
        out: F64Array = np.random.default_rng(seed).uniform(-0.4, 0.4, t.shape)
        return out

    return signal


def _clicks(per_second: float) -> Signal:
    def signal(t: F64Array) -> F64Array:
        gate = (np.mod(t * per_second, 1.0) < 0.02).astype(np.float64)
        out: F64Array = 0.8 * gate * np.sin(2 * math.pi * 2500 * t)
        return out

    return signal


_NOTES_HZ = np.array([262.0, 330.0, 392.0, 523.0, 392.0, 330.0, 440.0, 349.0])


def _melody(t: F64Array) -> F64Array:
    notes = _NOTES_HZ[(t / 0.5).astype(int) % len(_NOTES_HZ)]
    out: F64Array = 0.45 * np.sin(2 * math.pi * notes * t)
    return out


def sample_clips() -> list[SampleClip]:
    """Short clips (one encoder window each), all clearly different."""
    return [
        SampleClip("tone-440", 2.0, 16000, 1, _tone(440)),
        SampleClip("chirp-up", 3.0, 16000, 1, _chirp(150, 6000, 3.0)),
        SampleClip("noise", 1.5, 16000, 1, _noise(7)),
        SampleClip("clicks", 2.5, 16000, 1, _clicks(6)),
        SampleClip("tone-3000-44k-stereo", 2.0, 44100, 2, _tone(3000, 0.3)),
        SampleClip("melody-8k", 4.0, 8000, 1, _melody),
    ]


def long_clip(seconds: float = 35.0) -> SampleClip:
    """A melody longer than one 30 s window: Whisper-style models make two chunks of it."""
    return SampleClip(f"melody-{seconds:g}s", seconds, 16000, 1, _melody)


def window_clip(seconds: float = 29.9, variant: int = 0) -> SampleClip:
    """A clip that fills one 30 s encoder window (at 30.0 s llama.cpp already makes two);
    each `variant` starts its sweep elsewhere, so its bytes (and its cache key) differ."""
    return SampleClip(
        f"chirp-{seconds:g}s-{variant}", seconds, 16000, 1, _chirp(100 + variant, 7000, seconds)
    )


def whisper_windows(n_samples_16k: int) -> int:
    """Chunks llama.cpp's Whisper preprocessor makes of a clip of `n_samples_16k` samples.

    It appends 30 s of silence, computes a log-mel with hop 160, and keeps whole 3000-frame
    windows (mtmd-audio.cpp): one chunk up to 479,839 samples, two from 30.0 s on.
    """
    frames = (n_samples_16k + 16000 * int(WINDOW_SECONDS)) // 160 + 1
    return frames // 3000


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for clip in [*sample_clips(), long_clip(), window_clip()]:
        (args.out / f"{clip.name}.wav").write_bytes(clip.wav())
    return 0


if __name__ == "__main__":
    sys.exit(main())

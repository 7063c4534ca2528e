"""Which encoder a medium goes to: llama-server decides by the bytes, and so does the proxy.

llama-server sends any media buffer whose first bytes look like WAV, MP3 or FLAC to the audio
encoder, whatever the request called it (an ``input_audio`` part, an ``image_url``, an element
of ``multimodal_data``), and everything else to the image decoder (``is_audio_file()`` in
tools/mtmd/mtmd-helper.cpp). The proxy sniffs with the same rules, so that a clip is keyed,
encoded and put back as audio exactly when the server would treat it as audio.
"""

from __future__ import annotations

from typing import Literal

Modality = Literal["image", "audio"]


def sniff(data: bytes | memoryview) -> Modality:
    """ "audio" for what mtmd decodes as audio (RIFF/WAVE, ID3 or an MPEG frame sync, fLaC)."""
    head = bytes(data[:12])
    if len(head) < 12:  # mtmd's own minimum
        return "image"
    wav = head[:4] == b"RIFF" and head[8:12] == b"WAVE"
    mp3 = head[:3] == b"ID3" or (head[0] == 0xFF and head[1] & 0xE0 == 0xE0)
    flac = head[:4] == b"fLaC"
    return "audio" if wav or mp3 or flac else "image"


def audio_mime(data: bytes | memoryview) -> str:
    """The media type of a clip `sniff` calls audio (the server reads it from the bytes)."""
    head = bytes(data[:4])
    if head == b"RIFF":
        return "audio/wav"
    return "audio/flac" if head == b"fLaC" else "audio/mpeg"

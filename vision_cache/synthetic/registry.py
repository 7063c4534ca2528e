"""The model families the generator knows: family name -> the module that holds it.

Adding a family is one module in `vision_cache.synthetic.families` (a `Family` subclass, or an
`AudioFamily` one for audio models, and ``FAMILY = ...``) and one line here. Modules are
imported on first use, so a family's cost is paid only by whoever generates it.
"""

from __future__ import annotations

import functools
import importlib

from vision_cache.synthetic.audio_family import AudioFamily
from vision_cache.synthetic.family import Family

AnyFamily = Family | AudioFamily

FAMILIES: dict[str, str] = {
    "gemma3": "vision_cache.synthetic.families.gemma3",
    "qwen2vl": "vision_cache.synthetic.families.qwen2vl",
    "qwen2vl-embed": "vision_cache.synthetic.families.qwen2vl_embed",
    "qwen25vl": "vision_cache.synthetic.families.qwen25vl",
    "qwen3vl": "vision_cache.synthetic.families.qwen3vl",
    "gemma4": "vision_cache.synthetic.families.gemma4",
    "idefics3": "vision_cache.synthetic.families.idefics3",
    "internvl": "vision_cache.synthetic.families.internvl",
    "pixtral": "vision_cache.synthetic.families.pixtral",
    "llama4": "vision_cache.synthetic.families.llama4",
    "minicpmv": "vision_cache.synthetic.families.minicpmv",
    "lfm2": "vision_cache.synthetic.families.lfm2",
    "kimivl": "vision_cache.synthetic.families.kimivl",
    "glm4v": "vision_cache.synthetic.families.glm4v",
    "llava": "vision_cache.synthetic.families.llava",
    "janus": "vision_cache.synthetic.families.janus",
    # audio
    "qwen2audio": "vision_cache.synthetic.families.qwen2audio",
    "ultravox": "vision_cache.synthetic.families.ultravox",
}


class UnknownFamilyError(KeyError):
    """A family name the registry does not list."""


def family_names() -> tuple[str, ...]:
    return tuple(FAMILIES)


@functools.cache
def get_family(name: str) -> AnyFamily:
    """The family called `name`; UnknownFamilyError if none is registered under it."""
    try:
        module = importlib.import_module(FAMILIES[name])
    except KeyError:
        raise UnknownFamilyError(
            f"unknown model family {name!r}; known: {', '.join(FAMILIES)}"
        ) from None
    family = getattr(module, "FAMILY", None)
    if not isinstance(family, Family | AudioFamily) or family.name != name:
        raise TypeError(f"{FAMILIES[name]}.FAMILY must be a Family named {name!r}")
    return family


def vision_family(name: str) -> Family:
    """The vision family called `name`; TypeError for an audio family."""
    family = get_family(name)
    if not isinstance(family, Family):
        raise TypeError(f"{name} is an audio family")
    return family


def audio_family_names() -> tuple[str, ...]:
    return tuple(n for n in FAMILIES if isinstance(get_family(n), AudioFamily))


def vision_family_names() -> tuple[str, ...]:
    return tuple(n for n in FAMILIES if isinstance(get_family(n), Family))

"""vision_cache.synthetic: the family registry and the command `make models` runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from vision_cache.synthetic import registry
from vision_cache.synthetic.__main__ import main
from vision_cache.synthetic.audio_family import AudioFamily
from vision_cache.synthetic.family import Family
from vision_cache.synthetic.registry import (
    UnknownFamilyError,
    audio_family_names,
    family_names,
    get_family,
    vision_family,
    vision_family_names,
)


def test_every_registered_family_loads_under_its_name() -> None:
    assert family_names() == tuple(registry.FAMILIES)
    for name in family_names():
        family = get_family(name)
        assert isinstance(family, Family | AudioFamily) and family.name == name
    assert set(vision_family_names()) | set(audio_family_names()) == set(family_names())
    for name in vision_family_names():
        for size in ("tiny", "demo", "realistic"):
            spec = vision_family(name).spec(size)
            assert (spec.arch, spec.size) == (name, size)


def test_an_unknown_family_is_a_clear_error() -> None:
    with pytest.raises(UnknownFamilyError, match="unknown model family 'llava9'"):
        get_family("llava9")


def test_a_module_without_its_family_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.FAMILIES, "impostor", "vision_cache.synthetic.families.gemma3")
    get_family.cache_clear()
    try:
        with pytest.raises(TypeError, match="must be a Family named 'impostor'"):
            get_family("impostor")
    finally:
        get_family.cache_clear()


def test_the_command_writes_a_model_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--family", "gemma3", "--out", str(tmp_path)]) == 0
    files = {p.name for p in (tmp_path / "gemma3-tiny").iterdir()}
    assert files == {"model.gguf", "mmproj.gguf", "manifest.json"}
    assert "done in" in capsys.readouterr().out
    assert main(["--arch", "gemma3", "--out", str(tmp_path)]) == 0  # the old spelling
    assert "up to date" in capsys.readouterr().out


def test_the_command_wants_one_family_or_all(tmp_path: Path) -> None:
    for argv in ([], ["--all", "--family", "gemma3"]):
        with pytest.raises(SystemExit) as exited:
            main([*argv, "--out", str(tmp_path)])
        assert exited.value.code == 2

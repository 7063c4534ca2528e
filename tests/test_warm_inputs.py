"""What `vcache warm` and `vcache compare` read from the user before any request: paths,
folders, globs and list files, manifests, and --describe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.cli.warm_command import read_describe
from proxy.compare.sidecars import describe_request
from proxy.errors import ClientError
from vision_cache.client.warmup import Source, WarmError, expand, read_manifest
from vision_cache.errors import VisionCacheError


def _files(folder: Path, *names: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"x")
    return [folder / n for n in names]


def test_folders_globs_urls_and_list_files_expand_to_media(tmp_path: Path) -> None:
    _files(tmp_path / "refs", "b.png", "a.JPG", "notes.md", "clip.wav")
    _files(tmp_path / "refs" / "deeper", "c.webp")
    url = "https://example.org/cat.png"
    listed = tmp_path / "list.txt"
    listed.write_text(f"# references\nrefs/b.png\n\n{url}\n")

    def locations(*paths: str, recursive: bool = False) -> list[str]:
        return [s.location for s in expand(list(paths), recursive=recursive)]

    refs = tmp_path / "refs"
    assert locations(str(refs)) == [
        str(refs / "a.JPG"),
        str(refs / "b.png"),
        str(refs / "clip.wav"),
    ]
    assert str(refs / "deeper" / "c.webp") in locations(str(refs), recursive=True)
    assert locations(str(refs / "*.png")) == [str(refs / "b.png")]
    assert locations(url) == [url]
    assert locations(str(listed)) == [str(refs / "b.png"), url]
    with pytest.raises(WarmError, match="not found"):
        expand([str(tmp_path / "missing.png")])
    with pytest.raises(WarmError, match="no images"):
        expand([str(tmp_path / "refs" / "*.gif")])


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_a_manifest_names_each_image(tmp_path: Path, suffix: str) -> None:
    entries = {
        "cat": "refs/cat.png",
        "dog": {"path": "dog.png", "ttl": 60},
        "web": {"url": "https://example.org/x.png"},
    }
    manifest = tmp_path / f"refs{suffix}"
    if suffix == ".json":
        manifest.write_text(json.dumps(entries))
    else:
        manifest.write_text(
            'cat = "refs/cat.png"\ndog = { path = "dog.png", ttl = 60 }\n'
            'web = { url = "https://example.org/x.png" }\n'
        )
    assert read_manifest(manifest) == [
        Source(str(tmp_path / "refs" / "cat.png"), "cat", None),
        Source(str(tmp_path / "dog.png"), "dog", 60.0),
        Source("https://example.org/x.png", "web", None),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cat = [", "cannot read manifest"),
        ("cat = { ttl = 5 }", "needs a path or url"),
        ('cat = { path = "a.png", ttl = -1 }', "ttl must be a positive"),
        ('"not a name!" = "a.png"', "name must match"),
    ],
)
def test_a_bad_manifest_says_which_entry(tmp_path: Path, text: str, message: str) -> None:
    manifest = tmp_path / "refs.toml"
    manifest.write_text(text)
    with pytest.raises(VisionCacheError, match=message):
        read_manifest(manifest)


def test_describe_is_a_prompt_a_schema_or_a_file_holding_either(tmp_path: Path) -> None:
    schema = {"type": "object", "properties": {"colour": {"type": "string"}}}
    assert read_describe(None) is None
    assert read_describe("Describe the animal.") == "Describe the animal."
    assert read_describe(json.dumps(schema)) == schema
    held = tmp_path / "schema.json"
    held.write_text(json.dumps(schema))
    assert read_describe(f"@{held}") == schema
    with pytest.raises(VisionCacheError, match="not JSON"):
        read_describe("{colour")


def test_a_describe_request_constrains_the_answer_to_json() -> None:
    schema = {"type": "object", "properties": {"colour": {"type": "string"}}}
    for given in (schema, json.dumps(schema)):
        body = describe_request("vcache://cat", given, "m")
        assert body["response_format"]["type"] == "json_schema"
        assert body["model"] == "m" and body["temperature"] == 0
    prompt = describe_request("vcache://cat", "What colour is it?", "")
    assert "model" not in prompt
    assert prompt["response_format"]["type"] == "json_object"
    with pytest.raises(ClientError, match="not JSON"):
        describe_request("vcache://cat", "{colour", "")

"""The pieces of a comparison that need no server: rubrics and verdicts, the result cache's
decisions and keys, nearest-neighbour search, description filters."""

from __future__ import annotations

import json

import numpy as np
import pytest
from multidict import CIMultiDict

from proxy.compare.index import VectorSet
from proxy.compare.sidecars import passes
from proxy.images import json_body
from proxy.images.json_body import JsonBody
from proxy.images.slots import find_images
from proxy.lookup.result_cache import Recorder, decide, determined, namespace, result_key
from vision_cache.client.compare import CompareError, parse_condition
from vision_cache.judging import (
    Rubric,
    RubricError,
    VerdictError,
    judge_request,
    parse_verdict,
    verdict_schema,
)


def test_rubrics_split_into_criteria() -> None:
    assert Rubric.parse("short fur, triangular ears").criteria == ("short fur", "triangular ears")
    assert Rubric.parse("fur: short, soft; ears\ngreen eyes").criteria == (
        "fur: short, soft",
        "ears",
        "green eyes",
    )
    assert Rubric.parse("anything", ["a", "b"]).criteria == ("a", "b")
    for bad in ("", "a; a", ";".join(f"c{i}" for i in range(17)), "x" * 121):
        with pytest.raises(RubricError):
            Rubric.parse(bad)


def test_the_schema_and_the_verdict() -> None:
    rubric = Rubric.parse("fur; ears")
    schema = verdict_schema(rubric)
    assert schema["required"] == ["criteria", "score"]
    assert schema["properties"]["criteria"]["required"] == ["fur", "ears"]
    body = judge_request(rubric, reference="vcache://a", candidate="vcache://b")
    assert body["temperature"] == 0 and body["response_format"]["type"] == "json_schema"
    parts = body["messages"][1]["content"]
    assert [p["image_url"]["url"] for p in parts if p["type"] == "image_url"] == [
        "vcache://b",
        "vcache://a",
    ]  # the candidate first: shared prefix
    v = parse_verdict('{"criteria": {"fur": "yes", "ears": "partly"}, "score": 7}', rubric)
    assert (v.score, v.marks) == (7, (1, 1))
    for bad in (
        '{"criteria": {"fur": "yes"}, "score": 7}',
        '{"criteria": {"fur": "yes", "ears": "no"}, "score": 11}',
        '{"criteria": {',
        "[]",
    ):
        with pytest.raises(VerdictError):
            parse_verdict(bad, rubric)


def test_the_result_cache_decision() -> None:
    def headers(**h: str) -> CIMultiDict[str]:
        return CIMultiDict({k.replace("_", "-"): v for k, v in h.items()})

    assert not decide(headers(), default_on=False).active
    assert decide(headers(X_Vcache_Result_Cache="on"), default_on=False).lookup
    assert not decide(headers(X_Vcache_Result_Cache="off"), default_on=True).active
    refresh = decide(headers(Cache_Control="no-cache"), default_on=True)
    assert (refresh.lookup, refresh.store) == (False, True)
    assert not decide(headers(Cache_Control="no-store"), default_on=True).active
    chat = "/v1/chat/completions"
    assert determined(chat, {"temperature": 0}, {})
    assert determined(chat, {}, {"temperature": 0.0, "seed": -1})
    assert not determined(chat, {}, {"temperature": 0.8, "seed": 4294967295})
    assert determined(chat, {"temperature": 0.8, "seed": 3}, {})
    assert not determined(chat, {"temperature": 0, "xtc_probability": 0.5}, {})
    assert determined("/v1/embeddings", {}, {"temperature": 0.8})


def test_result_keys_follow_the_images_not_their_spelling() -> None:
    ns = namespace({"model_path": "m.gguf"})

    def body(image: str, text: str = "hi", **p: object) -> JsonBody:
        return JsonBody.of(
            {
                "temperature": 0,
                **p,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": text},
                            {"type": "image_url", "image_url": {"url": image}},
                        ],
                    }
                ],
            }
        )

    d = "a" * 64
    key = result_key(ns, "/v1/chat/completions", body("data:x"), {"data:x": d})
    assert key == result_key(ns, "/v1/chat/completions", body("vcache://cat"), {"vcache://cat": d})
    assert key != result_key(ns, "/v1/chat/completions", body("data:x"), {"data:x": "b" * 64})
    assert key != result_key(ns, "/v1/chat/completions", body("data:x", "ho"), {"data:x": d})
    assert key != result_key(ns, "/v1/chat/completions", body("data:x", top_k=2), {"data:x": d})
    assert key != result_key(ns, "/chat/completions", body("data:x"), {"data:x": d})
    assert key != result_key(ns, "/v1/chat/completions", body("data:x"), {"data:x": d}, "Bearer k")
    assert key != result_key(
        namespace({"model_path": "n.gguf"}), "/v1/chat/completions", body("data:x"), {"data:x": d}
    )


def test_result_keys_of_bodies_read_in_place_do_not_depend_on_the_read() -> None:
    """Strings left in the raw body stand in the parsed tree as placeholders that differ from
    one read to the next: the key holds each image's digest and every other string's value."""
    ns = namespace({"model_path": "m.gguf"})
    image = "data:image/png;base64," + "A" * 100
    document = "long text " * 20

    def key(image: str, text: str) -> object:
        raw = json.dumps(
            {
                "temperature": 0,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": text},
                            {"type": "image_url", "image_url": {"url": image}},
                        ],
                    }
                ],
            }
        ).encode()
        body = json_body.parse(raw, min_span=64)
        (slot,) = find_images("/v1/chat/completions", body, max_images=4)
        assert slot.span is not None and slot.placeholder is not None  # read in place
        return result_key(ns, "/v1/chat/completions", body, {slot.placeholder: "a" * 64})

    assert key(image, document) == key(image, document)
    assert key(image, document) != key(image, document + "!")
    small = JsonBody.of(
        {
            "temperature": 0,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": document},
                        {"type": "image_url", "image_url": {"url": "x"}},
                    ],
                }
            ],
        }
    )
    assert key(image, document) == result_key(ns, "/v1/chat/completions", small, {"x": "a" * 64})


def test_the_recorder_keeps_only_whole_200_answers() -> None:
    ok = Recorder()
    ok.start(200, [("Content-Type", "text/event-stream"), ("Content-Length", "9")])
    for chunk in (b"data: 1\n\n", b"data: 2\n\n"):
        ok.feed(chunk)
    recorded = ok.recorded()
    assert recorded is not None and recorded.chunks == (9, 9)
    assert recorded.headers == (("Content-Type", "text/event-stream"),)
    broken = Recorder()
    broken.start(200, [])
    broken.feed(b"data: 1\n\n")
    broken.fail()
    assert broken.recorded() is None
    refused = Recorder()
    refused.start(400, [])
    refused.feed(b"{}")
    assert refused.recorded() is None


def test_nearest_is_exact_and_hnsw_agrees() -> None:
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((500, 32)).astype(np.float32)
    labels = [f"r{i}" for i in range(500)]
    exact = VectorSet(labels, matrix)
    hnsw = VectorSet(labels, matrix, ann_above=100)
    assert exact.method.startswith("exact") and hnsw.method.startswith("hnsw")
    query = matrix[42] + 0.01 * rng.standard_normal(32).astype(np.float32)
    top = exact.nearest(query, 5)
    assert top[0].label == "r42" and top[0].similarity == pytest.approx(1.0, abs=1e-3)
    assert [n.similarity for n in top] == sorted((n.similarity for n in top), reverse=True)
    assert hnsw.nearest(query, 1)[0].label == "r42"
    assert len(exact.nearest(query, 1000)) == 500


def test_conditions_as_written_on_the_command_line() -> None:
    doc = {"colour": "Red", "legs": 4, "tags": ["cat", "pet"], "size": {"cm": 30}}

    def check(text: str) -> bool:
        return passes(doc, [parse_condition(text)])

    assert check("colour=red") and not check("colour=blue") and check("colour!=blue")
    assert check("legs>=4") and not check("legs>4") and check("legs<5")
    assert check("tags~cat") and check("size.cm=30") and not check("missing=1")
    assert check("legs=[3,4]") is False and passes(doc, [parse_condition("legs=4")])
    with pytest.raises(CompareError):
        parse_condition("no operator")

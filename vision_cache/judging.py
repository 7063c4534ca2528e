"""Judging a candidate image against one reference under a rubric: the request and the verdict.

Stage 2 of a comparison asks the VLM one question per finalist. The question is built here, in
one place, so that `POST /vcache/compare`, a client judging references one by one, and the
tests all send byte-for-byte the same request; the answer is constrained by a JSON schema
(llama-server's ``response_format`` with ``json_schema``, compiled to a grammar), so it parses
into a `Verdict` instead of being scraped from free text.

    rubric = Rubric.parse("short fur; triangular ears")
    body = judge_request(rubric, reference="vcache://ref-01", candidate="vcache://sha256:...")
    verdict = parse_verdict(response_json, rubric)
    verdict.score, verdict.criteria["short fur"]        # 0..10, "yes" | "partly" | "no"
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from typing import Any, Literal

from vision_cache.errors import VisionCacheError

Mark = Literal["yes", "partly", "no"]
MARKS: tuple[Mark, ...] = ("yes", "partly", "no")
MAX_SCORE = 10
MAX_CRITERIA = 16
MAX_CRITERION_CHARS = 120
SUMMARY_CHARS = 160
_SPLIT = re.compile(r"[\n;]+")


class RubricError(VisionCacheError, ValueError):
    """A rubric that cannot be judged against (empty, too many or too long criteria)."""


class VerdictError(VisionCacheError, ValueError):
    """The judge's answer does not hold a verdict (cut short, or not the schema's shape)."""


@dataclasses.dataclass(frozen=True)
class Rubric:
    """What to judge: the rubric as written, and the criteria the judge marks one by one."""

    text: str
    criteria: tuple[str, ...]

    @classmethod
    def parse(cls, text: str, criteria: Sequence[str] | None = None) -> Rubric:
        """Criteria given, else the rubric's lines or ';'-separated parts, else its
        ','-separated parts: "short fur, triangular ears" is two criteria."""
        text = text.strip()
        items = list(criteria) if criteria else _split(text)
        items = [c.strip() for c in items if c.strip()]
        if not text and not items:
            raise RubricError("the rubric is empty")
        if len(items) > MAX_CRITERIA:
            raise RubricError(f"{len(items)} criteria, at most {MAX_CRITERIA}")
        long = [c for c in items if len(c) > MAX_CRITERION_CHARS]
        if long:
            raise RubricError(
                f"criterion longer than {MAX_CRITERION_CHARS} characters: {long[0][:40]!r}..."
            )
        if len(set(items)) != len(items):
            raise RubricError("criteria must be distinct")
        return cls(text or "; ".join(items), tuple(items))


def _split(text: str) -> list[str]:
    parts = [p for p in _SPLIT.split(text) if p.strip()]
    return parts if len(parts) > 1 else [p for p in text.split(",") if p.strip()]


def verdict_schema(rubric: Rubric, *, summary: bool = False) -> dict[str, Any]:
    """The JSON schema the judge's answer must follow (llama-server turns it into a grammar).

    Marks per criterion come first, then the score: the score is written after the model has
    committed to each criterion. Keys are in alphabetical order because the server's JSON
    object keeps its keys sorted, and the grammar follows that order."""
    props: dict[str, Any] = {
        "criteria": {
            "type": "object",
            "properties": {c: {"type": "string", "enum": list(MARKS)} for c in rubric.criteria},
            "required": list(rubric.criteria),
            "additionalProperties": False,
        },
        "score": {"type": "integer", "minimum": 0, "maximum": MAX_SCORE},
    }
    if summary:
        props["summary"] = {"type": "string", "maxLength": SUMMARY_CHARS}
    return {
        "type": "object",
        "properties": props,
        "required": sorted(props),
        "additionalProperties": False,
    }


def judge_request(
    rubric: Rubric,
    *,
    reference: str,
    candidate: str,
    model: str = "",
    summary: bool = False,
    max_tokens: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The chat request that judges `candidate` against `reference` (each an image URL:
    ``vcache://NAME``, ``vcache://sha256:DIGEST``, a data URI...). Greedy and seeded, so the
    answer is fully determined (and so a result-cache entry when that cache is on)."""
    criteria = "\n".join(f"- {c}" for c in rubric.criteria)
    body: dict[str, Any] = {
        "messages": [
            {
                "role": "system",
                "content": "You compare a candidate image with a reference "
                "image under a rubric. For each criterion answer yes, partly or no: does the "
                "candidate match the reference on it? Then score the overall match from 0 "
                f"(nothing alike) to {MAX_SCORE} (the same on every criterion). Answer in JSON.",
            },
            # the candidate before the reference: every finalist's question then starts with
            # the same tokens, which llama-server's prompt cache evaluates once per slot
            {
                "role": "user",
                "content": [
                    {
                        "type": "text",
                        "text": f"Rubric: {rubric.text}\nCriteria:\n{criteria}\nCandidate image:",
                    },
                    {"type": "image_url", "image_url": {"url": candidate}},
                    {"type": "text", "text": "Reference image:"},
                    {"type": "image_url", "image_url": {"url": reference}},
                ],
            },
        ],
        "temperature": 0,
        "seed": seed,
        "max_tokens": max_tokens or default_max_tokens(rubric, summary=summary),
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "verdict", "schema": verdict_schema(rubric, summary=summary)},
        },
    }
    if model:
        body["model"] = model
    return body


def default_max_tokens(rubric: Rubric, *, summary: bool) -> int:
    """An upper bound, not a cost: generation stops where the schema's grammar completes.

    Generous because the grammar lets whitespace in between tokens, and a weak model (a
    random-weight test model, say) spends tokens on it that a real one does not."""
    per_criterion = sum(2 * len(c) + 48 for c in rubric.criteria)
    return 96 + per_criterion + (2 * SUMMARY_CHARS + 32 if summary else 0)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The judge's structured answer for one reference."""

    score: int
    criteria: dict[str, Mark]
    summary: str = ""

    @property
    def marks(self) -> tuple[int, int]:
        """(criteria judged yes, criteria judged partly): the tie-breaks after the score."""
        values = list(self.criteria.values())
        return values.count("yes"), values.count("partly")


def parse_verdict(content: str, rubric: Rubric) -> Verdict:
    """The verdict in a judge's message content; VerdictError if it is not one."""
    try:
        doc = json.loads(content)
    except ValueError as e:
        raise VerdictError(f"the judge's answer is not JSON (cut short?): {content[:120]!r}") from e
    if not isinstance(doc, dict):
        raise VerdictError("the judge's answer is not a JSON object")
    score, marks = doc.get("score"), doc.get("criteria")
    if not isinstance(score, int) or isinstance(score, bool) or not 0 <= score <= MAX_SCORE:
        raise VerdictError(f"the judge's score is not an integer in 0..{MAX_SCORE}: {score!r}")
    if (
        not isinstance(marks, dict)
        or set(marks) != set(rubric.criteria)
        or not all(m in MARKS for m in marks.values())
    ):
        raise VerdictError("the judge did not mark every criterion yes, partly or no")
    summary = doc.get("summary", "")
    return Verdict(
        score, {c: marks[c] for c in rubric.criteria}, summary if isinstance(summary, str) else ""
    )


def message_content(response: dict[str, Any]) -> str:
    """The assistant message of a chat completion response."""
    try:
        content = response["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as e:
        raise VerdictError("the judge's response has no message") from e
    if not isinstance(content, str):
        raise VerdictError("the judge's message has no text")
    return content

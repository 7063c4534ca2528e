"""The wire models of ``POST /vcache/compare``, shared by the proxy and its clients.

A request names a candidate image, a rubric, a reference set and `top_k`; the reply ranks the
finalists and says what each stage cost. With ``"stream": true`` the answer is NDJSON: one
`Event` per line (stage ends, references judged), the last one holding the reply.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Op = Literal["eq", "ne", "lt", "le", "gt", "ge", "in", "contains"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class References(_Model):
    """Which references to compare against: exactly one of names, a tag, or image digests
    (a folder warmed earlier: the client hashes its files). `labels` names digests in the
    reply (file names, say)."""

    names: list[Name] | None = Field(None, max_length=100_000)
    tag: Name | None = None
    digests: list[Hex64] | None = Field(None, max_length=100_000)
    labels: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _exactly_one(self) -> References:
        given = [x for x in (self.names, self.tag, self.digests) if x is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of names, tag and digests")
        return self


class Condition(_Model):
    """One test on a reference's description (its sidecar): `field` is a dotted path."""

    field: Annotated[str, Field(min_length=1, max_length=256)]
    op: Op = "eq"
    value: Any = None


class CompareRequest(_Model):
    candidate: Annotated[str, Field(min_length=1)]
    rubric: Annotated[str, Field(min_length=1, max_length=4000)]
    criteria: list[str] | None = Field(None, max_length=16)
    references: References
    top_k: Annotated[int, Field(ge=1, le=10_000)] = 5
    model: str = ""
    instruction: str | None = Field(None, max_length=4000)
    where: list[Condition] = Field(default_factory=list, max_length=32)
    describe: str | dict[str, Any] | None = None
    parallel: Annotated[int, Field(ge=1, le=64)] | None = None
    summary: bool = False
    stream: bool = False

    @model_validator(mode="after")
    def _where_needs_describe(self) -> CompareRequest:
        if self.where and self.describe is None:
            raise ValueError(
                "where filters on descriptions: give the describe prompt or "
                "schema the references were warmed with"
            )
        return self


class Finalist(_Model):
    rank: int
    reference: str
    digest: str
    similarity: float
    score: int | None = None
    criteria: dict[str, str] = Field(default_factory=dict)
    summary: str = ""
    error: str | None = None
    judge_ms: float = 0.0
    cached: bool = False


class StageCost(_Model):
    ms: float = 0.0
    model_calls: int = 0
    items_in: int = 0
    items_out: int = 0
    cached: int = 0
    detail: dict[str, Any] = Field(default_factory=dict)


class Event(_Model):
    """One line of a streamed comparison."""

    event: Literal["stage", "embedded", "judged", "result", "error"]
    stage: str | None = None
    done: int | None = None
    total: int | None = None
    reference: str | None = None
    score: int | None = None
    cost: StageCost | None = None
    result: CompareReply | None = None
    error: dict[str, Any] | None = None


class CompareReply(_Model):
    candidate: str
    rubric: str
    criteria: list[str]
    recall: Literal["embedding-model", "pooled-packages"]
    ranking: list[Finalist]
    stages: dict[str, StageCost]
    total_ms: float
    model_calls: int


Event.model_rebuild()

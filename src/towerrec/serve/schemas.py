"""Request and response bodies of the JSON API (unknown fields are refused with 422)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from towerrec.retrieval.hits import Hit

#: The hard cap on ``k``; a server's ``--max-k`` can only lower it.
K_CAP = 1000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SimilarQuery(_Strict):
    """Query parameters of ``GET /v1/items/{item_id}/similar``."""

    k: int = Field(10, ge=1, le=K_CAP, description="results to return")
    exclude: list[str] = Field(
        default_factory=list,
        description="raw item ids to leave out (repeat the parameter or join with commas)",
    )


class SimilarRequest(_Strict):
    """One item-to-item query (the product page)."""

    item_id: str = Field(description="raw id of the query item")
    k: int = Field(10, ge=1, le=K_CAP)
    exclude: list[str] = Field(default_factory=list, description="raw item ids to leave out")


class SimilarBatch(_Strict):
    queries: list[SimilarRequest] = Field(min_length=1)


class RecommendRequest(_Strict):
    """One history query (the cart and the home page)."""

    history: list[str] = Field(min_length=1, description="raw item ids, oldest first")
    exclude: list[str] = Field(
        default_factory=list, description='items to leave out: "already bought", "not interested"'
    )
    k: int = Field(10, ge=1, le=K_CAP)
    keep_history: bool = Field(False, description="allow the history items back (repurchases)")


class RecommendBatch(_Strict):
    queries: list[RecommendRequest] = Field(min_length=1)


class Results(BaseModel):
    """``query``, ``exclude`` and ``results``, as ``towerrec-similar --json`` prints them."""

    query: dict
    exclude: list[str]
    results: list[Hit]  # exactly as towerrec-similar --json prints them


class BatchResults(BaseModel):
    responses: list[Results]


class ItemOut(BaseModel):
    item_id: str
    item_idx: int
    title: str
    is_cold: bool
    has_image: bool
    image_url: str | None


class Problem(BaseModel):
    """Every 4xx (and the unexpected 5xx) carries one line."""

    detail: str


class CampaignIn(_Strict):
    """One campaign of ``POST /v1/audience``."""

    items: list[str] = Field(description="raw item ids; several: each customer scored by the best or mean match")
    k: int = Field(100, ge=1, description="customers to return (at most the export's customer count)")
    name: str = Field("", description="the campaign's name in the answer (default: the joined item ids)")


class AudienceRequest(_Strict):
    """Audiences of one or more campaigns (an export written with ``users=true``)."""

    campaigns: list[CampaignIn] = Field(min_length=1)
    aggregate: str = Field("max", pattern="^(max|mean)$", description="a several-item campaign: best or mean match")
    exclude: list[str] = Field(default_factory=list, description="customer ids never returned (opt-outs)")
    include_buyers: bool = Field(False, description="keep customers who already bought a campaign item")
    segments: list[str] = Field(
        default_factory=list, description="prepared segments to keep: lifecycle=active, rfm_r=3, R3F3M3 ..."
    )
    max_per_customer: int | None = Field(None, ge=1, description="audiences per customer at most, across campaigns")

"""The recipe's data section: sources, the mixture (fixed or a schedule of points over the stage), replay
buffers, document masking."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Discriminator, Field, PlainSerializer, Tag, model_validator

from cpt.units import Length, StrictModel, TokenCount, parse_length


def _parse_at(value: object) -> Length | str:
    if value == "decay":
        return "decay"
    try:
        return parse_length(value)
    except ValueError:
        raise ValueError(f"expected tokens (800K), steps (200 steps), a fraction of the stage (80%) or decay, "
                         f"got {value!r}") from None


MixtureAt = Annotated[
    Length | str, BeforeValidator(_parse_at), PlainSerializer(str, return_type=str),
]


class MixturePoint(StrictModel):
    at: MixtureAt = Field(
        description="Where along the stage: tokens (800K), steps (200 steps), a fraction of the stage's budget "
        "(80%, 0.8), or decay (the start of the stage's final LR decay: wsd/power decay, infinite anneal). "
        "The first point is at 0."
    )
    weights: dict[str, float] = Field(description="Name -> share of the sequences from here; sums to 1.")
    ramp: Literal["step", "linear"] = Field(
        "step", description="How the mixture gets here from the previous point: step = jumps at `at`; "
        "linear = interpolated between the two points."
    )


Mixture = Annotated[
    # tags in brackets: error locations drop them (load._locate), they are not keys the user wrote
    Annotated[dict[str, float], Tag("mixture[dict]")] | Annotated[list[MixturePoint], Tag("mixture[list]")],
    Discriminator(lambda v: "mixture[list]" if isinstance(v, list) else "mixture[dict]"),
]
MIXTURE_DOC = ("Name -> share of the sequences (sums to 1; replay = the old data's share), or a schedule "
               "over the stage: a list of {at, weights, ramp} points, e.g. [{at: 0, weights: {de: 0.75, en: "
               "0.25}}, {at: 100%, weights: {de: 0.95, en: 0.05}, ramp: linear}] (replay 25% -> 5%), or a "
               "switch at: decay to a high-quality source. Logged per step as data/<name>/share.")


class DataConfig(StrictModel):
    seq_len: int = Field(gt=0, description="Tokens per sequence; must match the prepared sources.")
    sources: dict[str, str] = Field(
        min_length=1, description="Name -> prepared token dir (written by `cpt prepare`)."
    )
    mixture: Mixture | None = Field(
        None, description=MIXTURE_DOC + " With stages, each stage sets its own instead."
    )
    replay_buffer: dict[str, TokenCount] = Field(
        default_factory=dict, description="Name -> size of a fixed buffer (a seeded subset of the source, "
        "chosen once) to draw that source from, instead of the whole corpus, e.g. {english: 2M}."
    )
    document_masking: bool = Field(
        False, description="Keep attention inside each document of a packed sequence: position_ids restart "
        "after every EOS and transformers masks across documents (flash-attention varlen on GPU, a block "
        "causal mask with sdpa/eager). Off: documents see the ones before them in the row, as plain packing."
    )
    document_start_loss: bool = Field(
        True, description="Train on predicting a document's first token from the previous document's EOS. "
        "false = those targets are ignored (what transformers' DataCollatorWithFlattening does); mostly "
        "meant with document_masking, where that prediction has no context."
    )
    warn_epochs: float = Field(
        4.0, gt=0, description="Warn when a source has been read this many times over (repeated data "
        "hurts beyond a few epochs; tiny replay buffers repeated 100x degrade a model)."
    )

    @model_validator(mode="after")
    def _mixture_matches_sources(self) -> DataConfig:
        if self.mixture is not None:
            check_mixture(self.mixture, self.sources, "data.mixture")
        for name in self.replay_buffer:
            if name not in self.sources:
                raise ValueError(f"data.replay_buffer.{name}: not one of data.sources ({', '.join(self.sources)})")
        return self


def check_mixture(mixture: dict[str, float] | list[MixturePoint], sources: dict[str, str], key: str) -> None:
    if isinstance(mixture, list):
        if not mixture:
            raise ValueError(f"{key}: an empty schedule; give at least the point at: 0")
        first = mixture[0].at
        if not isinstance(first, Length) or first.value != 0:
            raise ValueError(f"{key}.0.at = {first}: a mixture schedule starts at 0")
        for i, point in enumerate(mixture):
            check_mixture(point.weights, sources, f"{key}.{i}.weights")
        return
    for name, w in mixture.items():
        if name not in sources:
            raise ValueError(f"{key}.{name}: not one of data.sources ({', '.join(sources)})")
        if w < 0:
            raise ValueError(f"{key}.{name} = {w}: weights must be >= 0")
    total = sum(mixture.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"{key}: weights sum to {total:g}, expected 1")

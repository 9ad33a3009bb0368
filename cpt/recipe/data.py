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


class ReplayControllerConfig(StrictModel):
    old: str = Field(description="The replay source: the old data whose share the controller sets.")
    new: str = Field(description="The new data: it gets the rest of the mixture (1 - the replay share).")
    probe: str | None = Field(
        None, description="The probe set (probes.sets) that measures the old domain; null = the one named as `old`."
    )
    budget: float = Field(
        gt=0, description="The most the old domain's held-out loss may rise over the stage start's (nats per "
        "token, probe/<probe>/forgetting)."
    )
    target: float = Field(
        0.8, gt=0, le=1, description="The rise aimed at, as a fraction of the budget: the margin absorbs the "
        "drift between probes and the probe's noise."
    )
    min: float = Field(0.0, ge=0, le=1, description="The lowest replay share.")
    max: float = Field(0.5, ge=0, le=1, description="The highest replay share.")
    start: float | None = Field(
        None, ge=0, le=1, description="The replay share until the first probe after the stage start; null = "
        "the middle of [min, max]."
    )
    kp: float = Field(
        0.05, ge=0, description="Proportional gain: the share added per budget of rise above the target."
    )
    ki: float = Field(
        1.0, ge=0, description="Integral gain: the share added per budget of excess rise held over the whole stage."
    )

    @model_validator(mode="after")
    def _bounds(self) -> ReplayControllerConfig:
        if self.min > self.max:
            raise ValueError(f"min = {self.min:g} is above max = {self.max:g}")
        if self.start is not None and not self.min <= self.start <= self.max:
            raise ValueError(f"start = {self.start:g} is outside [min, max] = [{self.min:g}, {self.max:g}]")
        if self.old == self.new:
            raise ValueError(f"old and new are both {self.old!r}; they are two different sources")
        return self

    @property
    def start_share(self) -> float:
        return self.start if self.start is not None else (self.min + self.max) / 2

    @property
    def probe_set(self) -> str:
        return self.probe or self.old


class ControlledMixture(StrictModel):
    controller: ReplayControllerConfig = Field(
        description="The replay share set online from the old domain's probe (cpt.data.controller)."
    )


def _mixture_kind(v: object) -> str:
    if isinstance(v, list):
        return "mixture[list]"
    if isinstance(v, ControlledMixture) or (isinstance(v, dict) and isinstance(v.get("controller"), dict)):
        return "mixture[controller]"
    return "mixture[dict]"


Mixture = Annotated[
    # tags in brackets: error locations drop them (load._locate), they are not keys the user wrote
    Annotated[dict[str, float], Tag("mixture[dict]")] | Annotated[list[MixturePoint], Tag("mixture[list]")]
    | Annotated[ControlledMixture, Tag("mixture[controller]")],
    Discriminator(_mixture_kind),
]
MIXTURE_DOC = ("Name -> share of the sequences (sums to 1; replay = the old data's share), or a schedule "
               "over the stage: a list of {at, weights, ramp} points, e.g. [{at: 0, weights: {de: 0.75, en: "
               "0.25}}, {at: 100%, weights: {de: 0.95, en: 0.05}, ramp: linear}] (replay 25% -> 5%), or a "
               "switch at: decay to a high-quality source, or {controller: {old, new, budget, ...}}: the replay "
               "share set at every probe so that the old domain's rise stays under the budget. Logged per step "
               "as data/<name>/share.")


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


def check_mixture(mixture: dict[str, float] | list[MixturePoint] | ControlledMixture, sources: dict[str, str],
                  key: str) -> None:
    if isinstance(mixture, ControlledMixture):
        for role in ("old", "new"):
            name = getattr(mixture.controller, role)
            if name not in sources:
                raise ValueError(f"{key}.controller.{role} = {name}: not one of data.sources ({', '.join(sources)})")
        return
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

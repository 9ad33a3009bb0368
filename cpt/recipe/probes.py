"""The recipe's probes section: held-out sets, cadence, the dense window, lm-eval tasks."""

from __future__ import annotations

from itertools import pairwise

from pydantic import ConfigDict, Field, field_validator

from cpt.units import StrictModel, TokenCount


class DenseProbesConfig(StrictModel):
    every: TokenCount = Field(description="Probe cadence right after each stage start.")
    for_: TokenCount = Field(alias="for", description="Length of the dense window after each stage start.")

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)


class LmEvalProbesConfig(StrictModel):
    tasks: list[str] = Field(min_length=1, description="lm-evaluation-harness task names (or task YAML paths).")
    every: TokenCount | None = Field(
        None, description="Cadence in tokens; null = at each stage's start (the baseline) and end only."
    )
    limit: int | None = Field(None, gt=0, description="The first N documents of each task; null = all.")
    include: str | None = Field(None, description="A folder of local task YAMLs (lm-eval's include_path).")
    batch_size: int = Field(16, gt=0, description="Sequences per lm-eval forward.")


class ProbesConfig(StrictModel):
    sets: dict[str, str] = Field(
        default_factory=dict, description="Domain name -> prepared held-out token dir to measure loss on, "
        "prepared at data.seq_len or shorter (a set at the old context in a long-context stage: short-context loss)."
    )
    every: TokenCount | None = Field(
        None, description="Probe cadence in tokens; null = only at each stage's start and end."
    )
    dense: DenseProbesConfig | None = Field(
        None, description="A denser cadence right after each stage start, where the stability gap hides."
    )
    new_domains: list[str] | None = Field(
        None, description="Probe sets that are new data (adaptation is reported); the others are old "
        "(forgetting is reported). Default: per stage, the sources that gained weight over the previous "
        "stage, or the heaviest source of the first stage."
    )
    max_sequences: int = Field(
        64, gt=0, description="Held-out sequences per domain: a fixed sample spread evenly over the whole set "
        "(every (set size / N)-th sequence, cpt.probes.probe_indices; the whole set when it has N or fewer), the "
        "same at every probe, on resume and in `cpt probe --max-sequences N`."
    )
    micro_batch_size: int = Field(16, gt=0, description="Sequences per forward pass while probing.")
    by_position: list[int] | None = Field(
        None, description="Bucket edges of the held-out loss by position, e.g. [0, 128, 256, 512]: each set "
        "also logs probe/<set>/loss@<lo>-<hi>, the mean loss of the tokens at positions lo..hi-1 of their row "
        "(of their document with data.document_masking), from the same forward. Does loss keep falling past "
        "the context the model was trained at (a long-context stage)?"
    )

    @field_validator("by_position")
    @classmethod
    def _edges(cls, v: list[int] | None) -> list[int] | None:
        return None if v is None else check_edges(v)
    lm_eval: LmEvalProbesConfig | None = Field(
        None, description="lm-evaluation-harness tasks on the model in memory at each stage's start and end "
        "and every N tokens, on the main process (the others wait), logged as lm_eval/<task>/<metric> "
        "(needs pip install -e '.[eval]'; not with ZeRO-3 / FSDP shards). The raw weights, not EMA/merged."
    )


def check_edges(edges: list[int]) -> list[int]:
    """Bucket edges of the loss by position (``probes.by_position``, ``cpt probe --by-position``): at least
    two, strictly increasing, from 0 or more."""
    edges = [int(e) for e in edges]
    if len(edges) < 2 or edges[0] < 0 or any(b <= a for a, b in pairwise(edges)):
        raise ValueError(f"by_position {edges}: expected at least two increasing positions from 0 or more, "
                         f"e.g. [0, 128, 256, 512]")
    return edges

"""The recipe's mitigate and merge sections: forgetting mitigations beyond replay (one module each in
cpt/mitigate/) and checkpoint merging in the run."""

from __future__ import annotations

from pydantic import Field

from cpt.units import StrictModel


class EmaConfig(StrictModel):
    decay: float = Field(gt=0, lt=1, description="ema <- decay * ema + (1 - decay) * weights at each update; "
                         "starts from the run's start weights (their share after n updates is decay^n).")
    every: int = Field(1, ge=1, description="Update every this many optimizer steps.")


class DistillConfig(StrictModel):
    weight: float = Field(gt=0, description="beta: each micro-batch trains on loss + beta * T^2 * KL(teacher || "
                          "student) at temperature T, the teacher a frozen copy of the weights the stage started "
                          "from (logged as train/distill_kl, the T^2-scaled KL; train/loss stays the plain loss).")
    temperature: float = Field(1.0, gt=0, description="T: both distributions are softmax(logits / T).")
    positions: float = Field(1.0, gt=0, le=1, description="Share of each micro-batch's target positions the KL "
                             "is taken on: 1 = all; below it a random sample seeded by run.seed (the same "
                             "draws on a resumed run). Saves head matmuls, not the teacher's forward.")
    top_k: int | None = Field(None, ge=1, description="null = KL over the full vocabulary; k = over the "
                              "teacher's k most likely tokens, both distributions renormalised over them (the "
                              "student's logits and gradients are then computed at those k tokens only).")


class MitigateConfig(StrictModel):
    """Forgetting mitigations beyond replay (cpt/mitigate/, one module each). Patterns are regular
    expressions searched (re.search) in the names of the trainable parameters, e.g. 'embed_tokens|lm_head',
    'layers\\.[0-7]\\.' (write the trailing dot: 'layers\\.1' also matches layers.10); a pattern matching
    nothing is an error."""

    freeze: list[str] = Field(default_factory=list, description="Parameters not trained (e.g. the bottom "
                              "layers); counts per pattern are printed at start.")
    lr_multipliers: dict[str, float] = Field(
        default_factory=dict, description="Pattern -> factor > 0 on the schedule's LR (layer-wise LR, e.g. "
        "embeddings 0.1, lower layers 0.5); the first matching pattern wins; counts printed at start."
    )
    l2_init: float = Field(
        0.0, ge=0, description="Decoupled L2 toward the weights the stage started from: after each update "
        "w <- w - lr * l2_init * (w - w_stage_start), like AdamW's decoupled weight decay (lr * l2_init must "
        "stay <= 1). The reference weights are in every checkpoint. With DeepSpeed ZeRO-1/2/3 it moves DeepSpeed's "
        "fp32 master copies too; under FSDP2 it acts on the shards; not with FSDP1."
    )
    ema: EmaConfig | None = Field(
        None, description="An exponential moving average of the weights: probed beside the raw weights "
        "(probe_ema/<set>/loss), kept in every checkpoint, exported as final_ema/. With DeepSpeed ZeRO-1/2 "
        "(whole weights on every rank), ZeRO-3 and FSDP2 (an average per slice / shard); not with FSDP1."
    )
    distill: DistillConfig | None = Field(
        None, description="Self-distillation from the stage's start weights (needs no replay data): a KL "
        "from a frozen copy of them (one whole copy per process, kept in every checkpoint; its forward runs "
        "on every micro-batch) to the trained model. One process or DDP; refused under DeepSpeed and FSDP."
    )


class MergeConfig(StrictModel):
    """Checkpoint merging in the run (cpt/merge.py): at the end of every stage, the stage's last ``last``
    checkpoints are averaged into runs/<name>/merged/<stage>/ (an HF model dir) and probed as their own
    series (probe_merge/<set>/loss). "Constant LR + merge" instead of a decay is then a recipe."""

    last: int = Field(ge=2, description="How many of the stage's most recent checkpoints to merge (needs "
                      "checkpoint.every to save that many in the stage, and checkpoint.keep_last >= it).")
    weights: str = Field("wsm:1-sqrt", description="uniform | w1,w2,... | ema:<decay> | wsm:<shape> "
                         "(WSM: the coefficients that emulate that decay over the checkpoints; see cpt merge).")
    at_probes: bool = Field(False, description="Also at every probe: merge the stage's last checkpoints so far "
                            "(once it has 2) into merged/<stage>-latest/ and probe them (probe_merge/<set>/loss), "
                            "so the merged curve is seen during the stage, not only at its end.")

"""The recipe schema: every section of a recipe as a pydantic v2 model, with its defaults, the
description of every field and the validators, down to :class:`Recipe` (the whole file) and its rules
that involve several sections. Every default lives here, so the schema documents the recipes.

Loading a recipe file (``extends:``, overrides, ``${...}``, error messages) is :mod:`cpt.recipe.load`.
"""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from cpt.errors import CptError
from cpt.merge_weights import merge_coefficients
from cpt.recipe.data import MIXTURE_DOC, DataConfig, Mixture, check_mixture
from cpt.recipe.mitigate import MergeConfig, MitigateConfig
from cpt.recipe.probes import ProbesConfig
from cpt.schedules import ScheduleConfig
from cpt.tracking import WandbConfig
from cpt.units import StrictModel, TokenCount


class RunConfig(StrictModel):
    name: str = Field(description="Run name; used in logs and trackers.")
    output_dir: str = Field(description="Run directory: resolved recipe, metrics.jsonl, checkpoints, final model.")
    seed: int = Field(1234, description="Seed for model init, the mixture sampler and RNG states.")


class ExtendVocabConfig(StrictModel):
    init: Literal["subword_mean", "mean", "random"] = Field(
        "subword_mean", description="The new rows of the embeddings (and of an untied head): subword_mean = "
        "the mean of the rows of the old tokens the new token's text encodes to with the init_from model's "
        "own tokenizer (FVT); mean = the mean of all old rows; random = the model's init."
    )
    pad_to_multiple_of: int | None = Field(
        64, ge=1, description="Round the new vocabulary size up to a multiple of this (tensor-core friendly "
        "on GPUs); the extra rows are initialised like the new ones and never produced by the tokenizer."
    )
    train_rows: Literal["all", "new"] = Field(
        "all", description="new = the rows of the init_from model's own tokens (embeddings and an untied head) "
        "are restored after every update, so only the new rows learn (with mitigate.freeze of the rest: the "
        "first phase of a new-language recipe); all = every row trains. new: not with DeepSpeed / FSDP / peft."
    )


class ModelConfig(StrictModel):
    preset: Literal["tiny-llama", "small-llama", "llama-1b"] | None = Field(
        None, description="Build a fresh Llama-shaped model from a preset. Leave null when init_from "
        "loads the weights (any Hugging Face causal LM dir or a cpt checkpoint)."
    )
    config: dict[str, Any] = Field(
        default_factory=dict, description="Config overrides on top of the preset, e.g. {num_hidden_layers: 4}, "
        "or of the init_from model's config.json, e.g. long-context CPT: {rope_theta: 1000000, "
        "max_position_embeddings: 32768} (what changed is printed; keys the config does not have are refused)."
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer dir (HF). Defaults to the init_from checkpoint's; required with a preset."
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention kernel passed to transformers. auto = flash_attention_2 on CUDA where "
        "the flash-attn package and the model support it, else sdpa where the model supports it, else eager "
        "(e.g. Gemma 2). With data.document_masking, flash_attention_2 and sdpa/eager all keep attention "
        "inside each document."
    )
    trust_remote_code: bool = Field(
        False, description="Run the modelling code a model dir ships (config.json auto_map). Off: such a "
        "model is refused with one line instead of a prompt in the middle of a batch job."
    )
    extend_vocab: ExtendVocabConfig | None = Field(
        None, description="When model.tokenizer has more tokens than the init_from model's vocabulary (an "
        "extended tokenizer, e.g. for a new language): resize the embeddings and head, old rows unchanged, "
        "new rows as extend_vocab.init says; tied embeddings stay tied. null = refuse such a pair."
    )
    export_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of final/ (training is in fp32 with autocast). auto = the init_from "
        "model's own dtype (a bf16 model stays bf16), float32 for a preset."
    )


class InitLoadConfig(StrictModel):
    weights: bool = Field(True, description="Load the model weights (else build model.preset fresh).")
    optimizer: bool = Field(
        False, description="Load the optimizer state (AdamW moments); cpt checkpoints only. "
        "Hyperparameters (betas, weight decay) still come from this recipe."
    )
    schedule_state: bool = Field(
        False, description="Continue the checkpoint's token counter (the schedule goes on where it was, "
        "no re-warm) and its data position (sources already read are not repeated). "
        "false = a new stage: the counter restarts at 0 and the schedule starts over."
    )


class InitFromConfig(StrictModel):
    path: str = Field(description="A Hugging Face model dir, a cpt checkpoint dir, or a cpt run dir.")
    checkpoint: str = Field(
        "latest", description="For a run dir: latest | pre_anneal | a stage name (its last checkpoint) "
        "| step-N."
    )
    load: InitLoadConfig = Field(default_factory=InitLoadConfig)

    @model_validator(mode="after")
    def _optimizer_needs_weights(self) -> InitFromConfig:
        if self.load.optimizer and not self.load.weights:
            raise ValueError("init_from.load.optimizer needs init_from.load.weights: moments belong to weights")
        return self


class OptimizerConfig(StrictModel):
    name: Literal["adamw"] = Field("adamw", description="Optimizer; the LR comes from the schedule.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="Adam betas.")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    weight_decay: float = Field(0.1, ge=0, description="Decoupled weight decay on matrices (not norms/biases).")
    fused: Literal["auto"] | bool = Field(
        "auto", description="Fused AdamW kernel (one kernel for all parameters): auto = on wherever torch has "
        "it (CUDA and CPU, fp32/bf16/fp16 weights); false = torch's foreach implementation."
    )


class TrainConfig(StrictModel):
    tokens: TokenCount | None = Field(
        None, description="Token budget of the run, e.g. 20M (K/M/G are powers of 2). With stages, the sum "
        "of the stages' budgets (leave it out)."
    )
    global_batch_tokens: TokenCount = Field(
        description="Tokens per optimizer step over all processes; grad accumulation is derived from it."
    )
    micro_batch_size: int = Field(8, gt=0, description="Sequences per forward pass per process.")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    grad_clip: float | None = Field(1.0, description="Clip the global grad norm to this; null = no clipping.")
    collective_timeout: float = Field(
        600, gt=0, description="Seconds a process waits in a collective (an all-reduce, a barrier) before it "
        "gives up on a peer that stopped answering (a frozen node) and the run ends with one line naming the "
        "last checkpoint; a dead peer is seen at once. 10 minutes: far below torch's 30, long enough for the "
        "main process to write a checkpoint, merge or run probes.lm_eval while the others wait. Raise it for "
        "a big model's checkpoint on a slow filesystem."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 autocast on a GPU that supports it, fp32 otherwise. bf16 autocast "
        "(fp32 weights) also runs on CPUs: 2x the fp32 tokens/s at 20M parameters on an AVX512-BF16 CPU "
        "(docs/benchmarks.md), slower where the CPU lacks bf16 instructions; auto keeps fp32 there."
    )
    compile: bool = Field(
        False, description="torch.compile the model (in place, so checkpoint keys do not change); the first "
        "steps are slow while it compiles. Meant for GPUs (works on CPU too, compiling for minutes)."
    )
    loss: Literal["auto", "chunked", "model"] = Field(
        "auto", description="How the next-token loss is computed. chunked = from the final hidden states, a "
        "chunk of positions at a time, gradients formed per chunk, so the [batch, seq, vocab] logits and "
        "their fp32 copies never exist (what makes 128K-256K vocabularies fit); same loss and gradients as "
        "the model's own to float rounding. model = model(..., labels=...).loss. auto = chunked where it "
        "applies (a plain Linear head whose logits the model does not post-process beyond Gemma's "
        "soft-capping, weights not partitioned by ZeRO-3/FSDP1; checked at start on a few tokens), else model, "
        "saying why."
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute each layer's activations in backward instead of keeping them "
        "(non-reentrant torch checkpointing): ~1/3 more compute for activations that no longer grow with "
        "depth; what makes 7-8B models fit at seq 4096. Same losses within float tolerance."
    )
    deepspeed: str | None = Field(
        None, description="Path to a DeepSpeed JSON config (e.g. recipes/deepspeed/zero2.json) = train with "
        "DeepSpeed ZeRO through accelerate. Batch sizes, grad accumulation and clipping are filled in from "
        "this recipe (write \"auto\" for them); precision from train.precision. null = plain DDP."
    )

    on_nonfinite: Literal["halt", "skip"] = Field(
        "halt", description="A step whose loss or grad norm is NaN/inf never updates the weights. halt = stop "
        "at once, save nothing, name the step and the last good checkpoint (exit code 3); skip = drop that "
        "step's update (its data is consumed, the LR schedule goes on), count it in train/skipped_steps, "
        "and halt after train.max_skipped_steps in a row. Not with train.deepspeed (DeepSpeed steps inside "
        "backward): there only halt."
    )
    max_skipped_steps: int = Field(
        8, gt=0, description="With on_nonfinite: skip, halt after this many non-finite steps in a row."
    )
    spike_factor: float | None = Field(
        2.0, gt=1, description="Log a loss_spike event (and print it) when a step's loss exceeds this "
        "factor times the median of the last spike_window steps; null = off. Spikes only inform: the "
        "step is taken."
    )
    spike_window: int = Field(64, ge=8, description="Steps in the running median of spike_factor.")

    @field_validator("grad_clip")
    @classmethod
    def _positive_clip(cls, v: float | None) -> float | None:
        if v is not None and v <= 0:
            raise ValueError("must be > 0, or null for no clipping")
        return v


class PeftConfig(StrictModel):
    kind: Literal["lora"] = Field("lora", description="Adapter kind (peft): lora.")
    r: int = Field(16, gt=0, description="LoRA rank of the update B @ A.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch's input.")
    target_modules: list[str] | None = Field(
        None, min_length=1, description="Names (suffixes) of the layers that get adapters; null = every "
        "linear layer but the output head, whatever the architecture (peft's all-linear: q/k/v/o and the "
        "MLP of Llama-like models, c_attn/c_proj/c_fc of GPT-2, query_key_value/dense of GPT-NeoX).",
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained in full beside the adapters, e.g. [embed_tokens, "
        "lm_head] when the new data brings new tokens or a new language.",
    )


class CheckpointConfig(StrictModel):
    every: TokenCount | None = Field(None, description="Save every N tokens; null = only at the end.")
    keep_last: int = Field(3, ge=1, description="How many periodic checkpoints to keep.")


class StageConfig(StrictModel):
    name: str = Field(description="Stage name, e.g. the domain it adds; logged with every record.")
    tokens: TokenCount = Field(description="Token budget of this stage.")
    mixture: Mixture = Field(description=MIXTURE_DOC)
    schedule: ScheduleConfig | None = Field(
        None, description="A schedule of this stage's own, counted from its start over its budget "
        "(re-warming: warmup_from: checkpoint starts at the LR the previous stage ended at). Null = "
        "the run's schedule goes on across the stage boundary."
    )
    probes: list[str] | None = Field(None, description="Names of probes.sets measured in this stage; null = all.")
    new_domains: list[str] | None = Field(None, description="As probes.new_domains, for this stage.")


class TrackingConfig(StrictModel):
    progress: bool = Field(True, description="Show a progress bar (tokens/s, ETA) on the main process.")
    wandb: WandbConfig | None = Field(
        None, description="Mirror metrics to Weights & Biases (offline by default); null = JSONL only."
    )


class Recipe(StrictModel):
    run: RunConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    peft: PeftConfig | None = Field(
        None, description="Train LoRA adapters (peft) on the frozen model instead of all weights; null = "
        "full training. Checkpoints hold the adapters; the run's final/ is the merged model, final/adapter/ "
        "the adapter alone."
    )
    init_from: InitFromConfig | None = Field(
        None, description="Start from a checkpoint: which of weights, optimizer, schedule/data state to load. "
        "A new stage, not a resume (cpt train --resume continues the same run exactly)."
    )
    data: DataConfig
    train: TrainConfig
    schedule: ScheduleConfig | None = Field(
        None, description="The run's LR schedule over its whole token counter; may be left out when every "
        "stage has its own."
    )
    stages: list[StageConfig] | None = Field(
        None, description="A → B → C: stages run in order in one run dir, each with its own mixture and budget."
    )
    probes: ProbesConfig = Field(default_factory=ProbesConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    mitigate: MitigateConfig = Field(default_factory=MitigateConfig)
    merge: MergeConfig | None = Field(None, description="Merge the last checkpoints of each stage (WSM); null = off.")

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        """Rules that involve several sections, each naming the key at fault (checked in this order)."""
        self._check_model_source()
        self._check_merge()
        self._check_budgets()
        return self

    def _check_model_source(self) -> None:
        """model.preset / model.tokenizer against init_from, and what train.deepspeed rules out."""
        loads = self.init_from is not None and self.init_from.load.weights
        if loads and self.model.preset is not None:
            raise ValueError("model.preset: init_from.load.weights loads the model; remove model.preset")
        if not loads and self.model.preset is None:
            raise ValueError("model.preset: required when no weights are loaded (init_from.load.weights)")
        if self.model.tokenizer is None and self.init_from is None:
            raise ValueError("model.tokenizer: required with model.preset (the vocabulary comes from it)")
        if self.train.deepspeed is not None and self.train.on_nonfinite == "skip":
            raise ValueError("train.on_nonfinite: skip is not possible with train.deepspeed (DeepSpeed applies "
                             "the update inside backward, before the loss can be checked); use halt")
        if self.train.deepspeed is not None and self.init_from is not None and self.init_from.load.optimizer:
            raise ValueError("init_from.load.optimizer: not supported with train.deepspeed (DeepSpeed keeps the "
                             "optimizer state partitioned in its own format); set it to false, or train without "
                             "DeepSpeed")

    def _check_merge(self) -> None:
        """merge: valid weights, and checkpoints saved and kept for it."""
        if self.merge is None:
            return
        try:
            merge_coefficients(self.merge.weights, self.merge.last)
        except CptError as e:
            raise ValueError(f"merge.weights: {e}") from None
        if self.checkpoint.every is None:
            raise ValueError("merge: needs checkpoint.every (the checkpoints it merges)")
        if self.checkpoint.keep_last < self.merge.last:
            raise ValueError(f"checkpoint.keep_last = {self.checkpoint.keep_last}: merge.last = "
                             f"{self.merge.last} checkpoints must be kept")

    def _check_budgets(self) -> None:
        """Token budgets in whole steps, the run or its stages complete, probe sets that exist."""
        L, G = self.data.seq_len, self.train.global_batch_tokens
        if G % L:
            raise ValueError(f"train.global_batch_tokens = {G}: not a multiple of data.seq_len = {L}")
        budgets = self._run_budget() if self.stages is None else self._stage_budgets(self.stages)
        for key, tokens in budgets:
            if tokens < G or tokens % G:
                raise ValueError(f"{key} = {tokens}: must be a positive multiple of one step "
                                 f"(train.global_batch_tokens = {G})")
        for name in self.probes.new_domains or []:
            if name not in self.probes.sets:
                raise ValueError(f"probes.new_domains: {name!r} is not one of probes.sets")

    def _run_budget(self) -> list[tuple[str, int]]:
        """A recipe without stages: what the single stage needs, and its budget."""
        if self.train.tokens is None:
            raise ValueError("train.tokens: required (the run's token budget) unless stages are given")
        if self.data.mixture is None:
            raise ValueError("data.mixture: required unless stages are given")
        if self.schedule is None:
            raise ValueError("schedule: required unless every stage has its own")
        return [("train.tokens", self.train.tokens)]

    def _stage_budgets(self, stages: list[StageConfig]) -> list[tuple[str, int]]:
        """A recipe with stages: each stage complete and consistent with the run, and their budgets."""
        if not stages:
            raise ValueError("stages: empty; give at least one stage or leave stages out")
        if self.train.tokens is not None:
            total = sum(st.tokens for st in stages)
            if self.train.tokens != total:
                raise ValueError(f"train.tokens = {self.train.tokens}: the stages' budgets sum to {total}; "
                                 f"leave train.tokens out with stages")
        if self.data.mixture is not None:
            raise ValueError("data.mixture: with stages, each stage sets its mixture (stages[i].mixture)")
        names = [st.name for st in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stages: names must be unique, got {names}")
        for i, st in enumerate(stages):
            check_mixture(st.mixture, self.data.sources, f"stages[{i}].mixture")
            for name in (st.probes or []) + (st.new_domains or []):
                if name not in self.probes.sets:
                    raise ValueError(f"stages[{i}]: probe set {name!r} is not one of probes.sets")
        if self.schedule is None and stages[0].schedule is None:
            raise ValueError("schedule: required unless the first stage has its own (stages[0].schedule)")
        return [(f"stages[{i}].tokens", st.tokens) for i, st in enumerate(stages)]

    def stage_list(self) -> list[StageConfig]:
        """The stages to run; a recipe without stages is one stage named after the run."""
        if self.stages is not None:
            return self.stages
        return [StageConfig(name=self.run.name, tokens=self.train.tokens, mixture=self.data.mixture,
                            new_domains=self.probes.new_domains)]

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain YAML-able data (human sizes kept human)."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

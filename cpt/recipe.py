"""Recipes: one typed schema (pydantic v2) loaded from YAML.

A recipe file may name parents with ``extends:`` (a path or a list, relative to the file); parents are
merged depth-first, dicts recursively, anything else replaced. Dotted overrides from the command line
(``schedule.max_lr=1e-3``, values parsed as YAML) are applied on top, then ``${a.b}`` references are
filled from the merged recipe, then the result is validated. Every default lives in this schema;
every field is documented where it is declared, so the schema documents the recipes.
"""

from __future__ import annotations

import difflib
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cpt.errors import CptError
from cpt.schedules import ScheduleConfig
from cpt.units import TokenCount


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class RunConfig(_Strict):
    name: str = Field(description="Run name; used in logs and trackers.")
    output_dir: str = Field(description="Run directory: resolved recipe, metrics.jsonl, checkpoints, final model.")
    seed: int = Field(1234, description="Seed for model init, the mixture sampler and RNG states.")


class ModelConfig(_Strict):
    path: str | None = Field(
        None, description="A Hugging Face model dir (any causal LM) to start from, loaded with from_pretrained."
    )
    preset: Literal["tiny-llama", "small-llama", "llama-1b"] | None = Field(
        None, description="Build a fresh Llama-shaped model from a config preset instead of loading one."
    )
    config: dict[str, Any] = Field(
        default_factory=dict, description="Config overrides on top of the preset, e.g. {num_hidden_layers: 4}."
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer dir (HF). Defaults to model.path; required with a preset."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel passed to transformers."
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.path is None) == (self.preset is None):
            raise ValueError("set exactly one of model.path (load a model) or model.preset (build one)")
        if self.preset is not None and self.tokenizer is None:
            raise ValueError("model.tokenizer is required with model.preset (the vocabulary comes from it)")
        if self.config and self.preset is None:
            raise ValueError("model.config overrides apply to a preset only")
        return self

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.path  # type: ignore[return-value]


class DataConfig(_Strict):
    seq_len: int = Field(gt=0, description="Tokens per sequence; must match the prepared sources.")
    sources: dict[str, str] = Field(
        min_length=1, description="Name -> prepared token dir (written by `cpt prepare`)."
    )
    mixture: dict[str, float] = Field(
        description="Name -> share of training sequences; sums to 1. Replay = the old data's share."
    )
    warn_epochs: float = Field(
        4.0, gt=0, description="Warn when a source has been read this many times over (repeated data "
        "hurts beyond a few epochs; tiny replay buffers repeated 100x degrade a model)."
    )

    @model_validator(mode="after")
    def _mixture_matches_sources(self) -> DataConfig:
        for name, w in self.mixture.items():
            if name not in self.sources:
                raise ValueError(f"data.mixture.{name}: not one of data.sources ({', '.join(self.sources)})")
            if w < 0:
                raise ValueError(f"data.mixture.{name} = {w}: weights must be >= 0")
        total = sum(self.mixture.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"data.mixture: weights sum to {total:g}, expected 1")
        return self


class OptimizerConfig(_Strict):
    name: Literal["adamw"] = Field("adamw", description="Optimizer; the LR comes from the schedule.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="Adam betas.")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    weight_decay: float = Field(0.1, ge=0, description="Decoupled weight decay on matrices (not norms/biases).")
    fused: Literal["auto"] | bool = Field(
        "auto", description="Fused AdamW kernel: auto = on for CUDA, off on CPU."
    )


class TrainConfig(_Strict):
    tokens: TokenCount = Field(description="Token budget of this stage, e.g. 20M (K/M/G are powers of 2).")
    global_batch_tokens: TokenCount = Field(
        description="Tokens per optimizer step over all processes; grad accumulation is derived from it."
    )
    micro_batch_size: int = Field(8, gt=0, description="Sequences per forward pass per process.")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    grad_clip: float | None = Field(1.0, description="Clip the global grad norm to this; null = no clipping.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 autocast on a GPU that supports it, fp32 otherwise."
    )

    @field_validator("grad_clip")
    @classmethod
    def _positive_clip(cls, v: float | None) -> float | None:
        if v is not None and v <= 0:
            raise ValueError("must be > 0, or null for no clipping")
        return v


class ProbesConfig(_Strict):
    sets: dict[str, str] = Field(
        default_factory=dict, description="Domain name -> prepared held-out token dir to measure loss on."
    )
    every: TokenCount | None = Field(
        None, description="Probe cadence in tokens; null = only at the stage start and end."
    )
    max_sequences: int = Field(64, gt=0, description="Held-out sequences per domain (the first N, fixed).")
    micro_batch_size: int = Field(16, gt=0, description="Sequences per forward pass while probing.")


class CheckpointConfig(_Strict):
    every: TokenCount | None = Field(None, description="Save every N tokens; null = only at the end.")
    keep_last: int = Field(3, ge=1, description="How many periodic checkpoints to keep.")


class TrackingConfig(_Strict):
    progress: bool = Field(True, description="Show a progress bar (tokens/s, ETA) on the main process.")


class Recipe(_Strict):
    run: RunConfig
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    schedule: ScheduleConfig
    probes: ProbesConfig = Field(default_factory=ProbesConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _batch_fits(self) -> Recipe:
        L = self.data.seq_len
        if self.train.global_batch_tokens % L:
            raise ValueError(
                f"train.global_batch_tokens = {self.train.global_batch_tokens}: not a multiple of "
                f"data.seq_len = {L}"
            )
        if self.train.tokens < self.train.global_batch_tokens:
            raise ValueError(
                f"train.tokens = {self.train.tokens}: smaller than one step "
                f"(train.global_batch_tokens = {self.train.global_batch_tokens})"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain YAML-able data (human sizes kept human)."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------- loading


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load, merge (``extends:``), override, interpolate and validate a recipe; CptError on any problem."""
    data = _load_tree(Path(path), chain=())
    for item in overrides:
        _apply_override(data, item)
    data = _interpolate(data, data)
    return validate_recipe(data, source=str(path))


def validate_recipe(data: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise CptError(_explain(e, data, source)) from None


def _load_tree(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in chain:
        raise CptError(f"{path}: extends itself through {' -> '.join(p.name for p in chain)}")
    if not path.is_file():
        where = f" (extended by {chain[-1]})" if chain else ""
        raise CptError(f"recipe file not found: {path}{where}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        raise CptError(f"{path}{at}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise CptError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    parents = data.pop("extends", None) or []
    if isinstance(parents, str):
        parents = [parents]
    merged: dict[str, Any] = {}
    for parent in parents:
        merged = _merge(merged, _load_tree(path.parent / parent, chain + (path,)))
    return _merge(merged, data)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise CptError(f"override {item!r}: expected key.path=value, e.g. schedule.max_lr=1e-3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise CptError(f"override {item!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


_REF = re.compile(r"\$\{([A-Za-z0-9_.]+)\}")


def _interpolate(node: Any, root: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        return {k: _interpolate(v, root) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, root) for v in node]
    if isinstance(node, str) and "${" in node:
        def sub(m: re.Match[str]) -> str:
            value: Any = root
            for part in m.group(1).split("."):
                if not isinstance(value, dict) or part not in value:
                    raise CptError(f"${{{m.group(1)}}}: no such key in the recipe")
                value = value[part]
            if isinstance(value, (dict, list)):
                raise CptError(f"${{{m.group(1)}}}: refers to a section, not a value")
            return str(value)

        return _REF.sub(sub, node)
    return node


# ------------------------------------------------------------------------------------ error messages


def _explain(err: ValidationError, data: dict[str, Any], source: str) -> str:
    """One line naming the key, the value and what was expected (plus a count of further problems)."""
    errors = err.errors(include_url=False)
    first = errors[0]
    key, value, present = _locate(first["loc"], data)
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    if first["type"] == "extra_forbidden":
        choices = _field_names(first["loc"][:-1], data)
        close = difflib.get_close_matches(str(first["loc"][-1]), choices, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (expected one of: {', '.join(choices)})"
        return f"{source}: {key}: unknown key{hint}{more}"
    if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
        key = f"{key}.kind"
        value, present = (value or {}).get("kind") if isinstance(value, dict) else None, True
        kinds = first.get("ctx", {}).get("expected_tags", "")
        return f"{source}: {key} = {value!r}: expected one of {kinds}{more}"
    if first["type"] == "missing":
        return f"{source}: {key}: required key is missing{more}"
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
        if not key or msg.startswith(key.split(".")[0]):
            return f"{source}: {msg}{more}"
    shown = f" = {value!r}" if present else ""
    return f"{source}: {key}{shown}: {msg}{more}"


def _locate(loc: tuple[Any, ...], data: Any) -> tuple[str, Any, bool]:
    """Map a pydantic loc onto the recipe's keys, dropping union-tag segments (e.g. 'wsd')."""
    parts: list[str] = []
    node, present = data, True
    for item in loc:
        if isinstance(node, dict) and item in node:
            node = node[item]
            parts.append(str(item))
        elif isinstance(node, (list, tuple)) and isinstance(item, int) and item < len(node):
            node = node[item]
            parts.append(str(item))
        elif isinstance(node, dict) and node.get("kind") == item:
            continue  # discriminated-union tag: not a key the user wrote
        elif isinstance(item, str) and ("[" in item or item.startswith("function-")):
            continue  # pydantic's internal names for union members / validators
        else:
            parts.append(str(item))
            present = False
    return ".".join(parts), node if present else None, present


def _field_names(loc: tuple[Any, ...], data: Any) -> list[str]:
    """Field names allowed at ``loc`` in the schema, following the input through unions."""
    model: Any = Recipe
    node = data
    for item in loc:
        if isinstance(node, dict) and node.get("kind") == item:
            continue
        ann = _model_of(model, node)
        if ann is None or item not in ann.model_fields:
            return []
        model = ann.model_fields[item].annotation
        node = node.get(item) if isinstance(node, dict) else None
    ann = _model_of(model, node)
    return list(ann.model_fields) if ann is not None else []


def _model_of(annotation: Any, node: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        m = _model_of(arg, node)
        if m is None:
            continue
        kind = m.model_fields.get("kind")
        if kind is None or not isinstance(node, dict):
            return m
        if node.get("kind") in typing.get_args(kind.annotation):
            return m
    return None


def recipe_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two resolved recipes: {key: (old, new)}."""
    a, b = _flatten(old), _flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out

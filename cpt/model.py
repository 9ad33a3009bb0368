"""Models: load any causal LM dir with from_pretrained, or build a Llama-shaped one from a preset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cpt.errors import CptError
from cpt.recipe import ModelConfig, PeftConfig

# Where a LoRA run keeps its adapter (peft save_pretrained: adapter_config.json + weights), inside each
# checkpoint and inside final/. A subfolder, so that transformers' own PEFT detection never mistakes
# the (merged, or full-state) model dir around it for a bare adapter.
ADAPTER_DIR = "adapter"
_PEFT_PREFIX = "base_model.model."  # parameter names of a peft-wrapped model in a checkpoint

# Llama-shaped presets. tiny-llama is the CPU model of the tests and the demo; llama-1b is the
# GPU throughput model (same shape family as OLMo-1B / TinyLlama).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048),
    "small-llama": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096),
}


def preset_config(cfg: ModelConfig, tokenizer):
    """The LlamaConfig of ``model.preset`` with the tokenizer's vocabulary and ``model.config`` overrides."""
    from transformers import LlamaConfig

    kwargs = dict(PRESETS[cfg.preset])  # type: ignore[index]
    kwargs.update(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    kwargs.update(cfg.config)
    try:
        config = LlamaConfig(**kwargs)
    except (TypeError, ValueError, KeyError) as e:  # KeyError: rope_parameters missing a key its kind needs
        raise CptError(f"model.config: {e}") from None
    config._attn_implementation = attention_for(config, cfg.attn_implementation)
    return config


def attention_for(config, requested: str) -> str:
    """The attention kernel to load ``config``'s model with: ``requested``, or for ``auto`` the best the
    model class supports here (flash-attention 2 on CUDA when installed, else sdpa, else eager)."""
    if requested != "auto":
        return requested
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import is_flash_attn_2_available

    cls = AutoModelForCausalLM._model_mapping.get(type(config), None)
    if torch.cuda.is_available() and is_flash_attn_2_available() and getattr(cls, "_supports_flash_attn", False):
        return "flash_attention_2"
    return "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"


def model_config(path: str | Path, overrides: dict | None = None, trust_remote_code: bool = False):
    """(config, {key: (old, new)}) of the model dir ``path`` with ``model.config`` overrides applied; a
    config that ships its own modelling code is refused unless ``trust_remote_code``."""
    from transformers import AutoConfig

    path = Path(path)
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CptError(f"{path}/config.json cannot be read ({e})") from None
    if raw.get("auto_map") and not trust_remote_code:
        raise CptError(f"{path}: its config.json names modelling code of its own (auto_map); set "
                       f"model.trust_remote_code: true to run it")
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise CptError(f"cannot read the model config of {path} ({str(e).splitlines()[0]})") from None
    changes = {}
    overrides = dict(overrides or {})
    rope = {k: overrides.pop(k) for k in ROPE_KEYS if k in overrides}
    old_rope, old_positions = getattr(config, "rope_parameters", None), getattr(config, "max_position_embeddings", None)
    for key, value in overrides.items():
        if key not in raw and not hasattr(config, key):
            raise CptError(f"model.config.{key}: the {config.model_type} config has no such key")
        changes[key] = (getattr(config, key, None), value)
        setattr(config, key, value)
    if rope:
        set_rope(config, rope, old_positions)
        changes["rope_parameters"] = (old_rope, config.rope_parameters)
    return config, changes


# model.config keys that change RoPE: transformers >= 5 keeps them all in config.rope_parameters (rope_type,
# rope_theta, factor, ...); rope_scaling is its older name, and a bare rope_theta goes into it.
ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters")
# RoPE kinds that need the context length the model was trained at before the extension
_NEEDS_ORIGINAL = ("yarn", "longrope", "llama3")


def set_rope(config, given: dict, old_positions: int | None) -> None:
    """Apply ``model.config`` RoPE overrides to a loaded ``config``: ``rope_parameters`` (or its older name
    ``rope_scaling``) replaces the scaling, ``rope_theta`` sets the base; the base the model had is kept
    unless given. yarn / llama3 / longrope without ``original_max_position_embeddings`` get the context the
    model had before these overrides (its own ``original_max_position_embeddings`` when it is already
    scaled, so applying the same overrides again, as a resume does, changes nothing), not transformers'
    default, the new ``max_position_embeddings``, which would make the extension a no-op."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    old = getattr(config, "rope_parameters", None)
    if not isinstance(old, dict) or (old and config.nested_rope_parameter_keys(old)):
        raise CptError(f"model.config.{next(iter(given))}: the {config.model_type} config has no single set of "
                       f"RoPE parameters to change (none, or one per layer type)")
    if "rope_parameters" in given and "rope_scaling" in given:
        raise CptError("model.config: give rope_parameters or rope_scaling (its older name), not both")
    scaling = given.get("rope_parameters", given.get("rope_scaling", old))
    new = dict(scaling or {})
    if "type" in new:
        new["rope_type"] = new.pop("type")
    new.setdefault("rope_type", "default")
    new.setdefault("rope_theta", old.get("rope_theta", config.default_theta))
    if "rope_theta" in given:
        new["rope_theta"] = float(given["rope_theta"])
    kinds = ("default", *ROPE_INIT_FUNCTIONS)
    if new["rope_type"] not in kinds:
        raise CptError(f"model.config.rope_parameters.rope_type = {new['rope_type']!r}: transformers knows "
                       f"{', '.join(kinds)}")
    if new["rope_type"] in _NEEDS_ORIGINAL and old_positions is not None:
        new.setdefault("original_max_position_embeddings", old.get("original_max_position_embeddings", old_positions))
    if new["rope_type"] == "longrope":  # transformers only warns, then the first forward fails on shapes
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        half = int(head_dim * new.get("partial_rotary_factor", 1.0)) // 2
        for key in ("short_factor", "long_factor"):
            if key in new and len(new[key]) != half:
                raise CptError(f"model.config.rope_parameters.{key}: {len(new[key])} factors, but this model's "
                               f"rotary dimension {2 * half} needs {half}")
    config.rope_parameters = new
    try:
        config.standardize_rope_params()
        config.validate_rope()
    except (KeyError, ValueError, TypeError) as e:
        raise CptError(f"model.config.rope_parameters: {str(e).strip(chr(34) + chr(39))}") from None


def source_dtype(config):
    """The dtype a model dir's weights are meant for (its config's dtype; float32 when it names none)."""
    import torch

    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def load_causal_lm(path: str | Path, attn_implementation: str = "auto", trust_remote_code: bool = False,
                   overrides: dict | None = None):
    """The one loader of a model from disk, in fp32 on the CPU: a Hugging Face causal-LM dir, or a cpt
    checkpoint (itself an HF dir; a LoRA checkpoint with its adapter merged in; an older checkpoint
    without config.json takes the config of its run's ``final/``). ``model.config.dtype`` keeps the
    dtype the weights came in (what final/ is exported in). Errors name the path; callers put the
    recipe key or flag that named it in front."""
    import torch
    from transformers import AutoModelForCausalLM

    from cpt.state import STATE_FILE

    path = Path(path)
    if not path.is_dir():
        raise CptError(f"{path}: no such directory (a Hugging Face model dir or a cpt checkpoint is expected)")
    final = path.parent.parent / "final"  # RUN/checkpoints/step-N -> RUN/final
    old_layout = not (path / "config.json").is_file() and (path / STATE_FILE).is_file()
    if not (path / "config.json").is_file() and not (old_layout and (final / "config.json").is_file()):
        where = f" (nor has {final}, its run's export)" if old_layout else ""
        raise CptError(f"{path} has no config.json{where} (a Hugging Face model dir or a cpt checkpoint is "
                       f"expected)")
    config, _ = model_config(final if old_layout else path, overrides, trust_remote_code)
    dtype = source_dtype(config)
    config._attn_implementation = attention_for(config, attn_implementation)
    try:
        if is_peft_checkpoint(path):
            model = _load_merged_peft_checkpoint(path, config)
        elif old_layout:
            from safetensors.torch import load_file

            weights = path / "model.safetensors"
            if not weights.is_file():
                raise CptError(f"{path}: no model.safetensors (sharded FSDP/DeepSpeed states are not read "
                               f"here; use the run's exported final/ dir instead)")
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                     trust_remote_code=trust_remote_code)
            load_weights(model, load_file(weights), str(weights))
        else:
            model = AutoModelForCausalLM.from_pretrained(
                str(path), config=config, dtype=torch.float32, attn_implementation=config._attn_implementation,
                trust_remote_code=trust_remote_code)
    except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: shapes that overrides no longer fit
        raise CptError(f"cannot load a causal LM from {path} ({str(e).strip().splitlines()[0]})") from None
    model.config.dtype = dtype  # a record (the weights are fp32 now): checkpoints and final/ carry it on
    return model


def load_weights(model, state_dict: dict, source: str) -> None:
    """Load a full state dict, refusing any mismatch except keys tied to a loaded tensor (tied embeddings)."""
    result = model.load_state_dict(state_dict, strict=False)
    loaded = {p.data_ptr() for k, p in model.state_dict().items() if k in state_dict}
    params = model.state_dict()
    missing = [k for k in result.missing_keys if params[k].data_ptr() not in loaded]
    if missing or result.unexpected_keys:
        raise CptError(f"{source} does not match the model's config: missing {missing[:5]}, "
                       f"unexpected {result.unexpected_keys[:5]}")


def build_model(cfg: ModelConfig, tokenizer, seed: int, weights_from: str | Path | None = None):
    """The model to train, in fp32 (autocast handles bf16): loaded from ``weights_from`` (any HF causal
    LM dir, or a cpt checkpoint, which is one) or built from ``cfg.preset`` with a seeded init."""
    import torch
    from transformers import AutoModelForCausalLM

    if weights_from is not None:
        try:
            model = load_causal_lm(weights_from, cfg.attn_implementation, cfg.trust_remote_code, cfg.config)
        except CptError as e:
            raise CptError(e if str(e).startswith("model.config.") else f"init_from.path: {e}") from None
    else:
        config = preset_config(cfg, tokenizer)
        # Seed only the init, so that the data order and everything downstream stay independent of it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if weights_from is not None:
        # A diverged run's checkpoint (or a corrupt download) would train to NaN from its first step.
        bad = next((n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)
        if bad is not None:
            raise CptError(f"init_from.path: {weights_from}: parameter {bad} holds NaN or inf values; "
                           f"refusing to train from it (start from an earlier checkpoint)")
    if len(tokenizer) > model.config.vocab_size:
        if weights_from is None or cfg.extend_vocab is None:
            raise CptError(
                f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                f"{model.config.vocab_size}: they do not belong together (an extended tokenizer: set "
                f"model.extend_vocab to resize the embeddings)"
            )
        extend_vocab(model, tokenizer, cfg.extend_vocab, weights_from)
    return model




def old_token_rows(source: str | Path) -> int:
    """Rows of the init_from model's own tokens: its tokenizer's size, at most its vocab_size."""
    from transformers import AutoConfig

    from cpt.data.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(source)
        vocab = AutoConfig.from_pretrained(source).vocab_size
    except Exception as e:  # noqa: BLE001 - gone, or not a model dir: one line
        raise CptError(f"model.extend_vocab.train_rows: new needs the init_from model's tokenizer and config at "
                       f"{source} ({type(e).__name__}: {e})") from None
    return min(len(tok), vocab)


def extend_vocab(model, tokenizer, cfg, old_tokenizer_dir) -> dict[str, int]:
    """Resize ``model``'s embeddings (and untied head) to ``len(tokenizer)`` rounded up to
    ``cfg.pad_to_multiple_of`` (model.extend_vocab). The rows of the model's own tokenizer's tokens
    (``old_tokenizer_dir``) stay bit-identical; every row past them (new tokens, which may start inside the
    model's old padding rows, and the new padding) is initialised as ``cfg.init`` says: subword_mean = the
    mean of the rows of the old tokens a new token's text encodes to (padding rows: the mean of all old
    token rows), mean = the mean of all old token rows, random = the model's init (rows it already had
    keep their values). Returns {old, new} row counts."""
    import torch

    from cpt.data.tokenizer import load_tokenizer

    old_rows = model.get_input_embeddings().num_embeddings
    try:
        old_tok = load_tokenizer(old_tokenizer_dir)
    except CptError as e:
        if cfg.init == "subword_mean":
            raise CptError(f"model.extend_vocab.init: subword_mean needs the model's own tokenizer: {e}") from None
        old_tok = None
    known = min(len(old_tok), old_rows) if old_tok is not None else old_rows  # rows of real old tokens
    with torch.random.fork_rng(devices=[]):  # random rows come from the model's init; the RNG stream stays
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=cfg.pad_to_multiple_of,
                                      mean_resizing=False)
    new_rows = model.get_input_embeddings().num_embeddings
    if cfg.init == "random":
        return {"old": old_rows, "new": new_rows}
    sources: list[list[int] | None] = [None] * (new_rows - known)  # None: the mean of all old token rows
    if cfg.init == "subword_mean":
        added = tokenizer.added_tokens_decoder  # their text as written (decode would byte-map non-ASCII)
        for i, new_id in enumerate(range(known, min(new_rows, len(tokenizer)))):
            text = added[new_id].content if new_id in added else tokenizer.decode([new_id])
            if "\ufffd" in text:  # a piece of a UTF-8 character: no text of its own, the mean row
                continue
            ids = old_tok.encode(text, add_special_tokens=False)
            sources[i] = [t for t in ids if t < known] or None
    tables = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != tables[0].data_ptr():
        tables.append(head.weight)
    with torch.no_grad():
        for table in tables:
            mean = table[:known].mean(dim=0)
            for i, ids in enumerate(sources):
                table[known + i] = mean if ids is None else table[ids].mean(dim=0)
        if head is not None and getattr(head, "bias", None) is not None and head.bias.numel() == new_rows:
            head.bias[known:] = head.bias[:known].mean()
    return {"old": old_rows, "new": new_rows}


# Where architectures keep their longest position: Llama, Qwen, Gemma, ... | GPT-2 | Bloom-style configs.
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def position_limit(config) -> int | None:
    """The longest sequence a model config declares (None when it declares none). Dynamic NTK RoPE keeps
    ``max_position_embeddings`` at the trained context and stretches to ``factor`` times it as a sequence
    grows: its limit is that product."""
    for key in _POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            rope = getattr(config, "rope_parameters", None)
            if isinstance(rope, dict) and rope.get("rope_type") == "dynamic" and rope.get("factor"):
                return int(value * rope["factor"])
            return value
    return None


def check_seq_len(config, seq_len: int, where: str) -> None:
    """Refuse a data.seq_len past the model's positions at start, not as an IndexError mid-run."""
    limit = position_limit(config)
    if limit is not None and seq_len > limit:
        raise CptError(f"data.seq_len = {seq_len} is longer than the model's position limit ({limit}, "
                       f"{where}): prepare the data with --seq-len {limit} or less")


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ LoRA


def wrap_peft(model, cfg: PeftConfig, verbose: bool = True):
    """Freeze ``model`` and add LoRA adapters (plus full copies of ``modules_to_save``)."""
    from peft import LoraConfig, get_peft_model

    targets = list(cfg.target_modules) if cfg.target_modules else "all-linear"
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                      target_modules=targets, modules_to_save=list(cfg.modules_to_save) or None,
                      task_type="CAUSAL_LM")
    try:
        model = tie_saved_embeddings(get_peft_model(model, lora))
    except ValueError as e:  # e.g. "Target modules {...} not found in the base model"
        raise CptError(f"peft.target_modules / peft.modules_to_save: {e}") from None
    if verbose:
        trainable, total = model.get_nb_trainable_parameters()
        print(f"cpt: LoRA r={cfg.r} alpha={cfg.alpha:g} on {', '.join(sorted(model.peft_config['default'].target_modules))}"
              f"{' + full ' + ', '.join(cfg.modules_to_save) if cfg.modules_to_save else ''}: "
              f"{trainable / 1e6:.3f}M of {total / 1e6:.2f}M parameters trainable ({100 * trainable / total:.2f}%)")
    return model


def tie_saved_embeddings(model):
    """A peft model whose base ties its input embeddings to its head, with a full trainable copy of the
    embeddings (peft.modules_to_save, e.g. GPT-2's [wte]): make the head use that copy too. Otherwise the
    model trains new input embeddings under the old frozen head and its merged export, saved tied,
    is another model. (peft's ensure_weight_tying does this only for modules named embed_tokens.)"""
    from peft.utils import ModulesToSaveWrapper

    base = model.get_base_model()
    emb, head = base.get_input_embeddings(), base.get_output_embeddings()
    if (getattr(base.config, "tie_word_embeddings", False) and isinstance(emb, ModulesToSaveWrapper)
            and head is not None and not isinstance(head, ModulesToSaveWrapper)):
        head.weight = emb.modules_to_save[model.active_adapter].weight
    return model


def is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def is_peft_checkpoint(path: str | Path) -> bool:
    """A cpt checkpoint of a LoRA run: its weights are stored under peft's names, with the adapter
    config in ``adapter/`` (the run's final/ is a plain merged model and does not count)."""
    path = Path(path)
    weights = path / "model.safetensors"
    if not ((path / ADAPTER_DIR / "adapter_config.json").is_file() and weights.is_file()):
        return False
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        return any(k.startswith(_PEFT_PREFIX) for k in f.keys())


def _load_merged_peft_checkpoint(path: Path, config):
    """The model of a LoRA checkpoint with its adapter merged in: a plain causal LM. Used for init_from
    (a new stage starts from the merged weights; a recipe with peft then adds a fresh adapter) and for
    --resume (where load_state then restores the adapter-wrapped state exactly)."""
    import torch
    from peft import PeftConfig as HfPeftConfig
    from peft import get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):  # the init is overwritten; keep the RNG stream untouched
        base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = tie_saved_embeddings(get_peft_model(base, HfPeftConfig.from_pretrained(path / ADAPTER_DIR)))
    missing, unexpected = model.load_state_dict(load_file(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise CptError(f"{path}: the LoRA checkpoint does not match its adapter config "
                       f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    # peft froze the base weights; the merged model is a plain model again (wrap_peft re-freezes it)
    return model.merge_and_unload().requires_grad_(True)


def merged_copy(model, state_dict: dict):
    """A plain causal LM equal to the peft ``model`` with adapters merged, built from ``state_dict``
    (peft names, e.g. gathered by accelerate) on the CPU, leaving the training model untouched."""
    import copy

    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base_config = model.get_base_model().config
    with torch.random.fork_rng(devices=[]):
        base = AutoModelForCausalLM.from_config(base_config, dtype=torch.float32)
    clone = tie_saved_embeddings(get_peft_model(base, copy.deepcopy(model.peft_config[model.active_adapter])))
    clone.load_state_dict({k: v.to("cpu", torch.float32) for k, v in state_dict.items()}, strict=True)
    return clone.merge_and_unload()

"""Models: load any causal LM dir with from_pretrained, or build a Llama-shaped one from a preset."""

from __future__ import annotations

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
    except (TypeError, ValueError) as e:
        raise CptError(f"model.config: {e}") from None
    config._attn_implementation = cfg.attn_implementation
    return config


def build_model(cfg: ModelConfig, tokenizer, seed: int, weights_from: str | Path | None = None):
    """The model to train, in fp32 (autocast handles bf16): loaded from ``weights_from`` (any HF causal
    LM dir, or a cpt checkpoint, which is one) or built from ``cfg.preset`` with a seeded init."""
    import torch
    from transformers import AutoModelForCausalLM

    if weights_from is not None and is_peft_checkpoint(weights_from):
        model = _load_merged_peft_checkpoint(Path(weights_from), cfg)
    elif weights_from is not None:
        if not (Path(weights_from) / "config.json").is_file():
            raise CptError(f"init_from.path: {weights_from} has no config.json (a Hugging Face model dir "
                           f"or a cpt checkpoint is expected)")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(weights_from), dtype=torch.float32, attn_implementation=cfg.attn_implementation
            )
        except (OSError, ValueError) as e:
            raise CptError(f"init_from.path: cannot load a causal LM from {weights_from} ({e})") from None
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
        raise CptError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{model.config.vocab_size}: they do not belong together"
        )
    return model


# Where architectures keep their longest position: Llama, Qwen, Gemma, ... | GPT-2 | Bloom-style configs.
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def position_limit(config) -> int | None:
    """The longest sequence a model config declares (None when it declares none)."""
    for key in _POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
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

    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                      target_modules=list(cfg.target_modules), modules_to_save=list(cfg.modules_to_save) or None,
                      task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:  # e.g. "Target modules {...} not found in the base model"
        raise CptError(f"peft.target_modules / peft.modules_to_save: {e}") from None
    if verbose:
        trainable, total = model.get_nb_trainable_parameters()
        print(f"cpt: LoRA r={cfg.r} alpha={cfg.alpha:g} on {', '.join(cfg.target_modules)}"
              f"{' + full ' + ', '.join(cfg.modules_to_save) if cfg.modules_to_save else ''}: "
              f"{trainable / 1e6:.3f}M of {total / 1e6:.2f}M parameters trainable ({100 * trainable / total:.2f}%)")
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


def _load_merged_peft_checkpoint(path: Path, cfg: ModelConfig):
    """The model of a LoRA checkpoint with its adapter merged in: a plain causal LM. Used for init_from
    (a new stage starts from the merged weights; a recipe with peft then adds a fresh adapter) and for
    --resume (where load_state then restores the adapter-wrapped state exactly)."""
    import torch
    from peft import PeftConfig as HfPeftConfig
    from peft import get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    config._attn_implementation = cfg.attn_implementation
    with torch.random.fork_rng(devices=[]):  # the init is overwritten; keep the RNG stream untouched
        base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = get_peft_model(base, HfPeftConfig.from_pretrained(path / ADAPTER_DIR))
    missing, unexpected = model.load_state_dict(load_file(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise CptError(f"init_from.path: {path}: the LoRA checkpoint does not match its adapter config "
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
    clone = get_peft_model(base, copy.deepcopy(model.peft_config[model.active_adapter]))
    clone.load_state_dict({k: v.to("cpu", torch.float32) for k, v in state_dict.items()}, strict=True)
    return clone.merge_and_unload()


# ------------------------------------------------------------------------------------------- FLOPs/MFU

# Dense (no sparsity) bf16 tensor-core peak per GPU, from NVIDIA's data sheets. Matched in order
# against torch.cuda.get_device_name(), so the PCIe variants come before the SXM ones.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),
    ("H100", 989e12),   # SXM
    ("H200", 989e12),   # SXM; same tensor cores as H100 SXM, more memory
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10", 125e12),    # A10 / A10G
    ("L4", 121e12),
]


def peak_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a GPU named like torch.cuda.get_device_name(); None if unknown."""
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in device_name), None)


def matmul_params(model) -> tuple[int, int]:
    """(trainable, frozen) parameter counts that take part in matrix multiplies: every parameter except
    the input embedding table (a lookup, not a matmul; when tied to the LM head it is counted once, as
    the head). Call before the model is sharded (ZeRO-3/FSDP report 0 elements per parameter after)."""
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is emb
    trainable = frozen = 0
    for p in model.parameters():
        if p is emb and not tied:
            continue
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    return trainable, frozen


def flops_per_token(config, seq_len: int, trainable: int, frozen: int = 0) -> float:
    """Model FLOPs to train on one token (PaLM, Chowdhery et al. 2022, appendix B; nanoGPT's MFU):

    - 6 per trainable matmul parameter: 2 forward + 4 backward (input and weight gradients);
      4 per frozen one (LoRA's base weights: forward + input gradient, no weight gradient);
    - attention scores and the weighted sum: 12 · layers · (heads · head_dim) · seq_len, counting the
      full seq_len × seq_len matrix (no causal halving, as in PaLM).
    Not counted: norms, activations, softmax, the loss (small against the matmuls).
    """
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 6 * trainable + 4 * frozen + 12 * config.num_hidden_layers * heads * head_dim * seq_len

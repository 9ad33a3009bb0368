"""Models: load any causal LM dir with from_pretrained, or build a Llama-shaped one from a preset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cpt.errors import CptError
from cpt.recipe import ModelConfig

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


def build_model(cfg: ModelConfig, tokenizer, seed: int, weights_from: str | Path | None = None):
    """The model to train, in fp32 (autocast handles bf16): loaded from ``weights_from`` (any HF causal
    LM dir, or a cpt checkpoint, which is one) or built from ``cfg.preset`` with a seeded init."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if weights_from is not None:
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
        # Seed only the init, so that the data order and everything downstream stay independent of it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if len(tokenizer) > model.config.vocab_size:
        raise CptError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{model.config.vocab_size}: they do not belong together"
        )
    return model


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())

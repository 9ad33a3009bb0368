"""What a checkpoint save writes beside the weights and what it prints: generation_config.json as final/
has it, and accelerate's "Removed shared tensor" line silenced for the tie the model's config declares
(tied word embeddings), and only for it."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from cpt.checkpoint import SHARED_TENSOR_LOGGER, _TiedSaveFilter, save_checkpoint, tied_names
from cpt.state import Origin, TrainerState
from cpt.train.backend import eval_accelerator

SHARED = "Removed shared tensor"


def tiny(tied: bool):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2))


def save(model, run_dir):
    acc = eval_accelerator()
    prepared = acc.prepare(model)
    state = TrainerState(step=1, tokens=10, stage="a", sampler={}, data_consumed={}, mixture={}, lr=1e-3,
                         elapsed_s=1.0, tags=[], origin=Origin())
    return save_checkpoint(acc, run_dir, 1, state, "run: {}\n", keep_last=3, model=prepared)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_a_checkpoint_holds_generation_config_and_a_declared_tie_saves_quietly(tied, tmp_path, caplog, capfd):
    from transformers import AutoModelForCausalLM

    model = tiny(tied)
    assert tied_names(model) == ({"model.embed_tokens.weight", "lm_head.weight"} if tied else set())
    with caplog.at_level(logging.WARNING):
        ckpt = save(model, tmp_path / "run")
    assert SHARED not in caplog.text and SHARED not in capfd.readouterr().err
    model.save_pretrained(tmp_path / "hf")  # transformers' own export, as final/ is written
    gen = json.loads((ckpt / "generation_config.json").read_text())
    assert gen == json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2
    back = AutoModelForCausalLM.from_pretrained(ckpt)  # the tie comes back from the config
    assert (back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()) == tied
    assert torch.equal(back.lm_head.weight, model.lm_head.weight)


def test_a_tie_the_config_does_not_declare_is_still_reported(tmp_path, caplog):
    """An untied config whose head was pointed at the embeddings at runtime: accelerate drops a tensor that
    from_pretrained will not restore; that line stays."""
    model = tiny(False)
    model.lm_head.weight = model.model.embed_tokens.weight
    assert tied_names(model) == set()
    with caplog.at_level(logging.WARNING):
        save(model, tmp_path / "run")
    assert f"{SHARED} {{'lm_head.weight'}} while saving" in caplog.text


def test_the_filter_drops_only_the_known_names():
    quiet = _TiedSaveFilter({"model.embed_tokens.weight", "lm_head.weight"})

    def passes(removed: str) -> bool:
        msg = f"[RANK 0] {SHARED} {removed} while saving. This should be OK, but check by verifying ..."
        return quiet.filter(logging.LogRecord(SHARED_TENSOR_LOGGER, logging.WARNING, __file__, 1, msg, None, None))

    assert not passes("{'lm_head.weight'}") and not passes("{'module.lm_head.weight'}")  # DDP's prefix too
    assert passes("{'lm_head.weight', 'model.layers.0.mlp.up_proj.weight'}")  # one unknown name: reported
    assert passes("{'model.layers.0.mlp.up_proj.weight'}") and passes("{'xlm_head.weight'}")
    assert passes("set()") and passes("{not a literal}")
    assert quiet.filter(logging.LogRecord(SHARED_TENSOR_LOGGER, logging.WARNING, __file__, 1, "other", None, None))

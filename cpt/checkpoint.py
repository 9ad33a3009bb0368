"""Checkpoints: one named bundle per save, written atomically.

Layout of a run directory::

    recipe.yaml                  the resolved recipe of the run
    metrics.jsonl                one record per step / probe
    checkpoints/step-00000120/   accelerate state (model.safetensors, optimizer, RNG of every rank),
                                 trainer_state.json (counters, sampler state, last LR, tags), recipe.yaml,
                                 config.json, generation_config.json + tokenizer: the dir is also a
                                 Hugging Face model dir, with the same generation defaults as final/
    final/                       the exported Hugging Face model dir (safetensors) + tokenizer

With LoRA (recipe ``peft:``) a checkpoint's weights carry peft's names and its ``adapter/`` holds the
adapter (peft ``save_pretrained``); ``final/`` is the merged model and ``final/adapter/`` the adapter.
Under DeepSpeed or FSDP accelerate writes its own sharded model files; the gathered weights are written
beside them as ``model.safetensors`` so that a checkpoint stays a model dir (init_from reads it).

A checkpoint is written under ``checkpoints/.tmp-step-...`` and renamed into place when complete: the
rename is the commit, so a kill during a save leaves the previous checkpoints intact and the latest
checkpoint is simply the highest complete ``step-*`` directory (no pointer file to get out of sync).
Checkpoints with tags (``stage_end:<name>``, ``pre_anneal``) are kept whatever ``keep_last`` says:
the next stage or a decay branch starts from them.

A model whose config ties its head to its word embeddings (``tie_word_embeddings``: SmolLM2, Gemma,
Qwen 2 small) holds one tensor under two names; accelerate writes it once and logs "Removed shared
tensor {'lm_head.weight'} while saving. This should be OK, but check..." at every save. The tie is the
model's own and from_pretrained restores it, so that line is dropped for exactly those names
(:func:`quiet_tied_save`); any other shared tensor is still reported.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from cpt.errors import CptError
from cpt.model import ADAPTER_DIR, is_peft, merged_copy
from cpt.state import (  # noqa: F401  (checkpoint_dirs, find_checkpoint: part of this module's API)
    STATE_FILE,
    STEP_DIR,
    TrainerState,
    checkpoint_dirs,
    find_checkpoint,
    latest_checkpoint,
    read_trainer_state,
)
from cpt.train.backend import collective_failure, weights_sharded


def save_checkpoint(accelerator, run_dir: str | Path, step: int, state: TrainerState, recipe_yaml: str,
                    keep_last: int, model=None, tokenizer=None, write_extra=None) -> Path:
    """Save model, optimizer, RNG (all ranks) and trainer state; prune untagged ones to ``keep_last``.
    ``write_extra(dir)``: writes more of the run's state into the checkpoint (main process, before the
    commit), e.g. the mitigations' reference and EMA weights.

    A write that fails (disk full, quota, a vanished mount) removes its temporary dir and is one line
    that says the earlier checkpoints are intact: the rename below is the commit, so nothing partial
    can be taken for a checkpoint. A collective that fails meanwhile (a lost or frozen peer) is raised as
    it is, for the loop to report as such."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-{final.name}"
    try:
        return _save_checkpoint(accelerator, run_dir, root, final, tmp, state, recipe_yaml, keep_last, model,
                                tokenizer, write_extra)
    except Exception as e:  # OSError from open(), RuntimeError from torch.save, SafetensorError, ...
        shutil.rmtree(tmp, ignore_errors=True)
        if collective_failure(e):  # a peer died or froze during the save: not a disk problem (the loop says so)
            raise
        raise CptError(f"checkpoint {final} could not be written ({_why(e)}); nothing partial was kept and the "
                       f"earlier checkpoints are intact: free space, then --resume") from None


def _why(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def _save_checkpoint(accelerator, run_dir, root: Path, final: Path, tmp: Path, state, recipe_yaml, keep_last,
                     model, tokenizer, write_extra) -> Path:
    if accelerator.is_main_process:
        for stale in root.glob(".tmp-*") if root.is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)  # left by a run killed mid-save
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with quiet_tied_save(accelerator.unwrap_model(model) if model is not None else None):
        accelerator.save_state(str(tmp), safe_serialization=True)
    peft = model is not None and is_peft(accelerator.unwrap_model(model))
    sharded = model is not None and weights_sharded(accelerator)
    # every rank takes part: gathers ZeRO-3 / FSDP shards (cheap references otherwise)
    state_dict = accelerator.get_state_dict(model) if peft or sharded else None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if model is not None:  # accelerate writes HF parameter names: with the config, from_pretrained loads it
            unwrapped = accelerator.unwrap_model(model)
            base = unwrapped.get_base_model() if peft else unwrapped
            base.config.save_pretrained(tmp)
            if base.can_generate() and base.generation_config is not None:  # as save_pretrained writes final/'s
                base.generation_config.save_pretrained(tmp)
            if sharded:
                from accelerate.utils import save

                with quiet_tied_save(unwrapped):
                    save(state_dict, tmp / "model.safetensors", safe_serialization=True)
            if peft:
                unwrapped.save_pretrained(tmp / ADAPTER_DIR, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / STATE_FILE).write_text(json.dumps(state.to_json(), indent=1))
        (tmp / "recipe.yaml").write_text(recipe_yaml)
        if write_extra is not None:
            write_extra(tmp)
        if final.exists():  # the same step saved again after a resume: replace it
            old = root / f".old-{final.name}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        untagged = [d for d in checkpoint_dirs(run_dir) if not read_trainer_state(d).tags]
        for old in untagged[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


SHARED_TENSOR_LOGGER = "accelerate.utils.other"  # accelerate.utils.other.clean_state_dict_for_safetensors
_SHARED_TENSOR = re.compile(r"Removed shared tensor (\{.*?\}) while saving")


def tied_names(model) -> set[str]:
    """The state-dict names of ``model`` (unwrapped from DDP / DeepSpeed; a peft model as it is) under which
    its word embeddings are stored when its config ties the head to them (``tie_word_embeddings``) and
    the head's weight is that very tensor; empty otherwise."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
    if not getattr(config, "tie_word_embeddings", False):
        return set()
    inputs, head = hf.get_input_embeddings(), hf.get_output_embeddings()
    weight = getattr(inputs, "weight", None)
    if weight is None or getattr(head, "weight", None) is not weight:
        return set()
    return {name for name, t in model.state_dict(keep_vars=True).items() if t is weight}


class _TiedSaveFilter(logging.Filter):
    """Drops accelerate's "Removed shared tensor {...} while saving" when every name it removed is one of
    ``names`` (or that name under a wrapper's prefix, ``module.lm_head.weight``); passes all else."""

    def __init__(self, names: set[str]):
        super().__init__()
        self.names = names

    def _known(self, removed: str) -> bool:
        return any(removed == n or removed.endswith("." + n) for n in self.names)

    def filter(self, record: logging.LogRecord) -> bool:
        m = _SHARED_TENSOR.search(record.getMessage())
        if m is None:
            return True
        try:
            removed = ast.literal_eval(m.group(1))
        except (ValueError, SyntaxError):
            return True
        return not (isinstance(removed, set) and removed and all(isinstance(r, str) and self._known(r)
                                                                for r in removed))


@contextmanager
def quiet_tied_save(model):
    """Inside: accelerate's shared-tensor line is silent for the tie ``model``'s config declares
    (:func:`tied_names`), and only for it. ``model``: unwrapped, or None (nothing silenced)."""
    names = tied_names(model) if model is not None else set()
    if not names:
        yield
        return
    logger, quiet = logging.getLogger(SHARED_TENSOR_LOGGER), _TiedSaveFilter(names)
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


_RNG_KEYS = ("random_state", "numpy_random_seed", "torch_manual_seed")


def safe_torch_load(f: Path, mmap: bool = False):
    """``torch.load`` that runs no code: tensors, containers, numbers and the numpy RNG-state types only
    (``weights_only``). A file that needs more (a planted payload) or is not a torch file at all is a
    CptError naming it. ``mmap`` maps the tensors instead of reading them: a cheap check of the file."""
    import torch
    from accelerate.utils.other import TORCH_SAFE_GLOBALS  # numpy arrays and dtypes of accelerate's RNG file

    try:
        with torch.serialization.safe_globals(TORCH_SAFE_GLOBALS):
            return torch.load(f, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # UnpicklingError, a zip error from a truncated file, EOFError, ...
        raise CptError(f"{f}: refused: not a plain tensor file, or truncated ({_why(e)})") from None


def load_checkpoint(accelerator, ckpt: str | Path) -> TrainerState:
    """Restore model, optimizer and RNG states in place; return the trainer state.

    accelerate's loader swallows a bad RNG file (the run would go on with other random numbers) and
    raises raw errors for the rest, so every pickle-based file of this rank is checked first, by mapping
    it without running code; then any failure of the load itself names the checkpoint."""
    state = read_trainer_state(ckpt)
    ckpt = Path(ckpt)
    rng = ckpt / f"random_states_{accelerator.process_index}.pkl"
    if not rng.is_file():
        raise CptError(f"{ckpt}: no {rng.name}: the checkpoint is incomplete")
    states = safe_torch_load(rng)
    if not isinstance(states, dict) or any(k not in states for k in _RNG_KEYS):
        raise CptError(f"{rng}: not an RNG state file (expected keys {', '.join(_RNG_KEYS)})")
    for f in sorted(ckpt.glob("optimizer*.bin")):
        safe_torch_load(f, mmap=True)
    try:
        accelerator.load_state(str(ckpt))
    except Exception as e:  # safetensors / torch / shape errors of a damaged file
        raise CptError(f"{ckpt}: cannot restore the training state ({_why(e)})") from None
    return state


def load_optimizer_state(optimizer, ckpt: str | Path) -> None:
    """Load AdamW moments from a cpt checkpoint into ``optimizer``, keeping its hyperparameters.

    torch only checks group sizes; the shapes are checked here so that moments of another
    architecture are refused instead of silently broadcast."""

    # Under train.deepspeed the recipe refuses init_from.load.optimizer, so no DeepSpeed type is needed here.
    if (Path(ckpt) / ADAPTER_DIR).is_dir():
        raise CptError(f"{ckpt} is a LoRA checkpoint: init_from merges its adapter into the weights (a recipe "
                       f"with peft then starts a fresh adapter), so its optimizer moments belong to no parameter "
                       f"here; set init_from.load.optimizer: false (to continue the same adapter, --resume the run "
                       f"or add a stage to it)")
    f = Path(ckpt) / "optimizer.bin"
    if not f.is_file():
        if (Path(ckpt) / "pytorch_model").is_dir():
            raise CptError(f"{ckpt} was written under DeepSpeed: its optimizer state is in DeepSpeed's "
                           f"partitioned format, which init_from cannot load; set init_from.load.optimizer: false")
        raise CptError(f"{ckpt}: no optimizer state (optimizer.bin)")
    saved = safe_torch_load(f)  # init_from may name a checkpoint someone else wrote: no code runs
    if not isinstance(saved, dict) or not {"state", "param_groups"} <= set(saved):
        raise CptError(f"{f}: not an optimizer state (expected 'state' and 'param_groups')")
    groups = optimizer.param_groups
    if len(saved["param_groups"]) != len(groups):
        raise CptError(f"{ckpt}: optimizer state has {len(saved['param_groups'])} parameter groups, "
                       f"this model has {len(groups)}")
    for i, (old, new) in enumerate(zip(saved["param_groups"], groups, strict=True)):
        if len(old["params"]) != len(new["params"]):
            raise CptError(f"{ckpt}: optimizer group {i} holds {len(old['params'])} tensors, this model "
                           f"has {len(new['params'])}: another architecture")
        for pid, p in zip(old["params"], new["params"], strict=True):
            moment = saved["state"].get(pid, {}).get("exp_avg")
            if moment is not None and tuple(moment.shape) != tuple(p.shape):
                raise CptError(f"{ckpt}: optimizer moment of shape {tuple(moment.shape)} for a parameter "
                               f"of shape {tuple(p.shape)}: another architecture")
        old.update({k: v for k, v in new.items() if k != "params"})  # this recipe's betas, wd, ...
    optimizer.load_state_dict(saved)


def export_model(accelerator, model, tokenizer, out_dir: str | Path, dtype=None) -> Path:
    """Write a Hugging Face model dir (safetensors + tokenizer) that from_pretrained loads, its weights in
    ``dtype`` (None: as trained). A LoRA model is written merged (base + adapters), with the adapter alone
    in ``adapter/``."""
    out = Path(out_dir)
    tmp = out.with_name(f".tmp-{out.name}")
    state_dict = accelerator.get_state_dict(model)  # every rank: gathers sharded (ZeRO-3/FSDP) weights
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model)
        try:
            if is_peft(unwrapped):
                unwrapped.save_pretrained(tmp / ADAPTER_DIR, state_dict=state_dict)
                merged = merged_copy(unwrapped, state_dict)
                (merged.to(dtype) if dtype is not None else merged).save_pretrained(tmp, safe_serialization=True)
            else:
                if dtype is not None:
                    state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
                unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            if dtype is not None:  # save_pretrained records the live (fp32) parameters' dtype, not the file's
                config = json.loads((tmp / "config.json").read_text())
                config["dtype"] = str(dtype).removeprefix("torch.")
                (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            tokenizer.save_pretrained(tmp)
        except Exception as e:  # see save_checkpoint
            shutil.rmtree(tmp, ignore_errors=True)
            raise CptError(f"{out} could not be written ({_why(e)}); the run's last checkpoint holds the same "
                           f"weights: free space, then --resume exports it") from None
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    accelerator.wait_for_everyone()
    return out

"""Everything a run needs before its first step, in one place: the checkpoint to resume or the origin to
start from, the plan, the tokenizer and the checked data, the model, optimizer and Accelerator, the
tracker. :func:`check_recipe` (``cpt train --dry-run``) runs the same checks without building anything.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from cpt import checkpoint as ckpt_lib
from cpt import mitigate
from cpt.data.source import SubsetSource, TokenSource, validate_source
from cpt.data.tokenizer import load_tokenizer, tokenizer_identity
from cpt.errors import CptError
from cpt.guard import StepGuard
from cpt.model import build_model, check_seq_len, model_config, num_params, preset_config, wrap_peft
from cpt.plan import RunPlan, describe_origin, plan_run
from cpt.recipe import Recipe, recipe_diff
from cpt.tracking import Tracker
from cpt.train.backend import (
    deepspeed_plugin,
    head_gatherable,
    make_accelerator,
    mfu_per_token_s,
    params_sharded,
    settler,
)
from cpt.train.loss import choose_loss
from cpt.train.state import TrainerState
from cpt.train.step import Layout, make_optimizer, model_inputs


@dataclass
class Run:
    """A run being trained: its parts (built once by :func:`setup`) and its counters (moved by the loop)."""

    recipe: Recipe
    accelerator: Any
    layout: Layout
    plan: RunPlan
    model: Any
    optimizer: Any
    tokenizer: Any
    sources: dict[str, TokenSource | SubsetSource]
    vocab: int                        # embedding rows: token ids past it are refused before the forward
    guard: StepGuard
    tracker: Tracker
    mfu_per_token_s: float | None
    saved: TrainerState | None        # the state resumed from (None: a fresh start)
    resume_from: Path | None
    step: int
    tokens: int
    elapsed: float
    consumed: dict[str, int]          # draws per source before the current stage (the next one's offsets)
    loss: Any = None                  # (model, inputs) -> loss, and .token_nll for probes (cpt.train.loss)
    l2_init: Any = None               # cpt.mitigate.l2_init(...) (recipe mitigate.l2_init), or None
    ema: Any = None                   # cpt.mitigate.EMA (mitigate.ema), or None
    old_rows: Any = None              # cpt.model.OldRows (model.extend_vocab.train_rows: new), or None
    warned: set[str] = field(default_factory=set)  # sources already warned about repeats

    def frame(self, ids):
        """Packed token ids -> the forward's inputs (document masking, document-start loss)."""
        data = self.recipe.data
        eos = next(iter(self.sources.values())).eos_token_id
        return model_inputs(ids, eos, data.document_masking, data.document_start_loss)

    @property
    def export_dtype(self):
        """dtype of final/: model.export_dtype, or (auto) the dtype the weights came in."""
        from cpt.model import source_dtype

        want = self.recipe.model.export_dtype
        if want != "auto":
            return getattr(torch, want)
        model = self.accelerator.unwrap_model(self.model)
        return source_dtype((model.get_base_model() if self.recipe.peft is not None else model).config)

    @property
    def mitigations(self) -> dict:
        """The mitigations with state of their own (saved in every checkpoint), by name."""
        return _mitigation_parts(self.l2_init, self.ema)

    @property
    def run_dir(self) -> Path:
        return Path(self.recipe.run.output_dir)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def tokens_per_step(self) -> int:
        return self.recipe.train.global_batch_tokens


def open_keyed(key: str, opener, *args, **kwargs):
    """Open something a recipe names, prefixing any error with the recipe key that named it."""
    try:
        return opener(*args, **kwargs)
    except CptError as e:
        raise CptError(f"{key}: {e}") from None


def open_data(recipe: Recipe, model_dir: str | Path | None):
    """The tokenizer (model.tokenizer, else the model dir's) and the training sources; every source and
    probe set is checked against it (validate_source)."""
    tok_path = recipe.model.tokenizer or str(model_dir)
    tok_key = "model.tokenizer" if recipe.model.tokenizer else "init_from.path"
    tokenizer = open_keyed(tok_key, load_tokenizer, tok_path)
    tok_id = open_keyed(tok_key, tokenizer_identity, tok_path, tokenizer)
    seq_len = recipe.data.seq_len
    sources: dict[str, TokenSource | SubsetSource] = {}
    for name, path in recipe.data.sources.items():
        src = validate_source(f"data.sources.{name}", path, seq_len, tok_id)
        if name in recipe.data.replay_buffer:
            size = recipe.data.replay_buffer[name] // seq_len
            src = open_keyed(f"data.replay_buffer.{name}", SubsetSource, src, size, recipe.run.seed, name)
        sources[name] = src
    probe_sets = {name: validate_source(f"probes.sets.{name}", path, seq_len, tok_id)
                  for name, path in recipe.probes.sets.items()}
    return tokenizer, sources, probe_sets


def start_or_resume(recipe: Recipe, resume: bool, allow_changes: tuple[str, ...]) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run; refuses to mix the two up."""
    run_dir = Path(recipe.run.output_dir)
    latest = ckpt_lib.latest_checkpoint(run_dir)
    if not resume:
        if latest is not None:
            raise CptError(
                f"run.output_dir {run_dir} already holds checkpoints ({latest.name}): continue that run "
                f"with --resume, or choose another run.output_dir"
            )
        return None
    if latest is None:
        raise CptError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
    try:
        saved = yaml.safe_load((latest / "recipe.yaml").read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CptError(f"--resume: {latest / 'recipe.yaml'} cannot be read ({type(e).__name__})") from None
    if not isinstance(saved, dict):
        raise CptError(f"--resume: {latest / 'recipe.yaml'} is not a recipe")
    changed = {
        k: v for k, v in recipe_diff(saved, recipe.to_dict()).items()
        if not any(k == a or k.startswith(a + ".") for a in allow_changes)
    }
    if changed:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise CptError(
            f"--resume: the recipe differs from the checkpoint's in {listed} "
            f"(pass --allow-change KEY for each change you mean)"
        )
    return latest


def check_recipe(recipe: Recipe, resume: bool = False, allow_changes: tuple[str, ...] = ()) -> str:
    """Everything ``cpt train --dry-run`` can check without training: the checkpoint to resume or start
    from, the stage plan, the batch layout at this launch's world size, the tokenizer, every source and
    probe set (exists, seq_len, tokenizer), the model's position limit and a DeepSpeed config. Returns
    a one-line summary; raises CptError naming the first problem."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    layout = Layout.from_recipe(recipe, world)
    resume_from = start_or_resume(recipe, resume, allow_changes)
    plan = plan_run(recipe)
    tokenizer, sources, probe_sets = open_data(recipe, resume_from or plan.origin.path)
    if recipe.init_from is not None and recipe.init_from.load.weights:
        config, _ = open_keyed("init_from.path", model_config, plan.origin.path, recipe.model.config,
                               recipe.model.trust_remote_code)
        where = f"config of {plan.origin.path}"
    else:
        config, where = preset_config(recipe.model, tokenizer), f"model.preset {recipe.model.preset}"
    check_seq_len(config, recipe.data.seq_len, where)
    if recipe.train.deepspeed is not None:
        deepspeed_plugin(recipe.train.deepspeed)
    return (f"recipe checks passed: {len(plan.stages)} stage(s) to token {plan.end}, {len(sources)} source(s), "
            f"{len(probe_sets)} probe set(s), {world} process(es) x grad accum {layout.grad_accum}"
            f"{f', resuming {resume_from.name}' if resume_from else ''}")


def setup(recipe: Recipe, resume: bool, allow_changes: tuple[str, ...]) -> tuple[Run, dict[str, TokenSource]]:
    """Build the run: (Run, its checked probe sets)."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(recipe)
    main = accelerator.is_main_process
    run_dir = Path(recipe.run.output_dir)
    layout = Layout.from_recipe(recipe, accelerator.num_processes)
    accelerator.gradient_accumulation_steps = layout.grad_accum
    step_tokens = recipe.train.global_batch_tokens

    # Where the counters start: the checkpoint being resumed (its own record of the run's origin),
    # or init_from (a new stage), or zero. Stages are planned from that alone.
    resume_from = start_or_resume(recipe, resume, allow_changes)
    saved = ckpt_lib.read_trainer_state(resume_from) if resume_from else None
    plan = plan_run(recipe, saved.origin if saved else None)
    origin = plan.origin
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    set_seed(recipe.run.seed)

    # A cpt checkpoint is also an HF model dir (config, weights, tokenizer): on resume the model is
    # built from our own checkpoint, then load_state restores weights, optimizer and RNG exactly.
    weights_from = origin.path if recipe.init_from and recipe.init_from.load.weights else None
    if resume_from is not None and weights_from is not None:
        weights_from = str(resume_from)
    tokenizer, sources, probe_sets = open_data(recipe, resume_from or origin.path)

    model = build_model(recipe.model, tokenizer, recipe.run.seed, weights_from)
    if weights_from is not None and recipe.model.config and not saved and main:
        _, changes = model_config(weights_from, recipe.model.config, recipe.model.trust_remote_code)
        print("cpt: model.config: " + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items()))
    check_seq_len(model.config, recipe.data.seq_len,
                  f"config of {weights_from}" if weights_from else f"model.preset {recipe.model.preset}")
    vocab = model.get_input_embeddings().num_embeddings
    if recipe.model.extend_vocab is not None and weights_from is not None and not saved and main:
        print(f"cpt: model.extend_vocab: {vocab} embedding rows for the tokenizer's {len(tokenizer)} tokens "
              f"(new rows: {recipe.model.extend_vocab.init})")
    for name, src in sources.items():  # what the manifest says, at start; read_batch checks the ids read
        if src.max_token_id is not None and src.max_token_id >= vocab:
            raise CptError(f"data.sources.{name}: {recipe.data.sources[name]} holds token ids up to "
                           f"{src.max_token_id}, but the model has {vocab} embeddings")
    if recipe.train.activation_checkpointing:  # non-reentrant: works under DDP, ZeRO, FSDP and LoRA alike
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if recipe.peft is not None:  # frozen base + adapters; make_optimizer takes only what requires grad
        model = wrap_peft(model, recipe.peft, verbose=main)
    mit = recipe.mitigate
    if mit.freeze:  # before the optimizer and DDP, which take what requires grad
        frozen = open_keyed("mitigate.freeze", mitigate.freeze, model, mit.freeze)
        _print_counts(main, "frozen", frozen)
    n_params = num_params(model)  # counted before ZeRO-3/FSDP shard the parameters
    mfu = mfu_per_token_s(model, recipe, accelerator)
    if recipe.train.compile:
        # compile afresh, as a new process would, and one static graph per shape: which kernels run must not
        # depend on what ran before (graphs cached by an earlier run in this process; dynamic shapes that
        # a resumed run, which skips the stage's baseline probe, would switch to at another step), or a
        # resume would not be exact
        torch._dynamo.reset()
        model.compile(dynamic=False)  # in place: parameter names, and so checkpoints, stay the plain model's
    optimizer, scaled = open_keyed("mitigate.lr_multipliers", make_optimizer, model, recipe.train.optimizer,
                                   plan.stages[0].lr(origin.tokens), accelerator.device.type, mit.lr_multipliers)
    _print_counts(main, "lr x", scaled, mit.lr_multipliers)
    model, optimizer = accelerator.prepare(model, optimizer)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
    loss, note = choose_loss(recipe.train.loss, accelerator.unwrap_model(model), not head_gatherable(accelerator), vocab,
                             compute_dtype=autocast)
    if note and main:
        print(f"cpt: {note}")
    if recipe.probes.lm_eval is not None:
        _check_lm_eval(recipe.probes.lm_eval, params_sharded(accelerator))
    if resume_from is not None:
        ckpt_lib.load_checkpoint(accelerator, resume_from)
    elif recipe.init_from is not None and recipe.init_from.load.optimizer:
        open_keyed("init_from.load.optimizer", ckpt_lib.load_optimizer_state, optimizer, origin.path)

    l2_init = ema = None
    if mit.stateful:
        if why := mitigate.unsupported(accelerator):
            raise CptError(f"mitigate.{why}")
        weights = accelerator.unwrap_model(model)
        settle = settler(model, weights)
        if mit.l2_init > 0:
            zero = getattr(optimizer, "optimizer", None) if recipe.train.deepspeed is not None else None
            l2_init = mitigate.l2_init(weights, mit.l2_init, zero, settle)
        ema = mitigate.EMA(weights, mit.ema.decay, mit.ema.every, settle) if mit.ema is not None else None
        if resume_from is not None:
            mitigate.load_state(resume_from / mitigate.STATE_FILE, _mitigation_parts(l2_init, ema))

    old_rows = _old_rows(recipe, accelerator, model, origin.path, main)

    guard = StepGuard(recipe.train.on_nonfinite, recipe.train.max_skipped_steps, recipe.train.spike_factor,
                      recipe.train.spike_window, check_grad_norm=recipe.train.precision != "fp16")
    guard.load_state_dict(saved.guard if saved else None)
    step, tokens = (saved.step, saved.tokens) if saved else (origin.step, origin.tokens)
    tracker = Tracker(run_dir, recipe.to_dict(), enabled=main, resume_step=step if saved else None,
                      wandb_cfg=recipe.tracking.wandb, keep_records=saved.metrics_records if saved else None)
    run = Run(recipe, accelerator, layout, plan, model, optimizer, tokenizer, sources, vocab, guard, tracker, mfu,
              saved, resume_from, step, tokens, saved.elapsed_s if saved else 0.0,
              dict(saved.data_consumed) if saved else dict(origin.consumed), loss=loss, l2_init=l2_init, ema=ema,
              old_rows=old_rows)
    if main:
        how = f"resumed from {resume_from}" if saved else "fresh start"
        print(f"cpt: {recipe.run.name}: {n_params / 1e6:.2f}M params, "
              f"{len(plan.stages)} stage(s), {(plan.end - tokens) // step_tokens} steps x {step_tokens} tokens to go, "
              f"{accelerator.num_processes} process(es), grad accum {layout.grad_accum}; {how}")
    if saved:
        _note_schedule_change(run)
    else:
        _log_init(run)
    model.train()
    return run, probe_sets


def _old_rows(recipe: Recipe, accelerator, model, source: str | None, main: bool):
    """model.extend_vocab.train_rows: new -> the OldRows keeper of the init_from model's own token rows."""
    from accelerate.utils import DistributedType

    from cpt.model import OldRows, old_token_rows

    ext = recipe.model.extend_vocab
    if ext is None or ext.train_rows == "all":
        return None
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP) or recipe.peft is not None:
        raise CptError("model.extend_vocab.train_rows: new restores rows of the module's weights after each update: "
                       "not with DeepSpeed / FSDP (they update copies or shards of their own) or peft")
    if source is None:
        raise CptError("model.extend_vocab.train_rows: new needs init_from (the model whose rows stay)")
    rows = old_token_rows(source)
    keeper = OldRows(accelerator.unwrap_model(model), rows)
    if main:
        print(f"cpt: model.extend_vocab.train_rows: new: rows 0..{rows - 1} (the tokens of {source}) of "
              f"{len(keeper.kept)} table(s) kept; rows {rows}.. train")
    return keeper


def _mitigation_parts(l2_init, ema) -> dict:
    return {k: v for k, v in (("l2_init", l2_init), ("ema", ema)) if v is not None}


def _print_counts(main: bool, what: str, counts: dict[str, tuple[int, int]], factors=None) -> None:
    """One line per mitigate pattern: what it matched."""
    for pattern, (tensors, params) in counts.items() if main else ():
        factor = f" {factors[pattern]:g}" if factors else ""
        print(f"cpt: mitigate: {what}{factor} {pattern!r}: {tensors} tensors, {params / 1e6:.3f}M parameters")


def _note_schedule_change(run: Run) -> None:
    """On resume: say so when the recipe's schedule no longer continues the checkpoint's (e.g.
    train.tokens raised with --allow-change, which moves a horizon-dependent schedule)."""
    tokens, end = run.tokens, run.plan.end
    if tokens >= end or run.saved.next_lr is None:
        return
    lr_now = run.plan.stage_at(tokens).lr(tokens)
    if math.isclose(lr_now, run.saved.next_lr, rel_tol=1e-9, abs_tol=1e-15):
        return
    run.tracker.log({"step": run.step, "tokens": tokens, "event": "schedule_change",
                     "schedule_change/lr_was": run.saved.next_lr, "schedule_change/lr": lr_now,
                     "schedule_change/end_tokens": end})
    if run.main:
        print(f"cpt: note: the recipe's schedule differs from the checkpoint's: the LR at token {tokens} goes "
              f"from {run.saved.next_lr:.3e} to {lr_now:.3e}; the run now ends at token {end} "
              f"({(end - tokens) // run.tokens_per_step} more steps)")


def _log_init(run: Run) -> None:
    """A fresh start: what init_from loaded and reset, and an LR jump where a schedule is continued."""
    recipe, origin = run.recipe, run.plan.origin
    loaded, reset = describe_origin(recipe, origin)
    if run.main:
        print(f"cpt: init from {origin.path or 'scratch'}: loaded {', '.join(loaded) or 'nothing'}; "
              f"reset {', '.join(reset) or 'nothing'}")
    run.tracker.log({"step": run.step, "tokens": run.tokens, "event": "init", "init/path": origin.path,
                     "init/loaded": loaded, "init/reset": reset})
    lr0 = run.plan.stages[0].lr(run.tokens)
    if origin.next_lr is not None and recipe.init_from.load.schedule_state and not math.isclose(
            lr0, origin.next_lr, rel_tol=1e-9, abs_tol=1e-15) and run.main:
        print(f"cpt: note: the LR goes from {origin.next_lr:.3e} (where the checkpoint's schedule was going) "
              f"to {lr0:.3e} at token {run.tokens}; lengths given as fractions refer to the whole horizon")


def _check_lm_eval(cfg, sharded: bool) -> None:
    """probes.lm_eval: refused where the weights are sharded; lm_eval installed and every task known, before
    the first step (a misspelt task must not stop a run hours in)."""
    from cpt.lm_eval import check_tasks, task_manager

    if sharded:
        raise CptError("probes.lm_eval: runs on the main process, which with ZeRO-3 / FSDP holds a shard of the "
                       "weights; probe a saved checkpoint with cpt probe --lm-eval instead")
    try:
        check_tasks(cfg.tasks, task_manager(cfg.include))
    except CptError as e:
        raise CptError(f"probes.lm_eval: {e}") from None

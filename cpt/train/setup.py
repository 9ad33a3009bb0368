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
from cpt.mitigate import Mitigation
from cpt.model import (
    build_model,
    check_seq_len,
    model_config,
    num_params,
    preset_config,
    source_dtype,
    wrap_peft,
)
from cpt.plan import RunPlan, describe_origin, plan_run
from cpt.recipe import Recipe, recipe_diff, validate_recipe
from cpt.state import TrainerState
from cpt.tracking import Tracker
from cpt.train.backend import (
    deepspeed_plugin,
    head_gatherable,
    make_accelerator,
    mfu_per_token_s,
    params_sharded,
)
from cpt.train.layout import Layout
from cpt.train.loss import choose_loss
from cpt.train.optim import make_optimizer
from cpt.train.step import model_inputs
from cpt.train.weights import weights_of


@dataclass(frozen=True)
class Run:
    """A run's parts, built once by :func:`setup`: the loop reads them and replaces none (the guard, the
    tracker and the mitigations keep state of their own, saved in checkpoints)."""

    recipe: Recipe
    accelerator: Any
    layout: Layout
    plan: RunPlan
    model: Any
    optimizer: Any
    tokenizer: Any
    sources: dict[str, TokenSource | SubsetSource]
    probe_sets: dict[str, TokenSource]  # probes.sets, checked against the tokenizer and seq_len
    vocab: int                        # embedding rows: token ids past it are refused before the forward
    guard: StepGuard
    tracker: Tracker
    loss: Any                         # (model, inputs) -> loss, and .token_nll for probes (cpt.train.loss)
    mitigations: tuple[Mitigation, ...] = ()  # cpt.mitigate.build: hooks called in this order
    mfu_per_token_s: float | None = None
    saved: TrainerState | None = None  # the state resumed from (None: a fresh start)
    resume_from: Path | None = None

    def frame(self, ids):
        """Packed token ids -> the forward's inputs (document masking, document-start loss)."""
        data = self.recipe.data
        eos = next(iter(self.sources.values())).eos_token_id
        return model_inputs(ids, eos, data.document_masking, data.document_start_loss)

    @property
    def export_dtype(self):
        """dtype of final/: model.export_dtype, or (auto) the dtype the weights came in."""
        want = self.recipe.model.export_dtype
        if want != "auto":
            return getattr(torch, want)
        model = self.accelerator.unwrap_model(self.model)
        return source_dtype((model.get_base_model() if self.recipe.peft is not None else model).config)

    @property
    def stateful(self) -> dict[str, Mitigation]:
        """The mitigations with state of their own (saved in every checkpoint), by name."""
        return mitigate.stateful(list(self.mitigations))

    @property
    def run_dir(self) -> Path:
        return Path(self.recipe.run.output_dir)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def tokens_per_step(self) -> int:
        return self.recipe.train.global_batch_tokens


@dataclass
class Progress:
    """What the loop advances: the live half of cpt.state.TrainerState (a checkpoint saves it there)."""

    step: int
    tokens: int
    elapsed: float                    # training seconds so far (steps only)
    consumed: dict[str, int]          # draws per source before the current stage (the next one's offsets)
    warned: set[str] = field(default_factory=set)  # sources already warned about repeats

    @classmethod
    def at_start(cls, saved: TrainerState | None, origin) -> Progress:
        """Counters of a resumed checkpoint, or of the run's origin."""
        if saved:
            return cls(saved.step, saved.tokens, saved.elapsed_s, dict(saved.data_consumed))
        return cls(origin.step, origin.tokens, 0.0, dict(origin.consumed))


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
    # a probe set may be shorter than the training rows: in a long-context stage, the loss at the old context
    probe_sets = {name: validate_source(f"probes.sets.{name}", path, None, tok_id)
                  for name, path in recipe.probes.sets.items()}
    for name, src in probe_sets.items():
        if src.seq_len > seq_len:
            raise CptError(f"probes.sets.{name}: {recipe.probes.sets[name]} was prepared with seq_len {src.seq_len}, "
                           f"longer than data.seq_len {seq_len} (re-run cpt prepare with --seq-len {seq_len} or less)")
    return tokenizer, sources, probe_sets


def start_or_resume(recipe: Recipe, resume: bool | str, allow_changes: tuple[str, ...]) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run; refuses to mix the two up.

    ``resume``: False (a fresh run; a run dir with checkpoints is refused), True (--resume: the latest
    checkpoint; none is an error) or "auto" (--resume auto, one command for a first start and a requeue:
    resume when the run dir holds a checkpoint, start fresh when it holds none, refuse a run dir that holds
    another run's recipe)."""
    run_dir = Path(recipe.run.output_dir)
    latest = ckpt_lib.latest_checkpoint(run_dir)
    if resume == "auto":
        if latest is None:
            _check_same_run(recipe, run_dir / "recipe.yaml", allow_changes, "--resume auto")
        resume = latest is not None
    if not resume:
        if latest is not None:
            raise CptError(
                f"run.output_dir {run_dir} already holds checkpoints ({latest.name}): continue that run "
                f"with --resume, or choose another run.output_dir"
            )
        return None
    if latest is None:
        raise CptError(f"--resume: no checkpoint in {run_dir / 'checkpoints'} (--resume auto starts fresh there)")
    _check_same_run(recipe, latest / "recipe.yaml", allow_changes, "--resume")
    return latest


def _check_same_run(recipe: Recipe, saved_path: Path, allow_changes: tuple[str, ...], flag: str) -> None:
    """Refuse when ``saved_path`` (a checkpoint's or a run dir's recipe.yaml) describes another run than
    ``recipe``, but for the keys allowed to change. The saved recipe is read through today's schema, so a
    key that a newer cpt added (with its default) is no difference. A run dir without one passes."""
    if flag == "--resume auto" and not saved_path.exists():
        return
    try:
        saved = yaml.safe_load(saved_path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CptError(f"{flag}: {saved_path} cannot be read ({type(e).__name__})") from None
    if not isinstance(saved, dict):
        raise CptError(f"{flag}: {saved_path} is not a recipe")
    try:
        saved = validate_recipe(saved).to_dict()
    except CptError:
        pass  # compared as written: the differences are named below
    changed = {
        k: v for k, v in recipe_diff(saved, recipe.to_dict()).items()
        if not any(k == a or k.startswith(a + ".") for a in allow_changes)
    }
    if changed:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        what = "the checkpoint's" if flag == "--resume" else f"the one in {saved_path.parent} (another run)"
        raise CptError(f"{flag}: the recipe differs from {what} in {listed} "
                       f"(pass --allow-change KEY for each change you mean)")


def check_recipe(recipe: Recipe, resume: bool | str = False, allow_changes: tuple[str, ...] = ()) -> str:
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


def setup(recipe: Recipe, resume: bool | str, allow_changes: tuple[str, ...]) -> tuple[Run, Progress]:
    """Build the run: its parts (:class:`Run`) and where its counters stand (:class:`Progress`)."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(recipe)
    main = accelerator.is_main_process
    layout = Layout.from_recipe(recipe, accelerator.num_processes)
    accelerator.gradient_accumulation_steps = layout.grad_accum

    # Where the counters start: the checkpoint being resumed (its own record of the run's origin),
    # or init_from (a new stage), or zero. Stages are planned from that alone.
    resume_from = start_or_resume(recipe, resume, allow_changes)
    saved = ckpt_lib.read_trainer_state(resume_from) if resume_from else None
    plan = plan_run(recipe, saved.origin if saved else None)
    if main:
        run_dir = Path(recipe.run.output_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    set_seed(recipe.run.seed)

    tokenizer, sources, probe_sets = open_data(recipe, resume_from or plan.origin.path)
    mitigations = mitigate.build(recipe, plan.origin.path, main)
    model, vocab, n_params, mfu = _build_model(recipe, accelerator, tokenizer, sources, plan.origin.path,
                                               resume_from, mitigations)
    optimizer = make_optimizer(model, recipe.train.optimizer, plan.stages[0].lr(plan.origin.tokens),
                               accelerator.device.type, _optimizer_groups(mitigations, model, recipe))
    model, optimizer = accelerator.prepare(model, optimizer)
    loss = _loss(recipe, accelerator, model, vocab)
    if recipe.probes.lm_eval is not None:
        _check_lm_eval(recipe.probes.lm_eval, params_sharded(accelerator))
    if resume_from is not None:
        ckpt_lib.load_checkpoint(accelerator, resume_from)
    elif recipe.init_from is not None and recipe.init_from.load.optimizer:
        open_keyed("init_from.load.optimizer", ckpt_lib.load_optimizer_state, optimizer, plan.origin.path)
    _attach(mitigations, accelerator, model, optimizer, resume_from)

    guard = StepGuard(recipe.train.on_nonfinite, recipe.train.max_skipped_steps, recipe.train.spike_factor,
                      recipe.train.spike_window, check_grad_norm=recipe.train.precision != "fp16")
    guard.load_state_dict(saved.guard if saved else None)
    at = Progress.at_start(saved, plan.origin)
    tracker = Tracker(Path(recipe.run.output_dir), recipe.to_dict(), enabled=main,
                      resume_step=at.step if saved else None, wandb_cfg=recipe.tracking.wandb,
                      keep_records=saved.metrics_records if saved else None)
    run = Run(recipe, accelerator, layout, plan, model, optimizer, tokenizer, sources, probe_sets, vocab, guard,
              tracker, loss, tuple(mitigations), mfu, saved, resume_from)
    if main:
        step_tokens = run.tokens_per_step
        print(f"cpt: {recipe.run.name}: {n_params / 1e6:.2f}M params, "
              f"{len(plan.stages)} stage(s), {(plan.end - at.tokens) // step_tokens} steps x {step_tokens} tokens "
              f"to go, {accelerator.num_processes} process(es), grad accum {layout.grad_accum}; "
              f"{f'resumed from {resume_from}' if saved else 'fresh start'}")
    if saved:
        _log_resume(run, at)
        _note_schedule_change(run, at)
    else:
        _log_init(run, at)
    model.train()
    return run, at


def _build_model(recipe: Recipe, accelerator, tokenizer, sources, origin: str | None, resume_from: Path | None,
                 mitigations: list[Mitigation]):
    """The model before accelerate wraps it: loaded (init_from; on resume our own checkpoint, whose weights
    load_state restores exactly) or built from the preset, checked against seq_len and the data's token
    ids, with activation checkpointing, LoRA, the mitigations' before_optimizer (freezing) and compile.
    Returns (model, embedding rows, parameter count, MFU per token/s)."""
    main = accelerator.is_main_process
    weights_from = origin if recipe.init_from and recipe.init_from.load.weights else None
    if resume_from is not None and weights_from is not None:
        weights_from = str(resume_from)
    model = build_model(recipe.model, tokenizer, recipe.run.seed, weights_from)
    if weights_from is not None and recipe.model.config and resume_from is None and main:
        _, changes = model_config(weights_from, recipe.model.config, recipe.model.trust_remote_code)
        print("cpt: model.config: " + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items()))
    check_seq_len(model.config, recipe.data.seq_len,
                  f"config of {weights_from}" if weights_from else f"model.preset {recipe.model.preset}")
    vocab = model.get_input_embeddings().num_embeddings
    if recipe.model.extend_vocab is not None and weights_from is not None and resume_from is None and main:
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
    if recipe.peft is not None:  # frozen base + adapters; the optimizer takes only what requires grad
        model = wrap_peft(model, recipe.peft, verbose=main)
    for m in mitigations:  # before the optimizer and DDP, which take what requires grad
        m.before_optimizer(model)
    n_params = num_params(model)  # counted before ZeRO-3/FSDP shard the parameters
    mfu = mfu_per_token_s(model, recipe, accelerator)
    if recipe.train.compile:
        # compile afresh, as a new process would, and one static graph per shape: which kernels run must not
        # depend on what ran before (graphs cached by an earlier run in this process; dynamic shapes that
        # a resumed run, which skips the stage's baseline probe, would switch to at another step), or a
        # resume would not be exact
        torch._dynamo.reset()
        model.compile(dynamic=False)  # in place: parameter names, and so checkpoints, stay the plain model's
    return model, vocab, n_params, mfu


def _optimizer_groups(mitigations: list[Mitigation], model, recipe: Recipe) -> list[dict] | None:
    """The optimizer's parameter groups as a mitigation shapes them (layer-wise LR), or None (plain)."""
    shaped = [g for m in mitigations if (g := m.optimizer_groups(model, recipe.train.optimizer.weight_decay))]
    if len(shaped) > 1:
        raise CptError("mitigate: two mitigations shape the optimizer's parameter groups; only one may")
    return shaped[0] if shaped else None


def _loss(recipe: Recipe, accelerator, model, vocab: int):
    """train.loss for the prepared model (cpt.train.loss.choose_loss), saying what it chose where it fell back."""
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
    loss, note = choose_loss(recipe.train.loss, accelerator.unwrap_model(model), not head_gatherable(accelerator),
                             vocab, compute_dtype=autocast)
    if note and accelerator.is_main_process:
        print(f"cpt: {note}")
    return loss


def _attach(mitigations: list[Mitigation], accelerator, model, optimizer, resume_from: Path | None) -> None:
    """Hand the mitigations the backend's weights (after a resumed checkpoint's are in), then their own
    saved state. Those that write into the weights outside a step are refused where the backend cannot."""
    if any(m.writes_weights for m in mitigations) and (why := mitigate.unsupported(accelerator)):
        raise CptError(f"mitigate.{why}")
    weights = weights_of(accelerator, model, optimizer)
    for m in mitigations:
        m.attach(weights)
    if resume_from is not None and (parts := mitigate.stateful(mitigations)):
        mitigate.load_state(resume_from / mitigate.STATE_FILE, parts)


def _log_resume(run: Run, at: Progress) -> None:
    """On resume: an event record (metrics.jsonl, W&B) of where the run goes on from and on how many
    processes, with the count it was saved on where that differs."""
    now, was = run.accelerator.num_processes, run.saved.processes
    run.tracker.log({"step": at.step, "tokens": at.tokens, "event": "resume", "resume/from": str(run.resume_from),
                     "resume/processes": now, **({"resume/processes_was": was} if was not in (None, now) else {})})
    if was not in (None, now) and run.main:
        print(f"cpt: note: resumed on {now} process(es); the checkpoint was saved by {was} (same global batch: "
              f"grad accum {run.layout.grad_accum})")


def _note_schedule_change(run: Run, at: Progress) -> None:
    """On resume: say so when the recipe's schedule no longer continues the checkpoint's (e.g.
    train.tokens raised with --allow-change, which moves a horizon-dependent schedule)."""
    tokens, end = at.tokens, run.plan.end
    if tokens >= end or run.saved.next_lr is None:
        return
    lr_now = run.plan.stage_at(tokens).lr(tokens)
    if math.isclose(lr_now, run.saved.next_lr, rel_tol=1e-9, abs_tol=1e-15):
        return
    run.tracker.log({"step": at.step, "tokens": tokens, "event": "schedule_change",
                     "schedule_change/lr_was": run.saved.next_lr, "schedule_change/lr": lr_now,
                     "schedule_change/end_tokens": end})
    if run.main:
        print(f"cpt: note: the recipe's schedule differs from the checkpoint's: the LR at token {tokens} goes "
              f"from {run.saved.next_lr:.3e} to {lr_now:.3e}; the run now ends at token {end} "
              f"({(end - tokens) // run.tokens_per_step} more steps)")


def _log_init(run: Run, at: Progress) -> None:
    """A fresh start: what init_from loaded and reset, and an LR jump where a schedule is continued."""
    recipe, origin = run.recipe, run.plan.origin
    loaded, reset = describe_origin(recipe, origin)
    if run.main:
        print(f"cpt: init from {origin.path or 'scratch'}: loaded {', '.join(loaded) or 'nothing'}; "
              f"reset {', '.join(reset) or 'nothing'}")
    run.tracker.log({"step": at.step, "tokens": at.tokens, "event": "init", "init/path": origin.path,
                     "init/loaded": loaded, "init/reset": reset})
    lr0 = run.plan.stages[0].lr(at.tokens)
    if origin.next_lr is not None and recipe.init_from.load.schedule_state and not math.isclose(
            lr0, origin.next_lr, rel_tol=1e-9, abs_tol=1e-15) and run.main:
        print(f"cpt: note: the LR goes from {origin.next_lr:.3e} (where the checkpoint's schedule was going) "
              f"to {lr0:.3e} at token {at.tokens}; lengths given as fractions refer to the whole horizon")


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

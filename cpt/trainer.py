"""The training loop. Read it top to bottom: set up, then for each stage: baseline probe, then
step -> maybe probe -> maybe save until the stage's budget is spent.

Progress is counted in optimizer steps and tokens on one counter for the whole run (cpt.stages). The
LR is a pure function of that counter (cpt.schedules), written into the optimizer before every step
and logged as applied, so a resume only needs the counters and a wrong resume shows up in the first
record.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from cpt import checkpoint as ckpt_lib
from cpt.data.mixture import MixtureSampler, read_batch
from cpt.data.source import SubsetSource, TokenSource
from cpt.data.tokenizer import load_tokenizer, tokenizer_hash
from cpt.errors import CptError, DivergedError
from cpt.guard import StepGuard
from cpt.model import (
    build_model,
    check_seq_len,
    flops_per_token,
    matmul_params,
    num_params,
    peak_flops,
    preset_config,
    wrap_peft,
)
from cpt.probes import ForgettingTracker, HeldOutLoss, probe_due, probe_losses
from cpt.recipe import Recipe, recipe_diff
from cpt.stages import Origin, StagePlan, describe_origin, plan_stages, resolve_init
from cpt.tracking import Tracker


@dataclass
class Layout:
    """How one optimizer step is cut into micro-batches across processes."""

    seq_len: int
    sequences_per_step: int  # global batch, all processes
    micro_batch_size: int
    world_size: int
    grad_accum: int

    @classmethod
    def from_recipe(cls, recipe: Recipe, world_size: int) -> Layout:
        L, m = recipe.data.seq_len, recipe.train.micro_batch_size
        n = recipe.train.global_batch_tokens // L
        if n % (m * world_size):
            raise CptError(
                f"train.global_batch_tokens = {recipe.train.global_batch_tokens} is {n} sequences of "
                f"{L}, not divisible by train.micro_batch_size ({m}) x processes ({world_size})"
            )
        return cls(L, n, m, world_size, n // (m * world_size))

    def my_micro_batches(self, picks: list, rank: int) -> list[list]:
        """This rank's micro-batches of a global batch. Micro-step a of rank r holds picks
        [(a*W + r)*m, (a*W + r + 1)*m): the global batch is the same whatever W divides it."""
        m, W = self.micro_batch_size, self.world_size
        return [picks[(a * W + rank) * m:(a * W + rank + 1) * m] for a in range(self.grad_accum)]


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    completed: bool
    is_main: bool = True
    signum: int | None = None  # the signal that stopped the run early (checkpointed), if one did


class _StopFlag:
    """SIGTERM/SIGINT ask for a clean stop at the end of the current step (checkpoint, then exit)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. called from a notebook worker)
                pass

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def make_accelerator(recipe: Recipe):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    precision = recipe.train.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    ds = recipe.train.deepspeed
    extra: dict[str, Any] = {}
    if ds is not None:
        extra["deepspeed_plugin"] = deepspeed_plugin(ds)
        if not torch.cuda.is_available():
            # Without a backend accelerate counts 1 process while DeepSpeed's own init sees N, and
            # DeepSpeed's batch-size check (micro x accum x world) fails; gloo is torch's CPU collective.
            extra["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    # Without cpu=True, accelerate treats `accelerate launch --multi_gpu` on a machine without GPUs as
    # N independent single-process runs (no gradient sync, no reduce); with it, N gloo processes.
    # DeepSpeed is never engaged with cpu=True, so there the gloo backend above does that job.
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available() and ds is None,
        mixed_precision={"fp32": "no"}.get(precision, precision),
        step_scheduler_with_optimizer=False,
        **extra,
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and (accelerator.num_processes != world or accelerator.distributed_type == DistributedType.NO):
        raise CptError(
            f"launched as {world} processes but accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type}): the processes would train independently"
        )
    if ds is not None:
        fill_deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config, ds,
                              Layout.from_recipe(recipe, accelerator.num_processes), recipe.train.grad_clip)
        accelerator.wait_for_everyone()  # every rank has mapped every other rank's buffer (see below)
        unlink_deepspeed_shm(accelerator.process_index)
        # accelerate points transformers at the DeepSpeed config whatever zero3_init_flag says; with ZeRO-3
        # transformers would then build models under deepspeed.zero.Init: partitioned at birth with an init
        # of its own (other losses than the same seed without DeepSpeed, 0 parameters counted), and the
        # main-process-only merged LoRA export would wait on the other ranks. cpt builds models whole.
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    return accelerator


def unlink_deepspeed_shm(rank: int) -> None:
    """Remove this rank's DeepSpeed shared-memory buffer from /dev/shm.

    DeepSpeed's CPU communication setup (when LOCAL_SIZE says all ranks share one host, as its own
    launcher and MPI set it) creates a 66 MiB buffer per rank,
    ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``, and never unlinks
    it: every run on a host left ~69 MB per rank behind. Ranks find each other's buffers by name only
    while the process group comes up; after a barrier the names can go at once. The memory itself stays
    mapped until the processes exit, and a run killed later leaves nothing behind.
    """
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    try:
        os.unlink(Path("/dev/shm") / name)
    except FileNotFoundError:
        pass


def deepspeed_plugin(path: str):
    """accelerate's DeepSpeed plugin from a DeepSpeed JSON config (train.deepspeed). Only runs that set
    it get here, so only they import DeepSpeed (accelerate does, when the Accelerator is created)."""
    import importlib.util
    import json

    if importlib.util.find_spec("deepspeed") is None:
        raise CptError('train.deepspeed needs the deepspeed package: pip install -e ".[deepspeed]"')
    from accelerate.utils import DeepSpeedPlugin

    try:
        config = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CptError(f"train.deepspeed: {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise CptError(f"train.deepspeed: {path} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or "zero_optimization" not in config:
        raise CptError(f"train.deepspeed: {path} has no zero_optimization section")
    for section, owner in (("optimizer", "train.optimizer"), ("scheduler", "schedule")):
        if section in config:
            raise CptError(f"train.deepspeed: {path} defines {section!r}; cpt takes it from the recipe's "
                           f"{owner}: remove it from the DeepSpeed config")
    # The model is built whole on every rank (the same seeded init as without DeepSpeed) and partitioned
    # by deepspeed.initialize: zero3_init_flag=False here, and transformers' reference to the config is
    # unset in make_accelerator. zero.Init would be needed only for models that do not fit one process's
    # CPU memory.
    return DeepSpeedPlugin(hf_ds_config=config, zero3_init_flag=False)


def fill_deepspeed_config(config: dict[str, Any], path: str, layout: Layout, grad_clip: float | None) -> None:
    """Write the recipe's batch layout and clipping into the DeepSpeed config: "auto" (or absent) is
    filled, a number that disagrees with the recipe is refused, so nothing is kept twice by hand."""
    values = {"train_micro_batch_size_per_gpu": layout.micro_batch_size,
              "gradient_accumulation_steps": layout.grad_accum,
              "train_batch_size": layout.sequences_per_step,
              "gradient_clipping": float(grad_clip or 0.0)}  # DeepSpeed: 0 = no clipping
    for key, value in values.items():
        have = config.get(key, "auto")
        if have == "auto":
            config[key] = value
        elif have != value:
            raise CptError(f"train.deepspeed: {path} sets {key} = {have!r} but the recipe gives {value!r} "
                           f"(train.global_batch_tokens, train.micro_batch_size, train.grad_clip and the "
                           f"process count decide it): write \"auto\"")


def make_optimizer(model, cfg, lr: float, device_type: str):
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    fused = (device_type == "cuda") if cfg.fused == "auto" else cfg.fused
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None,
    )


def _mfu_per_token_s(model, recipe: Recipe, accelerator) -> float | None:
    """MFU per (global) token/s: model FLOPs per token over the peak of all devices together; None off
    CUDA or on a GPU whose peak is not in cpt.model.PEAK_BF16_FLOPS (then train/mfu is not logged)."""
    if accelerator.device.type != "cuda":
        return None
    peak = peak_flops(torch.cuda.get_device_name(accelerator.device))
    if peak is None:
        if accelerator.is_main_process:
            print(f"cpt: note: peak FLOP/s of {torch.cuda.get_device_name(accelerator.device)} unknown "
                  f"(cpt.model.PEAK_BF16_FLOPS): train/mfu not logged")
        return None
    trainable, frozen = matmul_params(model)
    config = model.get_base_model().config if recipe.peft is not None else model.config
    return flops_per_token(config, recipe.data.seq_len, trainable, frozen) / (peak * accelerator.num_processes)


def open_keyed(key: str, opener, *args, **kwargs):
    """Open something a recipe names, prefixing any error with the recipe key that named it."""
    try:
        return opener(*args, **kwargs)
    except CptError as e:
        raise CptError(f"{key}: {e}") from None


def check_source(key: str, path: str, seq_len: int, tok_hash: str) -> TokenSource:
    """A prepared dir the recipe names (training source or probe set), checked against the run."""
    src = open_keyed(key, TokenSource, path)
    if src.seq_len != seq_len:
        raise CptError(f"{key}: {path} was prepared with seq_len {src.seq_len}, but data.seq_len is {seq_len} "
                       f"(re-run cpt prepare with --seq-len {seq_len})")
    if not src.tokenizer_hash:
        raise CptError(f"{key}: {path}: its manifest records no tokenizer hash, so nothing says which "
                       f"tokenizer wrote it (re-run cpt prepare)")
    if src.tokenizer_hash != tok_hash:
        raise CptError(f"{key}: {path} was tokenized with another tokenizer than the model's "
                       f"(hash {src.tokenizer_hash[:12]} vs {tok_hash[:12]})")
    return src


def open_sources(recipe: Recipe, tok_hash: str) -> dict[str, TokenSource | SubsetSource]:
    sources: dict[str, TokenSource | SubsetSource] = {}
    for name, path in recipe.data.sources.items():
        src = check_source(f"data.sources.{name}", path, recipe.data.seq_len, tok_hash)
        if name in recipe.data.replay_buffer:
            size = recipe.data.replay_buffer[name] // recipe.data.seq_len
            src = open_keyed(f"data.replay_buffer.{name}", SubsetSource, src, size, recipe.run.seed, name)
        sources[name] = src
    return sources


def open_data(recipe: Recipe, model_dir: str | Path | None):
    """The tokenizer (model.tokenizer, else the model dir's) and the training sources, every source and
    probe set checked against it."""
    tok_path = recipe.model.tokenizer or str(model_dir)
    tok_key = "model.tokenizer" if recipe.model.tokenizer else "init_from.path"
    tokenizer = open_keyed(tok_key, load_tokenizer, tok_path)
    tok_hash = open_keyed(tok_key, tokenizer_hash, tok_path)
    sources = open_sources(recipe, tok_hash)
    for name, path in recipe.probes.sets.items():
        check_source(f"probes.sets.{name}", path, recipe.data.seq_len, tok_hash)
    return tokenizer, sources


def check_recipe(recipe: Recipe, resume: bool = False, allow_changes: tuple[str, ...] = ()) -> str:
    """Everything ``cpt train --dry-run`` can check without training: the checkpoint to resume or start
    from, the stage plan, the batch layout at this launch's world size, the tokenizer, every source and
    probe set (exists, seq_len, tokenizer), the model's position limit and a DeepSpeed config. Returns
    a one-line summary; raises CptError naming the first problem."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    layout = Layout.from_recipe(recipe, world)
    resume_from = _start_or_resume(recipe, Path(recipe.run.output_dir), resume, allow_changes)
    origin = resolve_init(recipe)
    stages = plan_stages(recipe, origin, recipe.train.global_batch_tokens, layout.sequences_per_step)
    tokenizer, sources = open_data(recipe, resume_from or origin.path)
    if recipe.init_from is not None and recipe.init_from.load.weights:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(origin.path)
        except (OSError, ValueError) as e:
            raise CptError(f"init_from.path: cannot read the model config of {origin.path} ({e})") from None
        where = f"config of {origin.path}"
    else:
        config, where = preset_config(recipe.model, tokenizer), f"model.preset {recipe.model.preset}"
    check_seq_len(config, recipe.data.seq_len, where)
    if recipe.train.deepspeed is not None:
        deepspeed_plugin(recipe.train.deepspeed)
    return (f"recipe checks passed: {len(stages)} stage(s) to token {stages[-1].end}, {len(sources)} source(s), "
            f"{len(recipe.probes.sets)} probe set(s), {world} process(es) x grad accum {layout.grad_accum}"
            f"{f', resuming {resume_from.name}' if resume_from else ''}")


def _start_or_resume(recipe: Recipe, run_dir: Path, resume: bool, allow_changes: tuple[str, ...]) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run; refuses to mix the two up."""
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


def train(recipe: Recipe, *, resume: bool = False, allow_changes: tuple[str, ...] = (),
          max_steps: int | None = None) -> TrainResult:
    """Run (or exactly resume) one training run described by ``recipe``.

    ``max_steps`` stops (with a checkpoint) once the run has taken that many steps since its origin."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    accelerator = make_accelerator(recipe)
    main, rank = accelerator.is_main_process, accelerator.process_index
    run_dir = Path(recipe.run.output_dir)
    layout = Layout.from_recipe(recipe, accelerator.num_processes)
    accelerator.gradient_accumulation_steps = layout.grad_accum
    tps = recipe.train.global_batch_tokens

    # Where the counters start: the checkpoint being resumed (its own record of the run's origin),
    # or init_from (a new stage), or zero. Stages are planned from that alone.
    resume_from = _start_or_resume(recipe, run_dir, resume, allow_changes)
    saved = ckpt_lib.read_trainer_state(resume_from) if resume_from else None
    origin = Origin(**saved["origin"]) if saved else resolve_init(recipe)
    stages = plan_stages(recipe, origin, tps, layout.sequences_per_step)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    set_seed(recipe.run.seed)

    # A cpt checkpoint is also an HF model dir (config, weights, tokenizer): on resume the model is
    # built from our own checkpoint, then load_state restores weights, optimizer and RNG exactly.
    weights_from = origin.path if recipe.init_from and recipe.init_from.load.weights else None
    if resume_from is not None and weights_from is not None:
        weights_from = str(resume_from)
    tokenizer, sources = open_data(recipe, resume_from or origin.path)
    sizes = {n: s.num_sequences for n, s in sources.items()}

    model = build_model(recipe.model, tokenizer, recipe.run.seed, weights_from)
    check_seq_len(model.config, recipe.data.seq_len,
                  f"config of {weights_from}" if weights_from else f"model.preset {recipe.model.preset}")
    vocab = model.get_input_embeddings().num_embeddings  # ids past it would fail deep inside the forward
    for name, src in sources.items():  # what the manifest says, at start; read_batch checks the ids read
        if src.max_token_id is not None and src.max_token_id >= vocab:
            raise CptError(f"data.sources.{name}: {recipe.data.sources[name]} holds token ids up to "
                           f"{src.max_token_id}, but the model has {vocab} embeddings")
    if recipe.peft is not None:  # frozen base + adapters; make_optimizer takes only what requires grad
        model = wrap_peft(model, recipe.peft, verbose=main)
    n_params = num_params(model)  # counted before ZeRO-3/FSDP shard the parameters
    mfu_per_token_s = _mfu_per_token_s(model, recipe, accelerator)
    if recipe.train.compile:
        model.compile()  # in place: parameter names, and so checkpoints, stay those of the plain model
    optimizer = make_optimizer(model, recipe.train.optimizer, stages[0].lr(origin.tokens), accelerator.device.type)
    model, optimizer = accelerator.prepare(model, optimizer)
    if resume_from is not None:
        ckpt_lib.load_checkpoint(accelerator, resume_from)
    elif recipe.init_from is not None and recipe.init_from.load.optimizer:
        open_keyed("init_from.load.optimizer", ckpt_lib.load_optimizer_state, optimizer, origin.path)

    step, tokens = (saved["step"], saved["tokens"]) if saved else (origin.step, origin.tokens)

    def stage_at(t: int) -> StagePlan:
        return next((st for st in stages if st.start <= t < st.end), stages[-1])
    elapsed = saved["elapsed_s"] if saved else 0.0
    consumed = saved["data_consumed"] if saved else dict(origin.consumed)
    end_tokens = stages[-1].end
    guard = StepGuard(recipe.train.on_nonfinite, recipe.train.max_skipped_steps, recipe.train.spike_factor,
                      recipe.train.spike_window, check_grad_norm=recipe.train.precision != "fp16")
    guard.load_state_dict(saved.get("guard") if saved else None)
    tracker = Tracker(run_dir, recipe.to_dict(), enabled=main, resume_step=step if saved else None,
                      wandb_cfg=recipe.tracking.wandb, keep_records=saved.get("metrics_records") if saved else None)
    if main:
        how = f"resumed from {resume_from}" if saved else "fresh start"
        print(f"cpt: {recipe.run.name}: {n_params / 1e6:.2f}M params, "
              f"{len(stages)} stage(s), {(end_tokens - tokens) // tps} steps x {tps} tokens to go, "
              f"{accelerator.num_processes} process(es), grad accum {layout.grad_accum}; {how}")
    if saved and saved.get("next_lr") is not None and tokens < end_tokens:
        lr_now = stage_at(tokens).lr(tokens)
        if not math.isclose(lr_now, saved["next_lr"], rel_tol=1e-9, abs_tol=1e-15):
            # e.g. train.tokens raised with --allow-change: a horizon-dependent schedule moves
            tracker.log({"step": step, "tokens": tokens, "event": "schedule_change", "schedule_change/lr_was":
                         saved["next_lr"], "schedule_change/lr": lr_now, "schedule_change/end_tokens": end_tokens})
            if main:
                print(f"cpt: note: the recipe's schedule differs from the checkpoint's: the LR at token {tokens} "
                      f"goes from {saved['next_lr']:.3e} to {lr_now:.3e}; the run now ends at token {end_tokens} "
                      f"({(end_tokens - tokens) // tps} more steps)")
    if not saved:
        loaded, reset = describe_origin(recipe, origin)
        if main:
            print(f"cpt: init from {origin.path or 'scratch'}: loaded {', '.join(loaded) or 'nothing'}; "
                  f"reset {', '.join(reset) or 'nothing'}")
        tracker.log({"step": step, "tokens": tokens, "event": "init", "init/path": origin.path,
                     "init/loaded": loaded, "init/reset": reset})
        lr0 = stages[0].lr(tokens)
        if origin.next_lr is not None and recipe.init_from.load.schedule_state and not math.isclose(
                lr0, origin.next_lr, rel_tol=1e-9, abs_tol=1e-15) and main:
            print(f"cpt: note: the LR goes from {origin.next_lr:.3e} (where the checkpoint's schedule was going) "
                  f"to {lr0:.3e} at token {tokens}; lengths given as fractions refer to the whole horizon")

    def save(stage: StagePlan, sampler: MixtureSampler, probe_state: dict | None, tags: list[str]) -> None:
        state = {"step": step, "tokens": tokens, "stage": stage.name, "sampler": sampler.state_dict(),
                 "data_consumed": sampler.consumed(), "mixture": stage.mixture,
                 "lr": optimizer.param_groups[0]["lr"], "next_lr": stage_at(tokens).lr(tokens),
                 "elapsed_s": elapsed, "tags": tags, "origin": origin.to_dict(), "probe_state": probe_state,
                 "guard": guard.state_dict(), "metrics_records": tracker.metrics.count}
        ckpt_lib.save_checkpoint(accelerator, run_dir, step, state, recipe.to_yaml(), recipe.checkpoint.keep_last,
                                 model=model, tokenizer=tokenizer)

    def crossed(every: int | None, before: int, after: int) -> bool:
        return every is not None and after // every > before // every

    dense = recipe.probes.dense
    stop = _StopFlag()
    bar = tqdm(total=(end_tokens - origin.tokens) // tps, initial=(tokens - origin.tokens) // tps, unit="step",
               dynamic_ncols=True, disable=not (main and recipe.tracking.progress))
    warned: set[str] = set()
    halted = False
    model.train()
    try:
        for stage in stages:
            if tokens >= stage.end:
                continue
            mid_stage = saved is not None and tokens > stage.start  # resumed inside this stage
            sampler = MixtureSampler(sizes, stage.mixture, recipe.run.seed, offsets=consumed)
            if mid_stage:
                sampler.load_state_dict(saved["sampler"])
            elif stage.index == 0 and origin.sampler and tokens == origin.tokens:
                sampler.load_state_dict(origin.sampler)  # same data, same weights: the exact order goes on
            tag = {"step": step, "tokens": tokens, "stage": stage.name}
            probes = forgetting = None
            if stage.probe_sets:
                probes = HeldOutLoss({n: recipe.probes.sets[n] for n in stage.probe_sets}, recipe.data.seq_len,
                                     recipe.probes.max_sequences, recipe.probes.micro_batch_size, rank,
                                     accelerator.num_processes)
                forgetting = ForgettingTracker(stage.probe_sets, stage.new_domains)
            if not mid_stage:
                tracker.log({**tag, "event": "stage_start", "stage_start/lr": stage.lr(tokens),
                             "stage_start/new_domains": stage.new_domains})
                if probes is not None:  # the baseline: before the stage's first step
                    baseline = probes(model, accelerator)
                    forgetting.start_stage(probe_losses(baseline), tokens)
                    tracker.log({**tag, **baseline, **forgetting.update(tokens, probe_losses(baseline))})
            elif forgetting is not None and saved.get("probe_state"):
                forgetting.load_state_dict(saved["probe_state"])
                if forgetting.stage_start is None:  # saved after the stage closed (an older checkpoint)
                    raise CptError(f"--resume: {resume_from} was saved after stage {stage.name!r} ended, "
                                   f"so its forgetting baseline is gone; the stage cannot be extended from it")

            while tokens < stage.end:
                t0 = time.perf_counter()
                lr = stage.lr(tokens)
                for group in optimizer.param_groups:
                    group["lr"] = lr

                picks = sampler.draw(layout.sequences_per_step)  # the same global batch on every rank
                loss_sum = torch.zeros((), device=accelerator.device)
                for micro in layout.my_micro_batches(picks, rank):
                    ids = read_batch(sources, micro, vocab_size=vocab).to(accelerator.device, non_blocking=True)
                    with accelerator.accumulate(model):
                        loss = model(input_ids=ids, labels=ids).loss
                        accelerator.backward(loss)
                    loss_sum += loss.detach()
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), recipe.train.grad_clip or math.inf)
                loss = accelerator.reduce(loss_sum / layout.grad_accum, reduction="mean").item()
                norm = float(grad_norm) if grad_norm is not None else None
                verdict = guard.check(loss, norm)  # the same reduced numbers on every rank: one decision
                if verdict == "halt":
                    optimizer.zero_grad(set_to_none=True)
                    tracker.log({"step": step + 1, "tokens": tokens + tps, "stage": stage.name, "event": "nonfinite",
                                 "train/loss": loss, "train/grad_norm": norm, "lr": lr})
                    last_good = ckpt_lib.latest_checkpoint(run_dir)
                    raise DivergedError(
                        f"step {step + 1} (tokens {tokens}-{tokens + tps}): loss {loss:.4g}, grad norm {norm}: not "
                        f"finite{f' ({guard.in_a_row} such steps in a row)' if guard.in_a_row else ''}; the "
                        f"weights were not updated and nothing was saved after it. Last good checkpoint: "
                        f"{last_good or 'none'} (continue with --resume, e.g. with a lower schedule.max_lr "
                        f"and --allow-change schedule.max_lr; train.on_nonfinite: skip drops such steps)")
                if verdict == "step":
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step, before, tokens = step + 1, tokens, tokens + tps
                dt = time.perf_counter() - t0
                elapsed += dt
                epochs = sampler.repeats()
                last = {"step": step, "tokens": tokens, "stage": stage.name, "train/loss": loss,
                        "lr": optimizer.param_groups[0]["lr"],
                        "train/grad_norm": norm,
                        **({"train/skipped_steps": guard.skipped} if guard.skipped else {}),
                        "train/tokens_per_s": tps / dt, "time/elapsed_s": elapsed,
                        **({"train/mfu": tps / dt * mfu_per_token_s} if mfu_per_token_s else {}),
                        **{f"data/{n}/epochs": e for n, e in epochs.items() if stage.mixture.get(n, 0) > 0}}
                tracker.log(last)
                if verdict == "skip" and main:
                    tqdm.write(f"cpt: warning: step {step}: loss {loss:.4g}, grad norm {norm}: not finite; update "
                               f"skipped ({guard.in_a_row} in a row, {guard.skipped} in all)")
                if (median := guard.spike(loss)) is not None:
                    tracker.log({"step": step, "tokens": tokens, "stage": stage.name, "event": "loss_spike",
                                 "train/loss": loss, "loss_spike/median": median})
                    if main:
                        tqdm.write(f"cpt: loss spike at step {step}: {loss:.4f} vs a median of {median:.4f} "
                                   f"over the last {len(guard.recent) - 1} steps")
                for name in [n for n, e in epochs.items() if e >= recipe.data.warn_epochs and n not in warned]:
                    warned.add(name)
                    if main:
                        tqdm.write(f"cpt: warning: source {name} has been read {epochs[name]:.1f} times over "
                                   f"(data.warn_epochs = {recipe.data.warn_epochs:g}); repeated data trains "
                                   f"less and can hurt: add data or lower its share")
                bar.update(1)
                bar.set_postfix(stage=stage.name, loss=f"{loss:.3f}", lr=f"{last['lr']:.2e}",
                                tok_s=f"{last['train/tokens_per_s']:.0f}", refresh=False)

                tag = {"step": step, "tokens": tokens, "stage": stage.name}
                stage_done = tokens == stage.end
                if probes is not None and (stage_done or probe_due(
                        before, tokens, stage.start, recipe.probes.every,
                        dense.every if dense else None, dense.for_ if dense else None)):
                    measured = probes(model, accelerator)
                    tracker.log({**tag, **measured, **forgetting.update(tokens, probe_losses(measured))})
                tags = []
                # saved as it stands before end_stage closes it: a run extended past this stage's old
                # end (train.tokens raised on --resume) goes on with the same baseline
                probe_state = forgetting.state_dict() if forgetting else None
                if stage_done:
                    if forgetting is not None:
                        tracker.log({**tag, "event": "stage_end", **forgetting.end_stage()})
                    tags.append(f"stage_end:{stage.name}")
                if stage.anneal_start is not None and tokens <= stage.anneal_start < tokens + tps:
                    tags.append("pre_anneal")
                halted = stop.signum is not None or (max_steps is not None and step - origin.step >= max_steps)
                if tags or halted or tokens == end_tokens or crossed(recipe.checkpoint.every, before, tokens):
                    save(stage, sampler, probe_state, tags)
                if halted and tokens < end_tokens:
                    if main:
                        why = f"signal {stop.signum}" if stop.signum is not None else f"--max-steps {max_steps}"
                        print(f"cpt: stopped at step {step} ({why}); checkpoint saved, continue with --resume")
                    break
            if halted and tokens < end_tokens:
                break
            consumed = sampler.consumed()
        if tokens == end_tokens:
            ckpt_lib.export_model(accelerator, model, tokenizer, run_dir / "final")
    finally:
        bar.close()
        tracker.close(exit_code=0 if sys.exc_info()[0] is None else 1)  # a crash marks the W&B run failed
        stop.restore()
    accelerator.end_training()
    done = tokens == end_tokens
    return TrainResult(run_dir, step, tokens, done, main, None if done else stop.signum)

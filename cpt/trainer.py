"""The training loop. Read it top to bottom: set up, then step -> maybe probe -> maybe save, until the
token budget is spent.

Progress is counted in optimizer steps and tokens; tokens = step * train.global_batch_tokens. The LR
is a pure function of tokens (cpt.schedules), written into the optimizer before every step and logged
as applied, so a resume only needs the counters and a wrong resume shows up in the first record.
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from cpt import checkpoint as ckpt_lib
from cpt.data.mixture import MixtureSampler, read_batch
from cpt.data.source import TokenSource
from cpt.data.tokenizer import load_tokenizer, tokenizer_hash
from cpt.errors import CptError
from cpt.model import build_model, num_params
from cpt.probes import HeldOutLoss
from cpt.recipe import Recipe, recipe_diff
from cpt.schedules import build_schedule
from cpt.tracking import MetricsLog


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
    last: dict[str, Any] = field(default_factory=dict)
    probes: dict[str, float] = field(default_factory=dict)


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
    from accelerate.utils import DistributedType

    precision = recipe.train.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    # Without cpu=True, accelerate treats `accelerate launch --multi_gpu` on a machine without GPUs as
    # N independent single-process runs (no gradient sync, no reduce); with it, N gloo processes.
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision={"fp32": "no"}.get(precision, precision),
        step_scheduler_with_optimizer=False,
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and (accelerator.num_processes != world or accelerator.distributed_type == DistributedType.NO):
        raise CptError(
            f"launched as {world} processes but accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type}): the processes would train independently"
        )
    return accelerator


def make_optimizer(model, cfg, lr: float, device_type: str):
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    fused = (device_type == "cuda") if cfg.fused == "auto" else cfg.fused
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None,
    )


def open_keyed(key: str, opener, *args, **kwargs):
    """Open something a recipe names, prefixing any error with the recipe key that named it."""
    try:
        return opener(*args, **kwargs)
    except CptError as e:
        raise CptError(f"{key}: {e}") from None


def open_sources(recipe: Recipe, tok_hash: str | None) -> dict[str, TokenSource]:
    sources = {}
    for name, path in recipe.data.sources.items():
        src = open_keyed(f"data.sources.{name}", TokenSource, path)
        if src.seq_len != recipe.data.seq_len:
            raise CptError(
                f"data.sources.{name}: {path} was prepared with seq_len {src.seq_len}, but data.seq_len is "
                f"{recipe.data.seq_len} (re-run cpt prepare with --seq-len {recipe.data.seq_len})"
            )
        if tok_hash and src.tokenizer_hash and src.tokenizer_hash != tok_hash:
            raise CptError(
                f"data.sources.{name}: {path} was tokenized with another tokenizer than model.tokenizer "
                f"(hash {src.tokenizer_hash[:12]} vs {tok_hash[:12]})"
            )
        sources[name] = src
    return sources


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
    saved = yaml.safe_load((latest / "recipe.yaml").read_text())
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
    """Run (or exactly resume) one training run described by ``recipe``."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    accelerator = make_accelerator(recipe)
    main, rank = accelerator.is_main_process, accelerator.process_index
    run_dir = Path(recipe.run.output_dir)
    layout = Layout.from_recipe(recipe, accelerator.num_processes)
    accelerator.gradient_accumulation_steps = layout.grad_accum
    tokens_per_step = recipe.train.global_batch_tokens
    total_steps = recipe.train.tokens // tokens_per_step

    resume_from = _start_or_resume(recipe, run_dir, resume, allow_changes)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    set_seed(recipe.run.seed)

    tok_key = "model.tokenizer" if recipe.model.tokenizer else "model.path"
    tokenizer = open_keyed(tok_key, load_tokenizer, recipe.model.tokenizer_path)
    sources = open_sources(recipe, open_keyed(tok_key, tokenizer_hash, recipe.model.tokenizer_path))
    weights = {name: recipe.data.mixture.get(name, 0.0) for name in sources}
    sampler = MixtureSampler({n: s.num_sequences for n, s in sources.items()}, weights, recipe.run.seed)
    schedule = build_schedule(recipe.schedule, total_tokens=recipe.train.tokens, tokens_per_step=tokens_per_step,
                              batch_size=layout.sequences_per_step)
    probes = None
    if recipe.probes.sets:
        probes = HeldOutLoss(recipe.probes.sets, recipe.data.seq_len, recipe.probes.max_sequences,
                             recipe.probes.micro_batch_size, rank, accelerator.num_processes)

    model = build_model(recipe.model, tokenizer, recipe.run.seed)
    optimizer = make_optimizer(model, recipe.train.optimizer, schedule(0), accelerator.device.type)
    model, optimizer = accelerator.prepare(model, optimizer)

    step, elapsed = 0, 0.0
    if resume_from is not None:
        state = ckpt_lib.load_checkpoint(accelerator, resume_from)
        step, elapsed = state["step"], state["elapsed_s"]
        sampler.load_state_dict(state["sampler"])
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=main, resume_step=step if resume_from else None)
    if main:
        how = f"resumed from {resume_from}" if resume_from else "fresh start"
        print(f"cpt: {recipe.run.name}: {num_params(accelerator.unwrap_model(model)) / 1e6:.2f}M params, "
              f"{total_steps} steps x {tokens_per_step} tokens, {accelerator.num_processes} process(es), "
              f"grad accum {layout.grad_accum}; {how}")

    def save(at_step: int) -> None:
        state = {"step": at_step, "tokens": at_step * tokens_per_step, "sampler": sampler.state_dict(),
                 "lr": optimizer.param_groups[0]["lr"], "elapsed_s": elapsed}
        ckpt_lib.save_checkpoint(accelerator, run_dir, at_step, state, recipe.to_yaml(), recipe.checkpoint.keep_last)

    def crossed(every: int | None, before: int, after: int) -> bool:
        return every is not None and after // every > before // every

    last_probe: dict[str, float] = {}
    if probes is not None and resume_from is None:
        last_probe = probes(model, accelerator)
        log.log({"step": 0, "tokens": 0, **last_probe})

    stop = _StopFlag()
    bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True,
               disable=not (main and recipe.tracking.progress))
    last: dict[str, Any] = {}
    warned: set[str] = set()
    model.train()
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            tokens = step * tokens_per_step
            lr = schedule(tokens)
            for group in optimizer.param_groups:
                group["lr"] = lr

            picks = sampler.draw(layout.sequences_per_step)  # the same global batch on every rank
            epochs = sampler.repeats()
            loss_sum = torch.zeros((), device=accelerator.device)
            for micro in layout.my_micro_batches(picks, rank):
                ids = read_batch(sources, micro).to(accelerator.device, non_blocking=True)
                with accelerator.accumulate(model):
                    loss = model(input_ids=ids, labels=ids).loss
                    accelerator.backward(loss)
                loss_sum += loss.detach()
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), recipe.train.grad_clip or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            loss = accelerator.reduce(loss_sum / layout.grad_accum, reduction="mean").item()
            step += 1
            dt = time.perf_counter() - t0
            elapsed += dt
            last = {"step": step, "tokens": step * tokens_per_step, "train/loss": loss,
                    "lr": optimizer.param_groups[0]["lr"],
                    "train/grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "train/tokens_per_s": tokens_per_step / dt, "time/elapsed_s": elapsed,
                    **{f"data/{name}/epochs": e for name, e in epochs.items() if weights[name] > 0}}
            log.log(last)
            for name in [n for n, e in epochs.items() if e >= recipe.data.warn_epochs and n not in warned]:
                warned.add(name)
                if main:
                    tqdm.write(f"cpt: warning: source {name} has been read {epochs[name]:.1f} times over "
                               f"(data.warn_epochs = {recipe.data.warn_epochs:g}); repeated data trains less "
                               f"and can hurt: add data or lower its share")
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{last['lr']:.2e}",
                            tok_s=f"{last['train/tokens_per_s']:.0f}", refresh=False)

            if probes is not None and (crossed(recipe.probes.every, tokens, step * tokens_per_step)
                                       or step == total_steps):
                last_probe = probes(model, accelerator)
                log.log({"step": step, "tokens": step * tokens_per_step, **last_probe})
            done = step == total_steps
            halted = stop.signum is not None or (max_steps is not None and step >= max_steps)
            if done or halted or crossed(recipe.checkpoint.every, tokens, step * tokens_per_step):
                save(step)
            if halted and not done:
                if main:
                    why = f"signal {stop.signum}" if stop.signum is not None else f"--max-steps {max_steps}"
                    print(f"cpt: stopped at step {step} ({why}); checkpoint saved, continue with --resume")
                break
        if step == total_steps:
            ckpt_lib.export_model(accelerator, model, tokenizer, run_dir / "final")
    finally:
        bar.close()
        log.close()
        stop.restore()
    accelerator.end_training()
    return TrainResult(run_dir, step, step * tokens_per_step, step == total_steps, main, last, last_probe)

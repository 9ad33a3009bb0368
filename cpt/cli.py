"""`cpt` command line: thin verbs over library code. Heavy imports happen inside each verb so that
`cpt --help` stays instant (and never imports DeepSpeed)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cpt.errors import CptError


def _split(args: list[str]) -> tuple[list[str], list[str]]:
    """Positional words: `key.path=value` are overrides, everything else a recipe path."""
    recipes = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    return recipes, overrides


def cmd_train(ns: argparse.Namespace) -> int:
    from cpt.recipe import load_recipe

    recipes, overrides = _split(ns.args)
    if len(recipes) != 1:
        raise CptError(f"cpt train takes one recipe, got {len(recipes)}: {' '.join(recipes) or '(none)'}")
    recipe = load_recipe(recipes[0], overrides)
    if ns.dry_run:
        print(recipe.to_yaml(), end="")
        return 0
    from cpt.trainer import train

    result = train(recipe, resume=ns.resume, allow_changes=tuple(ns.allow_change), max_steps=ns.max_steps)
    if result.completed and result.is_main:
        print(f"cpt: done: {result.step} steps, {result.tokens} tokens; model exported to {result.run_dir / 'final'}")
    return 0


def cmd_schedule(ns: argparse.Namespace) -> int:
    from cpt.recipe import load_recipe
    from cpt.schedules import build_schedule, describe, plot_schedules

    recipes, overrides = _split(ns.args)
    if not recipes:
        raise CptError("cpt schedule needs at least one recipe")
    schedules = {}
    for path in recipes:
        r = load_recipe(path, overrides)
        s = build_schedule(r.schedule, total_tokens=r.train.tokens, tokens_per_step=r.train.global_batch_tokens,
                           batch_size=r.train.global_batch_tokens // r.data.seq_len)
        label = r.run.name if r.run.name not in schedules else f"{r.run.name} ({path})"
        schedules[label] = s
        print(f"{label}: {r.schedule.kind}, {r.train.tokens} tokens, "
              f"{r.train.tokens // r.train.global_batch_tokens} steps")
        print(describe(s))
    plot_schedules(schedules, ns.out)
    print(f"plot: {ns.out}")
    return 0


def cmd_prepare(ns: argparse.Namespace) -> int:
    from cpt.data.prepare import prepare

    m = prepare(ns.inputs, ns.tokenizer, ns.out, seq_len=ns.seq_len, text_field=ns.text_field,
                num_proc=ns.num_proc, max_documents=ns.max_documents, overwrite=ns.overwrite)
    skipped = ", ".join(f"{k}: {v}" for k, v in m["skipped"].items() if v) or "none"
    print(f"{ns.out}: {m['documents']} documents, {m['sequences']} sequences of {m['seq_len']} tokens "
          f"({m['tokens']} tokens, {m['tokens_dropped_tail']} tail tokens dropped); skipped: {skipped}")
    return 0


def cmd_tokenizer_train(ns: argparse.Namespace) -> int:
    from cpt.data.tokenizer import train_tokenizer

    out = train_tokenizer(ns.inputs, ns.out, vocab_size=ns.vocab_size, text_field=ns.text_field,
                          max_documents=ns.max_documents)
    print(f"tokenizer: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cpt", description="Continual pre-training of causal LMs.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train (or --resume) a run from a recipe",
                       description="cpt train RECIPE [key.path=value ...]")
    t.add_argument("args", nargs="+", metavar="RECIPE|key=value")
    t.add_argument("--resume", action="store_true",
                   help="continue this run exactly from its latest checkpoint (same recipe)")
    t.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                   help="with --resume: a recipe key (or section) allowed to differ from the checkpoint's")
    t.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps (checkpointed; continue with --resume)")
    t.add_argument("--dry-run", action="store_true", help="print the resolved recipe and exit")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("schedule", help="print a recipe's LR phases and plot LR against tokens",
                       description="cpt schedule RECIPE [RECIPE ...] [key.path=value ...]")
    s.add_argument("args", nargs="+", metavar="RECIPE|key=value")
    s.add_argument("--out", type=Path, default=Path("lr_schedule.png"), help="PNG to write")
    s.set_defaults(func=cmd_schedule)

    d = sub.add_parser("prepare", help="tokenize raw text once into memory-mapped token shards")
    d.add_argument("inputs", nargs="+", help="jsonl, jsonl.gz, json, parquet, txt files or saved HF datasets")
    d.add_argument("--tokenizer", required=True, help="HF tokenizer dir")
    d.add_argument("--out", required=True, type=Path, help="output dir for shards + manifest.json")
    d.add_argument("--seq-len", type=int, required=True, help="tokens per packed sequence")
    d.add_argument("--text-field", default="text")
    d.add_argument("--num-proc", type=int, default=1)
    d.add_argument("--max-documents", type=int, default=None, help="only the first N documents")
    d.add_argument("--overwrite", action="store_true")
    d.set_defaults(func=cmd_prepare)

    k = sub.add_parser("tokenizer", help="tokenizer tools")
    ksub = k.add_subparsers(dest="tverb", required=True, metavar="COMMAND")
    kt = ksub.add_parser("train", help="train a byte-level BPE tokenizer locally (HF tokenizer dir)")
    kt.add_argument("inputs", nargs="+")
    kt.add_argument("--out", required=True, type=Path)
    kt.add_argument("--vocab-size", type=int, default=4096)
    kt.add_argument("--text-field", default="text")
    kt.add_argument("--max-documents", type=int, default=None)
    kt.set_defaults(func=cmd_tokenizer_train)
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except CptError as e:
        print(f"cpt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cpt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`cpt` command line: thin verbs over library code. Heavy imports happen inside each verb so that
`cpt --help` stays instant (and never imports DeepSpeed). The choice lists of the options come from the
modules that own them (none of which imports torch), so that a new decay shape, search family, law or
merge dtype reaches the command line without an edit here."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cpt.errors import CptError
from cpt.gguf import DTYPES as GGUF_DTYPES
from cpt.merge import DTYPES
from cpt.predict.laws import LAWS
from cpt.predict.search import FAMILIES
from cpt.schedules import DECAY_SHAPES


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
    if ns.branch_from is not None:
        from cpt.plan import make_branch

        recipe = make_branch(recipe, ns.branch_from, decay=ns.decay, shape=ns.decay_shape)
    elif ns.decay is not None or ns.decay_shape is not None:
        raise CptError("--decay and --decay-shape go with --branch-from CHECKPOINT")
    if ns.dry_run:
        from cpt.train.setup import check_recipe

        print(recipe.to_yaml(), end="")
        print(f"# {check_recipe(recipe, resume=ns.resume, allow_changes=tuple(ns.allow_change))}")
        return 0
    from cpt.train.loop import train

    result = train(recipe, resume=ns.resume, allow_changes=tuple(ns.allow_change), max_steps=ns.max_steps)
    if result.completed and result.is_main:
        print(f"cpt: done: {result.step} steps, {result.tokens} tokens; model exported to {result.run_dir / 'final'}")
    # stopped by SIGINT/SIGTERM (checkpointed): 128 + signal, as shells expect, so `cpt train a && b` stops
    return 128 + result.signum if result.signum is not None else 0


def cmd_schedule(ns: argparse.Namespace) -> int:
    from cpt.plan import plan_run
    from cpt.recipe import load_recipe
    from cpt.schedule_plot import plot_schedules
    from cpt.schedules import describe
    from cpt.stages import staged_schedule

    groups = _schedule_groups(ns.args)
    schedules, stages, mixtures, steps = {}, {}, {}, {}
    for path, overrides, own in groups:
        r = load_recipe(path, overrides)
        plan = plan_run(r, allow_missing_init=True)  # a re-warm from the checkpoint's last LR where it exists
        if plan.note:
            print(f"{path}: {plan.note}")
        step_tokens = r.train.global_batch_tokens
        s = staged_schedule(plan.stages)
        label = r.run.name + (f" ({', '.join(own)})" if own else "")
        label = label if label not in schedules else f"{label} [{path}]"
        schedules[label] = s
        stages[label] = [(st.start, st.name) for st in plan.stages[1:]]
        mixtures[label] = [(st.start, st.end, st.mixture) for st in plan.stages]
        steps[label] = (plan.origin.tokens, step_tokens)  # each step's LR: the schedule at its first token
        first, last = s(plan.origin.tokens), s(s.total_tokens - step_tokens)
        print(f"{label}: {len(plan.stages)} stage(s), tokens {plan.origin.tokens} -> {s.total_tokens}, "
              f"{(s.total_tokens - plan.origin.tokens) // step_tokens} steps; a step's LR is the schedule at "
              f"its first token: first step {first:.4g}, last step {last:.4g}")
        print(describe(s))
        for st in plan.stages:
            print(f"mixture of {st.name}: {st.mixture.describe()}")
    plot_schedules(schedules, ns.out, title=ns.title or "learning rate against tokens (each step's at its first "
                   "token)", stages=stages, mixtures=mixtures, steps=steps)
    print(f"plot: {ns.out}")
    return 0


def _schedule_groups(args: list[str]) -> list[tuple[str, list[str], list[str]]]:
    """`cpt schedule`'s words as (recipe, its overrides, the overrides of its own): key=value words before
    the first recipe apply to every recipe, those after a recipe to that recipe alone, so one recipe can
    be compared with a variant of itself (`cpt schedule r.yaml r.yaml schedule.max_lr=1e-3`)."""
    common: list[str] = []
    groups: list[tuple[str, list[str], list[str]]] = []
    for word in args:
        if "=" not in word:
            groups.append((word, common, []))
        elif groups:
            groups[-1][2].append(word)
        else:
            common.append(word)
    if not groups:
        raise CptError("cpt schedule needs at least one recipe")
    return [(path, [*common, *own], own) for path, common, own in groups]


def cmd_prepare(ns: argparse.Namespace) -> int:
    from cpt.data.prepare import prepare

    if (ns.num_shards is None) != (ns.shard_index is None):
        raise CptError("--num-shards N and --shard-index I go together (part I of N; merge with cpt prepare merge)")
    part = None if ns.num_shards is None else (ns.shard_index, ns.num_shards)
    inputs = _prepare_inputs(ns)
    if ns.validation_fraction is not None:
        return _prepare_split(ns, inputs, part)
    m = prepare(inputs, ns.tokenizer, ns.out, seq_len=ns.seq_len, text_field=ns.text_field,
                num_proc=ns.num_proc, max_documents=ns.max_documents, overwrite=ns.overwrite,
                eos_token=ns.eos_token, part=part, lengths=_length_options(ns))
    skipped = ", ".join(f"{k}: {v}" for k, v in m["skipped"].items() if v) or "none"
    tail = "tail tokens kept for the merge" if part else "tail tokens dropped"
    print(f"{ns.out}: {m['documents']} documents, {m['sequences']} sequences of {m['seq_len']} tokens "
          f"({m['tokens']} tokens, {m['tokens_dropped_tail']} {tail}); skipped: {skipped}")
    _print_lengths(m)
    _print_unsupported(m)
    return 0


def _prepare_inputs(ns: argparse.Namespace) -> list:
    """The positional inputs, then the --hf-dataset one (a reader.HubDataset) if given."""
    from cpt.data.reader import HubDataset

    if ns.hf_dataset is None:
        given = [f for f, v in (("--hf-config", ns.hf_config), ("--hf-split", ns.hf_split),
                                ("--streaming", ns.streaming)) if v]
        if given:
            raise CptError(f"{', '.join(given)} go with --hf-dataset NAME")
        if not ns.inputs:
            raise CptError("cpt prepare needs inputs: files or folders, and/or --hf-dataset NAME")
        return ns.inputs
    return [*ns.inputs, HubDataset(ns.hf_dataset, ns.hf_config, ns.hf_split or "train", ns.streaming)]


def _print_unsupported(m: dict) -> None:
    other = m.get("unsupported_files")
    if other:
        print(f"skipped {sum(other.values())} files of other types in input folders: "
              + ", ".join(f"{ext} {n}" for ext, n in other.items()))


def _length_options(ns: argparse.Namespace):
    """cpt.data.lengths.LengthOptions of --min-doc-tokens, --upsample-long, --whole-documents; None without them."""
    from cpt.data.lengths import LengthOptions, parse_upsample

    if ns.min_doc_tokens is None and ns.upsample_long is None and not ns.whole_documents:
        return None
    up = None if ns.upsample_long is None else parse_upsample(ns.upsample_long)
    return LengthOptions(ns.min_doc_tokens, up, ns.whole_documents)


def _print_lengths(manifest: dict) -> None:
    if "lengths" in manifest:
        from cpt.data.lengths import summary

        print(summary(manifest["lengths"]))


def _prepare_split(ns: argparse.Namespace, inputs: list, part) -> int:
    from cpt.data.prepare import prepare_split

    ms = prepare_split(inputs, ns.tokenizer, ns.out, ns.seq_len, ns.validation_fraction, split_seed=ns.split_seed,
                       text_field=ns.text_field, num_proc=ns.num_proc, max_documents=ns.max_documents,
                       overwrite=ns.overwrite, eos_token=ns.eos_token, part=part, lengths=_length_options(ns))
    tail = "tail tokens kept for the merge" if part else "tail tokens dropped"
    for side in ("train", "validation"):
        m = ms[side]
        print(f"{ns.out / side}: {m['documents']} documents, {m['sequences']} sequences of {m['seq_len']} tokens "
              f"({m['tokens']} tokens, {m['tokens_dropped_tail']} {tail})")
        _print_lengths(m)
    skipped = ", ".join(f"{k}: {v}" for k, v in ms["train"]["skipped"].items() if v) or "none"
    print(f"validation fraction {ns.validation_fraction} (seed {ns.split_seed}, by document hash); skipped: {skipped}")
    _print_unsupported(ms["train"])
    return 0


def cmd_prepare_merge(ns: argparse.Namespace) -> int:
    from cpt.data.prepare import is_split_part, merge_parts, merge_split_parts

    if any(is_split_part(p) for p in ns.parts):  # parts with a validation split: each side into OUT/side
        merged = {ns.out / side: m for side, m in merge_split_parts(ns.parts, ns.out, overwrite=ns.overwrite).items()}
    else:
        merged = {ns.out: merge_parts(ns.parts, ns.out, overwrite=ns.overwrite)}
    for out, m in merged.items():
        stitched = sum(s["sequences"] for s in m["shards"] if "/" not in s["file"])
        print(f"{out}: {len(m['parts'])} parts, {m['documents']} documents, {m['sequences']} sequences of "
              f"{m['seq_len']} tokens ({m['tokens']} tokens, {m['tokens_dropped_tail']} tail tokens dropped; "
              f"{stitched} sequences across part boundaries copied, the rest read from the parts)")
    return 0


def _prepare_merge_parser() -> argparse.ArgumentParser:
    """`cpt prepare merge`: routed by main(), since `cpt prepare`'s own words are input files."""
    p = argparse.ArgumentParser(prog="cpt prepare merge",
                                description="join parts written by cpt prepare --num-shards N --shard-index I "
                                            "into one prepared folder (no token data copied); parts prepared "
                                            "with --validation-fraction into OUT/train and OUT/validation")
    p.add_argument("parts", nargs="+", type=Path, help="the part folders, all N of them (any order)")
    p.add_argument("--out", required=True, type=Path,
                   help="output folder (may be the one holding the parts; its shards are the parts' files)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier merge in --out")
    p.set_defaults(func=cmd_prepare_merge)
    return p


def cmd_tokenizer_train(ns: argparse.Namespace) -> int:
    from cpt.data.tokenizer import train_tokenizer

    out = train_tokenizer(ns.inputs, ns.out, vocab_size=ns.vocab_size, text_field=ns.text_field,
                          max_documents=ns.max_documents, max_documents_per_input=ns.max_documents_per_input)
    print(f"tokenizer: {out}")
    return 0


def cmd_tokenizer_extend(ns: argparse.Namespace) -> int:
    from cpt.data.extend import extend_tokenizer, format_report

    report = extend_tokenizer(ns.base, ns.train, ns.add, ns.out, old=ns.old, keep=ns.keep,
                              max_documents=ns.max_documents, text_field=ns.text_field)
    print(format_report(report))
    print(f"tokenizer: {ns.out}")
    return 0


def cmd_probe(ns: argparse.Namespace) -> int:
    from accelerate import PartialState

    from cpt.probe_cmd import format_table, parse_named, run_probe, write_result

    sets = parse_named(ns.sets, "--sets")
    downstream = parse_named(ns.downstream, "--downstream")
    result = run_probe(ns.model, sets, downstream, max_sequences=ns.max_sequences,
                       micro_batch_size=ns.micro_batch_size, lm_eval_tasks=ns.lm_eval,
                       lm_eval_limit=ns.limit, lm_eval_include=ns.lm_eval_include, precision=ns.precision,
                       by_position=ns.by_position)
    if PartialState().is_main_process:
        print(format_table(result))
        if ns.out is not None:
            print(f"result: {write_result(result, ns.out)}")
    return 0


def cmd_compare(ns: argparse.Namespace) -> int:
    from cpt.compare import compare

    page = compare(ns.runs, ns.out, smoothing=ns.smoothing, metric=ns.metric)
    print(f"compare: {page}")
    return 0


def cmd_predict(ns: argparse.Namespace) -> int:
    from cpt.predict import run_predict

    recipes, overrides = _split(ns.recipe)
    if not recipes and not ns.search and not ns.held_out:
        raise CptError("cpt predict: give --recipe R.yaml ... or --held-out NAME=FILE ... to predict, or --search "
                       "FAMILY ... to search")
    run_predict(ns.fit, recipes, overrides, compare_runs=ns.runs, laws=ns.law, families=ns.search, out=ns.out,
                lam=ns.lam, bootstrap=ns.bootstrap, window=ns.smooth, final_window=ns.final_window, metric=ns.metric,
                curves=ns.curve, held_out=ns.held_out, fit_points=ns.fit_points, lam_half_life=ns.lam_half_life)
    return 0


def cmd_merge(ns: argparse.Namespace) -> int:
    from cpt.merge_cmd import cmd_merge as merge

    return merge(ns)


def cmd_import(ns: argparse.Namespace) -> int:
    from cpt.gguf import format_report, import_gguf

    print(format_report(import_gguf(ns.file, ns.out, dtype=ns.dtype, overwrite=ns.overwrite)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cpt", description="Continual pre-training of causal LMs.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="COMMAND")
    from cpt.planner.verb import add_plan

    for add_verb in (_add_train, _add_schedule, _add_prepare, _add_probe, _add_compare, _add_predict, add_plan,
                     _add_merge, _add_tokenizer, _add_import):  # the order `cpt --help` lists them in
        add_verb(sub)
    return p


def _add_train(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train (or --resume) a run from a recipe",
                       description="cpt train RECIPE [key.path=value ...]")
    t.add_argument("args", nargs="*", metavar="RECIPE|key=value")  # checked in cmd_train (--resume R.yaml)
    t.add_argument("--resume", nargs="?", const=True, default=False, metavar="auto",
                   help="continue this run exactly from its latest checkpoint (same recipe); --resume auto: "
                        "resume if run.output_dir holds a checkpoint, else start fresh (one command for a first "
                        "start and a requeue)")
    t.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                   help="with --resume: a recipe key (or section) allowed to differ from the checkpoint's")
    t.add_argument("--max-steps", type=int, default=None,
                   help="stop (with a checkpoint) once the run has taken this many steps since it started, "
                        "counted over resumes: a run resumed at step 20 with --max-steps 30 stops at 30")
    t.add_argument("--dry-run", action="store_true",
                   help="print the resolved recipe, check everything that can be checked without training "
                        "(paths, data vs tokenizer and seq_len, batch layout, position limit) and exit")
    t.add_argument("--branch-from", metavar="CHECKPOINT", default=None,
                   help="decay branch (WSD / infinite): from this stable-phase checkpoint of the RECIPE's run, "
                        "decay to min LR; a new run dir RUN-decay-at-STEP")
    t.add_argument("--decay", metavar="LENGTH", default=None,
                   help="with --branch-from: decay length (10%% of the run's budget, 200 steps, 2M)")
    t.add_argument("--decay-shape", default=None, choices=DECAY_SHAPES,
                   help="with --branch-from: decay shape (default: the recipe's)")
    t.set_defaults(func=cmd_train)


def _add_schedule(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("schedule", help="print a recipe's LR phases and plot LR against tokens",
                       description="cpt schedule [key=value ...] RECIPE [key=value ...] [RECIPE [key=value ...] ...]: "
                                   "key=value before the first recipe applies to all, after a recipe to that "
                                   "recipe alone (compare a recipe with a variant of itself)")
    s.add_argument("args", nargs="+", metavar="RECIPE|key=value")
    s.add_argument("--out", type=Path, default=Path("lr_schedule.png"), help="PNG to write")
    s.add_argument("--title", default=None, help="the plot's title (default: learning rate against tokens)")
    s.set_defaults(func=cmd_schedule)


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("prepare", help="tokenize raw text once into memory-mapped token shards",
                       epilog="in parts, on N machines: cpt prepare FILES ... --num-shards N --shard-index I "
                              "--out DIR/part-I, then cpt prepare merge DIR/part-* --out DIR")
    d.add_argument("inputs", nargs="*",
                   help="jsonl, jsonl.gz, json, parquet, csv, tsv files (a record / row per document); txt, md, "
                        "markdown, rst files (a file per document); saved HF datasets; folders of them (recursive, "
                        "sorted; hidden names and other file types skipped)")
    d.add_argument("--hf-dataset", default=None, metavar="NAME",
                   help="also read this dataset with datasets.load_dataset (a hub id, or a folder of data files), "
                        "after the inputs")
    d.add_argument("--hf-config", default=None, metavar="C", help="with --hf-dataset: its configuration (subset)")
    d.add_argument("--hf-split", default=None, metavar="S", help="with --hf-dataset: the split (default train)")
    d.add_argument("--streaming", action="store_true",
                   help="with --hf-dataset: read rows as they arrive instead of downloading the whole split first")
    d.add_argument("--tokenizer", required=True, help="HF tokenizer dir")
    d.add_argument("--out", required=True, type=Path, help="output dir for shards + manifest.json")
    d.add_argument("--seq-len", type=int, required=True, help="tokens per packed sequence")
    d.add_argument("--text-field", default="text", help="the JSON field / table or CSV column holding the text")
    d.add_argument("--num-proc", type=int, default=1)
    d.add_argument("--max-documents", type=int, default=None, help="only the first N documents")
    d.add_argument("--overwrite", action="store_true")
    d.add_argument("--eos-token", default=None,
                   help="the token that ends each document (the separator), in place of the tokenizer's eos "
                        "token; required where the tokenizer has none. Default: its eos token (an instruct "
                        "tokenizer's may be a chat-turn end such as <|im_end|>). The one chosen is printed")
    d.add_argument("--num-shards", type=int, default=None, metavar="N",
                   help="prepare only part --shard-index of N contiguous parts of the inputs' records, "
                        "balanced by size (join them with cpt prepare merge)")
    d.add_argument("--shard-index", type=int, default=None, metavar="I", help="which part, 0..N-1")
    d.add_argument("--validation-fraction", type=float, default=None, metavar="F",
                   help="also cut a validation split (0 < F < 0.5) by document: OUT/train and OUT/validation; "
                        "a document goes to validation by a hash of its text, so identical documents share a side")
    d.add_argument("--split-seed", type=int, default=0, help="seed of the validation split's hash")
    d.add_argument("--min-doc-tokens", type=int, default=None, metavar="N",
                   help="long-context data: drop documents shorter than N tokens (counted in the manifest)")
    d.add_argument("--upsample-long", default=None, metavar="L:F",
                   help="long-context data: write documents of L tokens or more F times (the extra copies in "
                        "passes of their own after the inputs, never two in one row); one prepare per source keeps "
                        "the domain mixture (Fu et al. 2024's per-source upsampling)")
    d.add_argument("--whole-documents", action="store_true",
                   help="never cut a document that fits in a row across two rows: it waits while shorter ones "
                        "fill the row (longer documents are cut as they come)")
    d.set_defaults(func=cmd_prepare)


def _add_probe(sub: argparse._SubParsersAction) -> None:
    pr = sub.add_parser("probe", help="held-out loss and downstream scores of a model or checkpoint",
                        description="cpt probe MODEL --sets NAME=PREPARED_DIR ... [--downstream NAME=JSONL ...] "
                                    "[--lm-eval TASK ... [--limit N] [--lm-eval-include DIR]]")
    pr.add_argument("model", help="HF model dir (e.g. RUN/final) or cpt checkpoint dir (RUN/checkpoints/step-N)")
    pr.add_argument("--sets", nargs="+", action="extend", default=[], metavar="NAME=PREPARED_DIR",
                    help="held-out token dirs written by cpt prepare")
    pr.add_argument("--downstream", nargs="+", action="extend", default=[], metavar="NAME=JSONL",
                    help="multiple-choice / cloze jsonl sets (see cpt/downstream.py)")
    pr.add_argument("--lm-eval", nargs="+", action="extend", default=[], metavar="TASK",
                    help="lm-evaluation-harness tasks, run on the model in memory (needs pip install -e '.[eval]')")
    pr.add_argument("--limit", type=int, default=None, metavar="N", help="the first N documents of each lm-eval task")
    pr.add_argument("--lm-eval-include", default=None, metavar="DIR",
                    help="a folder of local lm-eval task YAMLs (beside lm-eval's own tasks)")
    pr.add_argument("--max-sequences", type=int, default=64,
                    help="held-out sequences per set: N spread evenly over the set, as the run's probes.max_sequences "
                         "samples them (the whole set when it has N or fewer)")
    pr.add_argument("--micro-batch-size", type=int, default=16, help="sequences per forward pass")
    pr.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="bf16: every forward under bf16 autocast (fp32 weights), as train.precision: bf16 trains; "
                         "auto (default, as train.precision): bf16 on a GPU that supports it, fp32 elsewhere")
    pr.add_argument("--by-position", type=lambda v: [int(e) for e in v.split(",")], default=None,
                    metavar="E0,E1,...", help="bucket edges of the loss by position, e.g. 0,128,256,512: the mean "
                    "loss of the tokens at positions lo..hi-1 of their row, per set (probes.by_position)")
    pr.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    pr.set_defaults(func=cmd_probe)


def _add_compare(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("compare", help="plots and a summary table (HTML) from several runs' metrics",
                       description="cpt compare RUN_DIR [RUN_DIR ...] [--out DIR]")
    c.add_argument("runs", nargs="+", metavar="RUN_DIR")
    c.add_argument("--out", type=Path, default=Path("compare"), help="folder for the PNGs and index.html")
    c.add_argument("--metric", choices=["loss", "bpb"], default="loss",
                   help="probe panels and forgetting columns in nats per token (loss) or bits per byte (bpb: "
                        "comparable across tokenizers, e.g. an extended vocabulary)")
    c.add_argument("--smoothing", type=float, default=0.9,
                   help="EMA factor of the train-loss line and of the table's final train loss (its last point)")
    c.set_defaults(func=cmd_compare)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    from cpt.predict.fit import BOOTSTRAP, MAX_POINTS

    pd = sub.add_parser("predict", help="fit loss-curve laws on runs; predict other schedules; search for one",
                        description="cpt predict --fit RUN_DIR[@STAGE] ... [--curve NAME=FILE ...] --recipe "
                                    "R.yaml[@STAGE] ... [key.path=value ...] [--runs RUN_DIR ...] [--held-out "
                                    "NAME=FILE|RUN_DIR ...] [--search FAMILY ...]")
    pd.add_argument("--fit", nargs="+", default=[], metavar="RUN_DIR[@STAGE]",
                    help="cpt runs whose logged LR and loss the laws are fitted on (one stage of a staged run); "
                         "any number, with --curve too")
    pd.add_argument("--curve", nargs="+", default=[], metavar="NAME=FILE[,key=value]",
                    help="curves trained elsewhere to fit on: a .csv/.tsv/.jsonl/.json of records with a step (or "
                         "tokens), an LR and a loss column (Megatron, OLMo-core, HF Trainer, a W&B history export); "
                         "keys step=, tokens=, lr=, loss=, loss_at=before|after, lr_fill=linear|hold, "
                         "tokens_per_step= (docs/prediction.md)")
    pd.add_argument("--recipe", nargs="+", default=[], metavar="R.yaml[@STAGE]|key=value",
                    help="recipes whose schedules to predict; key=value overrides apply to all of them")
    pd.add_argument("--runs", nargs="+", default=[], metavar="RUN_DIR",
                    help="finished runs not used in the fit, to overlay where their recipe.yaml matches")
    pd.add_argument("--held-out", nargs="+", default=[], metavar="NAME=FILE[,key=value]|RUN_DIR[@STAGE]",
                    help="runs or curve files not used in the fit: each predicted from its own logged LR (any "
                         "schedule) and scored against its own loss")
    pd.add_argument("--search", nargs="+", default=[], choices=FAMILIES,
                    metavar="FAMILY", help="minimise the predicted final loss over these schedule families "
                    f"({', '.join(FAMILIES)}) at the first recipe's budget")
    pd.add_argument("--law", nargs="+", default=list(LAWS), choices=LAWS,
                    help="laws to fit (default both)")
    pd.add_argument("--out", type=Path, default=Path("predict"), help="folder for report.md/.json, curves.png")
    pd.add_argument("--lam", type=float, default=0.999,
                    help="anneal law: decay factor of the annealing momentum, per optimizer step (not per log record)")
    pd.add_argument("--lam-half-life", default=None, metavar="LENGTH",
                    help="anneal law: lambda given as the momentum's half-life, in steps (693 steps) or tokens (2.8M, "
                         "converted with the fitted runs' tokens per step); replaces --lam")
    pd.add_argument("--bootstrap", type=int, default=BOOTSTRAP,
                    help=f"bootstrap replicates for the intervals (default {BOOTSTRAP}; the time is printed)")
    pd.add_argument("--fit-points", type=int, default=MAX_POINTS,
                    help=f"fit each run on at most this many points, block means of its measured losses past "
                         f"that (default {MAX_POINTS}; 0: every measured point)")
    pd.add_argument("--smooth", type=int, default=9, help="centred moving-average window (steps) for the errors")
    pd.add_argument("--final-window", type=int, default=10, help="final loss = mean of the last N measured points")
    pd.add_argument("--metric", default="train/loss",
                    help="what to fit and compare: train/loss, or a probe the runs log (probe/DOMAIN/loss); for a "
                         "curve file, its column of that name if it has one")
    pd.set_defaults(func=cmd_predict)


def _add_merge(sub: argparse._SubParsersAction) -> None:
    from cpt.merge_cmd import add_arguments

    m = sub.add_parser("merge", help="average checkpoints (uniform, weights, EMA, WSM), interpolate toward a base "
                                     "model, task arithmetic / TIES / DARE; each into an HF model dir",
                       description="cpt merge CKPT [CKPT ...] --out DIR [--weights SPEC] (checkpoints oldest first) | "
                                   "cpt merge FINAL --toward BASE --weight A[,A...] --out DIR | cpt merge "
                                   "--task-arithmetic|--ties|--dare --base BASE --donor PATH:W ... --out DIR")
    add_arguments(m, DTYPES)
    m.set_defaults(func=cmd_merge)


def _add_tokenizer(sub: argparse._SubParsersAction) -> None:
    k = sub.add_parser("tokenizer", help="tokenizer tools")
    ksub = k.add_subparsers(dest="tverb", required=True, metavar="COMMAND")
    kt = ksub.add_parser("train", help="train a byte-level BPE tokenizer locally (HF tokenizer dir)")
    kt.add_argument("inputs", nargs="+")
    kt.add_argument("--out", required=True, type=Path)
    kt.add_argument("--vocab-size", type=int, default=4096)
    kt.add_argument("--text-field", default="text")
    kt.add_argument("--max-documents", type=int, default=None, help="the first N documents of all inputs together")
    kt.add_argument("--max-documents-per-input", type=int, default=None,
                    help="the first N documents of each input (a sample of every corpus)")
    kt.set_defaults(func=cmd_tokenizer_train)
    ke = ksub.add_parser("extend", help="append tokens learned on new-domain text to a BPE tokenizer (old ids kept)")
    ke.add_argument("base", help="the tokenizer (or model) dir to extend")
    ke.add_argument("--train", nargs="+", required=True, help="new-domain text (as cpt prepare reads it)")
    ke.add_argument("--add", type=int, required=True, help="how many tokens to add")
    ke.add_argument("--out", required=True, type=Path)
    ke.add_argument("--old", nargs="+", default=None,
                    help="old-domain text: fertility before/after and the share of its documents encoded differently")
    ke.add_argument("--keep", nargs="+", default=None,
                    help="old-domain text whose encodings must not change: merges of pairs adjacent in it are skipped")
    ke.add_argument("--text-field", default="text")
    ke.add_argument("--max-documents", type=int, default=20000, help="documents read from --train (and --old)")
    ke.set_defaults(func=cmd_tokenizer_extend)


def _add_import(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser("import", help="make another format's model into an HF model dir (GGUF)")
    isub = i.add_subparsers(dest="iverb", required=True, metavar="FORMAT")
    g = isub.add_parser("gguf", help="a GGUF file (llama.cpp) -> an HF model dir: dequantised safetensors, "
                                     "config, HF tokenizer; then init_from.path: DIR",
                        description="cpt import gguf FILE --out DIR: transformers' GGUF loader reads it (the "
                                    "architectures it supports; needs pip install -e '.[gguf]'), the saved dir is "
                                    "loaded back and checked against it (logits, tied head, tokenizer)")
    g.add_argument("file", type=Path, metavar="FILE", help="the .gguf file")
    g.add_argument("--out", required=True, type=Path, metavar="DIR", help="the HF model dir to write")
    g.add_argument("--dtype", default="float32", choices=GGUF_DTYPES,
                   help="dtype of the saved weights (default float32: the dequantised values exactly)")
    g.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    g.set_defaults(func=cmd_import)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["prepare", "merge"]:
        parser = _prepare_merge_parser()
        ns, extra = parser.parse_args(argv[2:]), []
    else:
        parser = build_parser()
        ns, extra = parser.parse_known_args(argv)
    if getattr(ns, "resume", False) not in (False, True, "auto"):  # --resume took a recipe or override as its value
        v = ns.resume
        ns.args, ns.resume = ([*ns.args, v] if "=" in v else [v, *ns.args]), True
    if extra:  # `cpt train R.yaml --resume train.tokens=32K`: argparse leaves what follows a flag over
        if getattr(ns, "args", None) is None or any("=" not in a or a.startswith("-") for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        ns.args += extra
    try:
        return ns.func(ns)
    except CptError as e:
        print(f"cpt: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("cpt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

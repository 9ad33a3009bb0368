"""Benchmark the data pipeline against the usual Hugging Face recipe, on real text.

(a) ``cpt.data.prepare`` vs the baseline of ``transformers``' run_clm example: ``load_dataset("json")``
    -> ``map(tokenize)`` -> ``map(group_texts)`` -> the packed ``input_ids`` written to a numpy
    file. Same corpus, same tokenizer (a byte-level BPE trained on that corpus), same ``num_proc``,
    fresh caches for both; best of ``--repeats`` wall-clock runs each, in alternating order.
(b) ``MixtureSampler.draw`` + ``read_batch`` throughput over two prepared sources.

    python scripts/bench_data.py --num-proc 2 --data ../shared/data
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from itertools import chain
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing


def baseline(corpus: Path, tokenizer_dir: Path, seq_len: int, num_proc: int, work: Path) -> int:
    """run_clm's pipeline, written out as a flat numpy token file. Returns tokens written."""
    from datasets import load_dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    raw = load_dataset("json", data_files=str(corpus), split="train", cache_dir=str(work / "cache"))

    def tokenize_function(examples):
        return tokenizer(examples["text"])

    tokenized = raw.map(tokenize_function, batched=True, num_proc=num_proc, remove_columns=raw.column_names)

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total_length = len(concatenated[list(examples.keys())[0]])
        total_length = (total_length // seq_len) * seq_len
        result = {
            k: [t[i : i + seq_len] for i in range(0, total_length, seq_len)] for k, t in concatenated.items()
        }
        result["labels"] = result["input_ids"].copy()
        return result

    lm = tokenized.map(group_texts, batched=True, num_proc=num_proc)
    ids = np.asarray(lm.with_format("numpy")["input_ids"], dtype=np.uint16)
    ids.tofile(work / "baseline-tokens.bin")
    return int(ids.size)


def cpt_prepare(corpus: Path, tokenizer_dir: Path, seq_len: int, num_proc: int, work: Path) -> int:
    from cpt.data.prepare import prepare

    m = prepare(
        [corpus], tokenizer_dir, work / "prepared", seq_len=seq_len, num_proc=num_proc, progress=False
    )
    return m["tokens"]


def timed(fn, *args) -> tuple[float, int]:
    t0 = time.perf_counter()
    tokens = fn(*args)
    return time.perf_counter() - t0, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data", type=Path, default=REPO.parent / "shared" / "data", help="folder with en_kernel_docs/"
    )
    ap.add_argument("--num-proc", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import datasets
    import transformers  # noqa: F401  (imports are not part of either pipeline's time)

    from cpt.data.mixture import MixtureSampler
    from cpt.data.prepare import prepare
    from cpt.data.source import TokenSource, read_batch
    from cpt.data.tokenizer import train_tokenizer

    datasets.disable_progress_bars()
    corpus = args.data / "en_kernel_docs" / "train.jsonl.gz"
    second = args.data / "de_libreoffice_help" / "train.jsonl.gz"
    print(
        f"corpus {corpus} ({corpus.stat().st_size / 2**20:.1f} MiB gz), seq_len {args.seq_len}, "
        f"num_proc {args.num_proc}, {os.cpu_count()} CPUs"
    )
    root = Path(tempfile.mkdtemp(prefix="cpt-bench-"))
    try:
        t0 = time.perf_counter()
        tok = train_tokenizer([corpus], root / "tokenizer", vocab_size=4096)
        print(f"tokenizer: byte-level BPE, vocab 4096, trained in {time.perf_counter() - t0:.1f} s")

        # (a) prepare vs baseline, alternating, fresh work dirs (and so fresh datasets caches)
        best = {"cpt prepare": (float("inf"), 0), "baseline (run_clm)": (float("inf"), 0)}
        fns = {"cpt prepare": cpt_prepare, "baseline (run_clm)": baseline}
        for r in range(args.repeats):
            order = list(fns) if r % 2 == 0 else list(reversed(fns))
            for name in order:
                work = root / f"run-{r}-{name.split()[0]}"
                work.mkdir()
                dt, tokens = timed(fns[name], corpus, tok, args.seq_len, args.num_proc, work)
                print(
                    f"  run {r}: {name:<20} {dt:6.2f} s  {tokens:>10,} tokens  {tokens / dt:>12,.0f} tokens/s"
                )
                best[name] = min(best[name], (dt, tokens))
                shutil.rmtree(work)
        (t_cpt, n_cpt), (t_base, n_base) = best["cpt prepare"], best["baseline (run_clm)"]
        print(
            f"(a) cpt prepare        : {n_cpt / t_cpt:>12,.0f} tokens/s  (best {t_cpt:.2f} s, {n_cpt:,} tokens)"
        )
        print(
            f"    baseline (run_clm) : {n_base / t_base:>12,.0f} tokens/s  (best {t_base:.2f} s, {n_base:,} tokens)"
        )
        print(
            f"    ratio (tokens/s)   : {(n_cpt / t_cpt) / (n_base / t_base):.2f}x; "
            f"wall-clock ratio {t_base / t_cpt:.2f}x"
        )

        # (b) mixture draw + read: the DESIGN's replay example, de 0.75 / en 0.25
        prepare([corpus], tok, root / "en", seq_len=args.seq_len, num_proc=args.num_proc, progress=False)
        prepare([second], tok, root / "de", seq_len=args.seq_len, num_proc=args.num_proc, progress=False)
        sources = {"en": TokenSource(root / "en"), "de": TokenSource(root / "de")}
        print(
            f"(b) sources: en {len(sources['en']):,} and de {len(sources['de']):,} sequences of {args.seq_len}"
        )
        for batch in (8, 64, 512):
            sampler = MixtureSampler({k: len(v) for k, v in sources.items()}, {"de": 0.75, "en": 0.25}, seed=0)
            read_batch(sources, sampler.draw(batch))
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 2.0:
                x = read_batch(sources, sampler.draw(batch))
                n += x.shape[0]
            dt = time.perf_counter() - t0
            print(
                f"    draw+read, batch {batch:>3}: {n / dt:>10,.0f} sequences/s = {n * args.seq_len / dt:>13,.0f} "
                f"tokens/s  (repeats: {', '.join(f'{k} {v:.2f}' for k, v in sampler.repeats().items())})"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Tokenizer + prepared shards of the three shared domains, at the paths recipes/paper/ names.

    python scripts/prepare_shared.py [--shared ../shared/data] [--out data/shared] [--seq-len 256]

Writes ``OUT/tokenizer`` (byte-level BPE, vocab 4096, trained on all three domains' training text) and
``OUT/prepared/{en,de,code}/{train,validation}``: ``en`` = Linux kernel docs (English), ``de`` =
LibreOffice help (German), ``code`` = CPython stdlib. Skips what already exists.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cpt.data.prepare import prepare  # noqa: E402
from cpt.data.tokenizer import train_tokenizer  # noqa: E402

DOMAINS = {"en": "en_kernel_docs", "de": "de_libreoffice_help", "code": "code_python_stdlib"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "shared")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--num-proc", type=int, default=2)
    args = ap.parse_args()
    tok = args.out / "tokenizer"
    if not (tok / "tokenizer.json").is_file():
        train_tokenizer([args.shared / d / "train.jsonl.gz" for d in DOMAINS.values()], tok, vocab_size=4096)
        print(f"tokenizer: {tok}")
    for short, domain in DOMAINS.items():
        for split in ("train", "validation"):
            out = args.out / "prepared" / short / split
            if (out / "manifest.json").is_file():
                continue
            m = prepare([args.shared / domain / f"{split}.jsonl.gz"], tok, out, seq_len=args.seq_len,
                        num_proc=args.num_proc, progress=False)
            print(f"{out}: {m['documents']} documents, {m['sequences']} sequences, {m['tokens']} tokens")


if __name__ == "__main__":
    main()

"""Tokenizer + prepared shards of the three shared domains, at the paths recipes/paper/ names.

    python scripts/prepare_shared.py [--shared ../shared/data] [--out data/shared] [--seq-len 256]

Writes ``OUT/tokenizer`` (byte-level BPE, vocab 4096, trained on all three domains' training text) and
``OUT/prepared/{en,de,code}/{train,validation}``: ``en`` = Linux kernel docs (English), ``de`` =
LibreOffice help (German), ``code`` = CPython stdlib. Skips what already exists.

    python scripts/prepare_shared.py --handbook debian-handbook_11.20220922_all.deb --lang es-ES

adds ``OUT/prepared/es/{train,validation}`` (the language's two letters) with the same tokenizer: the Debian
Administrator's Handbook in that language (``apt-get download debian-handbook``; GPL-2.0+ or CC-BY-SA-3.0,
Raphaël Hertzog, Roland Mas, Freexian SARL), one document per HTML page, its text without the markup, 1 page
in 20 (by a hash of its file name) held out for validation. scripts/plan_experiment.py --new es uses it.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html.parser
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cpt.data.prepare import prepare  # noqa: E402
from cpt.data.tokenizer import train_tokenizer  # noqa: E402

DOMAINS = {"en": "en_kernel_docs", "de": "de_libreoffice_help", "code": "code_python_stdlib"}


class _Text(html.parser.HTMLParser):
    """The text of an HTML page: script/style dropped, blocks on their own lines, spaces collapsed."""

    BLOCKS = {"p", "div", "li", "pre", "h1", "h2", "h3", "h4", "h5", "tr", "br", "dt", "dd", "table", "title"}

    def __init__(self):
        super().__init__()
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        self.skip += tag in ("script", "style")
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        self.skip -= tag in ("script", "style")
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)

    def text(self) -> str:
        lines = (" ".join(line.split()) for line in "".join(self.parts).splitlines())
        return "\n".join(line for line in lines if line)


def handbook(deb: Path, lang: str, raw: Path) -> None:
    """``raw/{train,validation}.jsonl.gz`` from the handbook's pages in ``lang`` (e.g. es-ES)."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        pages = sorted((Path(tmp) / "usr/share/doc/debian-handbook/html" / lang).glob("*.html"))
        if not pages:
            raise SystemExit(f"{deb}: no HTML pages for {lang}")
        raw.mkdir(parents=True, exist_ok=True)
        files = {split: gzip.open(raw / f"{split}.jsonl.gz", "wt") for split in ("train", "validation")}
        for page in pages:
            parser = _Text()
            parser.feed(page.read_text(errors="replace"))
            split = "validation" if hashlib.sha256(page.name.encode()).digest()[0] % 20 == 0 else "train"
            files[split].write(json.dumps({"text": parser.text(), "source": f"debian-handbook/{lang}/{page.name}"}) + "\n")
        for f in files.values():
            f.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "shared")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--handbook", type=Path, help="debian-handbook .deb: add its --lang pages as a domain")
    ap.add_argument("--lang", default="es-ES", help="the handbook's language folder (default es-ES)")
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
    if args.handbook:
        short, raw = args.lang[:2], args.out / "raw" / f"handbook-{args.lang}"
        if not (raw / "validation.jsonl.gz").is_file():
            handbook(args.handbook, args.lang, raw)
        for split in ("train", "validation"):
            out = args.out / "prepared" / short / split
            if (out / "manifest.json").is_file():
                continue
            m = prepare([raw / f"{split}.jsonl.gz"], tok, out, seq_len=args.seq_len, num_proc=args.num_proc,
                        progress=False)
            print(f"{out}: {m['documents']} documents, {m['sequences']} sequences, {m['tokens']} tokens")


if __name__ == "__main__":
    main()

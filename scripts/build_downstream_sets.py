"""Build the small next-line multiple-choice sets shipped under recipes/probes/.

    python scripts/build_downstream_sets.py [--data ../shared/data] [--out recipes/probes] [--items 50]

From the validation split of a domain: an item's context is a few consecutive lines of one document,
its choices the true next line and 3 lines drawn from *other* documents of the same domain, in a
seeded random order. A model that has learnt the domain's structure (reStructuredText prose, Python
code) picks the true line more often than chance (25%). Items are spread over the documents (one per
document per round) so one long file does not dominate. Deterministic: the same seed gives the same
files.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
from pathlib import Path

SETS = {  # output file -> shared data domain
    "kernel_next_line.jsonl": "en_kernel_docs",
    "python_next_line.jsonl": "code_python_stdlib",
}
CONTEXT_LINES = 6
N_DISTRACTORS = 3


def usable(line: str) -> bool:
    """A line worth predicting: some length and some letters (not a blank, a rule ``====`` or ``)``),
    and not a licence header (identical across files, so trivially guessable)."""
    s = line.strip()
    return len(s) >= 20 and sum(c.isalpha() for c in s) >= 8 and "SPDX-License" not in s


def build(docs: list[dict], n_items: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    lines = [d["text"].splitlines() for d in docs]
    pool = [(i, line) for i, ls in enumerate(lines) for line in ls if usable(line)]
    # candidate positions per document: a usable target with a full context before it
    cands = [[k for k in range(CONTEXT_LINES, len(ls)) if usable(ls[k])] for ls in lines]
    for c in cands:
        rng.shuffle(c)
    order = [i for i, c in enumerate(cands) if c]
    rng.shuffle(order)
    items: list[dict] = []
    taken = [0] * len(docs)
    while len(items) < n_items and any(taken[i] < len(cands[i]) for i in order):
        for i in order:
            if len(items) >= n_items or taken[i] >= len(cands[i]):
                continue
            k = cands[i][taken[i]]
            taken[i] += 1
            answer = lines[i][k]
            own = {line.strip() for line in lines[i]}
            distractors: list[str] = []
            while len(distractors) < N_DISTRACTORS:
                j, line = rng.choice(pool)
                # from another document, and not a line that also occurs in this one (no second right answer)
                if j != i and line.strip() not in own and line not in distractors:
                    distractors.append(line)
            choices = distractors + [answer]
            rng.shuffle(choices)
            items.append({
                "context": "\n".join(lines[i][k - CONTEXT_LINES:k]) + "\n",
                "choices": choices,
                "answer": choices.index(answer),
                "source": docs[i].get("source", ""),
            })
    return items


def main() -> int:
    repo = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=repo.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=repo / "recipes" / "probes")
    ap.add_argument("--items", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, domain in SETS.items():
        src = args.data / domain / "validation.jsonl.gz"
        if not src.is_file():
            print(f"error: {src} not found", file=sys.stderr)
            return 2
        with gzip.open(src, "rt", encoding="utf-8") as f:
            docs = [json.loads(line) for line in f]
        items = build(docs, args.items, args.seed)
        with open(args.out / name, "w", encoding="utf-8") as f:
            for item in items:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
        n_docs = len({it["source"] for it in items})
        print(f"{args.out / name}: {len(items)} items from {n_docs} documents of {domain}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

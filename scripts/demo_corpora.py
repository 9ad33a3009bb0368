"""Build two small real corpora offline from the running interpreter's standard library.

* ``english``: English prose, the Python help topics (``pydoc_data.topics``) split into paragraphs
  groups, plus the docstrings of half of the stdlib modules;
* ``code``: the Python source of the *other* half of the stdlib modules,
so the two domains share no text. Each is written as ``DOMAIN/{train,validation}.jsonl`` with
``{"text", "source"}`` records, split by document (1 in 20 goes to validation, chosen by a hash of
its source name, so the split is stable across machines). The text is the PSF-licensed CPython
distribution that ships with every Python.

    python scripts/demo_corpora.py data/demo/raw
"""

from __future__ import annotations

import ast
import json
import sys
import sysconfig
import zlib
from pathlib import Path


def _stdlib_modules() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def _docstrings(source: str) -> str:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
    docs = [ast.get_docstring(n) for n in nodes]
    return "\n\n".join(d.strip() for d in docs if d and len(d.split()) >= 5)


def _help_topics(chunk_chars: int = 3000) -> list[tuple[str, str]]:
    import pydoc_data.topics

    out = []
    for name, text in sorted(pydoc_data.topics.topics.items()):
        buf, part = [], 0
        for para in text.split("\n\n"):
            buf.append(para)
            if sum(map(len, buf)) >= chunk_chars:
                out.append((f"pydoc:{name}:{part}", "\n\n".join(buf)))
                buf, part = [], part + 1
        if buf:
            out.append((f"pydoc:{name}:{part}", "\n\n".join(buf)))
    return out


def build(out_dir: str | Path) -> dict[str, dict[str, int]]:
    """Write the corpora; return {domain: {split: documents}}."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: dict[str, list[tuple[str, str]]] = {"english": _help_topics(), "code": []}
    for path in _stdlib_modules():
        name = str(path.relative_to(root))
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if zlib.crc32(name.encode()) % 2:
            if len(source) > 200:
                docs["code"].append((f"stdlib:{name}", source))
        elif text := _docstrings(source):
            docs["english"].append((f"docstrings:{name}", text))
    counts: dict[str, dict[str, int]] = {}
    for domain, items in docs.items():
        d = Path(out_dir) / domain
        d.mkdir(parents=True, exist_ok=True)
        files = {split: open(d / f"{split}.jsonl", "w") for split in ("train", "validation")}
        counts[domain] = {"train": 0, "validation": 0}
        for source, text in items:
            split = "validation" if zlib.crc32(source.encode()) % 20 == 0 else "train"
            files[split].write(json.dumps({"text": text, "source": source}) + "\n")
            counts[domain][split] += 1
        for f in files.values():
            f.close()
    return counts


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "data/demo/raw"
    for domain, c in build(out).items():
        print(f"{out}/{domain}: {c['train']} train, {c['validation']} validation documents")

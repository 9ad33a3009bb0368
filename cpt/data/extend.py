"""Extend a BPE tokenizer with tokens learned from new-domain text (``cpt tokenizer extend``).

A BPE tokenizer is a vocabulary and an ordered list of merges. Extension learns BPE merges on the new
text with the base tokenizer's own normalizer and pre-tokenizer (a throwaway tokenizer trained from
scratch), then walks those merges in their learned order and appends each one whose two parts the
extended vocabulary already has and whose result it lacks, until ``add`` tokens are added. New tokens
get ids after every id the base uses (its added special tokens included) and new merges go after the
base's, with the lowest priority. So:

- every old token keeps its id, and old merges keep their order;
- a text is encoded with all old merges first; a new merge applies only where its pair of tokens stands
  side by side after them. Old-domain text has such pairs too (German "ei" is English "ei"), so without
  care some old encodings change (``--old FILES`` measures the share of documents). ``--keep FILES``
  skips every merge whose pair stands side by side in those texts' encodings: their encodings then stay
  exactly as they were, and unseen text of that domain nearly so (at the price of new tokens shared
  with it).

Only BPE models can be extended (byte-level as GPT-2 / Llama 3 / Qwen, or SentencePiece-style with
byte fallback as Llama 2 / Mistral); a Unigram or WordPiece model is refused.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from cpt.data.reader import iter_documents, resolve_inputs
from cpt.errors import CptError


def _merge_pair(m) -> tuple[str, str]:
    return tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)  # "a b" (older files) or [a, b]


def learned_merges(base_json: dict, texts: list[str], vocab_size: int) -> list[tuple[str, str]]:
    """The merges a BPE with the base's normalizer / pre-tokenizer learns on ``texts``, in order."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    spec = dict(base_json)
    spec["added_tokens"] = []
    spec["post_processor"] = None
    tok = Tokenizer.from_str(json.dumps(spec))
    byte_level = _is_byte_level(base_json)
    tok.model = models.BPE(byte_fallback=bool(base_json["model"].get("byte_fallback")))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if byte_level else [],
    )
    tok.train_from_iterator(texts, trainer)
    return [_merge_pair(m) for m in json.loads(tok.to_str())["model"]["merges"]]


def _is_byte_level(base_json: dict) -> bool:
    return "ByteLevel" in json.dumps(base_json.get("pre_tokenizer"))


def adjacent_pairs(tokenizer, texts: list[str]) -> set[tuple[str, str]]:
    """The pairs of token strings that stand side by side in the encodings of ``texts``."""
    pairs = set()
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        toks = tokenizer.convert_ids_to_tokens(ids)
        pairs.update(zip(toks, toks[1:], strict=False))
    return pairs


def extended_json(base_json: dict, merges: list[tuple[str, str]], add: int,
                  protected: set[tuple[str, str]] = frozenset()) -> tuple[dict, list[str]]:
    """``base_json`` with up to ``add`` of ``merges`` appended (tokens and merges; see the module doc),
    skipping the merges of ``protected`` pairs: a new merge can only change a text's encoding where its
    pair stands side by side in the base's encoding (all old merges go first), so texts whose adjacent
    pairs are all protected keep their encodings exactly."""
    model = base_json["model"]
    if model.get("type") != "BPE":
        raise CptError(f"cpt tokenizer extend: the base is a {model.get('type')} model; only BPE can be extended")
    vocab = dict(model["vocab"])
    next_id = 1 + max([*vocab.values(), *(t["id"] for t in base_json.get("added_tokens", []))])
    known = set(vocab) | {t["content"] for t in base_json.get("added_tokens", [])}
    new_merges, new_tokens = [], []
    for a, b in merges:
        if len(new_tokens) == add:
            break
        if a in vocab and b in vocab and a + b not in known and (a, b) not in protected:
            vocab[a + b] = next_id
            known.add(a + b)
            next_id += 1
            new_merges.append((a, b))
            new_tokens.append(a + b)
    string_merges = bool(model["merges"]) and isinstance(model["merges"][0], str)
    out = json.loads(json.dumps(base_json))
    out["model"]["vocab"] = vocab
    out["model"]["merges"] = model["merges"] + [f"{a} {b}" if string_merges else [a, b] for a, b in new_merges]
    return out, new_tokens


def fertility(tokenizer, texts: list[str]) -> dict[str, float]:
    """Tokens per UTF-8 byte and per whitespace-separated word of ``texts``."""
    tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    return {"tokens_per_byte": tokens / max(1, sum(len(t.encode()) for t in texts)),
            "tokens_per_word": tokens / max(1, sum(len(t.split()) for t in texts))}


def extend_tokenizer(base: str | Path, train: list[str | Path], add: int, out: str | Path,
                     old: list[str | Path] | None = None, keep: list[str | Path] | None = None,
                     max_documents: int = 20000, text_field: str = "text") -> dict:
    """Write ``base`` extended by up to ``add`` tokens learned on ``train`` to ``out`` (an HF tokenizer
    dir: the base's files with a new tokenizer.json). ``keep``: old-domain text whose encodings must not
    change (merges of pairs adjacent in it are skipped). Returns a report: tokens added, fertility of the
    new (and ``old``) domain before and after, and the share of ``old`` documents encoded differently."""
    from transformers import AutoTokenizer

    from cpt.data.tokenizer import load_tokenizer, tokenizer_json

    if add < 1:
        raise CptError(f"cpt tokenizer extend: --add {add}: must be at least 1")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise CptError(f"cpt tokenizer extend: {out} exists and is not empty")
    base_tok = load_tokenizer(base)
    base_json = json.loads(tokenizer_json(base).read_text())

    def read(files):
        with tempfile.TemporaryDirectory(prefix="cpt-ext-") as cache:
            return list(iter_documents(resolve_inputs(files), text_field, [], max_documents=max_documents,
                                       cache_dir=cache))

    new_texts = read(train)
    old_texts = read(old) if old else []
    if not new_texts:
        raise CptError("cpt tokenizer extend: --train holds no documents")
    protected = adjacent_pairs(base_tok, read(keep)) if keep else set()
    merges = learned_merges(base_json, new_texts, len(base_json["model"]["vocab"]) + (16 if keep else 4) * add)
    spec, new_tokens = extended_json(base_json, merges, add, protected)
    if not new_tokens:
        raise CptError("cpt tokenizer extend: the new text teaches no merge the base lacks")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    base_tok.save_pretrained(tmp)
    (tmp / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    tmp.rename(out)
    extended = AutoTokenizer.from_pretrained(out)
    report = {"base": str(base), "out": str(out), "added": len(new_tokens), "base_size": len(base_tok),
              "size": len(extended), "examples": new_tokens[:10], "new_domain": {}, "old_domain": {}}
    for key, texts in (("new_domain", new_texts), ("old_domain", old_texts)):
        if texts:
            report[key] = {"before": fertility(base_tok, texts), "after": fertility(extended, texts)}
    if old_texts:
        a = base_tok(old_texts, add_special_tokens=False)["input_ids"]
        b = extended(old_texts, add_special_tokens=False)["input_ids"]
        report["old_domain"]["documents_changed"] = sum(x != y for x, y in zip(a, b, strict=True)) / len(a)
    return report


def format_report(r: dict) -> str:
    lines = [f"added {r['added']} tokens: {r['base_size']} -> {r['size']} (e.g. {', '.join(map(repr, r['examples'][:5]))})",
             f"{'domain':<12} {'tokens/byte before':>19} {'after':>7} {'tokens/word before':>19} {'after':>7}"]
    for key in ("new_domain", "old_domain"):
        if r[key]:
            b, a = r[key]["before"], r[key]["after"]
            lines.append(f"{key.replace('_domain', ''):<12} {b['tokens_per_byte']:>19.4f} {a['tokens_per_byte']:>7.4f} "
                         f"{b['tokens_per_word']:>19.3f} {a['tokens_per_word']:>7.3f}")
    if "documents_changed" in r["old_domain"]:
        lines.append(f"old-domain documents encoded differently: {100 * r['old_domain']['documents_changed']:.1f}%")
    return "\n".join(lines)

"""Inputs as people have them (issue 18 item 2): folders of .md / .markdown / .rst / .txt (a file per
document), .csv / .tsv (a row per document), a Hugging Face dataset by name (``--hf-dataset``, streamed
or not; the hub off is one line), and ``--validation-fraction`` in parts merged into the two folders one
prepare writes. Everything offline: conftest sets HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, save_bos_tokenizer  # tests/ is on sys.path (pytest's rootdir conftest)

from cpt.cli import main
from cpt.data.prepare import in_validation, merge_split_parts, prepare, prepare_split
from cpt.data.reader import HubDataset
from cpt.data.source import TokenSource
from cpt.data.tokenizer import load_tokenizer

SEQ = 16
DOCS = [
    "# Title\n\nA markdown page, with a list:\n\n- one\n- two\n",
    "Section\n=======\n\nreStructuredText, ``code`` and *emphasis*.\n",
    'Quotes "inside", commas, and a\ttab; Öffnen Sie das Menü – Optionen.\n',
    "def add(a, b):\n    return a + b\n",
    "Zeile eins\r\nZeile zwei mit CRLF\r\n",
    "emoji 🔎︎ and 日本語のテキスト",
]


def stream(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """All token ids and per-token byte counts of a prepared folder, in order."""
    src = TokenSource(path)
    everything = np.arange(len(src))
    return np.asarray(src.batch(everything)).reshape(-1), np.asarray(src.bytes_batch(everything)).reshape(-1)


def expected(tokenizer_dir, docs: list[str]) -> list[int]:
    """The packed stream one prepare writes: each document as the tokenizer frames a text (its BOS, if
    it adds one), then EOS."""
    tok = load_tokenizer(tokenizer_dir)
    out: list[int] = []
    for d in docs:
        out += tok(d, add_special_tokens=True)["input_ids"] + [tok.eos_token_id]
    return out


def utf8(docs: list[str]) -> int:
    return sum(len(d.encode("utf-8")) for d in docs)


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


# ---------------------------------------------------------------- 1. folders of text files, CSV / TSV


@pytest.fixture(scope="module")
def bos_tokenizer(tmp_path_factory) -> Path:
    """A Llama-style tokenizer that puts a BOS before every text: the framing must hold for every input kind."""
    return save_bos_tokenizer(DOCS * 20, 400, tmp_path_factory.mktemp("bos") / "tok")


def text_folder(root: Path) -> tuple[Path, list[str]]:
    """A documentation tree: text files at several depths, hidden ones, and files of other types; returns
    the folder and the documents in the order prepare must read them (sorted by path)."""
    folder = root / "docs"
    for rel, text in [("b/guide.rst", DOCS[1]), ("a.md", DOCS[0]), ("b/c/deep.markdown", DOCS[2]),
                      ("z.txt", DOCS[4]), ("b-notes.txt", DOCS[5]), ("B/upper.MD", DOCS[3]),
                      (".hidden.md", "hidden file"), (".git/info.md", "in a hidden folder"),
                      ("b/.cache/x.txt", "in a hidden folder"), ("img/logo.png", "\x89PNG"),
                      ("b/setup.py", "x = 1"), ("LICENSE", "MIT"), ("conf.PY", "y = 2")]:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(text.encode("utf-8"))  # bytes: CRLF kept as written
    # Path order: by component, "B" < "a" < "b" < "b-notes.txt" ("b/..." before "b-...", unlike plain strings)
    order = [DOCS[3], DOCS[0], DOCS[2], DOCS[1], DOCS[5], DOCS[4]]
    return folder, order


@pytest.mark.parametrize("tok", ["bpe", "bos"])
def test_text_folder_is_a_document_per_file_in_sorted_order(tok, tokenizer_dir, bos_tokenizer, tmp_path, capsys):
    tokenizer = tokenizer_dir if tok == "bpe" else bos_tokenizer
    folder, order = text_folder(tmp_path)
    out = tmp_path / "out"
    assert main(["prepare", str(folder), "--tokenizer", str(tokenizer), "--out", str(out), "--seq-len", str(SEQ)]) == 0
    printed = capsys.readouterr().out
    assert "skipped 4 files of other types in input folders: (none) 1, .png 1, .py 2" in printed
    m = json.loads((out / "manifest.json").read_text())
    assert m["documents"] == 6 and m["unsupported_files"] == {"(none)": 1, ".png": 1, ".py": 2}
    assert [(Path(i["path"]).name, i["format"], i["documents"]) for i in m["inputs"]] == [
        ("upper.MD", "md", 1), ("a.md", "md", 1), ("deep.markdown", "md", 1), ("guide.rst", "rst", 1),
        ("b-notes.txt", "txt", 1), ("z.txt", "txt", 1)]
    ids, nbytes = stream(out)
    want = expected(tokenizer, order)
    assert m["document_prefix"] == ([] if tok == "bpe" else [0])
    assert len(want) == len(ids) + m["tokens_dropped_tail"] and ids.tolist() == want[:len(ids)]
    # bytes per token: every document's UTF-8 bytes exactly once (BOS / EOS: 0), dropped tail included
    assert int(nbytes.sum()) == m["token_bytes"]["total"]
    assert m["token_bytes"]["total"] + m["token_bytes"]["dropped_tail"] == utf8(order)
    assert nbytes[ids == m["eos_token_id"]].sum() == 0


def test_csv_and_tsv_are_a_document_per_row(tokenizer_dir, bos_tokenizer, tmp_path):
    """The same texts as .jsonl, .csv (quoted newlines, commas, quotes, a BOM) and .tsv: the same tokens and
    byte counts; an empty cell and a short row are counted skips, as a bad JSON record is."""
    texts = DOCS
    write_jsonl(tmp_path / "d.jsonl", texts + ["", None])
    with open(tmp_path / "d.csv", "w", encoding="utf-8-sig", newline="") as f:  # Excel's BOM
        w = csv.writer(f)
        w.writerow(["id", "text", "lang"])
        w.writerows([[i, t, "x"] for i, t in enumerate(texts)] + [[90, "", "x"], [91]])  # empty text, short row
    with open(tmp_path / "d.tsv", "w", encoding="utf-8", newline="") as f:  # quoted where a text holds a tab
        w = csv.writer(f, delimiter="\t")
        w.writerow(["text", "id"])
        w.writerows([[t, i] for i, t in enumerate(texts)] + [["", 90], []])  # a blank line is no row
        f.write("\n")
        w.writerow([None, 91])  # -> an empty cell
    for tokenizer in (tokenizer_dir, bos_tokenizer):
        got = {}
        for kind in ("jsonl", "csv", "tsv"):
            got[kind] = prepare([tmp_path / f"d.{kind}"], tokenizer, tmp_path / kind, seq_len=SEQ, overwrite=True,
                                progress=False)
            got[kind]["stream"] = stream(tmp_path / kind)
        m = got["csv"]
        assert m["documents"] == len(texts) and m["inputs"][0]["format"] == "csv"
        assert m["skipped"] == {"empty_text": 1, "null_text": 1} == got["jsonl"]["skipped"]
        assert got["tsv"]["documents"] == len(texts) and got["tsv"]["skipped"] == {"empty_text": 2}
        want = expected(tokenizer, texts)
        for kind in ("csv", "tsv"):
            ids, nbytes = got[kind]["stream"]
            assert ids.tolist() == want[:len(ids)] and len(want) == len(ids) + got[kind]["tokens_dropped_tail"]
            assert np.array_equal(ids, got["jsonl"]["stream"][0]) and np.array_equal(nbytes, got["jsonl"]["stream"][1])
            tb = got[kind]["token_bytes"]
            assert tb["total"] + tb["dropped_tail"] == utf8(texts) and tb["total"] == int(nbytes.sum())


def test_csv_without_the_column_is_one_line(tokenizer_dir, tmp_path, capsys):
    (tmp_path / "t.csv").write_text("id,body,lang\n1,hello,en\n", encoding="utf-8")
    out = tmp_path / "out"
    argv = ["prepare", str(tmp_path / "t.csv"), "--tokenizer", str(tokenizer_dir), "--out", str(out), "--seq-len", "4"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"cpt: error: input {tmp_path / 't.csv'} has no column 'text' (its columns: id, body, lang); " \
                  "set --text-field"
    assert not out.exists()
    assert main([*argv, "--text-field", "body"]) == 0
    assert json.loads((out / "manifest.json").read_text())["documents"] == 1


# ---------------------------------------------------------------- 2. a Hugging Face dataset by name


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """datasets' cache (Arrow files of a non-streamed load) in the test's folder, not in ~/.cache."""
    import datasets

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


@pytest.fixture(scope="module")
def english(corpora) -> list[str]:
    """200 real English documents."""
    lines = corpora["en"]["train"].read_text(encoding="utf-8").splitlines()[:200]
    return [json.loads(line)["text"] for line in lines]


def test_prepare_labels_its_bars_and_names_the_separator(english, tokenizer_dir, tmp_path, capsys):
    """Issue 20 (a): each tokenizing bar says what it tokenizes (the split's side, the input), and one line
    names the document separator and why: the tokenizer's eos, which for an instruct tokenizer (SmolLM2-
    Instruct) is the chat-turn end <|im_end|>, or --eos-token, which overrides it. Manifests are unchanged."""
    from transformers import AutoTokenizer

    instruct = tmp_path / "instruct-tok"  # as SmolLM2-Instruct's: <|endoftext|> is there, but eos is <|im_end|>
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"eos_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.save_pretrained(instruct)
    text = write_jsonl(tmp_path / "en.jsonl", english[:60])
    base = ["prepare", str(text), "--tokenizer", str(instruct), "--seq-len", str(SEQ)]
    assert main([*base, "--out", str(tmp_path / "split"), "--validation-fraction", "0.2"]) == 0
    out, err = capsys.readouterr()
    im_end, endoftext = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    line = (f"cpt prepare: document separator: '<|im_end|>' (id {im_end}), the tokenizer's eos token; --eos-token "
            f"names another (its other special tokens: <|endoftext|>, <|im_start|>)")
    assert out.splitlines()[0] == line and out.count("document separator") == 1  # once for both sides
    assert err.index("tokenizing validation (en.jsonl):") < err.index("tokenizing train (en.jsonl):")
    m = json.loads((tmp_path / "split" / "train" / "manifest.json").read_text())
    assert m["eos_token_id"] == im_end
    assert main([*base, "--out", str(tmp_path / "plain"), "--eos-token", "<|endoftext|>"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == (f"cpt prepare: document separator: '<|endoftext|>' (id {endoftext}), from "
                                   f"--eos-token (the tokenizer's eos token is '<|im_end|>')")
    assert "tokenizing en.jsonl:" in err
    m = json.loads((tmp_path / "plain" / "manifest.json").read_text())
    assert m["eos_token_id"] == endoftext and set(m) == set(MANIFEST_KEYS)  # nothing added to the manifest
    ids, _ = stream(tmp_path / "plain")
    assert im_end not in ids and endoftext in ids
    # the part of a split: its side and its part
    prepare_split([text, text], instruct, tmp_path / "part", SEQ, 0.2, part=(1, 2), progress=True)
    err = capsys.readouterr().err
    assert "tokenizing validation, part 2/2 (en.jsonl, +1 more):" in err and "tokenizing train, part 2/2" in err
    help_text = subprocess.run([sys.executable, "-m", "cpt.cli", "prepare", "--help"], capture_output=True, text=True,
                               cwd=ROOT, check=True).stdout
    assert "in place of the tokenizer's eos token; required where the tokenizer has none" in " ".join(help_text.split())


MANIFEST_KEYS = ("format", "format_version", "seq_len", "dtype", "vocab_size", "max_token_id", "eos_token_id",
                 "document_prefix", "tokenizer", "tokenizer_hash", "tokenizer_fingerprint", "text_field",
                 "chunk_chars", "inputs", "unsupported_files", "max_documents", "documents", "skipped", "tokens",
                 "tokens_dropped_tail", "sequences", "shard_sequences", "shards", "token_bytes", "created",
                 "cpt_version")


def test_hf_dataset_streamed_or_not_is_the_jsonl(english, tokenizer_dir, tmp_path, hf_cache):
    """load_dataset on a local folder of data files (as a hub set arrives), with and without --streaming:
    token for token and byte for byte the shards of the same .jsonl prepared directly."""
    hub = tmp_path / "hub-set"
    hub.mkdir()
    write_jsonl(hub / "train.jsonl", english)
    write_jsonl(hub / "test.jsonl", ["not this split"] * 50)
    direct = prepare([hub / "train.jsonl"], tokenizer_dir, tmp_path / "direct", seq_len=SEQ, progress=False)
    want = stream(tmp_path / "direct")
    m = prepare([HubDataset(str(hub))], tokenizer_dir, tmp_path / "loaded", seq_len=SEQ, progress=False)
    assert any(hf_cache.iterdir())  # converted to Arrow in (our) datasets cache
    common = ["--tokenizer", str(tokenizer_dir), "--seq-len", str(SEQ), "--hf-dataset", str(hub)]
    assert main(["prepare", *common, "--streaming", "--hf-split", "train", "--out", str(tmp_path / "streamed")]) == 0
    streamed = json.loads((tmp_path / "streamed" / "manifest.json").read_text())
    for got, path in ((m, tmp_path / "loaded"), (streamed, tmp_path / "streamed")):
        ids, nbytes = stream(path)
        assert np.array_equal(ids, want[0]) and np.array_equal(nbytes, want[1])
        assert got["documents"] == direct["documents"] == len(english)
        assert got["sequences"] == direct["sequences"] and got["token_bytes"] == direct["token_bytes"]
        assert got["inputs"] == [{"path": f"hf:{hub} split=train", "format": "hf", "documents": len(english),
                                  "skipped": {}}]
    # a validation split of a streamed set: the same documents on each side as of the .jsonl
    prepare_split([HubDataset(str(hub), streaming=True)], tokenizer_dir, tmp_path / "s1", SEQ, 0.2, progress=False)
    prepare_split([hub / "train.jsonl"], tokenizer_dir, tmp_path / "s2", SEQ, 0.2, progress=False)
    for side in ("train", "validation"):
        assert np.array_equal(stream(tmp_path / "s1" / side)[0], stream(tmp_path / "s2" / side)[0])


def test_hf_dataset_errors_are_one_line(english, tokenizer_dir, tmp_path, hf_cache, capsys, monkeypatch):
    hub = tmp_path / "hub-set"
    hub.mkdir()
    write_jsonl(hub / "train.jsonl", english[:20], field="body")
    base = ["prepare", "--tokenizer", str(tokenizer_dir), "--seq-len", str(SEQ), "--out", str(tmp_path / "o")]
    cases = [
        (["--hf-dataset", str(hub), "--hf-split", "validation"], 'Unknown split "validation"'),
        (["--hf-dataset", str(hub), "--streaming"], "no field 'text' in any record (fields seen: body)"),
        (["--hf-dataset", str(hub)], "no field 'text' in any record (fields seen: body)"),
        (["--streaming"], "--streaming go with --hf-dataset NAME"),
        ([], "cpt prepare needs inputs"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()  # datasets' own bar (building Arrow) may come first
        assert message in err[-1] and err[-1].startswith("cpt: error: ") and "cpt: error" not in "".join(err[:-1])
    # the hub unreachable (not switched off): the network, or a copy cached where it is reachable
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/set' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    assert main([*base, "--hf-dataset", "org/set"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cpt: error: input hf:org/set split=train: cannot reach the Hugging Face Hub")
    assert "check the network" in err and "HF_HUB_OFFLINE=1" in err and "local files" in err and "\n" not in err


def test_hub_offline_and_not_cached_is_one_line(tokenizer_dir, tmp_path):
    """Through the entry point, in a fresh process with the hub switched off: one line, exit code 2."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(ROOT)}
    env.pop("HF_DATASETS_CACHE", None)
    out = subprocess.run([sys.executable, "-m", "cpt.cli", "prepare", "--hf-dataset", "nosuchorg/nosuchset",
                          "--hf-config", "en", "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "o"),
                          "--seq-len", str(SEQ)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("cpt: error: input hf:nosuchorg/nosuchset config=en split=train: not in the local "
                               "datasets cache, and the hub is switched off (HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1)")
    assert "HF_HUB_OFFLINE=0" in lines[0] and "pass local files" in lines[0]
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- 3. a validation split, in parts

SPLIT_KEYS = ("format", "format_version", "seq_len", "dtype", "vocab_size", "max_token_id", "eos_token_id",
              "document_prefix", "tokenizer_hash", "tokenizer_fingerprint", "text_field", "chunk_chars", "inputs",
              "unsupported_files", "documents", "skipped", "tokens", "tokens_dropped_tail", "sequences", "split")


@pytest.fixture(scope="module")
def split_inputs(corpora, tmp_path_factory) -> list[Path]:
    """English jsonl with bad records, a folder (.md, .rst and a .png), a .csv and an empty file."""
    root = tmp_path_factory.mktemp("split-parts")
    en = corpora["en"]["train"].read_text(encoding="utf-8").splitlines()[:240]
    en[3:3] = ["", "{not json", json.dumps({"other": 1}), json.dumps({"text": None})]
    (root / "en.jsonl").write_text("\n".join(en) + "\n", encoding="utf-8")
    (root / "docs").mkdir()
    for i, d in enumerate(DOCS):
        (root / "docs" / f"page{i}.{'md' if i % 2 else 'rst'}").write_text(d * 5, encoding="utf-8")
    (root / "docs" / "logo.png").write_bytes(b"\x89PNG")
    with open(root / "rows.csv", "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([["text"], *[[f"Row {i}: " + DOCS[i % len(DOCS)]] for i in range(60)], [""]])
    (root / "empty.jsonl").write_text("")
    return [root / "en.jsonl", root / "docs", root / "rows.csv", root / "empty.jsonl"]


def test_split_in_parts_merges_to_a_single_split(split_inputs, tokenizer_dir, tmp_path, capsys):
    """--validation-fraction with --num-shards: each part writes both sides, cpt prepare merge joins each
    side, and the result is the single prepare's, token for token, byte for byte, manifests too."""
    f, seed = 0.2, 3
    single = tmp_path / "single"
    ms = prepare_split(split_inputs, tokenizer_dir, single, SEQ, f, split_seed=seed, shard_sequences=8, progress=False)
    n_val = ms["validation"]["split"]["documents"]["validation"]
    n_all = sum(ms["train"]["split"]["documents"].values())
    assert n_all == 240 + 6 + 60 and 0.12 < n_val / n_all < 0.28  # 306 documents read, ~20% of them validation
    assert ms["train"]["documents"] + ms["validation"]["documents"] == n_all
    # the .md / .rst pages: each on the side its text hashes to, the other side's input counts 0
    pages = [i for m in ms.values() for i in m["inputs"] if i["format"] in ("md", "rst")]
    assert len(pages) == 12 and sum(i["documents"] for i in pages) == 6
    assert any(i["documents"] == 0 and not i["skipped"] for i in pages)  # not an "empty_file" on the other side
    for n in (2, 3):
        root = tmp_path / f"n{n}"
        for i in reversed(range(n)):
            prepare_split(split_inputs, tokenizer_dir, root / f"part-{i}", SEQ, f, split_seed=seed, shard_sequences=8,
                          part=(i, n), progress=False)
        parts = [str(root / f"part-{i}") for i in range(n)]
        if n == 2:
            merged = merge_split_parts(parts, root)
        else:
            assert main(["prepare", "merge", *parts, "--out", str(root)]) == 0
            printed = capsys.readouterr().out
            assert f"{root / 'train'}: 3 parts" in printed and f"{root / 'validation'}: 3 parts" in printed
            merged = {side: json.loads((root / side / "manifest.json").read_text()) for side in ("train", "validation")}
        for side in ("train", "validation"):
            a, b = stream(root / side), stream(single / side)
            assert len(a[0]) == len(b[0]) > 0
            assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
            m, s = merged[side], ms[side]
            assert {k: m[k] for k in SPLIT_KEYS} == {k: s[k] for k in SPLIT_KEYS}, side
            for k in ("total", "dropped_tail", "dtype", "counted_from"):
                assert m["token_bytes"][k] == s["token_bytes"][k]
            assert m["split"]["documents"] == {"train": n_all - n_val, "validation": n_val}
            assert m["inputs"][-1]["skipped"] == {"empty_file": 1}  # the empty file, counted once
        # every part on its own: both sides, each the side of that part's records
        for i in range(n):
            pm = {side: json.loads((root / f"part-{i}" / side / "manifest.json").read_text()) for side in ("train", "validation")}
            assert pm["train"]["part"]["records"] == pm["validation"]["part"]["records"]
            assert pm["train"]["split"]["documents"] == pm["validation"]["split"]["documents"]
    # the validation side's documents are exactly those whose text hashes below F
    records = [json.loads(line) for line in split_inputs[0].read_text().splitlines() if line.startswith('{"')]
    en_texts = [r["text"] for r in records if isinstance(r.get("text"), str)]
    assert len(en_texts) == 240
    assert ms["validation"]["inputs"][0]["documents"] == sum(in_validation(t, f, seed) for t in en_texts)


def test_split_parts_of_different_kinds_are_refused(split_inputs, tokenizer_dir, tmp_path, capsys):
    prepare_split(split_inputs[:1], tokenizer_dir, tmp_path / "part-0", SEQ, 0.2, part=(0, 2), progress=False)
    prepare(split_inputs[:1], tokenizer_dir, tmp_path / "part-1", seq_len=SEQ, part=(1, 2), progress=False)
    assert main(["prepare", "merge", str(tmp_path / "part-0"), str(tmp_path / "part-1"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "part-1 is not a part prepared with --validation-fraction" in err and "\n" not in err
    prepare_split(split_inputs[:1], tokenizer_dir, tmp_path / "other-1", SEQ, 0.2, split_seed=1, part=(1, 2),
                  progress=False)
    assert main(["prepare", "merge", str(tmp_path / "part-0"), str(tmp_path / "other-1"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "parts differ in validation split" in err and "\n" not in err

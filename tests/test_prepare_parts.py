"""`cpt prepare` in parts (``--num-shards N --shard-index I``) and `cpt prepare merge`: the merged folder is
the one a single prepare of the same inputs writes (same sequences, byte counts, counts), reads through
TokenSource, trains and probes; parts that do not belong together are refused."""

from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

import cpt.data.prepare as prep
from cpt.cli import main
from cpt.data.prepare import merge_parts, prepare, split_records
from cpt.data.source import TokenSource, validate_source
from cpt.errors import CptError

SEQ = 128
SAME_KEYS = ("format", "format_version", "seq_len", "dtype", "vocab_size", "max_token_id", "eos_token_id",
             "document_prefix", "tokenizer_hash", "tokenizer_fingerprint", "text_field", "chunk_chars", "inputs",
             "documents", "skipped", "tokens", "tokens_dropped_tail", "sequences")


@pytest.fixture(scope="module")
def inputs(corpora, tmp_path_factory) -> list[Path]:
    """Four inputs of three formats: English (jsonl, with bad records), a .txt, German (jsonl.gz), an
    empty file: documents of very different lengths, and skips that land in different parts."""
    root = tmp_path_factory.mktemp("parts-inputs")
    en = corpora["en"]["train"].read_text(encoding="utf-8").splitlines()[:150]
    en[3:3] = ["", "{not json", json.dumps({"other": 1}), json.dumps({"text": None}), "[1, 2]"]
    en[90:90] = ["", json.dumps({"text": "  "})]
    (root / "en.jsonl").write_text("\n".join(en) + "\n", encoding="utf-8")
    (root / "note.txt").write_text("A plain text file is one document.\n" * 40, encoding="utf-8")
    with gzip.open(corpora["de"]["train"], "rt", encoding="utf-8") as f:
        de = [next(f) for _ in range(120)]
    with gzip.open(root / "de.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(de)
    (root / "empty.jsonl").write_text("")
    return [root / "en.jsonl", root / "note.txt", root / "de.jsonl.gz", root / "empty.jsonl"]


@pytest.fixture(scope="module")
def single(inputs, tokenizer_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "all"
    prepare(inputs, tokenizer_dir, out, seq_len=SEQ, shard_sequences=16, progress=False)
    return out


def prepare_parts(inputs, tokenizer_dir, root: Path, n: int, **kw) -> list[Path]:
    """n parts as n workers write them (in reverse order: nothing depends on the order)."""
    kw = {"seq_len": SEQ, "shard_sequences": 16, "progress": False} | kw
    for i in reversed(range(n)):
        prepare(inputs, tokenizer_dir, root / f"part-{i}", part=(i, n), **kw)
    return [root / f"part-{i}" for i in range(n)]


def assert_same_as_single(merged: Path, single: Path) -> None:
    a, b = TokenSource(merged), TokenSource(single)
    assert len(a) == len(b) > 0
    everything = np.arange(len(b))
    assert np.array_equal(a.batch(everything), b.batch(everything))  # every sequence, in order
    assert np.array_equal(a.bytes_batch(everything), b.bytes_batch(everything))
    assert np.array_equal(a.batch(everything[::-3]), b.batch(everything[::-3]))  # random access too
    ma, mb = a.manifest, b.manifest
    assert {k: ma[k] for k in SAME_KEYS} == {k: mb[k] for k in SAME_KEYS}
    for k in ("total", "dropped_tail", "dtype", "counted_from"):
        assert ma["token_bytes"][k] == mb["token_bytes"][k], k


@pytest.mark.parametrize("n", [2, 3])
def test_merged_parts_are_a_single_prepare(n, inputs, single, tokenizer_dir, tmp_path):
    parts = prepare_parts(inputs, tokenizer_dir, tmp_path, n)
    ms = [json.loads((p / "manifest.json").read_text()) for p in parts]
    assert [m["part"]["records"] for m in ms][0][0] == 0 and all(m["documents"] for m in ms)
    # each part is a prepared folder itself (its own packing, its tail kept aside)
    assert all(len(TokenSource(p)) == m["sequences"] for p, m in zip(parts, ms, strict=True))
    m = merge_parts(list(reversed(parts)), tmp_path)  # into the folder that holds the parts
    assert_same_as_single(tmp_path, single)
    # the shards are the parts' own files, by relative path; only sequences across boundaries are copied
    own = [s for s in m["shards"] if "/" not in s["file"]]
    assert all(s["file"].startswith("stitch-") for s in own)
    assert sum(s["sequences"] for s in own) < len(m["shards"])
    assert {s["file"].split("/")[0] for s in m["shards"] if "/" in s["file"]} == {p.name for p in parts}
    assert validate_source("data.sources.en", tmp_path, SEQ, None).num_sequences == m["sequences"]


def test_many_small_parts_and_counts_above_255(tokenizer_dir, tmp_path, monkeypatch):
    """Parts smaller than a sequence (a sequence then spans three parts) and byte counts in the overflow
    file stitch and merge exactly."""
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": f"doc {i} " + "word " * (i % 7)}) + "\n" for i in range(40)))
    monkeypatch.setattr(prep, "byte_table", lambda backend: None)  # first token of each text: 10x its bytes
    monkeypatch.setattr(prep, "offset_bytes", lambda text, offsets: np.array(
        [len(text.encode()) * 10] + [0] * (len(offsets) - 1)))
    seq = 64
    whole = tmp_path / "whole"
    prepare([src], tokenizer_dir, whole, seq_len=seq, shard_sequences=3, progress=False)
    parts = prepare_parts([src], tokenizer_dir, tmp_path / "p", 11, seq_len=seq, shard_sequences=3)
    assert min(json.loads((p / "manifest.json").read_text())["sequences"] for p in parts) == 0
    merge_parts(parts, tmp_path / "merged")
    assert_same_as_single(tmp_path / "merged", whole)
    assert TokenSource(whole).bytes_batch(range(len(TokenSource(whole)))).max() > 255


def test_split_is_contiguous_and_balanced(inputs, tmp_path):
    resolved = [(p, prep.reader.input_format(p)) for p in inputs]
    for n in (1, 2, 3, 5):
        splits = [split_records(resolved, "text", tmp_path, i, n) for i in range(n)]
        assert splits[0]["lo"] == 0 and splits[-1]["hi"] == splits[0]["records_total"]
        assert all(a["hi"] == b["lo"] for a, b in itertools.pairwise(splits))
    weights = np.concatenate([prep._record_weights(p, f, "text", tmp_path) for p, f in resolved])
    per_part = [weights[s["lo"]:s["hi"]].sum() for s in splits]
    assert max(per_part) - min(per_part) <= 2 * weights.max()


def test_mismatched_or_incomplete_parts_are_refused(inputs, tokenizer_dir, tmp_path, single):
    parts = prepare_parts(inputs[:1], tokenizer_dir, tmp_path / "a", 2)
    other_len = prepare_parts(inputs[:1], tokenizer_dir, tmp_path / "b", 2, seq_len=64)
    other_inputs = prepare_parts(inputs[:2], tokenizer_dir, tmp_path / "c", 2)
    three = prepare_parts(inputs[:1], tokenizer_dir, tmp_path / "d", 3)
    with pytest.raises(CptError, match=r"^parts differ in seq_len: .* has 128, .* has 64; prepare every part"):
        merge_parts([parts[0], other_len[1]], tmp_path / "out")
    with pytest.raises(CptError, match="parts differ in inputs"):
        merge_parts([parts[0], other_inputs[1]], tmp_path / "out")
    with pytest.raises(CptError, match=r"must be shards 0\.\.1 of 2, each once"):
        merge_parts([parts[0]], tmp_path / "out")
    with pytest.raises(CptError, match=r"must be shards 0\.\.2 of 3"):
        merge_parts([three[0], three[1], parts[1]], tmp_path / "out")
    with pytest.raises(CptError, match="is not a part"):
        merge_parts([parts[0], single], tmp_path / "out")
    with pytest.raises(CptError, match="max_documents"):
        prepare(inputs, tokenizer_dir, tmp_path / "x", seq_len=SEQ, max_documents=5, part=(0, 2))
    assert not (tmp_path / "out" / "manifest.json").exists()
    merge_parts(parts, tmp_path / "out")
    with pytest.raises(CptError, match="overwrite"):
        merge_parts(parts, tmp_path / "out")
    merge_parts(parts, tmp_path / "out", overwrite=True)
    assert len(list((tmp_path / "out").glob("stitch-*"))) == 2  # the replaced merge's files are gone
    assert len(TokenSource(tmp_path / "out")) > 0


def test_cli_parts_then_merge(inputs, tokenizer_dir, tmp_path, single, capsys):
    common = ["--tokenizer", str(tokenizer_dir), "--seq-len", str(SEQ)]
    for i in range(2):
        assert main(["prepare", *map(str, inputs), *common, "--num-shards", "2", "--shard-index", str(i),
                     "--out", str(tmp_path / f"part-{i}")]) == 0
    assert "tail tokens kept for the merge" in capsys.readouterr().out
    assert main(["prepare", "merge", str(tmp_path / "part-1"), str(tmp_path / "part-0"), "--out", str(tmp_path)]) == 0
    assert "2 parts" in capsys.readouterr().out
    a, b = TokenSource(tmp_path), TokenSource(single)
    assert np.array_equal(a.batch(range(len(b))), b.batch(range(len(b))))
    assert main(["prepare", *map(str, inputs), *common, "--num-shards", "2", "--out", str(tmp_path / "x")]) == 2
    assert "go together" in capsys.readouterr().err


def test_merged_folder_trains_and_probes(inputs, tokenizer_dir, tmp_path, make_recipe, prepared):
    from cpt.tracking import read_metrics
    from cpt.train.loop import train

    merge_parts(prepare_parts(inputs, tokenizer_dir, tmp_path / "data", 2), tmp_path / "data")
    recipe = make_recipe("parts", data__sources={"mix": str(tmp_path / "data"), "de": str(prepared["de"]["train"])},
                         data__mixture={"mix": 0.5, "de": 0.5}, train__tokens=2048,
                         probes__sets={"mix": str(tmp_path / "data")})
    result = train(recipe)
    assert result.completed and result.step == 2
    records = read_metrics(Path(recipe.run.output_dir) / "metrics.jsonl")
    probe = [r for r in records if "probe/mix/loss" in r]
    assert probe and all(np.isfinite(r["probe/mix/loss"]) and r["probe/mix/bpb"] > 0 for r in probe)

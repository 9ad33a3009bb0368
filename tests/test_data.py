"""Data pipeline: tokenizer, prepare (packing, bad data), TokenSource, mixture sampler."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from cpt.data.mixture import MixtureSampler, permutation_keys, permute
from cpt.data.prepare import prepare
from cpt.data.source import TokenSource, read_batch
from cpt.data.tokenizer import load_tokenizer, tokenizer_hash
from cpt.errors import CptError

# ---------------------------------------------------------------- helpers


def write_jsonl(path: Path, records: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def flat_tokens(prepared_dir: Path) -> np.ndarray:
    """All packed tokens of a prepared folder, read straight from the shard files."""
    m = json.loads((prepared_dir / "manifest.json").read_text())
    return np.concatenate([np.fromfile(prepared_dir / s["file"], dtype=m["dtype"]) for s in m["shards"]])


def reference_stream(tok, docs: list[str]) -> list[int]:
    ids: list[int] = []
    for d in docs:
        ids += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return ids


DOCS = [
    "Die Funktion gibt den Wert der Zelle zurück.",
    "def add(a, b):\n    return a + b\n",
    "The kernel schedules tasks on every CPU; each runqueue is per-CPU.",
    "Öffnen Sie das Menü Extras – Optionen, um die Einstellungen zu ändern.",
]


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(tok) == 2048
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id is not None
    for text in DOCS + ["emoji 🔎︎ and tabs\tand\r\nCRLF"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert max(ids) < 2048
        assert tok.decode(ids) == text  # byte-level: lossless on any UTF-8
    # trained on real text: common words of each domain are single tokens or close to it
    assert len(tok(" the function", add_special_tokens=False)["input_ids"]) <= 3
    assert tokenizer_hash(tokenizer_dir) == tokenizer_hash(tokenizer_dir / "tokenizer.json")


def test_tokenizer_hash_survives_resave_and_differs_between_tokenizers(tokenizer_dir, tmp_path):
    from cpt.data.tokenizer import train_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    tok.save_pretrained(tmp_path / "copy")
    assert tokenizer_hash(tmp_path / "copy") == tokenizer_hash(tokenizer_dir)
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": d * 20} for d in DOCS])
    other = train_tokenizer([src], tmp_path / "other", vocab_size=300, min_frequency=1)
    assert tokenizer_hash(other) != tokenizer_hash(tokenizer_dir)
    with pytest.raises(CptError, match="not empty"):
        train_tokenizer([src], tmp_path / "other", vocab_size=300)


def test_document_caps_all_inputs_together_or_each_input(tmp_path):
    from cpt.data.reader import InputStats, iter_documents, resolve_inputs

    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(5)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": ""}] + [{"text": f"b{i}"} for i in range(5)])  # one unusable
    inputs = resolve_inputs([a, b])

    def read(**caps):
        stats: list[InputStats] = []
        return list(iter_documents(inputs, "text", stats, **caps)), [s.documents for s in stats]

    assert read(max_documents=4) == (["a0", "a1", "a2", "a3"], [4])  # b is never opened
    assert read(max_per_input=2) == (["a0", "a1", "b0", "b1"], [2, 2])  # usable documents, per input
    assert read(max_documents=3, max_per_input=2) == (["a0", "a1", "b0"], [2, 1])
    with pytest.raises(CptError, match="max_documents_per_input must be positive"):
        from cpt.data.tokenizer import train_tokenizer

        train_tokenizer([a], tmp_path / "tok", max_documents_per_input=0)


# ---------------------------------------------------------------- prepare: packing


def test_prepare_exact_packing(tmp_path, tokenizer_dir):
    """Shards hold exactly doc0 EOS doc1 EOS ... cut into seq_len rows; the tail is counted."""
    tok = load_tokenizer(tokenizer_dir)
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": d, "id": i} for i, d in enumerate(DOCS)])
    stream = reference_stream(tok, DOCS)
    seq_len = 7
    m = prepare([src], tokenizer_dir, tmp_path / "out", seq_len=seq_len, shard_sequences=3, progress=False)
    n_seq = len(stream) // seq_len
    assert m["sequences"] == n_seq and m["tokens"] == n_seq * seq_len
    assert m["tokens_dropped_tail"] == len(stream) - n_seq * seq_len
    assert m["documents"] == len(DOCS) and m["skipped"] == {}
    assert m["dtype"] == "uint16" and m["vocab_size"] == 2048 and m["eos_token_id"] == tok.eos_token_id
    assert m["tokenizer_hash"] == tokenizer_hash(tokenizer_dir)
    # shards of 3 sequences, the last one partial
    assert [s["sequences"] for s in m["shards"]] == [3] * (n_seq // 3) + ([n_seq % 3] if n_seq % 3 else [])
    assert flat_tokens(tmp_path / "out").tolist() == stream[: n_seq * seq_len]
    # TokenSource reads the same rows across shard boundaries, in any order
    src_ = TokenSource(tmp_path / "out")
    rows = np.asarray(stream[: n_seq * seq_len]).reshape(n_seq, seq_len)
    order = [n_seq - 1, 0, 4, 3, 3, 1]
    assert np.array_equal(src_.batch(order), rows[order])
    assert src_.batch(order).dtype == np.int64
    assert np.array_equal(src_.get(5), rows[5])
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == m
    assert not any(tmp_path.glob("out.tmp*"))


def test_packing_across_batches_and_writes(tmp_path, tokenizer_dir, monkeypatch):
    """One piece per tokenizer batch and random write sizes give the same bytes as one big batch."""
    import cpt.data.prepare as prep

    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCS * 3])
    whole = prepare([src], tokenizer_dir, tmp_path / "whole", seq_len=5, shard_sequences=4, progress=False)
    monkeypatch.setattr(prep, "_BATCH_CHARS", 1)
    split = prepare([src], tokenizer_dir, tmp_path / "split", seq_len=5, shard_sequences=4, progress=False)
    assert split["shards"] == whole["shards"] and split["tokens_dropped_tail"] == whole["tokens_dropped_tail"]
    assert np.array_equal(flat_tokens(tmp_path / "split"), flat_tokens(tmp_path / "whole"))

    rng = np.random.default_rng(0)
    stream = rng.integers(0, 60000, size=10_000).astype(np.uint16)
    nbytes = rng.integers(0, 8, size=len(stream)).astype(np.uint32)
    nbytes[rng.integers(0, len(stream), size=20)] = rng.integers(256, 70_000, size=20)  # past uint8
    (tmp_path / "w").mkdir()
    writer = prep._ShardWriter(tmp_path / "w", seq_len=64, shard_sequences=10, dtype=np.dtype(np.uint16))
    cuts = np.sort(rng.integers(0, len(stream), size=300))
    records = np.empty(len(stream), dtype=prep.token_records(np.uint16))
    records["id"], records["bytes"] = stream, nbytes
    for piece in np.split(records, cuts):
        writer.add(piece)
    kept = len(stream) // 64 * 64
    assert writer.close() == len(stream) % 64
    written = np.concatenate(
        [np.fromfile(tmp_path / "w" / s["file"], dtype=np.uint16) for s in writer.shards]
    )
    assert np.array_equal(written, stream[:kept])
    assert [s["sequences"] for s in writer.shards] == [10] * 15 + [6]
    # byte counts: uint8 files parallel to the shards, counts above 255 in the overflow file
    written_bytes = np.concatenate(
        [np.fromfile(tmp_path / "w" / s["bytes_file"], dtype=np.uint8) for s in writer.shards]
    ).astype(np.int64)
    overflow = np.load(tmp_path / "w" / "bytes-overflow.npy")
    written_bytes[overflow[:, 0]] = overflow[:, 1]
    assert np.array_equal(written_bytes, nbytes[:kept])
    assert writer.bytes == int(nbytes[:kept].sum()) and writer.carry["bytes"].sum() == nbytes[kept:].sum()


def test_prepare_real_text_round_trip(prepared, corpora, tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    path = prepared["en"]["train"]
    src = TokenSource(path)
    m = src.manifest
    assert src.seq_len == 128 and len(src) == m["sequences"] > 1000
    assert m["documents"] == 400 and m["skipped"] == {}
    assert m["tokens"] == sum(s["sequences"] for s in m["shards"]) * 128 == len(flat_tokens(path))
    assert 0 <= m["tokens_dropped_tail"] < 128
    # the first sequence decodes to the start of the first document
    with open(corpora["en"]["train"], encoding="utf-8") as f:
        first, second = (json.loads(next(f))["text"] for _ in range(2))
    text = tok.decode(src.get(0).tolist())
    assert first.startswith(text[:200]) and len(text) > 200
    # documents are separated by EOS: the first EOS sits right after the first document
    flat = flat_tokens(path)
    eos_at = np.flatnonzero(flat == tok.eos_token_id)
    n_first = len(tok(first, add_special_tokens=False)["input_ids"])
    assert eos_at[0] == n_first
    assert tok.decode(flat[eos_at[0] + 1 : eos_at[1]].tolist()) == second
    # every document but possibly the last (cut by the tail) ends with one EOS
    assert len(eos_at) in (m["documents"] - 1, m["documents"])


def test_prepared_fixture_shape(prepared):
    assert set(prepared) == {"en", "de", "code"}
    hashes = set()
    for splits in prepared.values():
        assert set(splits) == {"train", "validation"}
        for path in splits.values():
            src = TokenSource(path)
            assert src.seq_len == 128 and len(src) > 0
            hashes.add(src.tokenizer_hash)
    assert len(hashes) == 1


def test_prepare_num_proc_gives_identical_shards(tmp_path, tokenizer_dir, corpora):
    inp = [corpora["de"]["validation"]]
    a = prepare(inp, tokenizer_dir, tmp_path / "a", seq_len=64, num_proc=1, progress=False)
    b = prepare(inp, tokenizer_dir, tmp_path / "b", seq_len=64, num_proc=2, progress=False)
    assert a["sequences"] == b["sequences"] and a["documents"] == b["documents"]
    assert np.array_equal(flat_tokens(tmp_path / "a"), flat_tokens(tmp_path / "b"))


def test_prepare_other_formats(tmp_path, tokenizer_dir):
    import datasets

    tok = load_tokenizer(tokenizer_dir)
    # .txt is one document per file; a plain folder expands to its supported files, sorted
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text(DOCS[0] + "\n\n" + DOCS[1], encoding="utf-8")
    (folder / "b.txt").write_text(DOCS[2], encoding="utf-8")
    (folder / "notes.html").write_text("ignored", encoding="utf-8")
    m = prepare([folder], tokenizer_dir, tmp_path / "txt", seq_len=4, progress=False)
    assert m["documents"] == 2
    stream = reference_stream(tok, [DOCS[0] + "\n\n" + DOCS[1], DOCS[2]])
    assert flat_tokens(tmp_path / "txt").tolist() == stream[: m["tokens"]]
    # parquet, a saved dataset and a .json array, mixed in one call, read in the order given
    ds = datasets.Dataset.from_dict({"body": DOCS[:2], "n": [1, 2]})
    ds.to_parquet(str(tmp_path / "x.parquet"))
    datasets.Dataset.from_dict({"body": [DOCS[2], "", None]}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "y.json").write_text(json.dumps([{"body": DOCS[3]}, {"other": 1}]), encoding="utf-8")
    m = prepare(
        [tmp_path / "x.parquet", tmp_path / "saved", tmp_path / "y.json"],
        tokenizer_dir,
        tmp_path / "mixed",
        seq_len=4,
        text_field="body",
        progress=False,
    )
    assert m["documents"] == 4
    assert m["skipped"] == {"empty_text": 1, "null_text": 1, "missing_field": 1}
    assert [i["documents"] for i in m["inputs"]] == [2, 1, 1]
    assert flat_tokens(tmp_path / "mixed").tolist() == reference_stream(tok, DOCS)[: m["tokens"]]


def test_prepare_max_documents_and_overwrite(tmp_path, tokenizer_dir):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCS])
    m = prepare([src], tokenizer_dir, tmp_path / "out", seq_len=4, max_documents=2, progress=False)
    assert m["documents"] == 2
    with pytest.raises(CptError, match="exists; pass overwrite=True"):
        prepare([src], tokenizer_dir, tmp_path / "out", seq_len=4, progress=False)
    m = prepare([src], tokenizer_dir, tmp_path / "out", seq_len=4, overwrite=True, progress=False)
    assert m["documents"] == 4 and TokenSource(tmp_path / "out").manifest["documents"] == 4


# ---------------------------------------------------------------- prepare: bad data


def test_bad_lines_are_counted_not_fatal(tmp_path, tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    path = tmp_path / "messy.jsonl"
    good = [DOCS[0], DOCS[1], DOCS[2]]
    with open(path, "wb") as f:
        f.write(json.dumps({"text": good[0]}).encode() + b"\n")
        f.write(b'{"text": "broken json\n')  # invalid JSON
        f.write(b'{"text": "caf\xe9 latin-1 bytes"}\n')  # invalid UTF-8
        f.write(b"\n")  # blank line
        f.write(json.dumps({"text": good[1]}).encode() + b"\n")
        f.write(b"[1, 2]\n")  # JSON, but not an object
        f.write(b'{"body": "no text field"}\n')
        f.write(b'{"text": 42}\n')
        f.write(b'{"text": "   "}\n')
        f.write(json.dumps({"text": good[2]}).encode() + b"\n")
        f.write(b'{"text": "unterminated')  # last line, no newline
    m = prepare([path], tokenizer_dir, tmp_path / "out", seq_len=4, progress=False)
    assert m["documents"] == 3
    assert m["skipped"] == {
        "invalid_json": 2,
        "invalid_utf8": 1,
        "blank_line": 1,
        "not_an_object": 1,
        "missing_field": 1,
        "not_a_string": 1,
        "empty_text": 1,
    }
    assert m["inputs"][0]["skipped"] == m["skipped"]
    assert flat_tokens(tmp_path / "out").tolist() == reference_stream(tok, good)[: m["tokens"]]


def test_gzip_input_and_corrupt_gzip(tmp_path, tokenizer_dir):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for d in DOCS:
            f.write(json.dumps({"text": d}) + "\n")
    assert prepare([path], tokenizer_dir, tmp_path / "ok", seq_len=4, progress=False)["documents"] == 4
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(path.read_bytes()[:30])  # truncated stream
    with pytest.raises(CptError, match="bad.jsonl.gz cannot be read"):
        prepare([bad], tokenizer_dir, tmp_path / "bad", seq_len=4, progress=False)


def test_missing_field_everywhere_names_field_and_fields_seen(tmp_path, tokenizer_dir):
    path = write_jsonl(tmp_path / "x.jsonl", [{"body": d, "id": i} for i, d in enumerate(DOCS)])
    with pytest.raises(CptError) as e:
        prepare([path], tokenizer_dir, tmp_path / "out", seq_len=4, progress=False)
    msg = str(e.value)
    assert "x.jsonl" in msg and "no field 'text' in any record" in msg
    assert "fields seen: body, id" in msg and "--text-field" in msg and "\n" not in msg
    assert not (tmp_path / "out").exists() and not any(tmp_path.glob("out.tmp*"))


def test_empty_file_unusable_file_and_missing_path(tmp_path, tokenizer_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(CptError, match=r"empty\.jsonl is empty"):
        prepare([empty], tokenizer_dir, tmp_path / "o1", seq_len=4, progress=False)
    junk = tmp_path / "junk.jsonl"
    junk.write_bytes(b'not json\n{"text": ""}\n')
    with pytest.raises(
        CptError, match=r"junk\.jsonl has no usable document \(skipped: empty_text 1, invalid_json 1\)"
    ):
        prepare([junk], tokenizer_dir, tmp_path / "o2", seq_len=4, progress=False)
    with pytest.raises(CptError, match=r"input .*nope\.jsonl does not exist"):
        prepare([tmp_path / "nope.jsonl"], tokenizer_dir, tmp_path / "o3", seq_len=4, progress=False)
    with pytest.raises(CptError, match="unsupported file type"):
        prepare(
            [empty.with_suffix(".docx").touch() or empty.with_suffix(".docx")],
            tokenizer_dir,
            tmp_path / "o4",
            seq_len=4,
            progress=False,
        )
    with pytest.raises(CptError, match="cannot load tokenizer"):
        prepare([junk], tmp_path / "no-tokenizer", tmp_path / "o5", seq_len=4, progress=False)


def test_zero_sequences_is_an_error(tmp_path, tokenizer_dir):
    path = write_jsonl(tmp_path / "short.jsonl", [{"text": "tiny"}])
    with pytest.raises(CptError, match=r"short\.jsonl yields \d+ tokens, fewer than one sequence of 2048"):
        prepare([path], tokenizer_dir, tmp_path / "out", seq_len=2048, progress=False)
    assert not (tmp_path / "out").exists() and not any(tmp_path.glob("out.tmp*"))


# ---------------------------------------------------------------- TokenSource


def test_token_source_detects_damage(tmp_path, prepared):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared["de"]["validation"], copy)
    assert len(TokenSource(copy)) == TokenSource(prepared["de"]["validation"]).num_sequences
    shard = copy / "tokens-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CptError, match=r"tokens-00000\.bin has \d+ bytes, the manifest expects \d+"):
        TokenSource(copy)
    shard.unlink()
    with pytest.raises(CptError, match=r"tokens-00000\.bin is missing"):
        TokenSource(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(CptError, match="not valid JSON"):
        TokenSource(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(CptError, match="has no manifest.json"):
        TokenSource(copy)
    with pytest.raises(CptError, match="does not exist"):
        TokenSource(tmp_path / "absent")


def test_token_source_is_picklable_and_bounds_checked(prepared):
    import pickle

    src = TokenSource(prepared["code"]["validation"])
    first = src.get(0)
    clone = pickle.loads(pickle.dumps(src))
    assert np.array_equal(clone.get(0), first)
    with pytest.raises(IndexError):
        src.batch([len(src)])


# ---------------------------------------------------------------- mixture sampler


def test_feistel_is_a_permutation_per_epoch():
    for n in (1, 2, 3, 5, 8, 9, 100, 1000, 4097):
        for epoch in range(3):
            perm = permute(np.arange(n), n, permutation_keys(7, "en", epoch))
            assert sorted(perm.tolist()) == list(range(n))
    a = permute(np.arange(1000), 1000, permutation_keys(7, "en", 0))
    assert not np.array_equal(a, np.arange(1000))  # shuffled
    assert not np.array_equal(a, permute(np.arange(1000), 1000, permutation_keys(7, "en", 1)))  # new epoch
    assert not np.array_equal(a, permute(np.arange(1000), 1000, permutation_keys(7, "de", 0)))  # per source
    assert not np.array_equal(a, permute(np.arange(1000), 1000, permutation_keys(8, "en", 0)))  # per seed


def test_exact_shares_at_every_prefix():
    s = MixtureSampler({"de": 1000, "en": 1000}, {"de": 0.75, "en": 0.25}, seed=0)
    picks = s.draw(800)
    for start in range(0, 800, 8):
        assert Counter(name for name, _ in picks[start : start + 8]) == {"de": 6, "en": 2}
    # three sources, awkward weights: every prefix within one sample of its exact share
    w = {"a": 0.5, "b": 0.3, "c": 0.2}
    s = MixtureSampler({"a": 50, "b": 70, "c": 3}, w, seed=1)
    counts = Counter()
    for g, (name, _) in enumerate(s.draw(3000), start=1):
        counts[name] += 1
        for k in w:
            assert abs(counts[k] - w[k] * g) < 1.0
    # a weight-0 source is never drawn
    s = MixtureSampler({"a": 10, "b": 10}, {"a": 1.0, "b": 0.0}, seed=0)
    assert {name for name, _ in s.draw(100)} == {"a"}


def test_each_epoch_reads_every_sequence_once():
    s = MixtureSampler({"de": 37, "en": 11}, {"de": 0.5, "en": 0.5}, seed=3)
    picks = s.draw(5 * 22)  # 55 from each: en walks 5 epochs, de one and a half
    en = [i for name, i in picks if name == "en"]
    for e in range(5):
        assert sorted(en[e * 11 : (e + 1) * 11]) == list(range(11))
    assert en[:11] != en[11:22]  # a fresh order each epoch
    de = [i for name, i in picks if name == "de"]
    assert sorted(de[:37]) == list(range(37)) and len(set(de[37:])) == 18
    assert s.repeats() == pytest.approx({"de": 55 / 37, "en": 5.0})


def test_same_seed_same_picks_other_seed_other_order():
    sizes, w = {"code": 500, "de": 300, "en": 900}, {"code": 0.2, "de": 0.5, "en": 0.3}
    a = MixtureSampler(sizes, w, seed=11).draw(400)
    b = MixtureSampler(sizes, w, seed=11).draw(400)
    c = MixtureSampler(sizes, w, seed=12).draw(400)
    assert a == b
    assert [n for n, _ in a] == [n for n, _ in c]  # the interleaving does not depend on the seed
    assert a != c
    assert all(isinstance(n, str) and isinstance(i, int) for n, i in a)


def test_state_dict_round_trip_continues_identically():
    sizes, w = {"de": 123, "en": 77}, {"de": 0.6, "en": 0.4}
    ref = MixtureSampler(sizes, w, seed=5)
    ref.draw(100)
    state = ref.state_dict()
    expected = ref.draw(100)
    # the state is a handful of plain ints and survives JSON
    assert state == {"seed": 5, "drawn": {"de": 60, "en": 40}, "position": 100, "offsets": {"de": 0, "en": 0}}
    state = json.loads(json.dumps(state))
    restored = MixtureSampler(sizes, w, seed=5)
    restored.load_state_dict(state)
    assert restored.draw(100) == expected
    # drawing in pieces equals drawing at once
    pieces = MixtureSampler(sizes, w, seed=5)
    assert pieces.draw(37) + pieces.draw(163) == MixtureSampler(sizes, w, seed=5).draw(200)


def test_state_does_not_grow_with_corpus_or_draws():
    s = MixtureSampler({"big": 10**12, "small": 5}, {"big": 0.9, "small": 0.1}, seed=0)
    picks = s.draw(10_000)
    assert all(0 <= i < 10**12 for n, i in picks if n == "big")
    state = s.state_dict()
    assert len(json.dumps(state)) < 120
    assert all(isinstance(v, int) for v in [state["seed"], state["position"], *state["drawn"].values(),
                                            *state["offsets"].values()])


def test_offsets_continue_each_source_where_an_earlier_stage_left_it():
    one = MixtureSampler({"en": 50, "de": 30}, {"en": 1.0}, seed=2)
    first = one.draw(70)  # into en's second epoch
    # a new stage with other weights: en goes on from draw 70, not from the start of epoch 0
    two = MixtureSampler({"en": 50, "de": 30}, {"en": 0.5, "de": 0.5}, seed=2, offsets=one.consumed())
    later = [i for n, i in two.draw(20) if n == "en"]
    assert later == [i for _, i in one.draw(10)]
    assert two.repeats()["en"] == pytest.approx(80 / 50)
    assert len({i for _, i in first[:50]}) == 50  # epoch 0 was a permutation


def test_sampler_rejects_bad_weights_and_foreign_state():
    with pytest.raises(CptError, match="sum to 1"):
        MixtureSampler({"a": 1, "b": 1}, {"a": 0.5, "b": 0.6}, seed=0)
    with pytest.raises(CptError, match=">= 0"):
        MixtureSampler({"a": 1, "b": 1}, {"a": 1.5, "b": -0.5}, seed=0)
    with pytest.raises(CptError, match="fr, which is not a source"):
        MixtureSampler({"a": 1}, {"a": 0.5, "fr": 0.5}, seed=0)
    with pytest.raises(CptError, match="no sequences"):
        MixtureSampler({"a": 0, "b": 4}, {"a": 0.5, "b": 0.5}, seed=0)
    s = MixtureSampler({"a": 4, "b": 4}, {"a": 0.5, "b": 0.5}, seed=0)
    with pytest.raises(CptError, match="seed 1, this run uses seed 0"):
        s.load_state_dict({"seed": 1, "drawn": {"a": 0, "b": 0}, "position": 0})
    with pytest.raises(CptError, match="sources a, c, this run has a, b"):
        s.load_state_dict({"seed": 0, "drawn": {"a": 0, "c": 0}, "position": 0})


def test_read_batch_returns_the_right_rows(prepared):
    sources = {k: TokenSource(v["validation"]) for k, v in prepared.items()}
    s = MixtureSampler({k: len(v) for k, v in sources.items()}, {"en": 0.5, "de": 0.25, "code": 0.25}, seed=0)
    picks = s.draw(64)
    batch = read_batch(sources, picks)
    assert isinstance(batch, torch.Tensor) and batch.dtype == torch.long and batch.shape == (64, 128)
    for row, (name, idx) in zip(batch, picks, strict=True):
        assert np.array_equal(row.numpy(), sources[name].get(idx))
    with pytest.raises(CptError, match="fr, which is not loaded"):
        read_batch(sources, [("fr", 0)])


def test_draw_and_read_are_fast(prepared):
    import time

    sources = {k: TokenSource(v["train"]) for k, v in prepared.items()}
    s = MixtureSampler({k: len(v) for k, v in sources.items()}, {"en": 0.5, "de": 0.25, "code": 0.25}, seed=0)
    read_batch(sources, s.draw(64))
    t0 = time.perf_counter()
    n = 0
    while n < 20_000:
        read_batch(sources, s.draw(256))
        n += 256
    rate = n / (time.perf_counter() - t0)
    assert rate > 2_500, f"{rate:.0f} sequences/s"  # >= 50x a 12.5K tokens/s trainer at seq_len 256

"""cpt tokenizer extend: new tokens learned on German appended to a byte-level BPE trained on English and
code; old ids and merges kept, German takes fewer tokens, and --keep leaves the kept texts' encodings
exactly as they were."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from cpt.cli import main
from cpt.data.extend import extend_tokenizer
from cpt.data.reader import iter_documents, resolve_inputs
from cpt.errors import CptError


def docs(path, n=200):
    return list(iter_documents(resolve_inputs([path]), "text", [], max_documents=n))


@pytest.fixture(scope="module")
def english_tokenizer(corpora, tmp_path_factory):
    from cpt.data.tokenizer import train_tokenizer

    return train_tokenizer([corpora["en"]["train"], corpora["code"]["train"]], tmp_path_factory.mktemp("tok") / "en",
                           vocab_size=1024, max_documents_per_input=300)


def test_extension_keeps_old_ids_and_merges_and_shortens_german(english_tokenizer, corpora, tmp_path):
    report = extend_tokenizer(english_tokenizer, [corpora["de"]["train"]], 150, tmp_path / "ext",
                              old=[corpora["en"]["validation"]])
    base, ext = AutoTokenizer.from_pretrained(english_tokenizer), AutoTokenizer.from_pretrained(tmp_path / "ext")
    assert report["added"] == 150 and len(ext) == len(base) + 150
    assert all(ext.convert_tokens_to_ids(t) == i for t, i in base.get_vocab().items())  # old ids
    old_spec = json.loads((english_tokenizer / "tokenizer.json").read_text())["model"]
    new_spec = json.loads((tmp_path / "ext" / "tokenizer.json").read_text())["model"]
    assert new_spec["merges"][:len(old_spec["merges"])] == old_spec["merges"]  # old merges, same order
    assert len(new_spec["merges"]) == len(old_spec["merges"]) + 150
    assert sorted(ext.get_vocab().values()) == list(range(len(ext)))  # new ids right after the old ones
    german = docs(corpora["de"]["validation"], 40)  # held out from what the merges were learned on
    n_base = sum(map(len, base(german, add_special_tokens=False)["input_ids"]))
    n_ext = sum(map(len, ext(german, add_special_tokens=False)["input_ids"]))
    assert n_ext < 0.93 * n_base  # 150 German tokens: >= 7% fewer tokens on unseen German
    fert = report["new_domain"]
    assert fert["after"]["tokens_per_byte"] < fert["before"]["tokens_per_byte"]
    assert ext.decode(ext(german[0])["input_ids"]) == german[0]  # round trip
    assert 0 <= report["old_domain"]["documents_changed"] <= 1


def test_keep_leaves_the_kept_texts_encodings_unchanged(english_tokenizer, corpora, tmp_path):
    english = docs(corpora["en"]["train"], 200)
    extend_tokenizer(english_tokenizer, [corpora["de"]["train"]], 100, tmp_path / "kept",
                     keep=[corpora["en"]["train"], corpora["code"]["train"]], max_documents=200)
    extend_tokenizer(english_tokenizer, [corpora["de"]["train"]], 100, tmp_path / "free", max_documents=200)
    base = AutoTokenizer.from_pretrained(english_tokenizer)
    before = base(english, add_special_tokens=False)["input_ids"]
    kept = AutoTokenizer.from_pretrained(tmp_path / "kept")(english, add_special_tokens=False)["input_ids"]
    free = AutoTokenizer.from_pretrained(tmp_path / "free")(english, add_special_tokens=False)["input_ids"]
    assert kept == before
    assert sum(a != b for a, b in zip(free, before, strict=True)) > 0  # without --keep some English changes


def test_bad_requests_are_one_line(english_tokenizer, corpora, tmp_path, capsys):
    with pytest.raises(CptError, match="--add 0: must be at least 1"):
        extend_tokenizer(english_tokenizer, [corpora["de"]["train"]], 0, tmp_path / "x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    assert main(["tokenizer", "extend", str(english_tokenizer), "--train", str(corpora["de"]["train"]),
                 "--add", "5", "--out", str(tmp_path / "full")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err

"""Bits per byte: byte counts written by `cpt prepare`, read by TokenSource, reported by the probes.

bpb = sum of target NLL (nats) / (ln 2 * bytes of text those targets cover): a loss that compares
across tokenizers. The byte counts are checked against the documents' own text; bpb against NLL and
bytes recomputed here from the tokens and the text, on two packings and two processes.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import (  # tests/ is on sys.path (pytest's rootdir conftest)
    on_two_simulated_ranks,
    save_bos_tokenizer,
)

import cpt.data.prepare as prep
from cpt.data.prepare import prepare
from cpt.data.source import TokenSource
from cpt.data.tokenizer import load_tokenizer
from cpt.probes import HeldOutLoss, probe_indices
from cpt.train.loss import PlainLoss
from cpt.train.step import model_inputs

EN_DOCS = 60  # the en validation documents used here


def docs_of(path: Path, n: int | None = None) -> list[str]:
    if path.suffix == ".gz":
        import gzip

        lines = gzip.open(path, "rt", encoding="utf-8").read().splitlines()
    else:
        lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines[:n]]


def all_rows(src: TokenSource) -> tuple[np.ndarray, np.ndarray]:
    return src.batch(range(len(src))), src.bytes_batch(range(len(src)))


def utf8(text: str) -> int:
    return len(text.encode("utf-8"))


@pytest.fixture(scope="module")
def bos_tokenizer(corpora, tmp_path_factory) -> Path:
    """A Llama-style tokenizer (as tests/test_models.py builds one): byte-level BPE adding <s> to every text."""
    docs = docs_of(corpora["en"]["train"], 100) + docs_of(corpora["de"]["train"], 100)
    return save_bos_tokenizer(docs, 600, tmp_path_factory.mktemp("bos-tok"))


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(corpora, tmp_path_factory) -> Path:
    """Not byte-level: NFKC, a prefix space (Metaspace), byte fallback, a BOS: counts come from offsets."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tk.normalizer = normalizers.NFKC()
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tk.train_from_iterator(docs_of(corpora["de"]["train"], 100), trainers.BpeTrainer(
        vocab_size=800, special_tokens=specials, show_progress=False))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    out = tmp_path_factory.mktemp("sp-tok")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def en_sets(corpora, tokenizer_dir, tmp_path_factory) -> dict[int, Path]:
    """The first 60 en validation documents at seq_len 64 and 128."""
    root = tmp_path_factory.mktemp("bpb-en")
    for n in (64, 128):
        prepare([corpora["en"]["validation"]], tokenizer_dir, root / str(n), seq_len=n, max_documents=EN_DOCS,
                progress=False)
    return {n: root / str(n) for n in (64, 128)}


# ------------------------------------------------------------------------------------- byte counts


@pytest.mark.parametrize("which", ["cpt", "bos", "sentencepiece"])
def test_byte_counts_sum_to_the_documents_text(which, corpora, tokenizer_dir, bos_tokenizer,
                                               sentencepiece_tokenizer, tmp_path):
    """Every prepared set's byte counts sum to the bytes of its documents, less the dropped tail: exactly
    at seq_len 1 (nothing dropped), and at 128 with the tail decoded by hand; BOS and EOS count 0."""
    tok_dir = {"cpt": tokenizer_dir, "bos": bos_tokenizer, "sentencepiece": sentencepiece_tokenizer}[which]
    tok = load_tokenizer(tok_dir)
    inp = corpora["de"]["validation"]  # umlauts, dashes, quotes: multi-byte characters
    docs = docs_of(inp, 30)
    whole = sum(map(utf8, docs))
    one = prepare([inp], tok_dir, tmp_path / "one", seq_len=1, max_documents=30, progress=False)
    m = prepare([inp], tok_dir, tmp_path / "packed", seq_len=128, max_documents=30, progress=False)
    assert one["token_bytes"]["total"] == whole and one["token_bytes"]["dropped_tail"] == 0
    assert m["token_bytes"]["total"] + m["token_bytes"]["dropped_tail"] == whole
    assert m["token_bytes"]["counted_from"] == ("offsets" if which == "sentencepiece" else "byte-level vocabulary")
    ids, nbytes = all_rows(TokenSource(tmp_path / "packed"))
    assert nbytes.sum() == m["token_bytes"]["total"] == TokenSource(tmp_path / "packed").bytes_total
    specials = np.isin(ids, [tok.eos_token_id] + ([tok.bos_token_id] if which != "cpt" else []))
    assert specials.sum() >= 29 and (nbytes[specials] == 0).all() and (nbytes[~specials] > 0).mean() > 0.95
    if which != "sentencepiece":  # byte-level: the tail's tokens decode to exactly the text they cover
        stream = []
        for d in docs:
            stream += tok(d)["input_ids"] + [tok.eos_token_id]
        tail = stream[len(stream) - m["tokens_dropped_tail"]:]
        assert m["token_bytes"]["dropped_tail"] == utf8(tok.decode(tail, skip_special_tokens=True))


def test_long_documents_in_pieces_and_offsets_agree_with_the_table(corpora, tokenizer_dir, tmp_path, monkeypatch):
    """Documents tokenized in pieces (the chunked path), counts from offsets instead of the byte-level
    table, and 2 worker processes: every document's tokens carry its bytes, also across row boundaries."""
    inp = [corpora["en"]["validation"]]
    kw = {"seq_len": 64, "max_documents": EN_DOCS, "progress": False}
    base = prepare(inp, tokenizer_dir, tmp_path / "base", **kw)
    monkeypatch.setattr(prep, "byte_table", lambda backend: None)
    offsets = prepare(inp, tokenizer_dir, tmp_path / "offsets", **kw)
    assert offsets["token_bytes"]["counted_from"] == "offsets"
    monkeypatch.undo()
    monkeypatch.setattr(prep, "_CHUNK_CHARS", 300)  # most documents cut into several pieces
    monkeypatch.setattr(prep, "_BATCH_CHARS", 2000)  # pieces of one document in different batches
    chunked = prepare(inp, tokenizer_dir, tmp_path / "chunked", **kw)
    monkeypatch.undo()
    procs = prepare(inp, tokenizer_dir, tmp_path / "procs", num_proc=2, **kw)
    docs = docs_of(inp[0], EN_DOCS)
    eos = load_tokenizer(tokenizer_dir).eos_token_id
    ids, nbytes = all_rows(TokenSource(tmp_path / "base"))
    for m, name in ((base, "base"), (chunked, "chunked"), (offsets, "offsets"), (procs, "procs")):
        assert m["token_bytes"]["total"] + m["token_bytes"]["dropped_tail"] == sum(map(utf8, docs)), name
        other_ids, other_bytes = (a.reshape(-1) for a in all_rows(TokenSource(tmp_path / name)))
        # each document that ends inside the packed rows (most span a row boundary) has its bytes
        ends = np.flatnonzero(other_ids == eos)
        per_doc = np.add.reduceat(other_bytes, np.concatenate(([0], ends + 1))[:len(ends)])
        per_doc[-1] = other_bytes[ends[-2] + 1:ends[-1] + 1].sum()  # reduceat's last run goes to the end
        assert per_doc.tolist() == [utf8(d) for d in docs[:len(ends)]], name
        if name == "procs":
            assert np.array_equal(other_ids, ids.reshape(-1)) and np.array_equal(other_bytes, nbytes.reshape(-1))
        if name == "offsets":  # the same tokens; a character split over tokens ("…" = "ĠâĢ" "¦") goes
            # wholly to its first token from offsets, byte by byte from the table: running sums differ
            # only inside such characters
            assert np.array_equal(other_ids, ids.reshape(-1))
            differ = np.cumsum(other_bytes) != np.cumsum(nbytes.reshape(-1))
            assert 0 < differ.sum() < 0.01 * len(differ)
            assert (np.abs(np.cumsum(other_bytes) - np.cumsum(nbytes.reshape(-1))) <= 3).all()


def test_counts_above_255_survive(tokenizer_dir, tmp_path, monkeypatch):
    """A token that covers more than 255 bytes (a long run a large vocabulary merged, or the last token
    of a text whose tail a normalizer removed) reads back exactly, via the overflow file."""
    from cpt.data.source import BYTES_OVERFLOW

    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps({"text": "x" * 50}) + "\n")
    # a stand-in for such a tokenizer: the first token of each text covers 10x its bytes
    monkeypatch.setattr(prep, "byte_table", lambda backend: None)
    monkeypatch.setattr(prep, "offset_bytes",
                        lambda text, offsets: np.array([utf8(text) * 10] + [0] * (len(offsets) - 1)))
    m = prepare([src], tokenizer_dir, tmp_path / "out", seq_len=4, progress=False)
    assert m["token_bytes"]["overflow"] == BYTES_OVERFLOW and m["token_bytes"]["total"] == 500
    s = TokenSource(tmp_path / "out")
    assert s.bytes_batch([0])[0, 0] == 500 and s.bytes_batch(range(len(s))).sum() == 500
    assert s.bytes_batch([len(s) - 1, 0, 0])[1:, 0].tolist() == [500, 500]


# ---------------------------------------------------------------------------------------- probes


class Unigram(torch.nn.Module):
    """A model whose next-token distribution ignores the context: NLL of a target = -log_softmax(logits)[target]."""

    def __init__(self, vocab: int, seed: int = 0):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 2)

    def forward(self, input_ids, **_):
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1))

    def nll(self) -> np.ndarray:
        return (-self.logits.detach().double().log_softmax(-1)).numpy()


ONE_PROCESS = SimpleNamespace(device=torch.device("cpu"), reduce=lambda t, reduction: t)


def probe(sources: dict, model, max_sequences=10_000, micro=5, frame=None, accelerator=ONE_PROCESS, **kw):
    return HeldOutLoss(sources, max_sequences, micro, frame=frame, loss=PlainLoss(), **kw)(model, accelerator)


def test_bpb_of_a_real_model_by_hand(en_sets, corpora, tokenizer_dir):
    """A tiny Llama's bpb = its summed target NLL (from its own logits) / (ln 2 * the bytes of the text
    the targets decode to); and the rows decode to the documents' text."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = load_tokenizer(tokenizer_dir)
    src = TokenSource(en_sets[128])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256), dtype=torch.float32).eval()
    n = 12
    rows = src.batch(probe_indices(len(src), n))  # the probe's sample: n sequences strided over the set
    nll = bytes_ = 0.0
    with torch.no_grad():
        logp = model(input_ids=torch.from_numpy(rows)).logits.double().log_softmax(-1)
    for r in range(n):
        nll -= logp[r, torch.arange(127), torch.from_numpy(rows[r, 1:])].sum().item()
        bytes_ += utf8(tok.decode(rows[r, 1:].tolist(), skip_special_tokens=True))
    out = probe({"en": src}, model, max_sequences=n)
    assert out["probe/en/bpb"] == pytest.approx(nll / (math.log(2) * bytes_), rel=1e-5)
    assert out["probe/en/loss"] == pytest.approx(nll / (n * 127), rel=1e-5)
    # the packed rows hold the documents' text, EOS-separated, less the tail
    text = tok.decode(src.batch(range(len(src))).reshape(-1).tolist(), skip_special_tokens=True)
    whole = "".join(docs_of(corpora["en"]["validation"], EN_DOCS))
    assert whole.startswith(text) and utf8(text) == src.bytes_total


def test_ignored_targets_add_neither_nll_nor_bytes(en_sets, tokenizer_dir):
    """document_start_loss: false ignores the target after each EOS; its bytes leave the denominator."""
    tok = load_tokenizer(tokenizer_dir)
    src = TokenSource(en_sets[64])
    model = Unigram(len(tok))
    frame = lambda ids: model_inputs(ids, tok.eos_token_id, document_masking=True,  # noqa: E731
                                     document_start_loss=False)
    ids, nbytes = all_rows(src)
    counted = np.ones_like(ids[:, 1:], dtype=bool) & (ids[:, :-1] != tok.eos_token_id)
    assert (~counted).sum() > 10 and nbytes[:, 1:][~counted].sum() > 0  # starts of documents have bytes
    want = (model.nll()[ids[:, 1:]] * counted).sum() / (math.log(2) * (nbytes[:, 1:] * counted).sum())
    assert probe({"en": src}, model, frame=frame)["probe/en/bpb"] == pytest.approx(want, rel=1e-6)
    plain = (model.nll()[ids[:, 1:]]).sum() / (math.log(2) * nbytes[:, 1:].sum())
    assert probe({"en": src}, model)["probe/en/bpb"] == pytest.approx(plain, rel=1e-6)


def test_bpb_does_not_depend_on_the_packing(en_sets, tokenizer_dir):
    """The same model on the same text at seq_len 64 and 128. Token 0 of every row is not predicted, so
    the 64-packing leaves out one more token (and its bytes) per 128 tokens: its bpb may differ by about
    that share (< 2%). Adding those first tokens back by hand gives bpb over every token, which must be
    the same for both packings to fp32 rounding: the probe counts every other token once, and only once."""
    tok = load_tokenizer(tokenizer_dir)
    s64, s128 = TokenSource(en_sets[64]), TokenSource(en_sets[128])
    n = len(s128)
    ids128, b128 = all_rows(s128)
    ids64, b64 = s64.batch(range(2 * n)), s64.bytes_batch(range(2 * n))
    assert np.array_equal(ids64.reshape(-1), ids128.reshape(-1))  # the same text, cut twice as often
    assert np.array_equal(b64.reshape(-1), b128.reshape(-1))
    model = Unigram(len(tok))
    table = model.nll()
    whole = {}
    for name, src, m, ids, nb in (("64", s64, 2 * n, ids64, b64), ("128", s128, n, ids128, b128)):
        bpb = probe({"en": src}, model, max_sequences=m)["probe/en/bpb"]
        target_bytes = nb[:, 1:].sum()
        whole[name] = (bpb * math.log(2) * target_bytes + table[ids[:, 0]].sum()) / (math.log(2) * nb.sum())
        whole[name + "/bpb"] = bpb
    assert whole["64"] == pytest.approx(whole["128"], rel=1e-7)  # fp32 per-token NLL
    assert whole["64/bpb"] == pytest.approx(whole["128/bpb"], rel=0.02)
    assert whole["64/bpb"] != whole["128/bpb"]


def test_two_processes_reduce_bytes_too(en_sets, tokenizer_dir):
    """Sharded over 2 processes (an odd count: a weight-0 padding row), bpb equals one process's."""
    tok = load_tokenizer(tokenizer_dir)
    src = TokenSource(en_sets[64])
    model = Unigram(len(tok))
    one = probe({"en": src}, model, max_sequences=11, micro=3)
    def work(rank, reduce):
        acc = SimpleNamespace(device=torch.device("cpu"), reduce=lambda t, reduction: reduce(t))
        return probe({"en": src}, model, max_sequences=11, micro=3, accelerator=acc, rank=rank, world_size=2)

    results = on_two_simulated_ranks(work)
    for r in (0, 1):
        assert results[r]["probe/en/bpb"] == pytest.approx(one["probe/en/bpb"], rel=1e-9)
        assert results[r]["probe/en/loss"] == pytest.approx(one["probe/en/loss"], rel=1e-6)


def old_copy(prepared_dir: Path, out: Path) -> Path:
    """``prepared_dir`` as cpt prepare wrote it before byte counts existed."""
    shutil.copytree(prepared_dir, out)
    m = json.loads((out / "manifest.json").read_text())
    del m["token_bytes"]
    for shard in m["shards"]:
        (out / shard.pop("bytes_file")).unlink()
    (out / "manifest.json").write_text(json.dumps(m, indent=1) + "\n")
    return out


def test_a_set_prepared_before_byte_counts_probes_loss_only(en_sets, tokenizer_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from cpt.cli import main

    old = TokenSource(old_copy(en_sets[128], tmp_path / "old"))
    assert not old.has_bytes and old.bytes_total is None and old.bytes_batch([0]) is None
    new = TokenSource(en_sets[128])
    model = Unigram(len(load_tokenizer(tokenizer_dir)))
    out_old, out_new = probe({"old": old}, model), probe({"new": new}, model)
    assert "probe/old/bpb" not in out_old and out_old["probe/old/loss"] == out_new["probe/new/loss"]

    # cpt probe: a "-" in the table with the reason, null in the JSON
    tok = load_tokenizer(tokenizer_dir)
    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    result = tmp_path / "r.json"
    assert main(["probe", str(model_dir), "--sets", f"old={tmp_path / 'old'}", f"new={en_sets[128]}",
                 "--max-sequences", "4", "--out", str(result)]) == 0
    r = json.loads(result.read_text())
    assert r["sets"]["old"]["bpb"] is None and r["sets"]["new"]["bpb"] > 0
    assert r["sets"]["old"]["loss"] == pytest.approx(r["sets"]["new"]["loss"], abs=1e-6)
    printed = capsys.readouterr().out
    assert "bpb" in printed and f"{r['sets']['new']['bpb']:.4f}" in printed
    assert "bpb: - for old (prepared before byte counts; re-run cpt prepare)" in printed

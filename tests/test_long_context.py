"""Long-context CPT: RoPE overrides on an init_from model, the prepare options for long documents (keep
whole, drop short, upsample), the held-out loss by position, and a stage that extends a model trained at
128 tokens to 512."""

from __future__ import annotations

import json
import math
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, logits, metric

from cpt.errors import CptError

SEQ = 64  # rows of the prepare tests


def _tiny_dir(tmp_path, tokenizer_dir, max_positions=128) -> Path:
    """A saved tiny Llama with ``max_positions`` positions (default RoPE) and the test tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from cpt.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY, vocab_size=len(tok), max_position_embeddings=max_positions))
    out = tmp_path / "tiny"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# ------------------------------------------------------------------------------------- RoPE overrides


def test_rope_overrides_on_an_init_from_config(tmp_path, tokenizer_dir):
    """transformers >= 5 keeps RoPE in config.rope_parameters: a bare rope_theta override must land there
    (set as an attribute it changed nothing), yarn gets the model's own context as its original length (not
    the new max_position_embeddings), re-applying the overrides to the extended config changes nothing (a
    resume), dynamic NTK's limit is factor x the trained context, and a bad kind is one line."""
    from transformers import AutoModelForCausalLM

    from cpt.model import model_config, position_limit

    path = _tiny_dir(tmp_path, tokenizer_dir)
    base = AutoModelForCausalLM.from_pretrained(path).model.rotary_emb.inv_freq
    cfg, changes = model_config(path, {"rope_theta": 1e6, "max_position_embeddings": 512})
    assert cfg.rope_parameters == {"rope_type": "default", "rope_theta": 1e6}
    assert changes["rope_parameters"][0]["rope_theta"] == 10000.0
    inv = AutoModelForCausalLM.from_config(cfg).model.rotary_emb.inv_freq
    assert inv[0] == base[0] and inv[-1] < base[-1] / 10  # the base moved: low frequencies slower

    yarn = {"max_position_embeddings": 512, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    cfg, _ = model_config(path, yarn)
    assert cfg.rope_parameters == {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                   "original_max_position_embeddings": 128}
    cfg.save_pretrained(tmp_path / "extended")
    again, _ = model_config(tmp_path / "extended", yarn)
    assert again.rope_parameters == cfg.rope_parameters

    cfg, _ = model_config(path, {"rope_parameters": {"rope_type": "dynamic", "factor": 4.0}})
    assert cfg.max_position_embeddings == 128 and position_limit(cfg) == 512
    with pytest.raises(CptError, match=r"rope_type = 'ntk'.*linear, dynamic, yarn"):
        model_config(path, {"rope_parameters": {"rope_type": "ntk", "factor": 4.0}})
    with pytest.raises(CptError, match=r"^model.config.rope_parameters: Missing required keys .*factor"):
        model_config(path, {"rope_parameters": {"rope_type": "linear"}})


# ------------------------------------------------------------------------------------ prepare options


@pytest.fixture(scope="module")
def varied(corpora, tokenizer_dir, tmp_path_factory):
    """(jsonl path, token ids of each document with its framing): 80 real English texts cut to lengths
    spread from a few tokens to ~2 rows of SEQ."""
    from cpt.data.tokenizer import document_frame, load_tokenizer

    texts = [json.loads(line)["text"] for line in corpora["en"]["train"].read_text().splitlines()[:80]]
    rng = np.random.default_rng(0)
    texts = [t[:int(c)] for t, c in zip(texts, rng.integers(10, 500, len(texts)), strict=True) if t[:int(c)].strip()]
    path = tmp_path_factory.mktemp("varied") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok = load_tokenizer(tokenizer_dir)
    prefix, eos = document_frame(tok.backend_tokenizer, tok.eos_token_id)
    docs = [(*prefix, *tok(t, add_special_tokens=False)["input_ids"], eos) for t in texts]
    return path, docs


def _prepare(varied, tokenizer_dir, out, **lengths):
    from cpt.data.lengths import LengthOptions
    from cpt.data.prepare import prepare
    from cpt.data.source import TokenSource

    m = prepare([varied[0]], tokenizer_dir, out, seq_len=SEQ, progress=False, lengths=LengthOptions(**lengths))
    src = TokenSource(out)
    return m, src.batch(range(src.num_sequences)).astype(np.int64)


def _rows_holding(rows: np.ndarray, doc: tuple) -> list[int]:
    """The row of each whole occurrence of ``doc`` (a contiguous run of its ids), once per occurrence."""
    d = np.asarray(doc)
    return [r for r, row in enumerate(rows) for i in np.flatnonzero(row == d[0])
            if i + len(d) <= len(row) and (row[i:i + len(d)] == d).all()]


def test_whole_documents_keeps_every_document_that_fits_in_one_row(varied, tokenizer_dir, tmp_path):
    docs = varied[1]
    fit = [d for d in docs if len(d) <= SEQ]
    plain, plain_rows = _prepare(varied, tokenizer_dir, tmp_path / "plain", min_doc_tokens=1)
    whole, rows = _prepare(varied, tokenizer_dir, tmp_path / "whole", whole=True)
    assert plain["lengths"]["cut_documents"] > 5  # plain packing cuts documents that would fit
    cut = whole["lengths"]["cut_documents"]
    assert cut <= 2  # only at the end of the input, where nothing is left to fill the last row
    lost = [d for d in fit if not _rows_holding(rows, d)]
    assert len(lost) >= cut and sum(map(len, lost)) <= whole["tokens_dropped_tail"] + cut * SEQ
    cut_plain = [d for d in fit if not _rows_holding(plain_rows, d)]
    assert len(cut_plain) >= plain["lengths"]["cut_documents"] - 1  # what the manifest counts is what happened
    total = sum(map(len, docs))
    for m in (plain, whole):  # nothing lost or added: every token is in a row or in the tail
        assert m["lengths"]["written"]["tokens"] == total == m["tokens"] + m["tokens_dropped_tail"]


def test_min_doc_tokens_and_upsample_long_count_and_spread_copies(varied, tokenizer_dir, tmp_path):
    docs = varied[1]
    short, long_ = 12, 40
    kept = [d for d in docs if len(d) >= short]
    up = [d for d in kept if len(d) >= long_]
    m, rows = _prepare(varied, tokenizer_dir, tmp_path / "up", min_doc_tokens=short, upsample=(long_, 3), whole=True)
    lengths = m["lengths"]
    assert lengths["dropped_short"] == {"documents": len(docs) - len(kept),
                                        "tokens": sum(len(d) for d in docs if len(d) < short)}
    assert lengths["repeated_documents"] == len(up)
    written = [len(d) for d in kept] + [len(d) for d in up] * 2
    assert lengths["written"]["documents"] == len(written) == m["documents"] - (len(docs) - len(kept)) + 2 * len(up)
    assert lengths["written"]["tokens"] == sum(written) == m["tokens"] + m["tokens_dropped_tail"]
    assert sum(b["documents"] for b in lengths["written"]["histogram"]) == len(written)
    assert lengths["written"]["quantiles"]["p50"] == int(np.quantile(written, 0.5, method="lower"))
    assert lengths["written"]["quantiles"]["max"] == max(written)
    assert lengths["read"]["documents"] == len(docs)
    missing = 0
    for d in (d for d in up if len(d) <= SEQ):  # 3 copies of an upsampled document that fits, never two in a row
        held = _rows_holding(rows, d)
        assert len(held) == len(set(held)) and len(held) <= 3
        missing += (3 - len(held)) * len(d)
    # a copy not whole in a row is in the dropped tail or one of the few cut at the end of the input
    assert lengths["cut_documents"] <= 2 and missing <= m["tokens_dropped_tail"] + lengths["cut_documents"] * SEQ


def test_prepare_cli_prints_lengths_and_refuses_bad_options(varied, tokenizer_dir, tmp_path, capsys):
    from cpt.cli import main

    out = tmp_path / "cli"
    assert main(["prepare", str(varied[0]), "--tokenizer", str(tokenizer_dir), "--out", str(out), "--seq-len",
                 str(SEQ), "--min-doc-tokens", "12", "--upsample-long", "40:2", "--whole-documents"]) == 0
    printed = capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    assert f"{m['lengths']['cut_documents']} documents that fit a row cut across two" in printed
    assert f"{m['lengths']['repeated_documents']} upsampled x2" in printed
    assert m["lengths"]["upsample_long"] == {"min_tokens": 40, "copies": 2} and m["lengths"]["whole_documents"]
    assert main(["prepare", str(varied[0]), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "x"),
                 "--seq-len", str(SEQ), "--upsample-long", "40x2"]) == 2  # a CptError: one line, status 2
    assert "--upsample-long '40x2': expected L:F" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ loss by position


@pytest.mark.parametrize("masking", [False, True])
def test_loss_by_position_is_the_mean_of_the_token_losses_in_each_bucket(masking, prepared, tokenizer_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from cpt.data.source import TokenSource
    from cpt.probes import HeldOutLoss, probe_indices
    from cpt.train.step import model_inputs

    class One:
        device = torch.device("cpu")

        def reduce(self, t, reduction):
            return t

    model = AutoModelForCausalLM.from_pretrained(_tiny_dir(tmp_path, tokenizer_dir)).eval()
    src = TokenSource(prepared["en"]["validation"])
    edges = [0, 16, 64, 100]  # positions 100..127 fall in no bucket
    frame = (lambda ids: model_inputs(ids, src.eos_token_id, document_masking=True)) if masking else None
    out = HeldOutLoss({"en": src}, 6, 4, frame=frame, by_position=edges)(model, One())
    ids = torch.from_numpy(src.batch(probe_indices(src.num_sequences, 6)).astype(np.int64))
    inputs = frame(ids) if masking else {"input_ids": ids}
    with torch.no_grad():
        logp = torch.log_softmax(model(**{k: v for k, v in inputs.items() if k != "labels"}).logits[:, :-1], -1)
    nll = -logp.gather(2, ids[:, 1:, None])[..., 0]
    pos = inputs["position_ids"][:, 1:] if masking else torch.arange(1, ids.size(1)).expand_as(nll)
    if masking:
        assert (pos[:, 1:] < torch.arange(2, ids.size(1))).any()  # documents restart inside rows here
    for lo, hi in pairwise(edges):
        sel = (pos >= lo) & (pos < hi)
        assert out[f"probe/en/loss@{lo}-{hi}"] == pytest.approx(nll[sel].mean().item(), rel=1e-5)
    assert "probe/en/loss@100-128" not in out and math.isfinite(out["probe/en/loss"])


def test_by_position_edges_are_checked():
    from cpt.recipe.probes import ProbesConfig

    assert ProbesConfig(by_position=[0, 128, 512]).by_position == [0, 128, 512]
    for bad in ([128], [0, 128, 128], [-1, 4]):
        with pytest.raises(ValueError, match="increasing positions"):
            ProbesConfig(by_position=bad)


# ------------------------------------------------------------------------ a stage from 128 to 512 tokens


@pytest.fixture(scope="module")
def extended(corpora, prepared, tokenizer_dir, tmp_path_factory):
    """A tiny model pre-trained at 128 tokens (max_position_embeddings 128) on code, then a stage at 512
    with YaRN x4 on long code documents (whole, at least 256 tokens) and 25% replay of English documents
    packed into 512-token rows, with document masking. Returns (pre-training dir, stage dir, data)."""
    from cpt.data.lengths import LengthOptions
    from cpt.data.prepare import prepare
    from cpt.recipe import validate_recipe
    from cpt.train.loop import train

    root = tmp_path_factory.mktemp("long")
    data = {"long": root / "long", "long_val": root / "long_val", "short": root / "short"}
    long_docs = LengthOptions(min_doc_tokens=256, whole=True)
    prepare([corpora["code"]["train"]], tokenizer_dir, data["long"], seq_len=512, max_documents=40,
            progress=False, lengths=long_docs)
    prepare([corpora["code"]["validation"]], tokenizer_dir, data["long_val"], seq_len=512, progress=False,
            lengths=long_docs)
    prepare([corpora["en"]["train"]], tokenizer_dir, data["short"], seq_len=512, max_documents=100, progress=False)
    common = {"tokenizer": str(tokenizer_dir)}
    pre = validate_recipe({
        "run": {"name": "pre", "output_dir": str(root / "pre"), "seed": 1},
        "model": {"preset": "tiny-llama", **common, "config": {**TINY, "max_position_embeddings": 128}},
        "data": {"seq_len": 128, "sources": {"code": str(prepared["code"]["train"])}, "mixture": {"code": 1.0}},
        "train": {"tokens": 24 * 1024, "global_batch_tokens": 1024, "micro_batch_size": 8},
        "schedule": {"kind": "cosine", "max_lr": 3e-3, "min_lr": 3e-4, "warmup": 2048},
        "tracking": {"progress": False},
    })
    train(pre)
    stage = validate_recipe({
        "run": {"name": "ext", "output_dir": str(root / "ext"), "seed": 2},
        "init_from": {"path": str(root / "pre")},
        "model": {"config": {"max_position_embeddings": 512, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}},
        "data": {"seq_len": 512, "sources": {"long": str(data["long"]), "short": str(data["short"])},
                 "mixture": {"long": 0.75, "short": 0.25}, "document_masking": True},
        "train": {"tokens": 12 * 2048, "global_batch_tokens": 2048, "micro_batch_size": 4},
        "schedule": {"kind": "cosine", "max_lr": 3e-3, "min_lr": 3e-4, "warmup": 4096},
        "checkpoint": {"every": 12 * 2048},
        "probes": {"sets": {"long": str(data["long_val"]), "short": str(prepared["code"]["validation"])},
                   "every": 6 * 2048, "max_sequences": 6, "by_position": [0, 128, 256, 512]},
        "tracking": {"progress": False},
    })
    train(stage)
    return root / "pre", root / "ext", data


def test_a_stage_extends_128_to_512_and_exports_the_new_config(extended):
    from transformers import AutoModelForCausalLM

    from cpt.model import load_causal_lm

    pre, ext, _ = extended
    assert all(math.isfinite(x) for x in metric(ext))
    long_tail = metric(ext, "probe/long/loss@256-512")
    assert len(long_tail) == 3 and all(math.isfinite(x) for x in long_tail)  # start, middle, end
    assert long_tail[-1] < long_tail[0]  # positions past the old context train
    assert len(metric(ext, "probe/short/loss")) == 3  # a 128-token set probed in a 512-token stage
    config = json.loads((ext / "final" / "config.json").read_text())
    assert config["max_position_embeddings"] == 512
    assert config["rope_parameters"] == {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                         "original_max_position_embeddings": 128}
    # final/ as a user loads it == the run's last checkpoint through cpt's loader, at positions up to 512
    ids = torch.arange(3, 515).view(1, -1) % 2000
    final = AutoModelForCausalLM.from_pretrained(ext / "final").eval()
    ckpt = load_causal_lm(next((ext / "checkpoints").glob("step-*"))).eval()
    with torch.no_grad():
        a, b = final(ids).logits, ckpt(ids).logits
        assert torch.allclose(a, b, atol=1e-5)
        plain_rope = {"rope_type": "default", "rope_theta": 10000.0}
        unscaled = AutoModelForCausalLM.from_pretrained(ext / "final", rope_parameters=plain_rope).eval()
        assert (unscaled(ids).logits[0, 200:] - a[0, 200:]).abs().max() > 1e-3  # the scaling is in effect (100x)
    assert not torch.allclose(logits(pre / "final"), logits(ext / "final"), atol=1e-3)  # it trained


@pytest.mark.parametrize("kind", ["none", "theta", "linear", "dynamic", "yarn", "llama3", "longrope"])
def test_every_recipe_kind_trains_positions_past_the_old_context(kind, extended):
    """The model.config of recipes/long_context/extend-<kind>.yaml on the 128-token model: a finite loss at
    512 tokens, gradients in every weight, and inputs past position 128 feeding the targets past 400."""
    from cpt.model import check_seq_len, load_causal_lm
    from cpt.recipe import load_recipe

    pre, _, _ = extended
    overrides = load_recipe(Path(__file__).parents[1] / f"recipes/long_context/extend-{kind}.yaml").model.config
    rope = overrides.get("rope_parameters", {})
    if rope.get("rope_type") == "longrope":  # one factor per frequency: the recipe's model has head_dim 32
        with pytest.raises(CptError, match="long_factor: 16 factors, but this model's rotary dimension 16 needs 8"):
            load_causal_lm(pre / "final", overrides={**overrides, "rope_parameters": {**rope, "short_factor": [1] * 8}})
        overrides = {**overrides, "rope_parameters": {**rope, "short_factor": [1] * 8, "long_factor": [4] * 8}}
    model = load_causal_lm(pre / "final", overrides=overrides)
    check_seq_len(model.config, 512, kind)
    ids = torch.arange(3, 515).view(1, -1) % 2000
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    labels = torch.full_like(ids, -100)
    labels[:, 400:] = ids[:, 400:]  # only targets past 400 count
    loss = model(inputs_embeds=embeds, labels=labels).loss
    loss.backward()
    grad = embeds.grad[0].abs().sum(dim=1)
    assert math.isfinite(loss.item()) and (grad[130:400] > 0).all()
    emb = model.get_input_embeddings().weight  # not in this graph: the inputs are embeddings already
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p is not emb)


def test_the_extended_model_beats_the_unextended_one_past_the_old_context(extended):
    from cpt.probe_cmd import run_probe

    pre, ext, data = extended
    edges = [0, 128, 256, 512]
    before = run_probe(pre / "final", {"long": str(data["long_val"])}, {}, max_sequences=8, by_position=edges)
    after = run_probe(ext / "final", {"long": str(data["long_val"])}, {}, max_sequences=8, by_position=edges)
    b, a = before["sets"]["long"]["by_position"], after["sets"]["long"]["by_position"]
    assert a["256-512"] < b["256-512"] - 0.05, (a, b)  # plain RoPE past 4x its trained context vs YaRN trained
    # and relative to the model's own loss in the old context: past 256 the unextended model does worse than
    # at 0-128, the extended one better (it uses the longer context)
    assert a["256-512"] - a["0-128"] < 0 < b["256-512"] - b["0-128"], (a, b)


def test_a_probe_set_longer_than_the_rows_is_refused(extended, make_recipe):
    from cpt.train.loop import train

    _, _, data = extended
    with pytest.raises(CptError, match=r"probes.sets.long: .* seq_len 512, longer than data.seq_len 128"):
        train(make_recipe("longprobe", probes__sets={"long": str(data["long_val"])}))

"""`cpt import gguf`: a tiny Llama GGUF, written here with the gguf package's writer (quantised Q8_0 matrices,
an F16 embedding, F32 norms; the vocabulary and merges of the suite's BPE tokenizer as a llama.cpp "gpt2"
tokenizer), made into an HF model dir that loads with from_pretrained, gives the GGUF-loaded model's logits,
keeps the head tied, encodes as the GGUF's tokenizer (and as the tokenizer it came from, so the suite's
prepared data fits it) and starts a `cpt train` run. What cannot be imported is one line each."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")  # in the dev extra: the test command installs it

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from cpt.cli import main  # noqa: E402
from cpt.data.tokenizer import tokenizer_fingerprint  # noqa: E402
from cpt.gguf import IMPORT_FILE, SAMPLE_TEXTS, supported_architectures  # noqa: E402

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2
TEXTS = (*SAMPLE_TEXTS, "def main():\n    return 0\n<|endoftext|>Die Katze schläft.")


def write_gguf(path, tokenizer_dir, *, tied=True, architecture="llama", seed=0):
    """A Llama GGUF as llama.cpp's converter lays it out (blk.N.attn_q ..., no output.weight when tied)."""
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {t["content"] for t in spec["added_tokens"] if t.get("special")}
    eos = vocab["<|endoftext|>"]
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_name("tiny-gguf-llama")
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(eos)
    w.add_eos_token_id(eos)
    rng = np.random.default_rng(seed)

    def rand(*shape, scale=0.05):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def quantised(name, a):
        q = gguf.GGMLQuantizationType.Q8_0
        w.add_tensor(name, gguf.quants.quantize(a, q), raw_dtype=q)

    kv = HIDDEN // HEADS * KV_HEADS
    w.add_tensor("token_embd.weight", rand(len(tokens), HIDDEN, scale=0.5).astype(np.float16))
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", 1 + rand(HIDDEN))
        for name, shape in (("attn_q", (HIDDEN, HIDDEN)), ("attn_k", (kv, HIDDEN)), ("attn_v", (kv, HIDDEN)),
                            ("attn_output", (HIDDEN, HIDDEN)), ("ffn_gate", (FFN, HIDDEN)),
                            ("ffn_up", (FFN, HIDDEN)), ("ffn_down", (HIDDEN, FFN))):
            quantised(f"blk.{i}.{name}.weight", rand(*shape, scale=0.2))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", 1 + rand(HIDDEN))
    w.add_tensor("output_norm.weight", 1 + rand(HIDDEN))
    if not tied:
        quantised("output.weight", rand(len(tokens), HIDDEN, scale=0.5))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def from_gguf(path):
    """The model and tokenizer as transformers loads the GGUF itself."""
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def imported(tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    src = write_gguf(root / "tiny.Q8_0.gguf", tokenizer_dir)
    assert main(["import", "gguf", str(src), "--out", str(root / "hf")]) == 0
    return src, root / "hf"


def test_the_imported_dir_loads_and_gives_the_gguf_logits(imported):
    src, out = imported
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", IMPORT_FILE} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert config["num_hidden_layers"] == LAYERS and config["num_key_value_heads"] == KV_HEADS
    ref, tok = from_gguf(src)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.dtype == torch.float32
    ids = tok(" ".join(TEXTS), return_tensors="pt").input_ids
    with torch.no_grad():
        want, got = ref(ids).logits, model(ids).logits
    assert ids.shape[1] > 50 and want.abs().max() > 1  # a real input, logits that are not all ~0
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # tied embeddings stay tied: one tensor, equal to the GGUF model's (dequantised from F16)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, ref.model.embed_tokens.weight)
    # the quantised matrices were dequantised, not re-rounded: exactly the GGUF-loaded model's tensors
    for name, tensor in ref.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    record = json.loads((out / IMPORT_FILE).read_text())
    assert record["logits_max_abs_diff"] == 0 and record["tensor_types"] == {"F16": 1, "F32": 5, "Q8_0": 14}
    assert record["tied_embeddings"] and record["tokenizer_same"] and record["architecture"] == "llama"


def test_the_imported_tokenizer_encodes_as_the_gguf_and_its_source(imported, tokenizer_dir):
    src, out = imported
    _, from_file = from_gguf(src)
    saved, source = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(tokenizer_dir)
    assert saved.backend_tokenizer is not None and (out / "tokenizer.json").is_file()
    for text in TEXTS:
        assert saved(text).input_ids == from_file(text).input_ids == source(text).input_ids, text
    assert saved.eos_token == "<|endoftext|>"
    # what cpt matches data and model by: the suite's prepared data fits the imported model
    assert tokenizer_fingerprint(saved) == tokenizer_fingerprint(source)


def test_cpt_train_starts_from_the_imported_dir(imported, prepared, tmp_path):
    _, out = imported
    recipe = {
        "run": {"name": "from-gguf", "output_dir": str(tmp_path / "run"), "seed": 1},
        "init_from": {"path": str(out)},
        "data": {"seq_len": 128, "sources": {"en": str(prepared["en"]["train"])}, "mixture": {"en": 1.0}},
        "train": {"tokens": 2048, "global_batch_tokens": 1024, "micro_batch_size": 4},
        "schedule": {"kind": "constant", "max_lr": 1e-3, "warmup": 0},
        "probes": {"sets": {"en": str(prepared["en"]["validation"])}, "max_sequences": 4},
        "tracking": {"progress": False},
    }
    path = tmp_path / "from-gguf.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    assert main(["train", str(path)]) == 0
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in steps if "train/loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert final.config.tie_word_embeddings and final.lm_head.weight.data_ptr() == final.model.embed_tokens.weight.data_ptr()


def test_an_untied_head_stays_untied_in_bfloat16_and_overwrite_replaces(tokenizer_dir, tmp_path):
    src = write_gguf(tmp_path / "untied.gguf", tokenizer_dir, tied=False, seed=1)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.txt").write_text("from before")
    assert main(["import", "gguf", str(src), "--out", str(out), "--dtype", "bfloat16", "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and {p.name for p in tmp_path.iterdir()} == {"untied.gguf", "hf"}
    ref, _ = from_gguf(src)
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.bfloat16 and model.config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, ref.lm_head.weight.to(torch.bfloat16))
    assert not torch.equal(ref.lm_head.weight, ref.model.embed_tokens.weight)


def refused(capsys, *args) -> str:
    """Run `cpt import gguf ARGS`; assert it fails with exit 2 and one line; return the line."""
    assert main(["import", "gguf", *map(str, args)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cpt: error: ") and "\n" not in err, err
    return err


def test_what_cannot_be_imported_is_one_line_each(capsys, imported, tmp_path, monkeypatch):
    src, out = imported
    other = tmp_path / "rwkv.gguf"
    w = gguf.GGUFWriter(str(other), "rwkv7")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    line = refused(capsys, other, "--out", tmp_path / "a")
    assert "GGUF architecture 'rwkv7' is not one transformers" in line and "llama" in line
    assert "rwkv7" not in supported_architectures() and {"llama", "qwen2", "mistral"} <= set(supported_architectures())

    text = tmp_path / "model.gguf"
    text.write_text("not a model\n")
    assert "is not a GGUF file: it starts with b'not '" in refused(capsys, text, "--out", tmp_path / "b")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    assert "a damaged or truncated GGUF file" in refused(capsys, cut, "--out", tmp_path / "c")
    assert "no such file" in refused(capsys, tmp_path / "nope.gguf", "--out", tmp_path / "d")
    assert f"{out} exists; pass --overwrite" in refused(capsys, src, "--out", out)
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed
    assert 'needs the gguf package: pip install -e ".[gguf]"' in refused(capsys, src, "--out", tmp_path / "e")
    assert {p.name for p in tmp_path.iterdir()} == {"rwkv.gguf", "model.gguf", "cut.gguf"}  # nothing written

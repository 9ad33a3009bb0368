"""Users' own models: 15 architectures built from transformers' config classes, saved with a tokenizer
that is not cpt's (a Llama-style one that adds a BOS), prepared, trained from their HF dir, exported and
loaded back; plus document masking, activation checkpointing, attention auto, remote code, config
overrides, the export dtype and tokenizers compared by what they do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import save_bos_tokenizer, with_overrides  # tests/ is on sys.path (pytest's rootdir conftest)
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from cpt.data.prepare import prepare
from cpt.data.source import TokenSource
from cpt.errors import CptError
from cpt.recipe import validate_recipe
from cpt.tracking import read_metrics
from cpt.train.loop import train
from cpt.train.step import model_inputs

VOCAB = 640
TPS = 512  # tokens per step: 4 sequences of 128
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
GQA = dict(num_key_value_heads=2)
ARCHS = {
    "llama": (tf.LlamaConfig, GQA),
    "qwen2": (tf.Qwen2Config, GQA),
    "qwen3": (tf.Qwen3Config, {**GQA, "head_dim": 8}),
    "mistral": (tf.MistralConfig, GQA),
    "mixtral": (tf.MixtralConfig, {**GQA, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "gemma": (tf.GemmaConfig, {**GQA, "head_dim": 8}),
    "gemma2": (tf.Gemma2Config, {**GQA, "head_dim": 8}),
    "gemma3_text": (tf.Gemma3TextConfig, {**GQA, "head_dim": 8}),
    "phi3": (tf.Phi3Config, GQA),
    "olmo2": (tf.Olmo2Config, GQA),
    "gpt_neox": (tf.GPTNeoXConfig, {}),
    "gpt2": (tf.GPT2Config, {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 512}),
    "falcon": (tf.FalconConfig, {}),
    "stablelm": (tf.StableLmConfig, GQA),
    "starcoder2": (tf.Starcoder2Config, GQA),
}


@pytest.fixture(scope="module")
def llama_tokenizer(corpora, tmp_path_factory):
    """A Llama-style tokenizer (not cpt's): byte-level BPE with <s> / </s>, a BOS added to every text."""
    from cpt.data.reader import InputStats, iter_documents, resolve_inputs

    docs = iter_documents(resolve_inputs([corpora["en"]["train"]]), "text", [InputStats("x", "jsonl")],
                          max_documents=200)
    return save_bos_tokenizer(docs, VOCAB, tmp_path_factory.mktemp("llama-tok"))


@pytest.fixture(scope="module")
def bos_data(llama_tokenizer, corpora, tmp_path_factory):
    root = tmp_path_factory.mktemp("bos-data")
    for split, n in (("train", 120), ("validation", 20)):
        prepare([corpora["en"][split]], llama_tokenizer, root / split, seq_len=128, max_documents=n, progress=False)
    return root


def hf_model_dir(arch: str, tokenizer_dir: Path, out: Path, dtype=torch.float32) -> Path:
    cls, extra = ARCHS[arch]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = -(-(len(tok) + 1) // 64) * 64  # padded past the tokenizer, as real models are (Qwen's adds a token)
    kwargs = {**BASE, **extra, "vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    if arch == "gpt2":
        kwargs = {k: v for k, v in kwargs.items() if k not in ("hidden_size", "intermediate_size",
                                                               "num_hidden_layers", "num_attention_heads")}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cls(**kwargs), dtype=dtype)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def recipe_for(model_dir: Path, data: Path, out: Path, **over):
    return validate_recipe(with_overrides({
        "run": {"name": out.name, "output_dir": str(out), "seed": 1},
        "init_from": {"path": str(model_dir)},
        "data": {"seq_len": 128, "sources": {"en": str(data / "train")}, "mixture": {"en": 1.0}},
        "train": {"tokens": 2 * TPS, "global_batch_tokens": TPS, "micro_batch_size": 4},
        "schedule": {"kind": "constant", "max_lr": 1e-3, "warmup": 0},
        "probes": {"sets": {"en": str(data / "validation")}, "max_sequences": 4},
        "tracking": {"progress": False},
    }, over))


def test_prepare_frames_documents_as_the_tokenizer_does(bos_data, llama_tokenizer):
    src = TokenSource(bos_data / "train")
    assert src.manifest["document_prefix"] == [0] and src.eos_token_id == 1
    flat = torch.from_numpy(src.batch(range(len(src))).reshape(-1).astype("int64"))
    bos, eos = (flat == 0).nonzero().flatten(), (flat == 1).nonzero().flatten()
    assert bos[0] == 0 and len(bos) >= len(eos) > 50
    assert torch.equal(flat[eos[:-1] + 1], torch.zeros(len(eos) - 1, dtype=torch.long))  # EOS then BOS


def test_a_tokenizer_without_eos_names_the_option(llama_tokenizer, corpora, tmp_path):
    no_eos = tmp_path / "no-eos"
    shutil.copytree(llama_tokenizer, no_eos)
    cfg = json.loads((no_eos / "tokenizer_config.json").read_text())
    cfg.pop("eos_token", None)
    (no_eos / "tokenizer_config.json").write_text(json.dumps(cfg))
    (no_eos / "special_tokens_map.json").unlink(missing_ok=True)
    with pytest.raises(CptError, match="has no eos token to separate documents with; name one of its tokens "
                                       "with --eos-token"):
        prepare([corpora["en"]["validation"]], no_eos, tmp_path / "a", seq_len=64, progress=False)
    m = prepare([corpora["en"]["validation"]], no_eos, tmp_path / "b", seq_len=64, progress=False,
                eos_token="<pad>")
    assert m["eos_token_id"] == 2
    with pytest.raises(CptError, match="--eos-token 'nope': not a token of"):
        prepare([corpora["en"]["validation"]], no_eos, tmp_path / "c", seq_len=64, progress=False, eos_token="nope")


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_document_masking_equals_each_document_alone(impl):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(**BASE, **GQA)
    cfg._attn_implementation = impl
    model = AutoModelForCausalLM.from_config(cfg).eval()
    eos = 1
    a, b = torch.randint(3, VOCAB, (6,)), torch.randint(3, VOCAB, (9,))
    a[-1] = eos
    row = torch.cat([a, b]).unsqueeze(0)
    inputs = model_inputs(row, eos, document_masking=True, document_start_loss=False)
    assert inputs["position_ids"].tolist() == [list(range(6)) + list(range(9))]
    assert inputs["labels"][0, 6] == -100 and (inputs["labels"][0, :6] == a).all()
    with torch.no_grad():
        packed = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        alone_a, alone_b = model(input_ids=a[None]).logits, model(input_ids=b[None]).logits
        leaky = model(input_ids=row).logits
    torch.testing.assert_close(packed[0, :6], alone_a[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(packed[0, 6:], alone_b[0], rtol=0, atol=1e-5)
    assert (leaky[0, 6:] - alone_b[0]).abs().max() > 1e-2  # plain packing does see the first document


def prepare_with(tokenizer_dir: Path, corpora, out: Path) -> Path:
    for split, n in (("train", 120), ("validation", 20)):
        prepare([corpora["en"][split]], tokenizer_dir, out / split, seq_len=128, max_documents=n, progress=False)
    return out


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_common_architecture_trains_and_exports(arch, llama_tokenizer, corpora, tmp_path):
    """init_from the HF dir, prepared with the model dir's own tokenizer (as a user runs cpt prepare;
    transformers may load it as another class, e.g. Qwen2Tokenizer, and rewrite it on save), trained
    with document masking, exported; final/ loads, gives the checkpoint's logits, tokenizes as the
    source did, generates, and accepts the data it was trained on as the start of a next stage."""
    source = hf_model_dir(arch, llama_tokenizer, tmp_path / f"{arch}-hf")
    data = prepare_with(source, corpora, tmp_path / "data")
    r = recipe_for(source, data, tmp_path / "run", data__document_masking=True, checkpoint__every=2 * TPS)
    assert train(r).completed
    run = Path(r.run.output_dir)
    losses = [x["train/loss"] for x in read_metrics(run / "metrics.jsonl") if "train/loss" in x]
    assert len(losses) == 2 and all(isinstance(v, float) for v in losses)
    final = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    ckpt = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "step-00000002", dtype=torch.float32).eval()
    src_cfg, out_cfg = json.loads((source / "config.json").read_text()), final.config
    assert out_cfg.model_type == src_cfg["model_type"] == arch
    assert out_cfg.tie_word_embeddings == src_cfg.get("tie_word_embeddings", True) or arch == "gpt2"
    assert out_cfg.vocab_size == src_cfg["vocab_size"]
    ids = torch.randint(3, 600, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(final(input_ids=ids).logits, ckpt(input_ids=ids).logits, rtol=0, atol=0)
    text = "Hello 123 world"
    assert AutoTokenizer.from_pretrained(run / "final")(text)["input_ids"] == \
        AutoTokenizer.from_pretrained(source)(text)["input_ids"]
    out = final.generate(ids[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=2)
    assert out.shape == (1, 7)
    assert train(recipe_for(run / "final", data, tmp_path / "next", train__tokens=TPS)).completed


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "falcon", "phi3", "mixtral"])
def test_lora_default_targets_fit_every_architecture(arch, llama_tokenizer, bos_data, tmp_path, capsys):
    source = hf_model_dir(arch, llama_tokenizer, tmp_path / f"{arch}-hf")
    r = recipe_for(source, bos_data, tmp_path / "lora", peft={"r": 4})
    assert train(r).completed
    assert "cpt: LoRA r=4" in capsys.readouterr().out
    final = AutoModelForCausalLM.from_pretrained(Path(r.run.output_dir) / "final")
    assert final.config.model_type == arch and (Path(r.run.output_dir) / "final" / "adapter").is_dir()


@pytest.mark.parametrize("peft", [None, {"r": 4}], ids=["full", "lora"])
def test_activation_checkpointing_gives_the_same_losses(peft, llama_tokenizer, bos_data, tmp_path):
    source = hf_model_dir("llama", llama_tokenizer, tmp_path / "hf")
    plain = recipe_for(source, bos_data, tmp_path / "plain", train__tokens=3 * TPS, peft=peft)
    ckpt = recipe_for(source, bos_data, tmp_path / "ckpt", train__tokens=3 * TPS, peft=peft,
                      train__activation_checkpointing=True)
    train(plain)
    train(ckpt)

    def losses(r):
        return [x["train/loss"] for x in read_metrics(Path(r.run.output_dir) / "metrics.jsonl") if "train/loss" in x]

    assert len(losses(plain)) == 3 and losses(ckpt) == pytest.approx(losses(plain), rel=1e-5, abs=1e-6)
    final = [AutoModelForCausalLM.from_pretrained(Path(r.run.output_dir) / "final") for r in (plain, ckpt)]
    ids = torch.randint(3, 600, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(final[1](input_ids=ids).logits, final[0](input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)


def test_attention_auto_picks_what_the_model_supports(llama_tokenizer, bos_data, tmp_path):
    source = hf_model_dir("gemma2", llama_tokenizer, tmp_path / "gemma2")
    with pytest.raises(CptError, match=r"init_from.path: cannot load a causal LM from .*gemma2 \(.*scaled_dot_product"):
        train(recipe_for(source, bos_data, tmp_path / "sdpa", model__attn_implementation="sdpa"))
    assert train(recipe_for(source, bos_data, tmp_path / "auto")).completed  # eager for Gemma 2
    assert json.loads((tmp_path / "auto" / "final" / "config.json").read_text())["model_type"] == "gemma2"


def test_remote_code_is_refused_unless_trusted(llama_tokenizer, bos_data, tmp_path):
    source = hf_model_dir("llama", llama_tokenizer, tmp_path / "remote")
    cfg = json.loads((source / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (source / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CptError, match=r"init_from.path: .*remote: its config.json names modelling code of its "
                                       r"own \(auto_map\); set model.trust_remote_code: true"):
        train(recipe_for(source, bos_data, tmp_path / "run"))


def test_config_overrides_for_long_context_cpt(llama_tokenizer, bos_data, tmp_path, capsys):
    source = hf_model_dir("llama", llama_tokenizer, tmp_path / "short")
    cfg = json.loads((source / "config.json").read_text())
    cfg["max_position_embeddings"] = 64  # shorter than the data's 128
    (source / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CptError, match=r"data.seq_len = 128 is longer than the model's position limit \(64"):
        train(recipe_for(source, bos_data, tmp_path / "refused"))
    longer = recipe_for(source, bos_data, tmp_path / "long",
                        model__config={"max_position_embeddings": 256,
                                      "rope_parameters": {"rope_type": "default", "rope_theta": 1e5}})
    assert train(longer).completed
    assert "cpt: model.config: max_position_embeddings 64 -> 256, rope_parameters" in capsys.readouterr().out
    out = json.loads((tmp_path / "long" / "final" / "config.json").read_text())
    assert out["max_position_embeddings"] == 256
    with pytest.raises(CptError, match=r"model.config.no_such_key: the llama config has no such key"):
        train(recipe_for(source, bos_data, tmp_path / "bad", model__config={"no_such_key": 1}))


def test_final_keeps_the_source_dtype(llama_tokenizer, bos_data, tmp_path):
    source = hf_model_dir("llama", llama_tokenizer, tmp_path / "bf16", dtype=torch.bfloat16)
    r = recipe_for(source, bos_data, tmp_path / "run")
    assert train(r).completed
    final = Path(r.run.output_dir) / "final"
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    size_bf16 = (final / "model.safetensors").stat().st_size
    r32 = recipe_for(source, bos_data, tmp_path / "run32", model__export_dtype="float32")
    assert train(r32).completed
    assert (Path(r32.run.output_dir) / "final" / "model.safetensors").stat().st_size > 1.9 * size_bf16


def test_a_tokenizer_rewritten_on_save_still_matches_its_data(llama_tokenizer, bos_data, tmp_path):
    """A tokenizer.json written with other bytes (as transformers rewrites Qwen 2's on save) but the same
    tokenizer matches the data; one with other merges does not."""
    from cpt.data.tokenizer import tokenizer_fingerprint, tokenizer_hash

    rewritten = tmp_path / "rewritten"
    tok = json.loads((llama_tokenizer / "tokenizer.json").read_text())
    rewritten.mkdir()
    for f in llama_tokenizer.iterdir():
        shutil.copy(f, rewritten / f.name)
    (rewritten / "tokenizer.json").write_text(json.dumps(tok, indent=4))  # other bytes, same tokenizer
    assert tokenizer_hash(rewritten) != tokenizer_hash(llama_tokenizer)
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(rewritten)) == \
        tokenizer_fingerprint(AutoTokenizer.from_pretrained(llama_tokenizer))
    source = hf_model_dir("llama", rewritten, tmp_path / "llama")
    assert train(recipe_for(source, bos_data, tmp_path / "run")).completed
    tok["model"]["merges"] = tok["model"]["merges"][:-10]  # a different tokenizer: refused
    (rewritten / "tokenizer.json").write_text(json.dumps(tok))
    shutil.copy(rewritten / "tokenizer.json", source / "tokenizer.json")
    with pytest.raises(CptError, match="was tokenized with another tokenizer than the model's"):
        train(recipe_for(source, bos_data, tmp_path / "other"))


def test_lora_with_a_full_copy_of_gpt2s_tied_embeddings_exports_the_model_it_trained(llama_tokenizer, bos_data,
                                                                                     tmp_path):
    """GPT-2 ties wte and lm_head: peft.modules_to_save [wte] trains one copy used as both (kept tied), so
    final/ (saved tied) gives the logits of the adapter on the source model, and its head did move."""
    from peft import PeftModel

    from cpt.model import tie_saved_embeddings

    source = hf_model_dir("gpt2", llama_tokenizer, tmp_path / "gpt2-hf")
    r = recipe_for(source, bos_data, tmp_path / "lora", peft={"r": 4, "modules_to_save": ["wte"]})
    assert train(r).completed
    final_dir = Path(r.run.output_dir) / "final"
    final = AutoModelForCausalLM.from_pretrained(final_dir).eval()
    # the adapter alone, loaded by peft, needs the same tie (peft's own covers only embed_tokens)
    adapted = tie_saved_embeddings(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(source),
                                                             final_dir / "adapter")).eval()
    src = AutoModelForCausalLM.from_pretrained(source)
    assert final.config.tie_word_embeddings and final.lm_head.weight.data_ptr() == final.transformer.wte.weight.data_ptr()
    assert (final.lm_head.weight - src.lm_head.weight).abs().max().item() > 1e-4  # the trained copy is the head too
    ids = torch.randint(3, 600, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(final(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_an_extended_tokenizer_resizes_the_embeddings_old_rows_unchanged(tied, llama_tokenizer, corpora, tmp_path,
                                                                         capsys):
    """model.extend_vocab: the init_from model's tokenizer + new German words: embeddings (and an untied head)
    grow to a multiple of 64, old rows bit-identical, a new row = the mean of the old rows of the subwords
    its text had (FVT), padding rows = the mean of all old rows; the run trains and exports the new size."""
    from cpt.data.tokenizer import load_tokenizer

    source = hf_model_dir("llama", llama_tokenizer, tmp_path / "hf")
    if tied:
        cfg = json.loads((source / "config.json").read_text())
        cfg["tie_word_embeddings"] = True
        (source / "config.json").write_text(json.dumps(cfg))
    words = ["Donaudampfschiff", "Straßenbahn", "Eichhörnchen"]
    extended = AutoTokenizer.from_pretrained(source)
    more = [f"Wortteil{i}" for i in range(70)]  # past the source's padded vocabulary (a multiple of 64)
    assert extended.add_tokens(words + more) == 73
    extended.save_pretrained(tmp_path / "tok-de")
    data = prepare_with(tmp_path / "tok-de", corpora, tmp_path / "data")
    with pytest.raises(CptError, match="set model.extend_vocab to resize the embeddings"):
        train(recipe_for(source, data, tmp_path / "refused", model__tokenizer=str(tmp_path / "tok-de")))
    r = recipe_for(source, data, tmp_path / "run", model__tokenizer=str(tmp_path / "tok-de"),
                   model__extend_vocab={"init": "subword_mean", "pad_to_multiple_of": 64})
    from cpt.model import build_model
    before = AutoModelForCausalLM.from_pretrained(source)
    model = build_model(r.model, load_tokenizer(tmp_path / "tok-de"), seed=1, weights_from=source)
    old, new = before.get_input_embeddings().num_embeddings, model.get_input_embeddings().num_embeddings
    assert new % 64 == 0 and new >= len(extended) > old
    tables = [("embed", before.get_input_embeddings().weight, model.get_input_embeddings().weight)]
    if not tied:
        tables.append(("head", before.lm_head.weight, model.lm_head.weight))
    else:
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    own = AutoTokenizer.from_pretrained(source)
    known = len(own)  # the new tokens' ids start there, inside the source's old padding rows
    for _, was, now in tables:
        assert torch.equal(now[:known], was[:known])
        for word in words:
            subwords = own.encode(word, add_special_tokens=False)
            assert len(subwords) > 1
            torch.testing.assert_close(now[extended.convert_tokens_to_ids(word)], was[subwords].mean(0))
        torch.testing.assert_close(now[new - 1], was[:known].mean(0))  # a padding row
    assert train(r).completed
    assert "cpt: model.extend_vocab: " in capsys.readouterr().out
    final = AutoModelForCausalLM.from_pretrained(Path(r.run.output_dir) / "final")
    assert final.config.vocab_size == new and final.config.tie_word_embeddings == tied


def test_two_phase_vocabulary_extension_new_rows_first_then_everything(llama_tokenizer, corpora, tmp_path):
    """The common recipe for a new language (recipes/vocab/): phase 1 trains only the resized embeddings and
    head of the extended model (mitigate.freeze of every layer and the final norm), phase 2 starts from
    phase 1's final/ and trains everything. Phase 1 leaves the body bit-unchanged, moves the new rows, and
    its final/ is a model phase 2 loads with the same vocabulary (no second resize)."""
    from safetensors.torch import load_file

    source = hf_model_dir("llama", llama_tokenizer, tmp_path / "hf")
    extended = AutoTokenizer.from_pretrained(source)
    assert extended.add_tokens([f"Neuwort{i}" for i in range(80)]) == 80  # past the padded vocabulary
    extended.save_pretrained(tmp_path / "tok-de")
    data = prepare_with(tmp_path / "tok-de", corpora, tmp_path / "data")
    one = recipe_for(source, data, tmp_path / "phase1", model__tokenizer=str(tmp_path / "tok-de"),
                     model__extend_vocab={"init": "subword_mean"},
                     mitigate={"freeze": [r"\.layers\.", r"^model\.norm\."]})
    assert train(one).completed
    before = AutoModelForCausalLM.from_pretrained(source).state_dict()
    after = load_file(Path(one.run.output_dir) / "final" / "model.safetensors")
    body = [k for k in before if "embed_tokens" not in k and "lm_head" not in k]
    assert len(body) > 10 and all(torch.equal(after[k], before[k]) for k in body)
    old = before["model.embed_tokens.weight"].shape[0]
    assert after["model.embed_tokens.weight"].shape[0] > old
    assert not torch.equal(after["lm_head.weight"][:old], before["lm_head.weight"])  # the head trains
    two = recipe_for(Path(one.run.output_dir) / "final", data, tmp_path / "phase2")
    assert train(two).completed
    final = load_file(Path(two.run.output_dir) / "final" / "model.safetensors")
    assert final["model.embed_tokens.weight"].shape == after["model.embed_tokens.weight"].shape
    assert sum(not torch.equal(final[k], after[k]) for k in body) == len(body)  # now everything trains


def test_extend_vocab_train_rows_new_keeps_the_old_rows_bit_for_bit(llama_tokenizer, corpora, tmp_path):
    """model.extend_vocab.train_rows: new with the body frozen: only the new rows of the embeddings and of
    the untied head move (words of the English text, so their embedding rows get gradients); the rows of
    the source's own tokens and the body stay bit-identical, AdamW's weight decay included."""
    from safetensors.torch import load_file

    source = hf_model_dir("llama", llama_tokenizer, tmp_path / "hf")
    extended = AutoTokenizer.from_pretrained(source)
    vocab = extended.get_vocab()
    words = [w for w in ("implementation", "argument", "specified", "returned", "attribute", "instance")
             if w not in vocab][:4]  # frequent in the English text, several subwords each in the base BPE
    assert len(words) == 4 and extended.add_tokens(words + [f"Neu{i}" for i in range(70)]) == 74
    extended.save_pretrained(tmp_path / "tok")
    data = prepare_with(tmp_path / "tok", corpora, tmp_path / "data")
    r = recipe_for(source, data, tmp_path / "rows", model__tokenizer=str(tmp_path / "tok"),
                   model__extend_vocab={"init": "subword_mean", "train_rows": "new"},
                   mitigate={"freeze": [r"\.layers\.", r"^model\.norm\."]})
    assert train(r).completed
    before = AutoModelForCausalLM.from_pretrained(source).state_dict()
    after = load_file(Path(r.run.output_dir) / "final" / "model.safetensors")
    known = len(AutoTokenizer.from_pretrained(source))
    for table in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(after[table][:known], before[table][:known]), table
    new_ids = [extended.convert_tokens_to_ids(w) for w in words]
    assert all(i >= known for i in new_ids)
    from cpt.data.tokenizer import load_tokenizer
    from cpt.model import build_model

    init = build_model(r.model, load_tokenizer(tmp_path / "tok"), seed=1, weights_from=source).state_dict()
    emb = "model.embed_tokens.weight"
    assert all(not torch.equal(after[emb][i], init[emb][i]) for i in new_ids)  # the new rows learned
    assert not torch.equal(after["lm_head.weight"][known:], init["lm_head.weight"][known:])
    body = [k for k in before if "embed_tokens" not in k and "lm_head" not in k]
    assert all(torch.equal(after[k], before[k]) for k in body)
    with pytest.raises(CptError, match="train_rows: new restores rows .* or peft"):
        train(recipe_for(source, data, tmp_path / "lora", model__tokenizer=str(tmp_path / "tok"),
                         model__extend_vocab={"train_rows": "new"}, peft={"r": 4}))

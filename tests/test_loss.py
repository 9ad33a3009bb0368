"""The chunked loss (train.loss): the model's own loss and gradients without the full logits, on the
architectures whose heads differ (untied, tied, Gemma 2's soft-capped logits), with ignored targets
and chunks that do not divide the positions; the fallback where it does not apply; in a real run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from cpt.errors import CptError
from cpt.tracking import read_metrics
from cpt.train.loss import ChunkedLoss, LinearCrossEntropy, PlainLoss, choose_loss
from cpt.train.optim import make_optimizer

SMALL = {"vocab_size": 500, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2}


def models():
    torch.manual_seed(0)
    return {
        "llama": LlamaForCausalLM(LlamaConfig(**SMALL)),
        "llama-tied": LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=True)),
        "gemma2-softcap": Gemma2ForCausalLM(Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=2.0,
                                                          attn_implementation="eager")),
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=500, n_embd=32, n_layer=2, n_head=4)),
    }


def grads(model, loss_fn, inputs):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, inputs)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def plain_and_chunked(model, loss):
    """(loss, grads) of the model's own loss and of ``loss`` in chunks of 16 rows on 2 x 24 seeded tokens."""
    loss.chunk_rows = 16
    ids = torch.randint(500, (2, 24), generator=torch.Generator().manual_seed(2))
    inputs = {"input_ids": ids, "labels": ids}
    return grads(model, PlainLoss(), inputs), grads(model, loss, inputs), inputs


@pytest.mark.parametrize("name", ["llama", "llama-tied", "gemma2-softcap", "gpt2"])
def test_chunked_loss_equals_the_models_loss_and_gradients(name):
    model = models()[name].eval()  # GPT-2's dropout would differ between the two forwards
    loss, note = choose_loss("auto", model, partitioned=False, vocab=500)
    assert isinstance(loss, ChunkedLoss) and note is None
    loss.chunk_rows = 7  # 3 x 20 positions: 9 chunks, the last one short
    ids = torch.randint(500, (3, 20), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, 5] = labels[2, 11] = -100  # ignored targets (document starts)
    inputs = {"input_ids": ids, "labels": labels}
    want_loss, want = grads(model, PlainLoss(), inputs)
    got_loss, got = grads(model, loss, inputs)
    assert got.keys() == want.keys() and len(want) > 5
    assert abs(got_loss - want_loss) < 1e-5
    scale = max(g.abs().max().item() for g in want.values())
    for n in want:
        assert (got[n] - want[n]).abs().max().item() <= 2e-6 * max(1.0, scale), n
    # per-token losses of the probes: both paths, the ignored targets 0, the last position predicts nothing
    nll, ref = loss.token_nll(model, inputs), PlainLoss().token_nll(model, inputs)
    assert nll.shape == (3, 20) and (nll - ref).abs().max().item() < 1e-5
    assert nll[0, 4].item() == 0.0 and nll[:, -1].abs().sum().item() == 0.0 and nll[0, 3].item() > 1.0


@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
def test_linear_cross_entropy_with_a_bias_in_any_chunking_is_the_plain_loss(compute_dtype):
    """The function itself: a head with a bias (Phi's), chunk sizes that divide the rows, do not, or take
    them whole, fp32 and a bf16 compute dtype over fp32 weights, a scaled backward (accumulation's 1/k).
    A second backward over the same graph (kept) gives the same gradients again."""
    torch.manual_seed(0)
    hidden = torch.randn(30, 16, requires_grad=True)
    head = torch.nn.Linear(16, 300)
    targets = torch.randint(300, (30,))
    targets[[3, 17]] = -100
    dt = compute_dtype or torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute_dtype is not None):
        logits = head(hidden)
    want = F.cross_entropy(logits.float(), targets, ignore_index=-100)
    (want * 0.25).backward()
    ref = [t.grad.clone() for t in (hidden, head.weight, head.bias)]
    tol = 1e-6 if compute_dtype is None else 2e-2
    for rows in (30, 10, 7, 1000):
        for t in (hidden, head.weight, head.bias):
            t.grad = None
        loss = LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, None, rows, compute_dtype)
        assert abs(loss.item() - want.item()) < tol * 10, rows
        (loss * 0.25).backward(retain_graph=True)
        for t, r in zip((hidden, head.weight, head.bias), ref, strict=True):
            assert t.grad.dtype == torch.float32
            assert (t.grad - r).abs().max().item() <= tol * max(1.0, r.abs().max().item()), (rows, dt)
        first = [t.grad.clone() for t in (hidden, head.weight, head.bias)]
        (loss * 0.25).backward()
        for t, g in zip((hidden, head.weight, head.bias), first, strict=True):
            assert torch.allclose(t.grad, 2 * g, rtol=1e-6, atol=1e-9)


def test_chunked_loss_in_bf16_stays_within_bf16_rounding():
    model = models()["llama"].to(torch.bfloat16)
    loss, _ = choose_loss("chunked", model, partitioned=False, vocab=500)
    (want_loss, want), (got_loss, got), inputs = plain_and_chunked(model, loss)
    assert abs(got_loss - want_loss) < 2e-2 and all(g.dtype == torch.bfloat16 for g in got.values())
    for n in want:
        assert torch.allclose(got[n].float(), want[n].float(), rtol=5e-2, atol=2e-3), n


def test_under_autocast_the_chunks_run_in_the_compute_dtype_and_auto_keeps_them():
    """Mixed precision (fp32 weights, bf16 autocast: train.precision bf16, the GPU default): accelerate
    wraps the model's forward in autocast, the loss runs outside it. The chunked head must run in bf16 as
    the model's own head does, or its logits are not the model's (auto then fell back: the bug)."""
    model = models()["llama"].eval()
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)  # what accelerate does
    fallback, note = choose_loss("auto", model, partitioned=False, vocab=500)  # the compute dtype not given
    assert isinstance(fallback, PlainLoss) and "relative difference" in note
    loss, note = choose_loss("auto", model, partitioned=False, vocab=500, compute_dtype=torch.bfloat16)
    assert isinstance(loss, ChunkedLoss) and note is None
    (want_loss, want), (got_loss, got), inputs = plain_and_chunked(model, loss)
    assert abs(got_loss - want_loss) < 1e-2 and all(g.dtype == torch.float32 for g in got.values())
    scale = max(g.abs().max().item() for g in want.values())
    for n in want:  # bf16 matmuls on both sides: equal to bf16 rounding
        assert (got[n] - want[n]).abs().max().item() <= 2e-2 * scale, n
    nll, ref = loss.token_nll(model, inputs), PlainLoss().token_nll(model, inputs)
    assert (nll - ref).abs().max().item() < 5e-2


def test_models_that_post_process_logits_or_wrap_the_head_fall_back_to_their_own_loss():
    torch.manual_seed(0)
    cohere = CohereForCausalLM(CohereConfig(**SMALL, logit_scale=0.5))  # logits = head(h) * 0.5
    loss, note = choose_loss("auto", cohere, partitioned=False, vocab=500)
    assert isinstance(loss, PlainLoss) and "not head(final hidden states)" in note
    with pytest.raises(CptError, match="train.loss: chunked cannot run here: its logits"):
        choose_loss("chunked", cohere, partitioned=False, vocab=500)

    from peft import LoraConfig, get_peft_model
    lora_head = get_peft_model(models()["llama"], LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    loss, note = choose_loss("auto", lora_head, partitioned=False, vocab=500)
    assert isinstance(loss, PlainLoss) and "not a plain Linear" in note
    loss, note = choose_loss("auto", models()["llama"], partitioned=True, vocab=500)
    assert isinstance(loss, PlainLoss) and "ZeRO-3 / FSDP1" in note
    from transformers import MixtralConfig, MixtralForCausalLM
    moe = MixtralForCausalLM(MixtralConfig(**SMALL, num_local_experts=2, output_router_logits=True))
    loss, note = choose_loss("auto", moe, partitioned=False, vocab=500)  # its loss adds the router's aux loss
    assert isinstance(loss, PlainLoss) and "router auxiliary loss" in note
    assert isinstance(choose_loss("model", models()["llama"], partitioned=False, vocab=500)[0], PlainLoss)


def test_lora_on_the_body_trains_the_same_through_the_chunked_loss():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(models()["llama"], LoraConfig(r=4, target_modules="all-linear"))
    loss, note = choose_loss("auto", model, partitioned=False, vocab=500)
    assert isinstance(loss, ChunkedLoss) and note is None
    ids = torch.randint(500, (2, 16), generator=torch.Generator().manual_seed(3))
    want_loss, want = grads(model, PlainLoss(), {"input_ids": ids, "labels": ids})
    got_loss, got = grads(model, loss, {"input_ids": ids, "labels": ids})
    assert set(want) == set(got) and all("lora_" in n for n in want)  # the frozen head gets no gradient
    assert abs(got_loss - want_loss) < 1e-5
    assert max((got[n] - want[n]).abs().max().item() for n in want) < 1e-6


def test_fused_adamw_is_the_default_on_cpu_and_steps_like_foreach():
    from cpt.recipe import OptimizerConfig

    ref = models()["llama"]
    outs = []
    for fused in ("auto", False):
        model = models()["llama"]
        model.load_state_dict(ref.state_dict())
        opt = make_optimizer(model, OptimizerConfig(fused=fused), 1e-3, "cpu")
        assert opt.defaults["fused"] is (True if fused == "auto" else None)
        ids = torch.randint(500, (2, 16), generator=torch.Generator().manual_seed(4))
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        outs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.equal(outs[0], ref_flat := torch.cat([p.detach().flatten() for p in ref.parameters()]))
    assert (outs[0] - outs[1]).abs().max().item() < 1e-6 < (outs[0] - ref_flat).abs().max().item()


def test_runs_with_the_chunked_and_the_models_loss_log_the_same_losses(make_recipe):
    from cpt.train.loop import train

    runs = {}
    for mode in ("chunked", "model"):
        r = make_recipe(f"loss-{mode}", train__loss=mode, train__tokens=6 * 1024)
        train(r)
        records = list(read_metrics(Path(r.run.output_dir) / "metrics.jsonl"))
        runs[mode] = ([x["train/loss"] for x in records if "train/loss" in x],
                      [x["probe/en/loss"] for x in records if "probe/en/loss" in x])
    (train_c, probe_c), (train_m, probe_m) = runs["chunked"], runs["model"]
    assert len(train_c) == 6 and len(probe_c) >= 2
    assert max(abs(a - b) for a, b in zip(train_c, train_m, strict=True)) < 1e-4
    assert max(abs(a - b) for a, b in zip(probe_c, probe_m, strict=True)) < 1e-4
    assert train_c[-1] < train_c[0] - 0.2  # it learns (7.64 -> 7.38 in 6 steps)


def test_a_bf16_run_keeps_the_chunked_loss(make_recipe, capsys):
    from cpt.train.loop import train

    losses = {}
    for mode in ("auto", "model"):
        r = make_recipe(f"bf16-{mode}", train__loss=mode, train__precision="bf16", train__tokens=4 * 1024)
        train(r)
        losses[mode] = [x["train/loss"] for x in read_metrics(Path(r.run.output_dir) / "metrics.jsonl")
                        if "train/loss" in x]
    assert "train.loss: auto uses the model's own loss" not in capsys.readouterr().out
    assert max(abs(a - b) for a, b in zip(losses["auto"], losses["model"], strict=True)) < 2e-2

"""Forgetting mitigations (cpt.mitigate) on a tiny Llama with torch's AdamW: frozen tensors stay put,
LR multipliers scale the step, L2-init and EMA match hand-computed formulas, their state goes through
safetensors and a resume continues bit for bit, and all of it works on a LoRA-wrapped model."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from cpt.errors import CptError
from cpt.mitigate import (
    EMA,
    L2Init,
    freeze,
    load_state,
    match_params,
    param_groups,
    save_state,
    set_lr,
    unsupported,
)

LR = 1e-2


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is ~100x faster than two contending ones on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(seed: int = 0, tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))


def batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 300, (2, 16), generator=g) for _ in range(n)]


def adamw(model, weight_decay: float = 0.1, lr_multipliers=None) -> torch.optim.AdamW:
    groups, _ = param_groups(model, weight_decay, lr_multipliers)
    return torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95), fused=False, foreach=False)


def train(model, opt, ids: list[torch.Tensor], l2: L2Init | None = None, ema: EMA | None = None,
          start: int = 0, after=None) -> None:
    """The loop's order: set_lr, forward/backward, step, l2.apply, then ema.update(step count)."""
    for i, x in enumerate(ids):
        set_lr(opt, LR)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        if l2 is not None:
            l2.apply(opt)
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(start + i + 1)
        if after is not None:
            after(model)


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_match_params_searches_names_and_refuses_what_matches_nothing():
    model = tiny_llama()
    found = match_params(model, [r"layers\.1\.mlp", "embed_tokens|lm_head"])
    assert [n for n, _ in found[r"layers\.1\.mlp"]] == [
        f"model.layers.1.mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")]
    assert [n for n, _ in found["embed_tokens|lm_head"]] == ["model.embed_tokens.weight", "lm_head.weight"]
    with pytest.raises(CptError, match=r"'layers\\\\.9\\\\.' matches no trainable parameter .*model\.embed_tokens"):
        match_params(model, [r"layers\.9\."])
    with pytest.raises(CptError, match=r"'\(oops': not a regular expression"):
        match_params(model, ["(oops"])
    tied = tiny_llama(tied=True)  # one tensor under two names: either selects it, counted once
    head = match_params(tied, ["lm_head"])["lm_head"]
    assert [(n, p) for n, p in head] == [("model.embed_tokens.weight", tied.lm_head.weight)]
    assert freeze(tied, ["embed_tokens|lm_head"]) == {"embed_tokens|lm_head": (1, 300 * 32)}


def test_freeze_keeps_matched_tensors_bit_identical_and_counts_them():
    model = tiny_llama()
    report = freeze(model, ["embed_tokens|lm_head", r"layers\.0\."])
    # by hand: embedding and head 300 x 32 each; layer 0: q 32x32, k/v 32x16 (2 kv heads of 8), o 32x32,
    # gate/up 32x64, down 64x32, two norms of 32
    assert report == {"embed_tokens|lm_head": (2, 2 * 300 * 32),
                      r"layers\.0\.": (9, 1024 + 512 + 512 + 1024 + 3 * 2048 + 2 * 32)}
    opt = adamw(model)
    assert sum(len(g["params"]) for g in opt.param_groups) == 9 + 1  # layer 1 and the final norm
    before = weights(model)
    train(model, opt, batches(3))
    after = weights(model)
    for name in before:
        frozen = "embed_tokens" in name or "lm_head" in name or ".layers.0." in name
        assert torch.equal(before[name], after[name]) == frozen, name
    with pytest.raises(CptError, match="'lm_head' matches no trainable parameter"):
        freeze(model, ["lm_head"])  # already frozen: nothing trainable left to match


def test_lr_multipliers_scale_the_first_adamw_step():
    pattern = r"layers\.1\."
    half, full = tiny_llama(), tiny_llama()
    groups, counts = param_groups(half, 0.1, {pattern: 0.5, "norm": 2.0})
    # first match wins: layer 1's norms stay at 0.5; "norm" keeps the other norms (layer 0's two + final)
    assert counts == {pattern: (9, 1024 + 512 + 512 + 1024 + 3 * 2048 + 2 * 32), "norm": (3, 3 * 32)}
    assert [(len(g["params"]), g["weight_decay"], g["lr_scale"]) for g in groups] == [
        (9, 0.1, 1.0), (0, 0.0, 1.0), (7, 0.1, 0.5), (2, 0.0, 0.5), (3, 0.0, 2.0)]
    opt = torch.optim.AdamW(groups, lr=1.0, fused=False, foreach=False, weight_decay=0.0)
    set_lr(opt, LR)
    assert [g["lr"] for g in opt.param_groups] == [LR, LR, LR * 0.5, LR * 0.5, LR * 2.0]

    # the same start, batch and AdamW step (no weight decay), multipliers {layers.1: 0.5} against none
    opt_half, opt_full = adamw(half, 0.0, {pattern: 0.5}), adamw(full, 0.0)
    start = weights(half)
    train(half, opt_half, batches(1))
    train(full, opt_full, batches(1))
    for (name, p), q in zip(half.named_parameters(), full.parameters(), strict=True):
        if ".layers.1." in name:
            torch.testing.assert_close(p - start[name], 0.5 * (q - start[name]), rtol=1e-4, atol=1e-9)
            assert (q - start[name]).abs().max() > 0.5 * LR  # AdamW's first step is ~lr * sign(g)
        else:
            assert torch.equal(p, q), name


def test_no_multipliers_give_make_optimizers_groups():
    model = tiny_llama()
    groups, counts = param_groups(model, 0.1)
    assert counts == {}
    assert [g["params"] for g in groups] == [[p for p in model.parameters() if p.ndim >= 2],
                                             [p for p in model.parameters() if p.ndim < 2]]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]


def test_bad_multipliers_are_refused():
    model = tiny_llama()
    with pytest.raises(CptError, match="'lm_head' is 0: freeze"):
        param_groups(model, 0.1, {"lm_head": 0.0})
    with pytest.raises(CptError, match="expected a number > 0"):
        param_groups(model, 0.1, {"lm_head": -1.0})
    with pytest.raises(CptError, match=r"'layers\\\\.1\\\\.mlp' matches only parameters an earlier pattern"):
        param_groups(model, 0.1, {"layers": 0.5, r"layers\.1\.mlp": 0.1})


def test_l2_init_at_coeff_times_lr_one_keeps_the_start_weights():
    model = tiny_llama()
    start = weights(model)
    opt = adamw(model)
    l2 = L2Init(model, coeff=1 / LR)
    train(model, opt, batches(3), l2=l2)
    plain = tiny_llama()
    train(plain, adamw(plain), batches(3))
    assert (plain.lm_head.weight - start["lm_head.weight"]).abs().max() > LR  # without the pull it moves
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, start[name], rtol=0, atol=1e-6)
    with pytest.raises(CptError, match="overshoot"):
        L2Init(model, coeff=2 / LR).apply(opt)


def test_l2_init_at_zero_is_plain_training_bit_for_bit():
    plain, pulled = tiny_llama(), tiny_llama()
    train(plain, adamw(plain), batches(3))
    opt = adamw(pulled)
    train(pulled, opt, batches(3), l2=L2Init(pulled, 0.0))
    for p, q in zip(plain.parameters(), pulled.parameters(), strict=True):
        assert torch.equal(p, q)


def test_l2_init_one_step_by_hand_follows_the_groups_lr():
    coeff, pattern = 5.0, r"layers\.1\."
    plain, pulled = tiny_llama(), tiny_llama()
    p0 = weights(plain)
    train(plain, adamw(plain, 0.1, {pattern: 0.5}), batches(1))
    opt = adamw(pulled, 0.1, {pattern: 0.5})
    train(pulled, opt, batches(1), l2=L2Init(pulled, coeff))
    for (name, p_adam), p_after in zip(plain.named_parameters(), pulled.parameters(), strict=True):
        lr = LR * (0.5 if ".layers.1." in name else 1.0)
        expected = p_adam - lr * coeff * (p_adam - p0[name])
        torch.testing.assert_close(p_after, expected, rtol=0, atol=1e-6)
        assert not torch.equal(p_after, p_adam) or torch.equal(p_adam, p0[name]), name


def test_ema_is_the_decay_weighted_average_and_applied_restores_the_raw_weights():
    model = tiny_llama()
    seen = [weights(model)]
    ema, every2 = EMA(model, decay=0.9), EMA(model, decay=0.9, every=2)
    opt = adamw(model)
    for i, x in enumerate(batches(3)):
        train(model, opt, [x], ema=ema, start=i)
        every2.update(i + 1)
        seen.append(weights(model))
    raw = weights(model)
    w0, w1, w2, w3 = seen
    with ema.applied():
        for name, p in model.named_parameters():
            # e1 = .9 w0 + .1 w1; e2 = .9 e1 + .1 w2; e3 = .9 e2 + .1 w3
            by_hand = 0.729 * w0[name] + 0.081 * w1[name] + 0.09 * w2[name] + 0.1 * w3[name]
            torch.testing.assert_close(p, by_hand, rtol=0, atol=1e-6)
            assert torch.equal(p, ema.shadow[name])
    for name, p in model.named_parameters():
        assert torch.equal(p, raw[name])
        torch.testing.assert_close(every2.shadow[name], 0.9 * w0[name] + 0.1 * w2[name], rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="boom"), ema.applied():
        raise RuntimeError("boom")
    assert all(torch.equal(p, raw[n]) for n, p in model.named_parameters())


def test_resume_from_safetensors_state_is_bit_identical(tmp_path):
    from safetensors.torch import load_file, save_file

    mult = {r"layers\.1\.": 0.5}
    model = tiny_llama()
    opt = adamw(model, 0.1, mult)
    l2, ema = L2Init(model, 3.0), EMA(model, 0.8)
    ids = batches(4)
    train(model, opt, ids[:2], l2=l2, ema=ema)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    save_state(tmp_path / "mitigate.safetensors", {"l2_init": l2, "ema": ema})
    opt_state = copy.deepcopy(opt.state_dict())
    train(model, opt, ids[2:], l2=l2, ema=ema, start=2)

    fresh = tiny_llama(seed=7)  # other weights: everything must come from the saved state
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"))
    opt2 = adamw(fresh, 0.1, mult)
    opt2.load_state_dict(opt_state)
    l2b, emab = L2Init(fresh, 3.0), EMA(fresh, 0.8)  # references taken now are wrong until loaded
    load_state(tmp_path / "mitigate.safetensors", {"l2_init": l2b, "ema": emab})
    train(fresh, opt2, ids[2:], l2=l2b, ema=emab, start=2)
    for (name, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q), name
        assert torch.equal(ema.shadow[name], emab.shadow[name]), name
        assert torch.equal(l2.refs[name], l2b.refs[name]), name


def test_state_of_other_parameters_is_refused(tmp_path):
    model = tiny_llama()
    save_state(tmp_path / "m.safetensors", {"l2_init": L2Init(model, 1.0)})
    frozen = tiny_llama()
    freeze(frozen, ["lm_head"])
    with pytest.raises(CptError, match=r"l2_init: the saved state has lm_head.weight, which is no trainable"):
        load_state(tmp_path / "m.safetensors", {"l2_init": L2Init(frozen, 1.0)})
    with pytest.raises(CptError, match="no ema state"):
        load_state(tmp_path / "m.safetensors", {"ema": EMA(model, 0.9)})
    bad = L2Init(model, 1.0).state_dict()
    bad["lm_head.weight"] = torch.zeros(3, 32)
    with pytest.raises(CptError, match=r"lm_head.weight has shape \(3, 32\) in the saved state, \(300, 32\) here"):
        L2Init(model, 1.0).load_state_dict(bad)
    with pytest.raises(CptError, match="cannot read"):
        load_state(tmp_path / "absent.safetensors", {"ema": EMA(model, 0.9)})


def test_lora_model_freeze_multipliers_l2_init_and_ema_on_adapters_only():
    model = lora(tiny_llama())
    with pytest.raises(CptError, match="'embed_tokens' matches no trainable parameter .*lora_A"):
        freeze(model, ["embed_tokens"])  # the base is frozen by peft already
    # lora_B of q_proj is 32 x 4, of v_proj 16 x 4 (2 kv heads of 8); lora_A 4 x 32
    assert freeze(model, [r"layers\.0\..*lora_B"]) == {r"layers\.0\..*lora_B": (2, 32 * 4 + 16 * 4)}
    groups, counts = param_groups(model, 0.1, {"lora_A": 0.5})
    assert counts == {"lora_A": (4, 4 * 4 * 32)}
    assert [(len(g["params"]), g["lr_scale"]) for g in groups] == [(2, 1.0), (0, 1.0), (4, 0.5)]
    l2, ema = L2Init(model, 1.0), EMA(model, 0.5)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(l2.refs) == sorted(ema.shadow) == sorted(trainable)
    assert len(trainable) == 6 and all(".lora_" in n and n.startswith("base_model.model.") for n in trainable)
    assert all(not l2.refs[n].any() for n in trainable if "lora_B" in n)  # B starts at zeros
    before = weights(model)
    opt = torch.optim.AdamW(groups, lr=LR, fused=False, foreach=False)
    train(model, opt, batches(2), l2=l2, ema=ema)
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p)
        if "lora_B" in name and ".layers.1." in name:
            assert changed, name
        elif "lora" not in name or ".layers.0." in name and "lora_B" in name:
            assert not changed, name  # the base model and the frozen adapters
    raw = weights(model)
    with ema.applied():
        assert all(torch.equal(p, ema.shadow[n]) for n, p in model.named_parameters() if n in ema.shadow)
    assert all(torch.equal(p, raw[n]) for n, p in model.named_parameters())


def test_unsupported_backends():
    from accelerate.utils import DistributedType

    def on(kind, stage=None, fsdp2=False, **zero):
        return SimpleNamespace(distributed_type=kind, is_fsdp2=fsdp2, state=SimpleNamespace(
            deepspeed_plugin=SimpleNamespace(zero_stage=stage, deepspeed_config={"zero_optimization": zero})))

    assert unsupported(on(DistributedType.NO)) is None
    assert unsupported(on(DistributedType.MULTI_GPU)) is None
    assert "FSDP1" in unsupported(on(DistributedType.FSDP))
    assert unsupported(on(DistributedType.FSDP, fsdp2=True)) is None  # DTensor shards (tests/test_fsdp.py)
    for stage in (1, 2, 3):  # ZeroL2Init / Zero3L2Init move DeepSpeed's master copies too (tests/test_scale.py)
        assert unsupported(on(DistributedType.DEEPSPEED, stage)) is None
    assert unsupported(on(DistributedType.DEEPSPEED, 3, offload_optimizer={"device": "cpu"})) is None
    assert "NVMe" in unsupported(on(DistributedType.DEEPSPEED, 3, offload_param={"device": "nvme"}))
    assert "hpZ" in unsupported(on(DistributedType.DEEPSPEED, 3, zero_hpz_partition_size=8))
    assert unsupported(on(DistributedType.DEEPSPEED, 2, zero_hpz_partition_size=8)) is None


# ----------------------------------------------------------------------------------- in a training run


def _records(run_dir):
    from cpt.tracking import read_metrics

    return read_metrics(f"{run_dir}/metrics.jsonl")


def test_a_run_with_every_mitigation_prints_probes_exports_and_resumes_exactly(make_recipe, capsys):
    from pathlib import Path

    from safetensors.torch import load_file

    from cpt.train.loop import train as cpt_train

    mitigations = {"freeze": [r"layers\.0\."], "lr_multipliers": {"embed_tokens": 0.5, "lm_head": 0.25},
                   "l2_init": 50.0, "ema": {"decay": 0.8, "every": 2}}
    whole = make_recipe("mit-whole", mitigate=mitigations, train__tokens=6 * 1024, checkpoint__every=2 * 1024,
                        probes__every=2 * 1024)
    assert cpt_train(whole).completed
    out = capsys.readouterr().out
    assert "cpt: mitigate: frozen 'layers\\\\.0\\\\.': 9 tensors, 0.041M parameters" in out
    assert "cpt: mitigate: lr x 0.5 'embed_tokens': 1 tensors, 0.131M parameters" in out
    run = Path(whole.run.output_dir)
    first, final = load_file(run / "checkpoints/step-00000002/model.safetensors"), load_file(run / "final/model.safetensors")
    layer0 = [k for k in final if ".layers.0." in k]
    assert len(layer0) == 9 and all(torch.equal(first[k], final[k]) for k in layer0)  # frozen from step 0
    assert not torch.equal(first["model.layers.1.mlp.up_proj.weight"], final["model.layers.1.mlp.up_proj.weight"])
    ema = load_file(run / "final_ema/model.safetensors")
    assert ema.keys() == final.keys() and not torch.equal(ema["lm_head.weight"], final["lm_head.weight"])
    assert all(torch.equal(ema[k], final[k]) for k in layer0)  # frozen: its average is itself
    records = _records(run)
    probes = [r for r in records if "probe_ema/en/loss" in r]
    assert len(probes) >= 2 and all(r["probe_ema/en/loss"] != r["probe/en/loss"] for r in probes)
    lrs = [r["lr"] for r in records if "train/loss" in r]
    assert len(lrs) == 6  # group 0 runs at the schedule's LR, logged as before

    # stopped after 3 steps (a checkpoint with the reference and EMA weights), resumed: the same run
    split = make_recipe("mit-split", mitigate=mitigations, train__tokens=6 * 1024, checkpoint__every=2 * 1024,
                        probes__every=2 * 1024)
    cpt_train(split, max_steps=3)
    assert (Path(split.run.output_dir) / "checkpoints/step-00000003/mitigate.safetensors").is_file()
    assert cpt_train(split, resume=True).completed
    losses = {name: [(r.get("train/loss"), r.get("probe_ema/en/loss")) for r in _records(d)
                     if "train/loss" in r or "probe_ema/en/loss" in r]
              for name, d in (("whole", run), ("split", split.run.output_dir))}
    assert losses["split"] == losses["whole"]
    for sub in ("final", "final_ema"):
        a, b = load_file(run / sub / "model.safetensors"), load_file(Path(split.run.output_dir) / sub / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_l2_init_pulls_toward_the_stage_start(make_recipe):
    """A huge pull (lr x l2_init = 1 at the peak LR) keeps the weights near where the run started;
    none lets them move: the distance from the start after 4 steps, measured both ways."""
    from pathlib import Path

    from safetensors.torch import load_file

    from cpt.train.loop import train as cpt_train

    dist = {}
    for name, coeff in (("free", 0.0), ("pulled", 1 / 3e-3)):
        r = make_recipe(f"l2-{name}", mitigate={"l2_init": coeff}, train__tokens=4 * 1024,
                        checkpoint__every=1024, schedule={"kind": "constant", "max_lr": 3e-3, "warmup": 0})
        cpt_train(r)
        run = Path(r.run.output_dir)
        first, final = load_file(run / "checkpoints/step-00000001/model.safetensors"), load_file(run / "final/model.safetensors")
        dist[name] = max((final[k] - first[k]).abs().max().item() for k in final)
    assert dist["free"] > 1e-3 and dist["pulled"] < 1e-6  # lr x coeff = 1: every update lands on the start

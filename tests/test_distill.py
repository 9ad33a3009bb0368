"""mitigate.distill: the chunked KL equals the whole-logits one and a hand computation, it is 0 with a 0
gradient while the student is the teacher, the loss trained on is CE + beta * KL, the teacher stays at the
stage-start weights, a resumed run is bit-identical, 2 DDP processes match 1, and the backends it cannot
serve are refused with one line."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import launch, metric
from test_mitigate import lora, one_thread, tiny_llama  # noqa: F401  (one_thread: an autouse fixture)

from cpt.errors import CptError
from cpt.mitigate.distill import Distill, LinearDistill, logits_kl
from cpt.train.loss import ChunkedLoss, PlainLoss
from cpt.train.weights import Weights


def test_kl_by_hand_full_and_top_k():
    """Two positions, vocabulary 3, T = 2: the formula written out."""
    zs = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    zt = torch.tensor([[0.0, 1.0, 3.0], [2.0, -1.0, 0.0]])
    tau = 2.0

    def kl(s, t):
        ps = [math.exp(x / tau) / sum(math.exp(y / tau) for y in s) for x in s]
        pt = [math.exp(x / tau) / sum(math.exp(y / tau) for y in t) for x in t]
        return sum(p * math.log(p / q) for p, q in zip(pt, ps, strict=True))

    full = tau**2 * (kl(zs[0].tolist(), zt[0].tolist()) + kl(zs[1].tolist(), zt[1].tolist())) / 2
    assert logits_kl(zs, zt, tau, None).item() == pytest.approx(full, rel=1e-6)
    # top 2 of the teacher: tokens (2, 1) in row 0, (0, 2) in row 1, both renormalised over them
    top = tau**2 * (kl([-1.0, 0.0], [3.0, 1.0]) + kl([0.5, 2.0], [2.0, 0.0])) / 2
    assert logits_kl(zs, zt, tau, 2).item() == pytest.approx(top, rel=1e-6)


@pytest.mark.parametrize("top_k", [None, 5])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_chunked_kl_and_its_gradients_equal_the_whole_logits_ones(top_k, softcap):
    g = torch.Generator().manual_seed(0)
    n, hid, vocab = 37, 8, 50
    h = torch.randn(n, hid, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, hid, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(vocab, generator=g, dtype=torch.float64, requires_grad=True)
    th, tw, tb = (torch.randn(n, hid, generator=g, dtype=torch.float64), torch.randn(vocab, hid, generator=g,
                  dtype=torch.float64), torch.randn(vocab, generator=g, dtype=torch.float64))

    def cap(z):
        return z if softcap is None else softcap * torch.tanh(z / softcap)

    want = logits_kl(cap(h @ w.T + b), cap(th @ tw.T + tb), 2.0, top_k)
    got = LinearDistill.apply(h, w, b, th, tw, tb, 2.0, top_k, softcap, 7, None)  # 6 chunks, the last short
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    for a, c in zip(torch.autograd.grad(want, [h, w, b]), torch.autograd.grad(got, [h, w, b]), strict=True):
        assert torch.allclose(a, c, atol=1e-6), (a - c).abs().max()


def distiller(model, **kw) -> Distill:
    d = Distill(kw.pop("weight", 0.5), **kw)
    d.before_optimizer(model)
    d.attach(Weights(model, lambda: None))
    return d


def batch(seed=1):
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("loss", [ChunkedLoss, PlainLoss])
def test_kl_and_its_gradient_are_zero_while_the_student_is_the_teacher(loss):
    model = tiny_llama(tied=True)
    fn = loss(model) if loss is ChunkedLoss else loss()
    d = distiller(model, top_k=None)
    _, seen = fn.with_outputs(model, batch())
    kl = d.loss_terms(batch(), seen)["distill_kl"][1]
    assert kl.item() == 0.0
    grads = torch.autograd.grad(kl, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    assert max(g.abs().max().item() for g in grads if g is not None) < 1e-7


@pytest.mark.parametrize("top_k", [None, 7])
@pytest.mark.parametrize("loss", [ChunkedLoss, PlainLoss])
def test_the_loss_trained_on_is_ce_plus_beta_kl_by_hand(loss, top_k):
    """After one update the student differs from its frozen start copy: the hook's term is logits_kl of the
    two models' whole logits, and the gradient of CE + beta * term is the hand-built loss's."""
    model = tiny_llama()
    fn = loss(model) if loss is ChunkedLoss else loss()
    beta, tau = 0.7, 1.5
    d = distiller(model, weight=beta, temperature=tau, top_k=top_k)
    start = tiny_llama()  # the same seed: the start weights
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(**batch(2)).loss.backward()
    opt.step()
    opt.zero_grad()
    x = batch()
    ce, seen = fn.with_outputs(model, x)
    weight, term = d.loss_terms(x, seen)["distill_kl"]
    total = ce + weight * term
    total.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with torch.no_grad():
        zt = start(input_ids=x["input_ids"]).logits
    out = model(**x)
    valid = slice(0, 15)  # the last position of each row predicts nothing
    by_hand = logits_kl(out.logits[:, valid].flatten(0, 1), zt[:, valid].flatten(0, 1), tau, top_k)
    assert weight == beta and term.item() > 1e-4
    assert term.item() == pytest.approx(by_hand.item(), rel=1e-4, abs=1e-7)
    (out.loss + beta * by_hand).backward()
    for n, p in model.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-6), n


def test_positions_are_a_seeded_sample_of_the_targets():
    targets = torch.arange(100)
    targets[::10] = -100  # 90 target positions
    a, b = Distill(1.0, positions=0.25, seed=3), Distill(1.0, positions=0.25, seed=3)
    rows = [a._rows(targets) for _ in range(3)]
    assert [r.numel() for r in rows] == [22, 22, 22] and all((targets[r] != -100).all() for r in rows)
    assert not torch.equal(rows[0], rows[1])  # a new draw per micro-batch
    assert all(torch.equal(r, b._rows(targets)) for r in rows)  # the same draws from the same seed
    assert Distill(1.0, seed=3)._rows(targets).numel() == 90


def test_teacher_state_round_trips_and_a_foreign_one_is_refused():
    model = tiny_llama()
    d = distiller(model)
    d.calls = 5
    state = d.state_dict()
    other = distiller(tiny_llama(seed=1))
    other.load_state_dict(state)
    assert other.calls == 5 and all(torch.equal(p, model.state_dict()[n]) for n, p in other.teacher.named_parameters())
    with pytest.raises(CptError, match="distill: the saved teacher does not fit"):
        other.load_state_dict({"calls": state["calls"]})


def test_refused_under_sharded_backends_and_bad_settings():
    model = tiny_llama()
    d = Distill(1.0)
    d.before_optimizer(model)
    for weights in (Weights(model, lambda: None, in_place=False),  # FSDP
                    Weights(model, lambda: None, in_place=False, zero_optimizer=object())):  # DeepSpeed
        with pytest.raises(CptError, match=r"^mitigate.distill: one process or DDP only"):
            d.attach(weights)
    for kw in ({"weight": 0.0}, {"weight": 1.0, "temperature": 0.0}, {"weight": 1.0, "positions": 1.5}):
        with pytest.raises(CptError, match="distill"):
            Distill(**kw)


def test_lora_teacher_is_the_stage_start_model_with_its_adapters():
    model = lora(tiny_llama())
    fn = ChunkedLoss(model.get_base_model())
    d = distiller(model)
    _, seen = fn.with_outputs(model, batch())
    assert d.loss_terms(batch(), seen)["distill_kl"][1].item() == 0.0
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)
    _, seen = fn.with_outputs(model, batch())
    assert d.loss_terms(batch(), seen)["distill_kl"][1].item() > 1e-4


def _metrics(run_dir, key):
    return metric(run_dir, key)


def test_a_run_distils_from_the_stage_start_and_resumes_exactly(make_recipe):
    """Two stages; positions sampled and top-k, so the sample's counter is part of the resumed state too."""
    from safetensors.torch import load_file

    from cpt.train.loop import train

    over = dict(mitigate={"distill": {"weight": 1.0, "temperature": 2.0, "positions": 0.5, "top_k": 50}}, data__mixture=None,
                train__tokens=6 * 1024, checkpoint__every=1024, checkpoint__keep_last=6, probes__every=2 * 1024,
                stages=[{"name": "a", "tokens": 3 * 1024, "mixture": {"en": 1.0}},
                        {"name": "b", "tokens": 3 * 1024, "mixture": {"de": 1.0}}])
    whole = make_recipe("distill-whole", **over)
    assert train(whole).completed
    run = Path(whole.run.output_dir)
    kl, loss = _metrics(run, "train/distill_kl"), _metrics(run, "train/loss")
    assert len(kl) == len(loss) == 6
    assert _metrics(run, "lr")[0] == 0.0  # the warmup's first update does not move the student
    # the student is the teacher on steps 1 and 2, and on step 4, the first of stage b (a new teacher)
    assert kl[0] == kl[1] == kl[3] == 0.0 and min(kl[2], kl[4], kl[5]) > 1e-4, kl
    state = {s: load_file(run / f"checkpoints/step-{s:08d}/mitigate.safetensors") for s in (2, 3, 4, 6)}
    model = {s: load_file(run / f"checkpoints/step-{s:08d}/model.safetensors") for s in (3, 6)}
    key = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(state[2][f"distill/{key}"], state[3][f"distill/{key}"])  # stage a's start, kept
    assert not torch.equal(state[3][f"distill/{key}"], model[3][key])  # the student moved
    assert torch.equal(state[4][f"distill/{key}"], model[3][key])  # stage b starts from stage a's end
    assert torch.equal(state[6][f"distill/{key}"], model[3][key])

    split = make_recipe("distill-split", **over)
    train(split, max_steps=2)
    assert train(split, resume=True).completed
    for k in ("train/loss", "train/distill_kl", "probe/en/loss"):
        assert _metrics(split.run.output_dir, k) == _metrics(run, k), k


def test_distillation_pulls_the_outputs_toward_the_start(make_recipe):
    """A large beta keeps the English probe loss nearer its start value than none does on a German-only run
    (from scratch, where German training lowers it too: the change in either direction is what is held back)."""
    from cpt.train.loop import train

    rise = {}
    for name, mit in (("free", {}), ("distilled", {"distill": {"weight": 20.0}})):
        r = make_recipe(f"dist-{name}", mitigate=mit, train__tokens=4 * 1024, probes__every=4 * 1024,
                        data__mixture={"de": 1.0}, schedule={"kind": "constant", "max_lr": 1e-2, "warmup": 0})
        train(r)
        en = _metrics(r.run.output_dir, "probe/en/loss")
        rise[name] = abs(en[-1] - en[0])
    assert rise["free"] > 0.05 and rise["distilled"] < 0.5 * rise["free"], rise


@pytest.mark.multiproc
def test_two_ddp_processes_match_one(two_proc_recipe):
    from cpt.train.loop import train

    mit = {"distill": {"weight": 1.0, "top_k": 64}}
    one, _ = two_proc_recipe("distill-one", tokens=4096, mitigate=mit)
    train(one)
    two, path = two_proc_recipe("distill-two", tokens=4096, mitigate=mit)
    launch(path)
    for key in ("train/loss", "train/distill_kl"):
        assert metric(two.run.output_dir, key) == pytest.approx(metric(one.run.output_dir, key), abs=2e-5), key
    assert metric(one.run.output_dir, "train/distill_kl")[-1] > 0

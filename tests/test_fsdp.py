"""FSDP2 (torch fully_shard through accelerate) on 2 gloo CPU processes, launched with the shipped
recipes/accelerate/fsdp2.yaml: the run matches one process, resumes exactly from its sharded checkpoint,
exports a model dir equal to the one-process export, with activation checkpointing and with the stateful
mitigations (L2-init, EMA) on. accelerate engages FSDP only on GPUs; cpt.train.backend engages FSDP2 on
CPU itself (see its _fsdp_on_cpu), so the same accelerate code paths run here as on GPUs.
"""

from pathlib import Path

import pytest
import torch
from conftest import check_mitigations_on_two_processes, free_port, launch, logits, metric

from cpt import checkpoint as ckpt_lib
from cpt.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
FSDP2 = ROOT / "recipes/accelerate/fsdp2.yaml"
pytestmark = pytest.mark.multiproc


def test_fsdp2_matches_one_process_resumes_exactly_and_exports(two_proc_recipe):
    """FSDP2 averages the same gradients as one process (reduce-scatter instead of all-reduce: only the
    summation order differs), so the losses agree to ~1e-6; activation checkpointing (on in the FSDP2
    runs, off in the reference) recomputes the same forward; the chunked loss gathers the sharded head
    and its gradient is reduce-scattered back (grad norms equal). A stop at step 3 and --resume from the
    sharded checkpoint continue the whole FSDP2 run exactly."""
    one, _ = two_proc_recipe("one")
    train(one)
    whole, path = two_proc_recipe("fsdp2", activation_checkpointing=True)
    out = launch(path, port=free_port(), config=FSDP2)
    assert "2 process(es), grad accum 2" in out.stdout and out.stdout.count("cpt: done") == 1
    assert "uses the model's own loss" not in out.stdout  # the chunked loss, the head gathered for it
    assert metric(whole.run.output_dir) == pytest.approx(metric(one.run.output_dir), abs=2e-5)
    assert metric(whole.run.output_dir, "probe/en/loss") == pytest.approx(metric(one.run.output_dir, "probe/en/loss"),
                                                                          abs=2e-5)
    assert metric(whole.run.output_dir, "train/grad_norm") == pytest.approx(
        metric(one.run.output_dir, "train/grad_norm"), rel=1e-4)
    last = ckpt_lib.latest_checkpoint(whole.run.output_dir)
    assert (last / "pytorch_model_fsdp_0").is_dir() and (last / "model.safetensors").is_file()  # shards + whole
    assert torch.allclose(logits(Path(whole.run.output_dir) / "final"), logits(Path(one.run.output_dir) / "final"),
                          atol=1e-4)

    split, split_path = two_proc_recipe("fsdp2-split", activation_checkpointing=True)
    launch(split_path, "--max-steps", "3", port=free_port(), config=FSDP2)
    assert len(metric(split.run.output_dir)) == 3
    launch(split_path, "--resume", port=free_port(), config=FSDP2)
    assert metric(split.run.output_dir) == pytest.approx(metric(whole.run.output_dir), abs=1e-6)
    assert torch.allclose(logits(Path(split.run.output_dir) / "final"), logits(Path(whole.run.output_dir) / "final"),
                          atol=1e-6)


def test_l2_init_ema_and_merge_under_fsdp2_match_one_process_and_resume(two_proc_recipe):
    """mitigate.l2_init and mitigate.ema on FSDP2 shards (DTensors), with frozen parameters and an LR
    multiplier in the same shard units, and merged weights lent to the model for a probe: the 1-process
    run's numbers to 2e-5, and an exact resume (conftest.check_mitigations_on_two_processes)."""
    check_mitigations_on_two_processes(two_proc_recipe, "mit-fsdp2", 2e-5, config=FSDP2)


def test_lora_under_fsdp2_matches_one_process_and_exports_merged(two_proc_recipe):
    """LoRA adapters (and a full LM head, modules_to_save) trained on FSDP2 shards of the frozen base: the
    curve is the 1-process run's and final/ (base + adapters merged, gathered) gives its logits."""
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}
    one, _ = two_proc_recipe("lora-one", peft=lora)
    train(one)
    two, path = two_proc_recipe("lora-fsdp2", peft=lora)
    launch(path, port=free_port(), config=FSDP2)
    assert metric(two.run.output_dir) == pytest.approx(metric(one.run.output_dir), abs=2e-5)
    assert (Path(two.run.output_dir) / "final" / "adapter" / "adapter_model.safetensors").is_file()
    assert torch.allclose(logits(Path(two.run.output_dir) / "final"), logits(Path(one.run.output_dir) / "final"),
                          atol=1e-4)


def test_tied_head_in_bf16_under_fsdp2_matches_one_process(two_proc_recipe, tokenizer_dir):
    """The GPU default (bf16 autocast; FSDP2 computes in bf16 from fp32 shards) with a head tied to the
    embeddings (one tensor, in one shard unit with the final norm): the chunked loss gathers it, and the
    curve is the 1-process bf16 run's to bf16 rounding; final/ keeps the tie."""
    from transformers import AutoConfig

    tied = {"model": {"preset": "tiny-llama", "tokenizer": str(tokenizer_dir),
                      "config": {"hidden_size": 64, "intermediate_size": 128, "tie_word_embeddings": True}}}
    one, _ = two_proc_recipe("tied-one", precision="bf16", extra=tied)
    train(one)
    two, path = two_proc_recipe("tied-fsdp2", precision="bf16", extra=tied)
    out = launch(path, port=free_port(), config=FSDP2)
    assert "uses the model's own loss" not in out.stdout
    assert metric(two.run.output_dir) == pytest.approx(metric(one.run.output_dir), abs=1e-3)
    assert metric(two.run.output_dir)[-1] < metric(two.run.output_dir)[0] - 0.1  # it learns (0.25 by step 6)
    assert AutoConfig.from_pretrained(Path(two.run.output_dir) / "final").tie_word_embeddings

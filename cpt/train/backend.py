"""The backend: the Accelerator (accelerate, DeepSpeed, FSDP, gloo on CPU), DeepSpeed's config and
/dev/shm quirks, whether a backend shards the weights, and MFU (model FLOPs and GPU peaks). How a rank
holds the weights (pieces, settling, lending, the optimizer's masters) is cpt.train.weights and
cpt.train.masters; nothing else in cpt knows DeepSpeed's or FSDP's tensors.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from cpt.errors import CptError
from cpt.recipe import Recipe
from cpt.train.layout import Layout


def _accelerator(**kwargs):
    """Every Accelerator cpt makes (training, `cpt probe`) comes from here, with the world-size guard.

    Without cpu=True, accelerate treats `accelerate launch --multi_gpu` on a machine without GPUs as N
    independent single-process runs (no gradient sync, no reduce); with it, N gloo processes. DeepSpeed
    is never engaged with cpu=True, so there the gloo backend of make_accelerator does that job."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    # AcceleratorState is process-wide: a second run in one process (a notebook, a sweep, the tests) with
    # another precision would be refused ("has already been initialized"). Each run's settings are its
    # own; the process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    deepspeed = kwargs.get("deepspeed_plugin") is not None
    accelerator = Accelerator(cpu=not torch.cuda.is_available() and not deepspeed, **kwargs)
    if accelerator.distributed_type == DistributedType.MULTI_CPU and os.environ.get(
            "ACCELERATE_USE_FSDP", "false").lower() == "true":
        _fsdp_on_cpu(accelerator)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and (accelerator.num_processes != world or accelerator.distributed_type == DistributedType.NO):
        raise CptError(
            f"launched as {world} processes but accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type}): the processes would work independently"
        )
    return accelerator


def _fsdp_on_cpu(accelerator) -> None:
    """`accelerate launch` with an FSDP config on CPU processes: engage FSDP2 over gloo.

    accelerate turns FSDP on only for GPUs and other accelerators; on CPU it would quietly run plain data
    parallel while the config asked for shards. torch's FSDP2 (``fully_shard``) runs on a CPU mesh with
    gloo, so the state is switched to FSDP here (PartialState too: a later AcceleratorState() copies its
    fields back) and the same accelerate code as on GPUs shards the model (fsdp2_prepare_model), saves
    sharded states and gathers the weights. cpt's tests run FSDP this way. FSDP1 needs CUDA: refused."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables accelerate launch sets
    if plugin.fsdp_version != 2:
        raise CptError(f"FSDP on CPU processes: fsdp_version {plugin.fsdp_version} needs GPUs; set fsdp_version: 2 "
                       f"in the accelerate config (torch's fully_shard runs on CPU with gloo)")
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def eval_accelerator():
    """The Accelerator of `cpt probe`: the device(s), no precision or optimizer settings."""
    return _accelerator()


def make_accelerator(recipe: Recipe):
    """The training Accelerator: precision, DeepSpeed (train.deepspeed) with its batch sizes filled from
    the recipe, gloo on CPU."""
    from accelerate.utils import InitProcessGroupKwargs

    precision = recipe.train.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    ds = recipe.train.deepspeed
    # train.collective_timeout: how long a collective waits for a peer before it raises (then the loop
    # ends the run with cpt.errors.PeerError); it is the process group's, so the first run of a process sets it
    group = {"timeout": timedelta(seconds=recipe.train.collective_timeout)}
    extra: dict[str, Any] = {}
    if ds is not None:
        extra["deepspeed_plugin"] = deepspeed_plugin(ds)
        if not torch.cuda.is_available():
            # Without a backend accelerate counts 1 process while DeepSpeed's own init sees N, and
            # DeepSpeed's batch-size check (micro x accum x world) fails; gloo is torch's CPU collective.
            group["backend"] = "gloo"
    extra["kwargs_handlers"] = [InitProcessGroupKwargs(**group)]
    accelerator = _accelerator(mixed_precision={"fp32": "no"}.get(precision, precision),
                               step_scheduler_with_optimizer=False, **extra)
    if ds is not None:
        fill_deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config, ds,
                              Layout.from_recipe(recipe, accelerator.num_processes), recipe.train.grad_clip)
        accelerator.wait_for_everyone()  # every rank has mapped every other rank's buffer (see below)
        unlink_deepspeed_shm(accelerator.process_index)
        # accelerate points transformers at the DeepSpeed config whatever zero3_init_flag says; with ZeRO-3
        # transformers would then build models under deepspeed.zero.Init: partitioned at birth with an init
        # of its own (other losses than the same seed without DeepSpeed, 0 parameters counted), and the
        # main-process-only merged LoRA export would wait on the other ranks. cpt builds models whole.
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    return accelerator


def unlink_deepspeed_shm(rank: int) -> None:
    """Remove this rank's DeepSpeed shared-memory buffer from /dev/shm.

    DeepSpeed's CPU communication setup (when LOCAL_SIZE says all ranks share one host, as its own
    launcher and MPI set it) creates a 66 MiB buffer per rank,
    ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``, and never unlinks
    it: every run on a host left ~69 MB per rank behind. Ranks find each other's buffers by name only
    while the process group comes up; after a barrier the names can go at once. The memory itself stays
    mapped until the processes exit, and a run killed later leaves nothing behind.
    """
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    try:
        os.unlink(Path("/dev/shm") / name)
    except FileNotFoundError:
        pass


def deepspeed_plugin(path: str):
    """accelerate's DeepSpeed plugin from a DeepSpeed JSON config (train.deepspeed). Only runs that set
    it get here, so only they import DeepSpeed (accelerate does, when the Accelerator is created)."""
    import importlib.util
    import json

    if importlib.util.find_spec("deepspeed") is None:
        raise CptError('train.deepspeed needs the deepspeed package: pip install -e ".[deepspeed]"')
    from accelerate.utils import DeepSpeedPlugin

    try:
        config = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CptError(f"train.deepspeed: {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise CptError(f"train.deepspeed: {path} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or "zero_optimization" not in config:
        raise CptError(f"train.deepspeed: {path} has no zero_optimization section")
    for section, owner in (("optimizer", "train.optimizer"), ("scheduler", "schedule")):
        if section in config:
            raise CptError(f"train.deepspeed: {path} defines {section!r}; cpt takes it from the recipe's "
                           f"{owner}: remove it from the DeepSpeed config")
    # The model is built whole on every rank (the same seeded init as without DeepSpeed) and partitioned
    # by deepspeed.initialize: zero3_init_flag=False here, and transformers' reference to the config is
    # unset in make_accelerator. zero.Init would be needed only for models that do not fit one process's
    # CPU memory.
    return DeepSpeedPlugin(hf_ds_config=config, zero3_init_flag=False)


def fill_deepspeed_config(config: dict[str, Any], path: str, layout: Layout, grad_clip: float | None) -> None:
    """Write the recipe's batch layout and clipping into the DeepSpeed config: "auto" (or absent) is
    filled, a number that disagrees with the recipe is refused, so nothing is kept twice by hand."""
    values = {"train_micro_batch_size_per_gpu": layout.micro_batch_size,
              "gradient_accumulation_steps": layout.grad_accum,
              "train_batch_size": layout.sequences_per_step,
              "gradient_clipping": float(grad_clip or 0.0)}  # DeepSpeed: 0 = no clipping
    for key, value in values.items():
        have = config.get(key, "auto")
        if have == "auto":
            config[key] = value
        elif have != value:
            raise CptError(f"train.deepspeed: {path} sets {key} = {have!r} but the recipe gives {value!r} "
                           f"(train.global_batch_tokens, train.micro_batch_size, train.grad_clip and the "
                           f"process count decide it): write \"auto\"")


def collective_failure(e: BaseException) -> str | None:
    """What a failed collective says of the peers ("timed out": one stopped answering within
    train.collective_timeout; "lost": one is gone), or None when ``e`` is no failed collective. gloo raises
    plain RuntimeErrors that name its sources ("Connection closed by peer", "Timed out waiting 600000ms for
    recv operation"); NCCL's are torch.distributed.DistError (DistBackendError)."""
    import torch.distributed as dist

    if not isinstance(e, RuntimeError):
        return None
    text = str(e)
    if not (isinstance(e, getattr(dist, "DistError", ())) or "gloo" in text or "NCCL" in text
            or "Connection reset by peer" in text or "Connection closed by peer" in text):
        return None
    return "timed out" if ("Timed out" in text or "timed out" in text or "Timeout" in text) else "lost"


def weights_sharded(accelerator) -> bool:
    """Whether save_state writes the model in a sharded format of its own instead of model.safetensors."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


def params_sharded(accelerator) -> bool:
    """Whether a parameter exists whole only inside its module's forward (ZeRO-3, FSDP)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return False






def head_gatherable(accelerator) -> bool:
    """Whether code outside the model's forward can use the LM head's weight as a whole matrix (the chunked
    loss): whole tensors (one process, DDP, ZeRO-1/2, whose module weights the engine keeps whole) or FSDP2
    (unshard the head's unit). Not ZeRO-3's or FSDP1's flat partitions, which their engines gather."""
    return not params_sharded(accelerator) or bool(getattr(accelerator, "is_fsdp2", False))




# ------------------------------------------------------------------------------------------- FLOPs/MFU

# Dense (no sparsity) bf16 tensor-core peak per GPU, from NVIDIA's data sheets. Matched in order
# against torch.cuda.get_device_name(), so the PCIe variants come before the SXM ones.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),
    ("H100", 989e12),   # SXM
    ("H200", 989e12),   # SXM; same tensor cores as H100 SXM, more memory
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10", 125e12),    # A10 / A10G
    ("L4", 121e12),
]


def peak_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a GPU named like torch.cuda.get_device_name(); None if unknown."""
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in device_name), None)


def matmul_params(model) -> tuple[int, int]:
    """(trainable, frozen) parameter counts that take part in matrix multiplies: every parameter except
    the input embedding table (a lookup, not a matmul; when tied to the LM head it is counted once, as
    the head). Call before the model is sharded (ZeRO-3/FSDP report 0 elements per parameter after)."""
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is emb
    trainable = frozen = 0
    for p in model.parameters():
        if p is emb and not tied:
            continue
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    return trainable, frozen


def flops_per_token(config, seq_len: int, trainable: int, frozen: int = 0) -> float:
    """Model FLOPs to train on one token (PaLM, Chowdhery et al. 2022, appendix B; nanoGPT's MFU):

    - 6 per trainable matmul parameter: 2 forward + 4 backward (input and weight gradients);
      4 per frozen one (LoRA's base weights: forward + input gradient, no weight gradient);
    - attention scores and the weighted sum: 12 · layers · (heads · head_dim) · seq_len, counting the
      full seq_len × seq_len matrix (no causal halving, as in PaLM).
    Not counted: norms, activations, softmax, the loss (small against the matmuls).
    """
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 6 * trainable + 4 * frozen + 12 * config.num_hidden_layers * heads * head_dim * seq_len


def mfu_per_token_s(model, recipe: Recipe, accelerator) -> float | None:
    """MFU per (global) token/s: model FLOPs per token over the peak of all devices together; None off
    CUDA or on a GPU whose peak is not in cpt.train.backend.PEAK_BF16_FLOPS (then train/mfu is not logged)."""
    if accelerator.device.type != "cuda":
        return None
    peak = peak_flops(torch.cuda.get_device_name(accelerator.device))
    if peak is None:
        if accelerator.is_main_process:
            print(f"cpt: note: peak FLOP/s of {torch.cuda.get_device_name(accelerator.device)} unknown "
                  f"(cpt.train.backend.PEAK_BF16_FLOPS): train/mfu not logged")
        return None
    trainable, frozen = matmul_params(model)
    config = model.get_base_model().config if recipe.peft is not None else model.config
    return flops_per_token(config, recipe.data.seq_len, trainable, frozen) / (peak * accelerator.num_processes)

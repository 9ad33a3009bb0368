"""`cpt import gguf FILE --out DIR`: a GGUF file (llama.cpp's format, quantised or not) made into a plain
Hugging Face model dir, once, that `init_from.path: DIR` (and every other verb) then reads like any other.

Why a verb that writes a dir, not an ``init_from.gguf_file`` key: transformers loads a GGUF through its
GGUF quantizer, and a model loaded that way refuses ``save_pretrained`` ("quantized with gguf and is not
serializable") although its weights are dequantised floats; a run started from it could not write a
checkpoint or ``final/`` without the same rebuild done here. Importing once keeps one loader for
everything after it (checkpoints, resume, merge, probe, multi-process starts each read a normal dir),
pays the dequantisation once instead of in every process of every run, and leaves a dir one can inspect,
probe and merge. The import checks itself before it renames the dir into place: the saved model, loaded
back with ``from_pretrained``, gives the GGUF-loaded model's logits on a fixed text, tied embeddings stay
tied, and the saved tokenizer encodes sample texts as the GGUF's does.

How: transformers' own GGUF support reads the file (``AutoModelForCausalLM.from_pretrained(dir,
gguf_file=name)``, dequantised, and ``AutoTokenizer.from_pretrained(dir, gguf_file=name)``, converted to
a fast tokenizer). A model is then built from the same config without its ``quantization_config``, its
parameters empty (no second copy, no random init), the dequantised tensors assigned to it, and that
model saved: safetensors, config.json, generation_config.json; the tokenizer as tokenizer.json and its
configs; ``cpt_import.json`` records the source and the checks. What transformers cannot load from a
GGUF (an architecture its loader lacks, a model that is not a causal LM) is refused with one line, and so
are a file that is not GGUF or is cut short, a missing ``gguf`` package and an existing ``--out``.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cpt.errors import CptError

DTYPES = ("float32", "bfloat16", "float16")
IMPORT_FILE = "cpt_import.json"
INSTALL = 'pip install -e ".[gguf]" (or pip install "gguf>=0.10")'
# The texts the import encodes with both tokenizers; the first is also the model check's input.
SAMPLE_TEXTS = (
    "The quick brown fox jumps over the lazy dog. It's 12345 km, isn't it?",
    "  def f(x):\n\treturn x ** 2  # comment\n",
    "Straße, café, naïve; Привет мир; 東京タワー 🙂",
)
_LOGITS_TOLERANCE = 1e-4  # float32 import: relative to the largest logit; the same tensors give 0


@dataclass(frozen=True)
class GgufHeader:
    """What the file says about itself, read without loading a tensor."""

    path: Path
    architecture: str
    name: str | None
    tensor_types: dict[str, int]  # GGML type name -> how many tensors are stored in it
    tensors: int


@dataclass(frozen=True)
class ImportReport:
    source: str
    out: str
    architecture: str
    model_class: str
    dtype: str
    parameters: int
    layers: int | None
    vocab_size: int
    tied_embeddings: bool
    tensor_types: dict[str, int]
    check_tokens: int
    logits_max_abs_diff: float
    tokenizer_same: bool
    out_bytes: int
    seconds: float
    transformers: str
    gguf: str


def supported_architectures() -> list[str]:
    """The GGUF ``general.architecture`` values the installed transformers loads: its legacy GGUF loader's
    (``modeling_gguf_pytorch_utils.GGUF_SUPPORTED_ARCHITECTURES``, less the ``general``/``tokenizer`` key
    groups that share that table) and, where present, its newer reader's (``GGUF_CONFIG_ARCHS``)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    found = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}
    try:
        from transformers.integrations.gguf import GGUF_CONFIG_ARCHS
    except ImportError:  # transformers before the newer reader
        GGUF_CONFIG_ARCHS = {}
    return sorted(found | set(GGUF_CONFIG_ARCHS))


def _as_supported(architecture: str) -> str:
    """llama.cpp's spelling as transformers' table spells it (qwen2moe -> qwen2_moe, gpt-oss -> gpt_oss)."""
    return re.sub(r"(?<=\d)moe$", "_moe", architecture.replace("-", "_"))


def _gguf_module():
    try:
        import gguf
    except ImportError:
        raise CptError(f"reading a GGUF file needs the gguf package: {INSTALL}") from None
    return gguf


def read_header(path: str | Path) -> GgufHeader:
    """The architecture, name and tensor types of a GGUF file; one line for a file that is not GGUF, is cut
    short or cannot be parsed."""
    path = Path(path)
    if not path.is_file():
        raise CptError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CptError(f"{path} is not a GGUF file: it starts with {magic!r}, not b'GGUF'")
    gguf = _gguf_module()
    try:
        reader = gguf.GGUFReader(str(path), "r")
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
        if end > path.stat().st_size:
            raise ValueError(f"its tensors end at byte {end}, past the file's {path.stat().st_size}")
        architecture = _field(reader, "general.architecture")
    except (ValueError, KeyError, IndexError, OSError, UnicodeDecodeError) as e:
        raise CptError(f"{path}: a damaged or truncated GGUF file ({type(e).__name__}: "
                       f"{_first_line(e)})") from None
    if not architecture:
        raise CptError(f"{path}: the GGUF file names no general.architecture")
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return GgufHeader(path, architecture, _field(reader, "general.name"), types, len(reader.tensors))


def _field(reader, key: str) -> str | None:
    field = reader.fields.get(key)
    return None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def check_supported(header: GgufHeader) -> None:
    """One line for an architecture the installed transformers cannot load from GGUF."""
    import transformers

    supported = supported_architectures()
    if header.architecture not in supported and _as_supported(header.architecture) not in supported:
        raise CptError(f"{header.path}: GGUF architecture {header.architecture!r} is not one transformers "
                       f"{transformers.__version__} loads from GGUF (it loads: {', '.join(supported)})")


def import_gguf(path: str | Path, out: str | Path, dtype: str = "float32", overwrite: bool = False) -> ImportReport:
    """Write the GGUF model at ``path`` as a Hugging Face model dir ``out`` (weights in ``dtype``), checked
    against the GGUF-loaded model before it is renamed into place; see the module docstring."""
    from cpt.data.writer import commit, remove_stale, temporary

    started = time.perf_counter()
    if dtype not in DTYPES:
        raise CptError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise CptError(f"{out} exists; pass --overwrite to replace it")
    header = read_header(path)
    check_supported(header)
    tokenizer = _load_tokenizer(header)
    gguf_model = _load_gguf_model(header)
    ids = _check_ids(tokenizer, gguf_model.config.vocab_size)
    reference = _logits(gguf_model, ids)
    model = _rebuilt(gguf_model, dtype)
    facts = {"model_class": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
             "layers": getattr(model.config, "num_hidden_layers", None), "vocab_size": model.config.vocab_size,
             "tied_embeddings": bool(getattr(model.config, "tie_word_embeddings", False))}
    remove_stale(out)  # what an import killed before its rename left
    tmp = temporary(out, "tmp")  # <out>.tmp-<pid>@<host>, renamed into place by commit()
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model, gguf_model  # the checks below load the saved dir: one copy of the weights at a time
        diff, same = _check_saved(tmp, header, tokenizer, ids, reference, dtype, facts["tied_embeddings"])
        report = _report(header, out, dtype, facts, ids, diff, same, tmp, started)
        (tmp / IMPORT_FILE).write_text(json.dumps(asdict(report), indent=1) + "\n")
        commit(tmp, out)
    except OSError as e:  # a full disk, a folder one may not write to
        shutil.rmtree(tmp, ignore_errors=True)
        raise CptError(f"{out} could not be written ({type(e).__name__}: {_first_line(e)}); nothing partial "
                       "was kept") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _load_tokenizer(header: GgufHeader):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(header.path.parent), gguf_file=header.path.name)
    except Exception as e:
        raise CptError(f"{header.path}: transformers cannot build its tokenizer: {type(e).__name__}: "
                       f"{_first_line(e)}") from None
    if getattr(tok, "backend_tokenizer", None) is None:
        raise CptError(f"{header.path}: transformers built a slow tokenizer from it; cpt needs a fast one")
    return tok


def _load_gguf_model(header: GgufHeader):
    """The model as transformers loads the GGUF, every weight dequantised to float32."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    where, name = str(header.path.parent), header.path.name
    try:
        config = AutoConfig.from_pretrained(where, gguf_file=name)
    except Exception as e:
        raise CptError(f"{header.path}: transformers cannot read its config: {type(e).__name__}: "
                       f"{_first_line(e)}") from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise CptError(f"{header.path}: a {config.model_type} model ({header.architecture}), not a causal LM; "
                       "cpt continues the pre-training of causal LMs")
    kwargs = {"gguf_file": name, "dtype": torch.float32}
    if hasattr(transformers, "GgufConfig"):  # the newer loader may keep weights packed; unpack them all
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except Exception as e:
        raise CptError(f"{header.path}: transformers cannot load it: {type(e).__name__}: {_first_line(e)}") from None
    return model.eval()


def _check_ids(tokenizer, vocab_size: int):
    """The check's input: the first sample text as the GGUF's tokenizer encodes it (ids the model has)."""
    import torch

    ids = [i for i in tokenizer(SAMPLE_TEXTS[0]).input_ids if 0 <= i < vocab_size][:32]
    if len(ids) < 4:
        ids = list(range(min(vocab_size, 16)))
    return torch.tensor([ids])


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _rebuilt(gguf_model, dtype: str):
    """A plain model of the same config (no quantization_config, so it saves) holding the GGUF model's
    dequantised tensors in ``dtype``: built with empty parameters, the tensors assigned, then tied."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(gguf_model.config)
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, key):
            delattr(config, key)
    target = getattr(torch, dtype)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=target)
    state = {k: v.detach().to(target) for k, v in gguf_model.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    empty = sorted(n for n, p in model.named_parameters() if p.is_meta)
    if empty or unexpected:
        raise CptError(f"the GGUF model's tensors do not fill a {type(model).__name__}: "
                       f"missing {empty[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    return model.eval()


def _check_saved(tmp: Path, header: GgufHeader, tokenizer, ids, reference, dtype: str, tied: bool):
    """Load the written dir as a user would and compare: logits, tied head, tokenizer encodings."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    diff = float((_logits(saved, ids) - reference).abs().max())
    if tied and saved.get_output_embeddings().weight.data_ptr() != saved.get_input_embeddings().weight.data_ptr():
        raise CptError(f"{header.path}: the saved model's head is not tied to its embeddings as the GGUF's is")
    scale = max(1.0, float(reference.abs().max()))
    if dtype == "float32" and not diff <= _LOGITS_TOLERANCE * scale:
        raise CptError(f"{header.path}: the saved model's logits differ from the GGUF-loaded model's by {diff:.3g}")
    del saved
    reloaded = AutoTokenizer.from_pretrained(tmp)
    same = all(reloaded(t).input_ids == tokenizer(t).input_ids for t in SAMPLE_TEXTS)
    if not same:
        raise CptError(f"{header.path}: the saved tokenizer encodes the sample texts differently from the GGUF's")
    return diff, same


def _report(header, out, dtype, facts, ids, diff, same, tmp, started) -> ImportReport:
    from importlib.metadata import version

    import transformers

    size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
    return ImportReport(
        source=str(header.path.resolve()), out=str(out), architecture=header.architecture, dtype=dtype,
        tensor_types=header.tensor_types, check_tokens=int(ids.shape[1]), logits_max_abs_diff=diff,
        tokenizer_same=same, out_bytes=size, seconds=round(time.perf_counter() - started, 2),
        transformers=transformers.__version__, gguf=version("gguf"), **facts)


def format_report(r: ImportReport) -> str:
    types = ", ".join(f"{n} {k}" for k, n in sorted(r.tensor_types.items(), key=lambda kv: -kv[1]))
    tied = "lm_head tied to the embeddings" if r.tied_embeddings else "untied head"
    return "\n".join([
        f"gguf: {r.source}: {r.architecture} -> {r.model_class}, {r.layers} layers, vocab {r.vocab_size}, "
        f"{r.parameters / 1e6:.1f}M parameters ({tied}); tensors: {types}",
        f"wrote {r.out} ({r.dtype}, {r.out_bytes / 2**20:.1f} MiB) in {r.seconds:.1f} s",
        f"check: loaded back, logits max |diff| {r.logits_max_abs_diff:.3g} against the GGUF-loaded model on "
        f"{r.check_tokens} tokens; the tokenizer encodes the sample texts the same",
        f"use it: init_from: {{path: {r.out}}}",
    ])

"""Merging checkpoints: a weighted average of N model dirs, written as one Hugging Face model dir.

``cpt merge CKPT... --out DIR --weights SPEC`` averages cpt checkpoints (``RUN/checkpoints/step-N``), HF
model dirs (``RUN/final``, a downloaded model) or the checkpoints of run dirs, given **oldest first**, with
coefficients from :func:`merge_coefficients`:

``uniform``
    ``1/N`` each.
``w1,w2,...``
    explicit weights, one per checkpoint, finite and ``>= 0``, not all zero; normalised to sum 1.
``ema:<decay>``
    the exponential moving average of the sequence started at its first checkpoint
    (``ema = theta_1; ema = d * ema + (1 - d) * theta_i`` for ``i = 2..N``): the newest checkpoint gets
    ``1 - d``, the one ``k`` places older ``d^k (1 - d)``, and the first one absorbs the rest, ``d^(N-1)``,
    so that the weights sum to 1. ``0 <= d < 1``; ``ema:0`` is the newest checkpoint alone.
``wsm:<shape>``
    WSM, Warmup-Stable and Merge (Tian et al. 2025, arXiv 2507.17634): the checkpoints of a constant-LR
    run, merged with the coefficients that emulate a decay of ``shape`` (linear, cosine, 1-sqrt, rex:
    the decay shapes of :mod:`cpt.schedules`) over the span they cover. See :func:`wsm_coefficients`.

:func:`merge_checkpoints` checks that the inputs are one architecture (config, tensor names and shapes)
with one tokenizer (compared by what it does, :func:`cpt.data.tokenizer.tokenizer_identity`), then merges
tensor by tensor in float32, reading each input's safetensors one tensor at a time and writing each merged
tensor before the next is read (:mod:`cpt.tensorfile`; never a pickle: an input with only ``.bin`` /
``.pt`` weights is refused), so that memory holds a few tensors, not N state dicts nor an output shard.
The output has the last input's layout (tensor names, shards, tied embeddings saved as it saved them),
config and tokenizer files, and its dtype (a cpt checkpoint's fp32 training weights are written in its
config's dtype, as ``final/`` is); ``merge.json`` records inputs, coefficients and method.
It is written to a temporary dir and renamed into place. A LoRA checkpoint (peft names, ``adapter/``) is
merged through its merged weights (base + adapter, as ``final/`` holds them).

:func:`write_merge` is the engine under it, for any per-tensor rule: :mod:`cpt.merge_tasks` builds
interpolation toward a base model and task arithmetic, TIES and DARE on it.

Both functions are free of CLI concerns: the training loop can call them for an in-run merge.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpt.errors import CptError

# the coefficients live in the low module cpt.merge_weights (the recipe schema checks them); re-exported
from cpt.merge_weights import WSM_SHAPES as WSM_SHAPES
from cpt.merge_weights import ema_coefficients as ema_coefficients
from cpt.merge_weights import merge_coefficients as merge_coefficients
from cpt.merge_weights import wsm_coefficients as wsm_coefficients

MERGE_FILE = "merge.json"
DTYPES = ("float32", "bfloat16", "float16")

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
_PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt")
# Config keys that record how a model was saved or loaded, not what it is.
_HARMLESS_CONFIG_KEYS = frozenset({"dtype", "torch_dtype", "transformers_version", "_name_or_path",
                                   "_commit_hash", "_attn_implementation", "_attn_implementation_autoset",
                                   "attn_implementation", "use_cache"})
# What a Hugging Face model dir carries beside its weights and config, copied from the last input.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
                    "chat_template.jinja", "chat_template.json")
_EXTRA_FILES = ("generation_config.json",)


# ---------------------------------------------------------------------------------------- coefficients


def describe(spec: str, paths: list[Path], coefficients: list[float]) -> str:
    """The coefficients used, one line per input (oldest first), and how they came about."""
    head = f"merge weights {spec}"
    if not (spec == "uniform" or spec.startswith(("ema:", "wsm:"))):
        head += " (normalised to sum 1)"
    lines = [f"{head}, oldest first:"]
    lines += [f"  {c:.6f}  {p}" for p, c in zip(paths, coefficients, strict=True)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- inputs


def resolve_inputs(paths: list[str | Path], last: int | None = None) -> list[Path]:
    """Model dirs to merge, in the order given: a model dir (cpt checkpoint or HF dir) as it is, a cpt
    run dir as its checkpoints (oldest first); ``last``: only the last K of them all."""
    from cpt.state import checkpoint_dirs

    found: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise CptError(f"{p}: no such directory (a cpt checkpoint, an HF model dir or a run dir is expected)")
        if (p / "config.json").is_file() or _weight_files(p, refuse=False):
            found.append(p)
        elif dirs := checkpoint_dirs(p):
            found.extend(dirs)
        else:
            raise CptError(f"{p}: not a model dir (no config.json) nor a run dir with checkpoints")
    if last is not None:
        if last < 1:
            raise CptError(f"--last {last}: must be at least 1")
        if last > len(found):
            raise CptError(f"--last {last}: only {len(found)} checkpoints given")
        found = found[-last:]
    return found


@dataclass
class _Input:
    path: Path
    config: dict[str, Any]
    weights: dict[str, Path] = field(default_factory=dict)  # tensor name -> its safetensors file
    tensors: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)  # name -> (dtype, shape)
    layout: list[tuple[str, list[str]]] = field(default_factory=list)  # (file name, its tensors), in order
    index: dict[str, Any] | None = None  # model.safetensors.index.json of a sharded model

    @property
    def is_cpt_checkpoint(self) -> bool:
        from cpt.state import STATE_FILE

        return (self.path / STATE_FILE).is_file()


def _weight_files(path: Path, refuse: bool = True) -> list[Path]:
    """The safetensors files of a model dir (one, or the shards its index names); a dir with pickled
    weights only is refused: nothing here unpickles."""
    if (path / WEIGHTS_INDEX).is_file():
        index = _read_json(path / WEIGHTS_INDEX)
        return [path / f for f in dict.fromkeys(index.get("weight_map", {}).values())]
    if (path / WEIGHTS_FILE).is_file():
        return [path / WEIGHTS_FILE]
    if not refuse:
        return []
    pickled = sorted(f.name for pattern in _PICKLED for f in path.glob(pattern))
    if pickled:
        raise CptError(f"{path}: its weights are pickled ({', '.join(pickled[:3])}), and cpt merge reads "
                       f"safetensors only (unpickling can run code): re-save it with "
                       f"save_pretrained(..., safe_serialization=True)")
    raise CptError(f"{path}: no {WEIGHTS_FILE} (nor {WEIGHTS_INDEX}): not a model dir cpt merge can read")


def _read_json(f: Path) -> dict[str, Any]:
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise CptError(f"{f} cannot be read ({e})") from None
    if not isinstance(data, dict):
        raise CptError(f"{f}: not a JSON object")
    return data


def _open_input(path: Path) -> _Input:
    if not path.is_dir():
        raise CptError(f"{path}: no such directory")
    if not (path / "config.json").is_file():
        raise CptError(f"{path} has no config.json (a cpt checkpoint or a Hugging Face model dir is expected)")
    _weight_files(path)  # refuses pickled weights before anything else is read
    return _Input(path, _read_json(path / "config.json"))


def _read_tensors(inp: _Input, weights_dir: Path) -> None:
    """Names, dtypes and shapes of the input's tensors, from the safetensors headers (nothing loaded)."""
    from cpt.tensorfile import TensorFile

    if (weights_dir / WEIGHTS_INDEX).is_file():
        inp.index = _read_json(weights_dir / WEIGHTS_INDEX)
    for f in _weight_files(weights_dir):
        with TensorFile(f) as handle:  # a truncated or damaged file: one line
            for name in handle.keys():
                inp.tensors[name] = (handle.dtype(name), handle.shape(name))
                inp.weights[name] = f
            inp.layout.append((f.name, handle.keys()))


def _comparable_config(inp: _Input) -> dict[str, Any]:
    """The config as transformers reads it (defaults filled in, so a key one file leaves out and another
    writes as its default is no difference), less what records how it was saved; the raw file where
    transformers cannot read it without running code (auto_map)."""
    from transformers import AutoConfig

    config = dict(inp.config)
    if not config.get("auto_map"):  # (transformers would ask whether to run that code)
        try:
            config = AutoConfig.from_pretrained(str(inp.path)).to_dict()
        except Exception:  # ValueError of a model_type this transformers does not know, ...
            pass
    if not config.get("architectures"):  # cpt checkpoints save the config alone, without it
        config.pop("architectures", None)
    return {k: v for k, v in config.items() if k not in _HARMLESS_CONFIG_KEYS}


def _check_same_model(a: _Input, b: _Input, cb: dict[str, Any]) -> None:
    """Refuse two inputs that are not one architecture by their configs (``cb``: b's comparable config;
    tensors: _check_same_tensors)."""
    ca, cb = _comparable_config(a), dict(cb)
    if "architectures" not in ca or "architectures" not in cb:
        ca.pop("architectures", None)
        cb.pop("architectures", None)
    differ = sorted(k for k in ca.keys() | cb.keys() if ca.get(k, "(unset)") != cb.get(k, "(unset)"))
    if differ:
        shown = "; ".join(f"{k}: {_short(ca.get(k, '(unset)'))} vs {_short(cb.get(k, '(unset)'))}"
                          for k in differ[:3])
        more = f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""
        raise CptError(f"cannot merge {a.path} and {b.path}: different models: config {shown}{more}")


def _check_same_tensors(a: _Input, b: _Input) -> None:
    only_a, only_b = sorted(a.tensors.keys() - b.tensors.keys()), sorted(b.tensors.keys() - a.tensors.keys())
    if only_a or only_b:
        raise CptError(f"cannot merge {a.path} and {b.path}: different tensors: only in the first "
                       f"{only_a[:3]}, only in the second {only_b[:3]}")
    for name, (_, shape) in a.tensors.items():
        if b.tensors[name][1] != shape:
            raise CptError(f"cannot merge {a.path} and {b.path}: tensor {name} has shape {list(shape)} vs "
                           f"{list(b.tensors[name][1])}")


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def _tokenizer_key(path: Path):
    """What a model dir's tokenizer is: its identity (file hash + behavioural fingerprint) where it has a
    tokenizer.json, else the bytes of its tokenizer files; None without a tokenizer."""
    from cpt.data.tokenizer import tokenizer_identity

    if (path / "tokenizer.json").is_file():
        return tokenizer_identity(path)
    files = [path / f for f in _TOKENIZER_FILES if (path / f).is_file()]
    if not files:
        return None
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()


def _check_same_tokenizer(paths: list[Path]) -> None:
    keys = [(p, _tokenizer_key(p)) for p in paths]
    keys = [(p, k) for p, k in keys if k is not None]  # a weights-only dir has nothing to compare
    for (p, k), (q, ref) in zip(keys, keys[1:], strict=False):
        same = (k.matches(ref.hash, ref.fingerprint) if hasattr(k, "matches") and hasattr(ref, "matches")
                else k == ref)
        if not same:
            raise CptError(f"cannot merge {p} and {q}: their tokenizers differ (other vocabulary, merges, "
                           f"special tokens or ids): the models do not read the same token ids")


def _check_order(paths: list[Path]) -> None:
    """Checkpoints of one run given out of step order are a mistake: ema and wsm weigh by position."""
    seen: dict[Path, tuple[int, Path]] = {}
    for p in paths:
        from cpt.state import STEP_DIR

        m = STEP_DIR.match(p.name)
        if m is None or p.parent.name != "checkpoints":
            continue
        run, step = p.parent.resolve(), int(m.group(1))
        if run in seen and seen[run][0] >= step:
            raise CptError(f"{p} is given after {seen[run][1]}: give the checkpoints of a run oldest first")
        seen[run] = (step, p)


# ---------------------------------------------------------------------------------------------- merging


def merge_checkpoints(paths: list[str | Path], coefficients: list[float], out_dir: str | Path, *,
                      method: str | None = None, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Write ``sum_i coefficients[i] * weights(paths[i])`` as a Hugging Face model dir ``out_dir``.

    ``paths``: model dirs (cpt checkpoints, LoRA ones included, or HF dirs), oldest first.
    ``coefficients``: one per path, finite, ``>= 0``, summing to 1 (:func:`merge_coefficients`).
    ``method``: recorded in merge.json (e.g. the spec the coefficients came from). ``dtype``: the dtype of
    the output's floating tensors (``float32``, ``bfloat16``, ``float16``); None = as the last input stores
    them, or for a cpt checkpoint (fp32 training weights) its config's dtype, as ``final/``.
    ``overwrite``: replace an existing ``out_dir``. Returns ``out_dir``."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise CptError("merge: nothing to merge (no checkpoints)")
    if len(coefficients) != len(paths):
        raise CptError(f"merge: {len(coefficients)} coefficients for {len(paths)} checkpoints")
    if not all(math.isfinite(c) and c >= 0 for c in coefficients) or abs(sum(coefficients) - 1) > 1e-6:
        raise CptError(f"merge: coefficients must be finite, >= 0 and sum to 1, got {coefficients} "
                       f"(merge_coefficients normalises explicit weights)")
    _check_order(paths)
    return write_merge(paths, weighted_sum(coefficients), out_dir,
                       record={"method": method, "coefficients": list(coefficients)}, notes=[{"coefficient": c} for c in coefficients], dtype=dtype, overwrite=overwrite)


def weighted_sum(coefficients: list[float]):
    """The per-tensor rule ``sum_i coefficients[i] * input_i`` for :func:`write_merge`; an input of
    coefficient 0 is not read at all (one-hot coefficients give an input bit for bit)."""

    def combine(name: str, read) -> Any:
        acc = None
        for i, c in enumerate(coefficients):
            if c != 0:  # read(i) is a fresh tensor: scaled in place, and let go before the next is read
                t = read(i)
                acc = t.mul_(c) if acc is None else acc.add_(t, alpha=c)
                del t
        return acc

    return combine


def write_merge(paths: list[Path], combine, out_dir: str | Path, *, record: dict[str, Any],
                notes: list[dict[str, Any]], dtype: str | None = None, overwrite: bool = False,
                files_from: int = -1) -> Path:
    """The one engine of every merge: checks that ``paths`` are one architecture with one tokenizer, then
    writes ``out_dir`` (an HF model dir + merge.json) tensor by tensor, each floating tensor being
    ``combine(name, read)`` where ``read(i)`` is input ``i``'s tensor ``name`` in float32 (refused if not
    finite); memory holds the tensors ``combine`` holds at once, not a state dict.

    ``files_from``: the input whose layout (tensor names, shards, a tied head stored once), config,
    tokenizer, integer buffers and dtype the output takes. ``record``: merge.json's method fields;
    ``notes``: per input, what merge.json says of it beside its path (its coefficient, its role)."""
    paths = [Path(p) for p in paths]
    out = Path(out_dir)
    _check_request(paths, out, dtype, overwrite)
    inputs = [_open_input(p) for p in paths]
    src = inputs[files_from]
    src_config = _comparable_config(src)
    for inp in inputs:
        if inp is not src:
            _check_same_model(inp, src, src_config)  # configs and tokenizers before anything heavy is read
    _check_same_tokenizer(paths)

    target = out.resolve()  # a name to put the temporary dirs beside, also for --out .
    tmp = target.with_name(f".tmp-{target.name}")
    scratch = target.with_name(f".tmp-{target.name}-lora")  # merged weights of LoRA checkpoints, deleted after
    for d in (tmp, scratch):
        shutil.rmtree(d, ignore_errors=True)
    try:
        for i, inp in enumerate(inputs):
            _read_tensors(inp, _lora_merged(inp.path, scratch / str(i)))
        for inp in inputs:
            if inp is not src:
                _check_same_tensors(inp, src)
        out_dtype = dtype or (_config_dtype(src.config) if src.is_cpt_checkpoint else None)
        tmp.mkdir(parents=True)
        total_size = 0
        for file_name, names in src.layout:
            total_size += _write_file(inputs, src, combine, names, tmp / file_name, out_dtype)
        _write_side_files(src, tmp, out_dtype, total_size)
        record = {
            **record,
            "inputs": [{**_describe_input(inp.path), **note} for inp, note in zip(inputs, notes, strict=True)],
            "dtype": out_dtype or "as stored",
            "arithmetic": "float32, tensor by tensor",
            "config_and_tokenizer_from": str(src.path),
        }
        (tmp / MERGE_FILE).write_text(json.dumps(record, indent=1) + "\n")
    except CptError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as e:  # OSError of a full disk, an input damaged mid-read, ...
        shutil.rmtree(tmp, ignore_errors=True)
        raise CptError(f"{out} could not be written ({_why(e)}); nothing partial was kept") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if target.exists():  # overwrite (checked above): swap, then drop the old one
        old = target.with_name(f".old-{target.name}")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old)
    else:
        tmp.rename(target)
    return out


def _check_request(paths: list[Path], out: Path, dtype: str | None, overwrite: bool) -> None:
    if not paths:
        raise CptError("merge: nothing to merge (no checkpoints)")
    if dtype is not None and dtype not in DTYPES:
        raise CptError(f"merge: dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    resolved = [p.resolve() for p in paths]
    twice = next((p for i, p in enumerate(paths) if resolved[i] in resolved[:i]), None)
    if twice is not None:
        raise CptError(f"{twice} is given twice (to weigh it more, give explicit weights)")
    target = out.resolve()
    for p, r in zip(paths, resolved, strict=True):
        if r == target or target in r.parents:
            raise CptError(f"output dir {out} would overwrite the input {p}: choose another output dir")
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise CptError(f"{out} exists and is not empty: choose another output dir, or overwrite it (--overwrite)")


def _lora_merged(path: Path, scratch: Path) -> Path:
    """Where to read ``path``'s weights: itself, or for a LoRA checkpoint (peft names) its weights with the
    adapter merged in (cpt's one loader does it, as for init_from), written to ``scratch``."""
    from cpt.model import is_peft_checkpoint, load_causal_lm

    if not is_peft_checkpoint(path):
        return path
    model = load_causal_lm(path, attn_implementation="eager")
    scratch.mkdir(parents=True)
    model.save_pretrained(scratch, safe_serialization=True)
    del model
    return scratch


def _config_dtype(config: dict[str, Any]) -> str:
    """The dtype a config names for its weights (float32 where it names none), as cpt.model.source_dtype."""
    name = config.get("dtype") or config.get("torch_dtype")
    return name if name in _FLOATS.values() else "float32"


_CHUNK = 1 << 22  # elements checked at a time: isfinite makes a float copy (abs) and bool tensors of its input
_FLOATS = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # safetensors header dtypes


def _write_file(inputs: list[_Input], src: _Input, combine, names: list[str], dest: Path,
                out_dtype: str | None) -> int:
    """Write the tensors ``names`` (one file of ``src``'s layout) into ``dest``, each computed by
    ``combine`` and written before the next is read; integer tensors (buffers) are ``src``'s. Returns the
    tensors' total size in bytes."""
    import torch

    from cpt.tensorfile import DTYPES as CODES
    from cpt.tensorfile import TensorWriter

    specs = []
    for name in names:
        code, shape = src.tensors[name]
        specs.append((name, getattr(torch, (out_dtype or _FLOATS[code]) if code in _FLOATS else CODES[code][0]), shape))
    with _Handles() as handles, TensorWriter(dest, specs) as writer:
        for name, out_type, _ in specs:
            if src.tensors[name][0] not in _FLOATS:  # an integer buffer (or a dtype not to average): src's
                writer.write(name, handles.get(src.weights[name]).read(name))
                continue

            def read(i: int, name: str = name) -> Any:
                inp = inputs[i]
                t = handles.get(inp.weights[name]).read(name).to(torch.float32)
                if not all(bool(torch.isfinite(piece).all()) for piece in t.reshape(-1).split(_CHUNK)):
                    raise CptError(f"{inp.path}: tensor {name} holds NaN or inf values; refusing to merge it "
                                   f"(leave that checkpoint out)")
                return t

            writer.write(name, combine(name, read).to(out_type))
    return writer.bytes


class _Handles:
    """Open safetensors files (:class:`cpt.tensorfile.TensorFile`) by path, each once, all closed at the end."""

    def __init__(self) -> None:
        self.open: dict[Path, Any] = {}

    def get(self, f: Path):
        from cpt.tensorfile import TensorFile

        if f not in self.open:
            self.open[f] = TensorFile(f)
        return self.open[f]

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.open.values():
            handle.close()


def _write_side_files(last: _Input, tmp: Path, out_dtype: str | None, total_size: int) -> None:
    """config.json, tokenizer and generation config from the last input; the shard index if sharded."""
    config = dict(last.config)
    if out_dtype is not None:
        config["dtype"] = out_dtype
        config.pop("torch_dtype", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    else:
        shutil.copy2(last.path / "config.json", tmp / "config.json")
    for name in _TOKENIZER_FILES + _EXTRA_FILES:
        if (last.path / name).is_file():
            shutil.copy2(last.path / name, tmp / name)
    if last.index is not None:
        index = {**last.index, "metadata": {**last.index.get("metadata", {}), "total_size": total_size}}
        (tmp / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _describe_input(path: Path) -> dict[str, Any]:
    from cpt.state import STATE_FILE

    entry: dict[str, Any] = {"path": str(path.resolve())}
    state = path / STATE_FILE
    if state.is_file():
        try:
            raw = json.loads(state.read_text())
            entry.update({k: raw[k] for k in ("step", "tokens") if k in raw})
        except (OSError, ValueError):
            pass  # a record only; the weights were read and checked
    return entry


def _why(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__

"""Peak memory of `cpt merge` on a real model: each method in a fresh process, the memory the merge itself
adds (its peak resident set size above what the process held before it) against the model's size and its
largest tensor; memory is meant to hold a few tensors, not the model. Writes nothing into the repository
(a scratch dir; donors kept there with --keep-donors).

    python scripts/bench_merge.py --model /path/to/hf-dir [--scratch /tmp/bench-merge] [--keep-donors]

Two donors are made from the model (its tensors plus seeded noise of 1e-3 of each tensor's std, written
one tensor at a time), so the deltas are real and dense. Every process first imports what a merge imports
and runs its checks (configs, tokenizers, safetensors headers; the "baseline" row stops there), then resets
its peak RSS (Linux /proc/self/clear_refs) and merges: "merge MiB" = peak VmHWM during the merge minus the
VmRSS before it; "peak MiB" = the whole process's ru_maxrss. Timings on a shared machine are noisy and only
printed for orientation."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
METHODS = ("task_arithmetic", "ties", "dare")

BASELINE = """
from pathlib import Path
from cpt.merge import _check_same_model, _check_same_tokenizer, _comparable_config, _open_input, _read_tensors
paths = [Path(p) for p in {paths!r}]
inputs = [_open_input(p) for p in paths]
ref = _comparable_config(inputs[-1])
for inp in inputs[:-1]:
    _check_same_model(inp, inputs[-1], ref)
_check_same_tokenizer(paths)
for inp in inputs:
    _read_tensors(inp, inp.path)
import torch  # noqa: F401  (what the merge imports: torch, and cpt.model for its LoRA check)
from cpt.model import is_peft_checkpoint
assert not any(is_peft_checkpoint(p) for p in paths)
"""


def make_donor(model: Path, dest: Path, seed: int) -> None:
    """``model`` + seeded noise (1e-3 of each floating tensor's std), written tensor by tensor."""
    import torch

    from cpt.tensorfile import TensorFile, TensorWriter

    shutil.copytree(model, dest, ignore=shutil.ignore_patterns("*.safetensors"))
    with TensorFile(model / "model.safetensors") as f:
        specs = [(n, getattr(torch, {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[f.dtype(n)]),
                  f.shape(n)) for n in f.keys()]
        with TensorWriter(dest / "model.safetensors", specs) as w:
            for i, (name, dtype, _) in enumerate(specs):
                t = f.read(name).float()
                g = torch.Generator().manual_seed(seed * 100_003 + i)
                noise = torch.randn(t.shape, generator=g) * (1e-3 * float(t.std()) if t.numel() > 1 else 1e-3)
                w.write(name, (t + noise).to(dtype))


# After the imports and checks (BASELINE), the peak RSS is reset (Linux: clear_refs 5) and the merge runs: its
# peak minus the RSS it started from is the merge's own memory, free of what importing torch and loading
# tokenizers cost (the merge does those checks again, on top of the loaded ones: a small overcount).
MEASURED = """
def _status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
_before = _status("VmRSS:")
{merge}
print("MERGE_KIB", _status("VmHWM:") - _before)
"""


def peak(code: str) -> tuple[float, float, float]:
    """(peak RSS of the process in MiB, the merge's own peak above the RSS it started from in MiB, wall
    seconds) of ``python -c code`` in a fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"failed: {code}")
    own = [int(line.split()[1]) / 1024 for line in output.splitlines() if line.startswith("MERGE_KIB")]
    return usage.ru_maxrss / 1024, own[0] if own else 0.0, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="an HF model dir with one model.safetensors")
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/bench-merge"))
    ap.add_argument("--only", nargs="+", default=None, choices=["average", "interpolate", "naive", *METHODS],
                    help="measure only these (and the baseline)")
    ap.add_argument("--keep-donors", action="store_true", help="reuse donors left in --scratch by an earlier run")
    args = ap.parse_args()
    from cpt.tensorfile import DTYPES, TensorFile

    with TensorFile(args.model / "model.safetensors") as f:
        sizes = {n: e[3] - e[2] for n, e in f.entries.items()}
        largest = max(sizes, key=sizes.get)
        code = f.dtype(largest)
    numel = sizes[largest] // DTYPES[code][1]
    model_mib, largest_f32_mib = sum(sizes.values()) / 2**20, numel * 4 / 2**20
    base = args.model
    donors = [args.scratch / "donor1", args.scratch / "donor2"]
    if not (args.keep_donors and all((d / "model.safetensors").is_file() for d in donors)):
        shutil.rmtree(args.scratch, ignore_errors=True)
        args.scratch.mkdir(parents=True)
        for i, d in enumerate(donors):
            make_donor(base, d, seed=i + 1)
    paths = [str(base), *map(str, donors)]
    out = args.scratch / "out"
    prep = BASELINE.format(paths=paths)
    runs = {"baseline (imports + checks, no merge)": prep}
    merges = {f"{m}, base + 2 donors": f"from cpt.merge_tasks import merge_task_vectors; merge_task_vectors("
              f"{paths[0]!r}, {paths[1:]!r}, [1.0, 1.0], {str(out)!r}, method={m!r}, overwrite=True)" for m in METHODS}
    merges["interpolate --toward, 1 weight"] = (f"from cpt.merge_tasks import interpolate; interpolate({paths[1]!r}, "
                                                f"{paths[0]!r}, [0.5], {str(out)!r}, overwrite=True)")
    merges["average of 3 (cpt merge A B C)"] = (f"from cpt.merge import merge_checkpoints; merge_checkpoints("
                                                f"{paths!r}, [1/3] * 3, {str(out)!r}, overwrite=True)")
    # for scale: what holding state dicts costs (safetensors' load_file of all three, task arithmetic, save_file)
    merges["naive task arithmetic, 3 state dicts"] = (
        f"from safetensors.torch import load_file, save_file; import os; s = [load_file(p + '/model.safetensors') "
        f"for p in {paths!r}]; os.makedirs({str(out)!r}, exist_ok=True); save_file({{k: s[0][k] + (s[1][k] - s[0][k]) "
        f"+ (s[2][k] - s[0][k]) for k in s[0]}}, {str(out)!r} + '/model.safetensors')")
    runs |= {label: prep + MEASURED.format(merge=code_) for label, code_ in merges.items()}
    print(f"model {args.model}: {model_mib:.0f} MiB of weights ({code}), largest tensor {largest} "
          f"{largest_f32_mib:.0f} MiB in float32; peak RSS per process (fresh process each):", flush=True)
    print(f"{'run':<40} {'peak MiB':>9} {'merge MiB':>10} {'/ model':>8} {'/ largest f32':>14} {'s':>6}", flush=True)
    for label, code_ in runs.items():
        if args.only and label.split()[0].rstrip(",") not in (*args.only, "baseline"):
            continue
        mib, own, secs = peak(code_)
        shutil.rmtree(out, ignore_errors=True)
        print(f"{label:<40} {mib:>9.0f} {own:>10.0f} {own / model_mib:>8.2f} {own / largest_f32_mib:>14.2f} "
              f"{secs:>6.1f}", flush=True)
    if not args.keep_donors:
        shutil.rmtree(args.scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

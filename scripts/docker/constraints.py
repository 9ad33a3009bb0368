"""Write scripts/docker/constraints.txt: exact versions for every package the image installs besides torch's CUDA
libraries, taken from the environment this runs in (where the test suite passes), so that the image gets
the versions the tests ran with.

    python scripts/docker/constraints.py > scripts/docker/constraints.txt      # in the tested environment (Linux, Python 3.11)

The closure of ``cpt[deepspeed]``'s requirements over the installed distributions, with the extras each
requirement asks for; torch itself is pinned in the Dockerfile (TORCH_VERSION): its CPU build here has
another version string (2.13.0+cpu) than the CUDA wheel. The CUDA wheel's own requirements are pinned
exactly by torch (nvidia-*, triton, cuda-toolkit) except three, listed in CUDA_PINS: the versions pip
resolved for torch==2.13.0 on PyPI (``pip install --dry-run --report``), not run here (no GPU).
"""

from __future__ import annotations

import sys
from importlib import metadata

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT_REQUIREMENT = "cpt[deepspeed]"
NOT_PINNED = {"cpt", "torch"}  # cpt is the package being installed; torch: TORCH_VERSION in the Dockerfile
CUDA_PINS = {"cuda-bindings": "13.5.0", "cuda-pathfinder": "1.9.1", "nvidia-nvjitlink": "13.5.37"}


def closure(root: str = ROOT_REQUIREMENT) -> dict[str, str]:
    """{canonical name: installed version} of every distribution ``root`` needs, transitively."""
    env = default_environment()
    pins: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [Requirement(root)]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        dist = metadata.distribution(name)
        if name not in NOT_PINNED:
            pins[name] = dist.version
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({**env, "extra": e}) for e in (req.extras or {""})):
                todo.append(sub)
    return pins


def main() -> None:
    print(__doc__.strip().splitlines()[0].replace("Write scripts/docker/constraints.txt: e", "# E"))
    print(f"# Written by `python scripts/docker/constraints.py` (Python {sys.version.split()[0]}); the image installs")
    print("# torch and cpt[deepspeed] under these constraints (pip install -c scripts/docker/constraints.txt).")
    for name, version in sorted(closure().items()):
        print(f"{name}=={version}")
    print("# torch==2.13.0's CUDA wheel: what PyPI resolved, beside the exact pins in torch's own metadata")
    for name, version in sorted(CUDA_PINS.items()):
        print(f"{name}=={version}")


if __name__ == "__main__":
    main()

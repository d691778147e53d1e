"""CI's view of a Python environment: what is installed, which installed distributions cannot work in it, and an
overlay's means of hiding those.

CI tests older transformers releases as *overlays*: a folder holding transformers and the pins of its
Requires-Dist, put first on PYTHONPATH over the main environment. Everything else comes from the main
environment, and some of it may need newer pins than the overlay's (transformers 5.25 brings ``kernels`` 0.19,
which needs huggingface_hub>=1.32; transformers 4.57.6 pins huggingface_hub<1.0 and imports ``kernels`` whenever
it is installed). An overlay must then behave as if such a distribution were not installed, which is what a
user's environment with that transformers release would be.

    python .ci/environment.py versions LABEL      the versions CI reports for each environment it tests
    python .ci/environment.py hide OVERLAY_DIR    write OVERLAY_DIR/sitecustomize.py hiding every distribution
                                                  whose requirements this environment does not satisfy

``hide`` marks each such distribution's top-level modules as absent (``sys.modules[name] = None``: ``import``
raises ModuleNotFoundError and ``importlib.util.find_spec`` returns None, as for a package that is not
installed). ``tests/test_environment.py`` fails, naming the distribution and the requirement, when an
environment still lets such a distribution be imported.

Standard library and ``packaging`` only: this runs before anything else is known to work.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPORTED = ("torch", "transformers", "huggingface-hub", "tokenizers", "kernels", "accelerate", "peft", "trl")

SITECUSTOMIZE = "sitecustomize.py"


def installed() -> dict[str, metadata.Distribution]:
    """The distribution each canonical name imports as here: the first on ``sys.path`` (an overlay's before the
    main environment's, as imports and ``importlib.metadata.version`` resolve it)."""
    found: dict[str, metadata.Distribution] = {}
    for distribution in metadata.distributions():
        name = distribution.metadata["Name"]
        if name:
            found.setdefault(canonicalize_name(name), distribution)
    return found


def hidden_modules() -> set[str]:
    """Top-level module names marked absent in this process (by an overlay's sitecustomize, or otherwise)."""
    return {name for name, module in sys.modules.items() if module is None and "." not in name}


def top_level_modules(distributions: set[str]) -> set[str]:
    """The top-level modules that only these distributions (canonical names) provide."""
    modules = set()
    for module, providers in metadata.packages_distributions().items():
        names = {canonicalize_name(p) for p in providers}
        if names and names <= distributions and module.isidentifier():
            modules.add(module)
    return modules


def broken_requirements(found: dict[str, metadata.Distribution] | None = None) -> dict[str, list[str]]:
    """For each distribution whose requirements this environment does not satisfy (a missing distribution, a
    version outside the specifier, or one that is itself broken), the reasons, e.g. ``["requires
    huggingface-hub>=1.32.0; found 0.36.2"]``. Extras are not followed; environment markers are evaluated."""
    found = installed() if found is None else found
    broken: dict[str, list[str]] = {}
    for name, distribution in found.items():
        for line in distribution.requires or []:
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            target = found.get(canonicalize_name(requirement.name))
            if target is None:
                broken.setdefault(name, []).append(f"requires {requirement}; not installed")
            elif not requirement.specifier.contains(target.version, prereleases=True):
                broken.setdefault(name, []).append(f"requires {requirement}; found {target.version}")
    # a distribution that needs a broken one is broken too
    changed = True
    while changed:
        changed = False
        for name, distribution in found.items():
            if name in broken:
                continue
            for line in distribution.requires or []:
                requirement = Requirement(line)
                if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                    continue
                dependency = canonicalize_name(requirement.name)
                if dependency in broken:
                    broken[name] = [f"requires {requirement.name}, which cannot work here ({broken[dependency][0]})"]
                    changed = True
                    break
    return broken


def write_hiding(overlay: Path) -> dict[str, list[str]]:
    """Write ``overlay/sitecustomize.py`` marking absent the modules of every broken distribution; return those."""
    (overlay / SITECUSTOMIZE).unlink(missing_ok=True)
    broken = broken_requirements()
    modules = sorted(top_level_modules(set(broken)))
    lines = [
        "# Written by .ci/environment.py hide: distributions of the main environment that cannot work with this",
        "# overlay's pins, hidden as if they were not installed (import raises ModuleNotFoundError, find_spec -> None).",
        "import sys",
        "",
    ]
    for name, reasons in sorted(broken.items()):
        lines.append(f"# {name}: {'; '.join(reasons)}")
    lines.append(f"for _name in {modules!r}:")
    lines.append("    sys.modules.setdefault(_name, None)")
    (overlay / SITECUSTOMIZE).write_text("\n".join(lines) + "\n")
    return broken


def report_versions(label: str) -> str:
    found, hidden = installed(), hidden_modules()
    parts = []
    for name in REPORTED:
        distribution = found.get(name)
        if distribution is None:
            parts.append(f"{name} -")
        elif top_level_modules({name}) and top_level_modules({name}) <= hidden:
            parts.append(f"{name} {distribution.version} (hidden)")
        else:
            parts.append(f"{name} {distribution.version}")
    return f"== {label}: " + ", ".join(parts)


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "versions":
        print(report_versions(argv[1]))
        return 0
    if len(argv) == 2 and argv[0] == "hide":
        for name, reasons in sorted(write_hiding(Path(argv[1])).items()):
            print(f"overlay {argv[1]}: hiding {name} ({'; '.join(reasons)})")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

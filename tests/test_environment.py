"""The test environment itself: every distribution that can be imported here has what it requires.

CI runs the transformers-internals tests again under older transformers releases installed as overlays over the
main environment (.ci/run); a package of the main environment that needs newer pins than an overlay's (kernels
0.19 needs huggingface_hub>=1.32, the transformers 4.57.6 overlay pins 0.36.2) then breaks whatever imports it,
far from the cause. .ci/environment.py hides such packages in an overlay; this test names any that is left.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _environment_module():
    spec = importlib.util.spec_from_file_location("ci_environment", ROOT / ".ci" / "environment.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


environment = _environment_module()


def _importable_broken() -> dict[str, list[str]]:
    hidden = environment.hidden_modules()
    return {
        name: reasons
        for name, reasons in environment.broken_requirements().items()
        if environment.top_level_modules({name}) - hidden
    }


def test_every_importable_distribution_has_its_requirements():
    broken = _importable_broken()
    assert not broken, (
        "these installed distributions can be imported here but their requirements are not met, so importing them "
        "fails or misbehaves (in a CI overlay: hide them with `python .ci/environment.py hide OVERLAY`, or pin a "
        "release that fits): "
        + "; ".join(f"{name}: {', '.join(reasons)}" for name, reasons in sorted(broken.items()))
    )


def _fake_distribution(folder: Path, name: str, requires: list[str]) -> None:
    """A distribution as pip installs it: a module and its .dist-info with METADATA and top_level.txt."""
    (folder / f"{name}.py").write_text("VALUE = 1\n")
    info = folder / f"{name}-1.0.dist-info"
    info.mkdir()
    lines = ["Metadata-Version: 2.1", f"Name: {name}", "Version: 1.0", *(f"Requires-Dist: {r}" for r in requires)]
    (info / "METADATA").write_text("\n".join(lines) + "\n")
    (info / "top_level.txt").write_text(f"{name}\n")


def _run(code: str, overlay: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(overlay)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True)


def test_hiding_a_distribution_that_needs_newer_pins(tmp_path):
    # one distribution whose requirement nothing here satisfies, one that needs it, one that is fine
    _fake_distribution(tmp_path, "needs_future_hub", ["huggingface-hub>=999"])
    _fake_distribution(tmp_path, "needs_needs_future_hub", ["needs_future_hub"])
    _fake_distribution(tmp_path, "needs_packaging", ["packaging", "nothing-at-all; python_version < '3'"])
    check = f"""
        import importlib.util, sys
        sys.path.insert(0, {str(ROOT / ".ci")!r})
        import environment
        broken = environment.broken_requirements()
        print(sorted(n for n in broken if n.startswith("needs")), broken["needs-future-hub"])
        print([importlib.util.find_spec(m) is None for m in ("needs_future_hub", "needs_needs_future_hub", "needs_packaging")])
    """
    before = _run(check, tmp_path)
    assert before.returncode == 0, before.stderr
    names, reasons = before.stdout.splitlines()[0].split("] ", 1)
    assert names == "['needs-future-hub', 'needs-needs-future-hub'"
    assert "requires huggingface-hub>=999; found" in reasons
    assert before.stdout.splitlines()[1] == "[False, False, False]"

    hide = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "environment.py"), "hide", str(tmp_path)],
        env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True,
    )  # fmt: skip
    assert hide.returncode == 0, hide.stderr
    assert "hiding needs-future-hub (requires huggingface-hub>=999" in hide.stdout
    after = _run(check, tmp_path)
    assert after.stdout.splitlines()[1] == "[True, True, False]", after.stderr
    imported = _run("import needs_future_hub", tmp_path)
    assert "ModuleNotFoundError" in imported.stderr


def test_the_check_names_what_is_broken(tmp_path):
    _fake_distribution(tmp_path, "needs_future_hub", ["huggingface-hub>=999"])
    result = _run(
        f"""
        import sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        import test_environment
        test_environment.test_every_importable_distribution_has_its_requirements()
        """,
        tmp_path,
    )
    assert result.returncode != 0
    assert "needs-future-hub: requires huggingface-hub>=999; found" in result.stderr


@pytest.mark.parametrize("name", ["torch", "transformers", "huggingface-hub"])
def test_versions_report_names_each_environment(name):
    line = environment.report_versions("here")
    assert line.startswith("== here: ") and f"{name} " in line

"""Check that every direct dependency installed here is at its floor in pyproject.toml.

`make test-lowest` runs it in its venv after uv's lowest-direct resolution: a floor that
another package's own floor lifts (uv then installs a newer release) was never tested,
and this says which, so the floor gets raised to what runs. torch is left out: its
release is TORCH_SPEC's, whatever the floor.
"""

from __future__ import annotations

import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

#: Not held to its floor: the release a machine installs first (TORCH_SPEC).
UNCHECKED = {"torch"}


def floors(pyproject: Path) -> dict[str, Version]:
    """Each direct dependency's ``>=`` floor, over the base and every extra."""
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    for group in project["optional-dependencies"].values():
        requirements += group
    found = {}
    for text in requirements:
        requirement = Requirement(text)
        if requirement.name == project["name"] or requirement.name in UNCHECKED:
            continue
        for spec in requirement.specifier:
            if spec.operator == ">=":
                found[requirement.name] = Version(spec.version)
    return found


def main() -> int:
    """Print each dependency not at its floor; exit 1 if any."""
    wrong = []
    expected = floors(Path(__file__).resolve().parents[1] / "pyproject.toml")
    for name, floor in sorted(expected.items()):
        try:
            installed = Version(version(name))
        except PackageNotFoundError:
            wrong.append(f"{name}: not installed (floor {floor})")
            continue
        if installed != floor:
            wrong.append(f"{name}: {installed} installed, floor {floor}")
    for line in wrong:
        print(f"floor not tested: {line}", file=sys.stderr)
    if wrong:
        print("raise these floors to the release installed (another package needs it)")
        return 1
    print(f"{len(expected)} direct dependencies installed at their floors")
    return 0


if __name__ == "__main__":
    sys.exit(main())

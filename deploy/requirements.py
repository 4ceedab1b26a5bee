"""Print the project's dependencies (plus extras) from pyproject.toml, one per line.

The Dockerfiles install these in a layer of their own before the code is copied, so a code change
does not reinstall TensorFlow. The GPU image drops `tensorflow-cpu` (both wheels ship the same
`tensorflow` package; pip cannot swap one for the other) and takes the `gpu` extra instead.

    python deploy/requirements.py ops                          # CPU image
    python deploy/requirements.py gpu --without tensorflow-cpu # GPU image
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def requirement_name(requirement: str) -> str:
    """`tensorflow-cpu>=2.18,<3; marker` -> `tensorflow-cpu` (PEP 503 normalised).

    Hand-written rather than `packaging.requirements`: this script runs in the image build before
    any dependency is installed, where only the standard library is there.
    """
    name = re.match(r"[A-Za-z0-9._-]+", requirement.strip())
    if name is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", name.group(0)).lower()


def requirements(extras: list[str], without: list[str], pyproject: Path = PYPROJECT) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise ValueError(f"no such extra in {pyproject.name}: {', '.join(unknown)}")
    dropped = {requirement_name(name) for name in without}
    found = list(project["dependencies"])
    for extra in extras:
        found.extend(optional[extra])
    return [r for r in found if requirement_name(r) not in dropped]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extras", nargs="*", help="optional-dependency groups to add")
    parser.add_argument("--without", action="append", default=[], help="a dependency to leave out")
    args = parser.parse_args(argv)
    try:
        print("\n".join(requirements(args.extras, args.without)))
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()

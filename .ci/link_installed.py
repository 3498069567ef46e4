"""Hard-link installed distributions (and what they require) into another environment.

    python .ci/link_installed.py TARGET_SITE_PACKAGES torch==2.14.1 "numpy>=1.21" ...

Run with the interpreter whose environment holds them (the repository's .venv). Every
requirement must be satisfied here; the files of its distribution and of everything that one
requires (extras and markers evaluated) are hard-linked into TARGET, dist-info included, so pip
in the target environment sees them as installed. Only the closure of the requirements given is
linked: a dependency the caller does not name is not there. Used by .ci/wheel_smoke.sh with the
wheel's own Requires-Dist: torch with its CUDA libraries alone is 5.5 GB, which pip would unpack
again for identical files (1.5-2 minutes), and the other dependencies take as long again.

Exits 0 having printed the number of files linked; otherwise non-zero (a requirement not
satisfied here, TARGET on another file system), and TARGET may hold part of the files: the caller
starts that environment afresh and installs with pip instead.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import sys
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:  # pip vendors it
    from pip._vendor.packaging.requirements import Requirement


def _closure(roots: list[Requirement]) -> list[md.Distribution]:
    """The installed distributions `roots` need, transitively; SystemExit if one is missing or
    of another version than a root asks for."""
    found: dict[str, md.Distribution] = {}
    todo = [(r, True) for r in roots]
    while todo:
        req, is_root = todo.pop()
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            if is_root:
                sys.exit(f"link_installed: {req.name} is not installed here")
            continue  # pip installs it in the target
        if is_root and not req.specifier.contains(dist.version, prereleases=True):
            sys.exit(f"link_installed: {req.name} {dist.version} here, {req} asked for")
        key = dist.metadata["Name"].lower().replace("_", "-")
        extras = set(req.extras)
        if key in found and not extras:
            continue
        found[key] = dist
        for text in dist.requires or []:
            sub = Requirement(text)
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if sub.marker is None or any(sub.marker.evaluate(env) for env in envs):
                todo.append((sub, False))
    return list(found.values())


def main(argv: list[str]) -> int:
    target = Path(argv[0])
    roots = [Requirement(r) for r in argv[1:]]
    dists = _closure([r for r in roots if r.marker is None or r.marker.evaluate()])
    count = 0
    for dist in dists:
        base = Path(dist.locate_file(""))
        for rel in dist.files or []:
            if str(rel).startswith(".."):  # console scripts outside site-packages
                continue
            src = base / rel
            if not src.is_file():
                continue
            dst = target / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                try:
                    os.link(src, dst)
                except OSError as e:
                    print(f"link_installed: cannot link {src} -> {dst}: {e}", file=sys.stderr)
                    return 1
                count += 1
    print(f"link_installed: {count} files of {len(dists)} distributions")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

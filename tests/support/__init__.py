"""Where tests find what lives outside the repository: the shared corpora.

The shared directory is the sibling ``shared`` of the repository's root
(``<root>/../shared``: conformance, validation, manifests, ...), wherever the
clone is; no absolute path, no environment variable. Every test locates a
corpus through :func:`shared` (or the ``shared_dir`` fixture of tests/conftest.py).
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DIR = REPO_ROOT.parent / "shared"


def shared(*parts: str) -> Path:
    """A path under the shared directory, e.g. ``shared("conformance")``."""
    return SHARED_DIR.joinpath(*parts)

"""Where the package's own files are: its Hydra configs and the shipped bases (inside the
package, so an installed wheel has them), and the project root (the checkout, or else the
working directory: where `outputs/` and `results/` go)."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
CONFIG_DIR = PACKAGE / "configs"
ASSETS = PACKAGE / "assets"
_CHECKOUT = PACKAGE.parents[1]
PROJECT_ROOT = _CHECKOUT if (_CHECKOUT / "pyproject.toml").is_file() else Path.cwd()

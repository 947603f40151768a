"""Where the Hydra config tree lives, in a source checkout and in an installed wheel."""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def config_dir() -> Path:
    """The `conf/` folder: top level of a checkout, or `detr_train/conf` inside a wheel."""
    for candidate in (_PACKAGE_DIR.parent / "conf", _PACKAGE_DIR / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"detr_train's config tree was not found next to {_PACKAGE_DIR}: expected conf/config.yaml "
        "in the source checkout or detr_train/conf/config.yaml in the installed package"
    )

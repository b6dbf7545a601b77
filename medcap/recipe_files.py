"""Where medcap's recipes and configs live and how a name finds one: files under the
repository's ``recipes/`` folder, resolved by path (torchtune installs a top-level ``recipes``
package of its own, so medcap never imports its recipes as a package). The CLI, the estimator
and tests resolve names here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

# One training recipe serves one device and FSDP2 (chosen by how it is launched); the
# original's two names stay as aliases.
RECIPES = {
    "full_finetune": "full_finetune.py",
    "full_finetune_single_device": "full_finetune.py",
    "full_finetune_distributed": "full_finetune.py",
    "generate": "generate.py",
    "probe": "probe.py",
}


def recipes_dir() -> Path:
    folder = Path(__file__).resolve().parents[1] / "recipes"
    if not folder.is_dir():
        raise SystemExit(
            f"medcap's recipes/ folder is not beside the package ({folder}); install medcap from a "
            "source checkout (pip install -e .)"
        )
    return folder


def list_configs() -> list[str]:
    root = recipes_dir() / "configs"
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def resolve_recipe(name: str) -> Path:
    if name in RECIPES:
        path = recipes_dir() / RECIPES[name]
        if path.is_file():
            return path
    path = Path(name)
    if path.is_file():
        return path.resolve()
    raise SystemExit(f"unknown recipe {name!r}: medcap's recipes are {sorted(RECIPES)}, or give a file path")


def load_recipe(name: str) -> ModuleType:
    """A recipe file as a module (its classes, to drive a recipe from Python or a test)."""
    path = resolve_recipe(name)
    spec = importlib.util.spec_from_file_location(f"medcap_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the recipe look their module up there
    spec.loader.exec_module(module)
    return module


def resolve_config(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path.resolve()
    shipped = recipes_dir() / "configs" / f"{name.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return shipped
    raise SystemExit(f"unknown config {name!r}: medcap's configs are {list_configs()}, or give a file path")

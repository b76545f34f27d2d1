"""The recipes: one file each, registered here by name (an explicit dict, no magic).

Each entry names the module and class of a recipe; the module (and Lightning with it) is
imported on first use, so commands that train nothing (``phantom``, ``prepare``,
``register``, ``render``) start without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from medsynth.errors import MedsynthError

if TYPE_CHECKING:
    from medsynth.recipes.base import Recipe


class LazyRecipe:
    """A recipe given by ``module`` and ``class_name``, built once on first use.

    Attributes of the recipe (``config_class``, ``sample_modes``, ...) read through it, so
    ``RECIPES[name].config_class`` works as with the recipe itself.
    """

    def __init__(self, module: str, class_name: str):
        self.module, self.class_name = module, class_name
        self._recipe: Recipe | None = None

    def load(self) -> Recipe:
        if self._recipe is None:
            self._recipe = getattr(importlib.import_module(self.module), self.class_name)()
        return self._recipe

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("_"):
            raise AttributeError(attribute)
        return getattr(self.load(), attribute)

    def __repr__(self) -> str:
        return f"LazyRecipe({self.module}.{self.class_name})"


RECIPES: dict[str, LazyRecipe] = {
    "cvae": LazyRecipe("medsynth.recipes.cvae", "CVAERecipe"),
    "sdm": LazyRecipe("medsynth.recipes.sdm", "SDMRecipe"),
    "flow-cvae": LazyRecipe("medsynth.recipes.flow_cvae", "FlowCVAERecipe"),
    "motion-ldm": LazyRecipe("medsynth.recipes.motion_ldm", "MotionLDMRecipe"),
    "diffae": LazyRecipe("medsynth.recipes.diffae", "DiffAERecipe"),
    "class-diffusion": LazyRecipe("medsynth.recipes.class_diffusion", "ClassDiffusionRecipe"),
}


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``, or a one-line error listing the known ones."""
    if name not in RECIPES:
        raise MedsynthError(f"unknown recipe '{name}' (known: {', '.join(RECIPES)})")
    return RECIPES[name].load()


def all_sample_modes() -> tuple[str, ...]:
    """Every ``--mode`` some recipe accepts, in recipe order (imports every recipe)."""
    modes: dict[str, None] = {}
    for name in RECIPES:
        modes.update(dict.fromkeys(get_recipe(name).sample_modes))
    return tuple(modes)

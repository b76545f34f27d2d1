"""The recipes: one file each, registered here by name (an explicit dict, no magic)."""

from __future__ import annotations

from medsynth.errors import MedsynthError
from medsynth.recipes.base import Recipe
from medsynth.recipes.cvae import CVAERecipe
from medsynth.recipes.sdm import SDMRecipe

RECIPES: dict[str, Recipe] = {
    "cvae": CVAERecipe(),
    "sdm": SDMRecipe(),
}


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``, or a one-line error listing the known ones."""
    if name not in RECIPES:
        raise MedsynthError(f"unknown recipe '{name}' (known: {', '.join(RECIPES)})")
    return RECIPES[name]

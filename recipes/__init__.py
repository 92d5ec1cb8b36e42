"""Recipes: inference and the three training stages, as objects (`Stage1Recipe`, ...) and `qzoom` commands."""
from .config import RecipeConfig, load_config
from .recipe import Stage1Recipe, Stage2Recipe, Stage3Recipe

__all__ = ["RecipeConfig", "Stage1Recipe", "Stage2Recipe", "Stage3Recipe", "load_config"]

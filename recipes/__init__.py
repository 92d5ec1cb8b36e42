"""Recipes: inference and (in later releases) the three training stages, as objects and `qzoom` commands."""

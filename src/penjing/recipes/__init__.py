"""Recipes: `penjing compress recipe.yaml` as a library. A YAML file names the model, its
weights, the data, the metric and an ordered list of stages (train, prune, finetune,
distill, quantize, encode, export); `load` checks it before anything runs and `run`
executes it, measuring and saving the model after every stage and resuming where an
interrupted run stopped.

    import penjing.recipes as recipes
    result = recipes.run("examples/recipes/deep_compression.yaml", "runs/dc")
    print(result.format())
"""

from __future__ import annotations

from penjing.recipes.load import load, parse
from penjing.recipes.run import EPOCHS_ENV, CompressResult, StageResult, run
from penjing.recipes.schema import Recipe, RecipeError

__all__ = ["EPOCHS_ENV", "CompressResult", "Recipe", "RecipeError", "StageResult", "load",
           "parse", "run"]

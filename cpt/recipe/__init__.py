"""Recipes: one typed schema (pydantic v2) loaded from YAML.

- :mod:`cpt.recipe.schema`: every section of a recipe (run, model, train, schedule, stages, checkpoint,
  tracking, ...) with its defaults, field descriptions and validators, and :class:`Recipe`, the whole
  file; the bigger sections have their own modules (:mod:`cpt.recipe.data`, :mod:`cpt.recipe.probes`,
  :mod:`cpt.recipe.mitigate`). Every default lives there, so the schema documents the recipes.
- :mod:`cpt.recipe.load`: :func:`load_recipe` (YAML, ``extends:``, dotted overrides, ``${a.b}``
  references, validation), :func:`validate_recipe` (a dict), the one-line error messages, and
  :func:`recipe_diff`.

This package is a low layer: it imports only :mod:`cpt.errors`, :mod:`cpt.units`, :mod:`cpt.schedules`,
:mod:`cpt.tracking` and :mod:`cpt.merge_weights`. Every public name is re-exported here, so importers
write ``from cpt.recipe import Recipe, load_recipe``.
"""

from cpt.recipe.data import (
    MIXTURE_DOC,
    ControlledMixture,
    DataConfig,
    Mixture,
    MixtureAt,
    MixturePoint,
    ReplayControllerConfig,
    check_mixture,
)
from cpt.recipe.load import load_recipe, recipe_diff, validate_recipe
from cpt.recipe.mitigate import EmaConfig, MergeConfig, MitigateConfig
from cpt.recipe.probes import DenseProbesConfig, LmEvalProbesConfig, ProbesConfig
from cpt.recipe.schema import (
    CheckpointConfig,
    ExtendVocabConfig,
    InitFromConfig,
    InitLoadConfig,
    ModelConfig,
    OptimizerConfig,
    PeftConfig,
    Recipe,
    RunConfig,
    ScheduleConfig,
    StageConfig,
    StrictModel,
    TrackingConfig,
    TrainConfig,
)

__all__ = [
    "MIXTURE_DOC",
    "CheckpointConfig",
    "ControlledMixture",
    "DataConfig",
    "DenseProbesConfig",
    "EmaConfig",
    "ExtendVocabConfig",
    "InitFromConfig",
    "InitLoadConfig",
    "LmEvalProbesConfig",
    "MergeConfig",
    "MitigateConfig",
    "Mixture",
    "MixtureAt",
    "MixturePoint",
    "ModelConfig",
    "OptimizerConfig",
    "PeftConfig",
    "ProbesConfig",
    "Recipe",
    "ReplayControllerConfig",
    "RunConfig",
    "ScheduleConfig",
    "StageConfig",
    "StrictModel",
    "TrackingConfig",
    "TrainConfig",
    "check_mixture",
    "load_recipe",
    "recipe_diff",
    "validate_recipe",
]

"""Typed, frozen configuration: the schema (``schema.py``) and where its values come from (``loading.py``).
Dataclasses hold every default; presets, ``--config`` files and ``--set key=value`` only override them."""
from ilnas.config.loading import (checked, from_dict, list_presets, load_preset, load_yaml, load_yaml_file,
                                  parse_override, resolve, retraining_presets, to_dict, unread_overrides)
from ilnas.config.schema import (KINDS, MAX_IMAGE_SIDE, DataConfig, EvalRunConfig, NetworkConfig, PDartsConfig,
                                 RunConfig, SearchConfig, SearchRunConfig, SpaceConfig, TrainConfig, validate,
                                 validate_network)

__all__ = ["KINDS", "MAX_IMAGE_SIDE", "DataConfig", "EvalRunConfig", "NetworkConfig", "PDartsConfig", "RunConfig",
           "SearchConfig", "SearchRunConfig", "SpaceConfig", "TrainConfig", "checked", "from_dict", "list_presets",
           "load_preset", "load_yaml", "load_yaml_file", "parse_override", "resolve", "retraining_presets", "to_dict",
           "unread_overrides", "validate", "validate_network"]

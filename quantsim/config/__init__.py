"""Backend configs (AIMET-format JSON) and quantizer placement; see docs/config.md."""
from .placement import (BN_FOLDABLE_OP_TYPES, GRID_PRESERVING_OP_TYPES, PER_CHANNEL_OP_TYPES, NodePlacement,
                        QuantSpec, find_bn_folds, find_supergroups, place)
from .schema import (KNOWN_OP_TYPES, PRESETS, BackendConfig, ConfigError, ConfigWarning, Defaults, FrozenDict, Kernel,
                     OpTypeConfig, ParamConfig, load_config, parse_config)

__all__ = [
    "BackendConfig", "ConfigError", "ConfigWarning", "Defaults", "FrozenDict", "Kernel", "OpTypeConfig",
    "ParamConfig", "load_config", "parse_config", "PRESETS", "KNOWN_OP_TYPES",
    "QuantSpec", "NodePlacement", "place", "find_bn_folds", "find_supergroups",
    "PER_CHANNEL_OP_TYPES", "BN_FOLDABLE_OP_TYPES", "GRID_PRESERVING_OP_TYPES",
]

"""The run's configuration: typed sections (``schema``), YAML files and ``key=value`` overrides
(``loading``), and the shipped presets (``presets``)."""

from trustmatch.config.loading import (
    all_keys,
    describe_keys,
    from_dict,
    from_saved,
    load_config,
    merge_values,
    parse_overrides,
    read_yaml,
    shipped_configs,
)
from trustmatch.config.schema import (
    CalibrateMixConfig,
    Config,
    DataConfig,
    EvalConfig,
    MethodConfig,
    ModelConfig,
    TrainConfig,
)

__all__ = [
    "CalibrateMixConfig",
    "Config",
    "DataConfig",
    "EvalConfig",
    "MethodConfig",
    "ModelConfig",
    "TrainConfig",
    "all_keys",
    "describe_keys",
    "from_dict",
    "from_saved",
    "load_config",
    "merge_values",
    "parse_overrides",
    "read_yaml",
    "shipped_configs",
]

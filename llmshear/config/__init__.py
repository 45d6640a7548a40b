"""Run configuration: YAML + ``key=value`` overrides (OmegaConf) → a typed, validated :class:`RunConfig`.

Every problem is collected and reported at once, each naming its key (and, for keys written in the YAML file,
``file:line``), before any weight or data is read.

- :mod:`~llmshear.config.schema`: the sections (one dataclass each) and their choices;
- :mod:`~llmshear.config.types`: the generic merging, type checking and line numbers;
- :mod:`~llmshear.config.loading`: :func:`load`, the steps from file to config (``*_from`` files resolved there);
- :mod:`~llmshear.config.preflight`: the checks against numbers, files and the machine.
"""

from llmshear.config.loading import load
from llmshear.config.schema import RunConfig
from llmshear.config.types import ConfigError

__all__ = ["ConfigError", "RunConfig", "load"]

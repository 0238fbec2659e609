"""Models: typed configs, presets, the Megatron-core model provider, and HF <-> Megatron
checkpoint conversion (see :mod:`.mapping` for the parameter tables).

Importing this package does not import Megatron; :mod:`.provider` and the live-model
functions of :mod:`.convert` import it when called.
"""

from megatron_dgrpo.models.config import (
           ModelConfig,
           ParallelConfig,
           Runtime,
           validate_layout,
)
from megatron_dgrpo.models.presets import get_preset, preset_names

__all__ = ["ModelConfig", "ParallelConfig", "Runtime", "get_preset", "preset_names",
           "validate_layout"]

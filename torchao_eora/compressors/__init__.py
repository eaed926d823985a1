"""Base compressors: each turns a dense weight (and, if it needs them, calibration statistics) into a
``CompressedWeight`` in torchao's intx layout (``base.py`` holds the interface).

* ``rtn``: round to nearest (data-free).
* ``gptq``: GPTQ, on the shared Optimal Brain Surgeon column sweep (``sweep``).
* ``pruning``: magnitude, Wanda and SparseGPT (the same sweep), N:M or unstructured, optionally quantized.
"""

from .base import CompressedWeight, Compressor, by_row_blocks, check_group_size
from .gptq import GPTQConfig
from .pruning import PruneConfig, parse_pattern
from .rtn import RTNConfig

__all__ = ["CompressedWeight", "Compressor", "GPTQConfig", "PruneConfig", "RTNConfig", "by_row_blocks",
           "check_group_size", "parse_pattern"]

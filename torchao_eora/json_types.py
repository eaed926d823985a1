"""The only classes torchao's ``config_from_dict`` may build from our JSON: the configs, nothing else.

torchao looks a JSON ``"_type"`` up by name in each allowed module and calls it with the JSON's arguments, so an
allowed module must hold no callable beyond the configs (the package itself exports functions that load models,
delete directories, run remote code). ``import torchao_eora`` allows this module, never the package.
Our own loaders go further: :func:`torchao_eora.config.config_from_json` checks the whole tree first.
"""

from .config import EoRAConfig  # noqa: F401
from .compressors import GPTQConfig, PruneConfig, RTNConfig  # noqa: F401

"""torchao-eora: training-free eigenspace low-rank compensation (EoRA) for compressed LLMs, on torchao.

    from torchao.quantization import quantize_
    from torchao_eora import EoRAConfig, RTNConfig, calibrate, eora_config

    config = EoRAConfig(rank=64, base=RTNConfig(bits=3, group_size=64))
    calib = calibrate(model, batches, config)      # sequential, layer by layer
    quantize_(model, eora_config(calib))           # linear weights become QuantWithLowRank
"""

from .quiet import install_log_filters

install_log_filters()  # before torchao is imported: its import-time noise about CUDA-only kernels is not ours

from .calibration import Calibration, SecondMoment
from .compressors import CompressedWeight, Compressor, GPTQConfig, PruneConfig, RTNConfig
from .config import EoRAConfig, eora_config
from .experts_tensor import QuantExperts
from .hf import load_pretrained, save_pretrained
from .merge import merge_low_rank
from .peft_io import export_peft, import_peft
from .registrations import register_all
from .sequential import calibrate, compress_sequential
from .size import model_bytes
from .solver import LowRankFactors, eora_factors, resolve_B, svd_factors, weighted_error
from .tensor import QuantWithLowRank

register_all()  # quantize_'s handler, torchao safetensors, config_from_dict, transformers' torchao quantizer

__all__ = [
    "Calibration",
    "CompressedWeight",
    "Compressor",
    "EoRAConfig",
    "GPTQConfig",
    "LowRankFactors",
    "PruneConfig",
    "QuantExperts",
    "QuantWithLowRank",
    "RTNConfig",
    "SecondMoment",
    "calibrate",
    "compress_sequential",
    "eora_config",
    "eora_factors",
    "export_peft",
    "import_peft",
    "load_pretrained",
    "merge_low_rank",
    "model_bytes",
    "resolve_B",
    "save_pretrained",
    "svd_factors",
    "weighted_error",
]
__version__ = "0.1.0"

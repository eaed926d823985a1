"""Teach transformers' torchao quantizer about ``QuantWithLowRank``: the fields it does not reload by itself
(``A``, ``B``, and the scales and zero points of quantized adapters), a strict check of our checkpoints before
loading, and a strict JSON check of our configs. :func:`extend_transformers_torchao` runs at ``import
torchao_eora`` (``registrations.py``)."""

from __future__ import annotations

import logging

from .checkpoint_checks import check_checkpoint
from .checks import CONFIG_TYPES
from .config import EoRAConfig, _build_from_json
from .experts import use_eager_experts
from .experts_tensor import QuantExperts
from .tensor import QuantWithLowRank

__all__ = ["extend_transformers_torchao"]

log = logging.getLogger(__name__)

# The field suffixes transformers' torchao quantizer reloads by itself; QuantWithLowRank's others are added.
_TRANSFORMERS_FIELDS = ("qdata", "scale_and_zero", "per_tensor_scale", "scale", "zero_point", "act_pre_scale")


def _extra_fields() -> list[str]:
    """QuantWithLowRank's fields transformers does not reload, a name after every longer name it starts:
    transformers 5.17 matches the names as one regex alternation, first branch wins, so "_weight_A" listed
    before "_weight_A_scale" would claim (and mis-rename) the scale's key."""
    extra = [f for f in QuantWithLowRank.fields if f not in _TRANSFORMERS_FIELDS]
    return sorted(extra, key=lambda f: any(g != f and g.startswith(f) for g in extra))


_EXTRA_FIELDS = _extra_fields()
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")



def extend_transformers_torchao() -> bool:
    """Teach transformers' ``TorchAoHfQuantizer`` about ``QuantWithLowRank``; idempotent, called at import.

    * Reload: add ``_<param>_A`` / ``_<param>_B`` (and ``_A_scale``, ``_A_zero_point``, ``_B_scale``,
      ``_B_zero_point`` of quantized adapters) to the serialized names it collects per parameter
      (``serialized_names`` in transformers >= 5.2x, ``get_weight_conversions`` in 5.17).
    * Before loading an EoRA checkpoint: :func:`check_checkpoint`, so a missing, extra or mis-shaped tensor fails
      with its name (instead of a generic conversion error, a warning, or nothing at all).
    * Quantize on load is data-free: an ``EoRAConfig`` carrying a ``Calibration`` is refused up front with the
      way to use statistics (load unquantized, then ``quantize_``); torchao's handler sees modules, not names.
    * After loading an EoRA checkpoint with compressed experts: run them with the eager experts loop.
    * After loading an EoRA checkpoint: forget the deserialize step transformers would try (and fail) to reverse
      in ``save_pretrained``, so a reloaded model saves again.

    Returns False (with a warning) if this transformers version has neither mechanism.
    """
    try:
        from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer
    except ImportError:  # transformers or torchao missing: nothing to extend
        return False
    if getattr(TorchAoHfQuantizer, "_torchao_eora_extended", False):
        return True
    own = vars(TorchAoHfQuantizer)
    if isinstance(own.get("serialized_names"), property):
        _extend_serialized_names(TorchAoHfQuantizer, own["serialized_names"])
    elif "get_weight_conversions" in own:
        _extend_weight_conversions(TorchAoHfQuantizer, own["get_weight_conversions"])
    else:
        log.warning("unknown transformers torchao quantizer: QuantWithLowRank checkpoints will not reload")
        return False
    _guard_torchao_config_from_dict()
    _wrap_validate_environment(TorchAoHfQuantizer)
    _wrap_before_loading(TorchAoHfQuantizer)
    _wrap_after_loading(TorchAoHfQuantizer)
    TorchAoHfQuantizer._torchao_eora_extended = True
    return True


def _with_extra_fields(param: str, names: list[str]) -> list[str]:
    return names + [f"_{param}_{f}" for f in _EXTRA_FIELDS if f"_{param}_{f}" not in names]


def _extend_serialized_names(cls, original: property) -> None:
    def serialized_names(self):
        return {param: _with_extra_fields(param, list(names)) for param, names in original.fget(self).items()}

    cls.serialized_names = property(serialized_names, doc=original.__doc__)


def _extend_weight_conversions(cls, original) -> None:
    from transformers.core_model_loading import WeightConverter
    from transformers.integrations.torchao import TorchAoDeserialize

    def get_weight_conversions(self):
        converters = []
        for c in original(self):
            if isinstance(c, WeightConverter) and any(isinstance(op, TorchAoDeserialize) for op in c.operations):
                param = c._original_target_patterns[0]
                c = WeightConverter(
                    _with_extra_fields(param, list(c._original_source_patterns)),
                    list(c._original_target_patterns),
                    operations=c.operations,
                )
            converters.append(c)
        return converters

    cls.get_weight_conversions = get_weight_conversions


def _guard_torchao_config_from_dict() -> None:
    """Check every EoRA config inside a ``config.json``'s ``TorchAoConfig`` with :func:`config_from_json` before
    torchao builds it, so a crafted file is refused with a clear error before any of it is called."""
    from transformers import TorchAoConfig

    original = TorchAoConfig.from_dict.__func__

    def check(node) -> None:
        if isinstance(node, dict):
            if node.get("_type") in CONFIG_TYPES:
                _build_from_json(node, "quantization_config in config.json")
                return
            for value in node.values():
                check(value)
        elif isinstance(node, list):
            for value in node:
                check(value)

    def from_dict(cls, config_dict, *args, **kwargs):
        check(config_dict.get("quant_type"))
        return original(cls, config_dict, *args, **kwargs)

    TorchAoConfig.from_dict = classmethod(from_dict)


def _wrap_before_loading(cls) -> None:
    original = cls._process_model_before_weight_loading

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        result = original(self, model, checkpoint_files=checkpoint_files, **kwargs)
        quant_type = getattr(self.quantization_config, "quant_type", None)
        files = [str(f) for f in checkpoint_files or ()]
        if self.pre_quantized and isinstance(quant_type, EoRAConfig) and files and all(
            f.endswith(".safetensors") for f in files
        ):
            check_checkpoint(model, files)
        elif not self.pre_quantized and isinstance(quant_type, EoRAConfig):
            from .sequential import find_decoder_layers

            find_decoder_layers(model)  # a model without nn.Linear layers (GPT-2's Conv1D) would convert nothing
        return result

    cls._process_model_before_weight_loading = _process_model_before_weight_loading


def _wrap_validate_environment(cls) -> None:
    original = cls.validate_environment

    def validate_environment(self, *args, **kwargs):
        quant_type = getattr(self.quantization_config, "quant_type", None)
        if isinstance(quant_type, EoRAConfig) and quant_type.calibration is not None:
            # transformers writes the config to JSON while building the model, and the handler would not know the
            # modules' names anyway: statistics belong to the quantize_ flow.
            raise ValueError(
                "quantizing on load is data-free (EoRAConfig without calibration). To use calibration statistics, "
                "load the unquantized model, then quantize_(model, eora_config(Calibration.load(path, model)))"
            )
        return original(self, *args, **kwargs)

    cls.validate_environment = validate_environment


def _wrap_after_loading(cls) -> None:
    original = cls._process_model_after_weight_loading

    def _process_model_after_weight_loading(self, model, **kwargs):
        result = original(self, model, **kwargs)
        quant_type = getattr(self.quantization_config, "quant_type", None)
        if not isinstance(quant_type, EoRAConfig):
            return result
        if any(isinstance(p, QuantExperts) for p in model.parameters()):
            use_eager_experts(model)
        conversions = getattr(model, "_weight_conversions", None)
        if conversions:
            # transformers keeps the load-only deserialize step to reverse it on save, but it has no reverse (the
            # quantizer flattens the state dict itself), so save_pretrained would fail: drop it, as GGUF does.
            from transformers.integrations.torchao import TorchAoDeserialize

            def load_only(c) -> bool:
                return any(isinstance(op, TorchAoDeserialize) for op in getattr(c, "operations", ()))

            model._weight_conversions = [c for c in conversions if not load_only(c)]
        return result

    cls._process_model_after_weight_loading = _process_model_after_weight_loading

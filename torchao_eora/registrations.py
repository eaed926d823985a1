"""Everything ``import torchao_eora`` registers with torchao and transformers, in one place (``register_all`` is
called once by the package's ``__init__``; every step is idempotent).

* torchao's ``quantize_`` learns ``EoRAConfig`` (the handler is ``transform.eora_module_transform``).
* torchao's safetensors (de)serializer, and transformers through it, learns ``QuantWithLowRank`` and
  ``QuantExperts``.
* torchao's ``config_from_dict`` may rebuild our configs by name, from ``json_types`` only: never the package,
  whose functions load models and write directories.
* transformers' torchao quantizer reloads and checks our checkpoints (``hf_patches``).

The custom ops of ``ops.py`` register themselves where they are defined; the Inductor fusion pass is opt-in
(``torchao_eora.inductor_passes.install_fusion_pass``).
"""

from __future__ import annotations

__all__ = ["register_all"]


def register_all() -> None:
    import torchao.core.config as ao_config
    from torchao.prototype.safetensors import safetensors_utils
    from torchao.quantization.transform_module import register_quantize_module_handler

    from .config import EoRAConfig
    from .hf_patches import extend_transformers_torchao
    from .experts_tensor import QuantExperts
    from .tensor import QuantWithLowRank
    from .transform import eora_module_transform

    register_quantize_module_handler(EoRAConfig)(eora_module_transform)
    for cls in (QuantWithLowRank, QuantExperts):
        if cls.__name__ not in safetensors_utils.ALLOWED_TENSORS_SUBCLASSES:
            safetensors_utils.ALLOWED_TENSORS_SUBCLASSES.append(cls.__name__)
        safetensors_utils.ALLOWED_CLASSES[cls.__name__] = cls
    ao_config.ALLOWED_AO_MODULES.add("torchao_eora.json_types")
    extend_transformers_torchao()

"""Inductor graph passes (installed as ``torchao_eora.inductor_passes``)."""

from .fuse_low_rank import FuseLowRankPass, fusion_pass_installed, install_fusion_pass

__all__ = ["FuseLowRankPass", "fusion_pass_installed", "install_fusion_pass"]

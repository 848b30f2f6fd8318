"""Deployment targets. Each module declares a TargetProfile; `get_profile(name)` looks one up."""
from __future__ import annotations

from models.errors import MlamoeError

from .base import TargetProfile
from .ascend.profile import PROFILE as ASCEND
from .ort_cpu import PROFILE as ORT_CPU
from .ort_cuda import PROFILE as ORT_CUDA

PROFILES: dict[str, TargetProfile] = {p.name: p for p in (ORT_CPU, ASCEND, ORT_CUDA)}
PLANNED: tuple[str, ...] = ()


class TargetError(MlamoeError):
    pass


def get_profile(name: str) -> TargetProfile:
    if name in PROFILES:
        return PROFILES[name]
    if name in PLANNED:
        raise TargetError(f"target {name!r} is not implemented yet in this version; available: "
                          f"{', '.join(PROFILES)}")
    raise TargetError(f"unknown target {name!r}: choose one of {', '.join(PROFILES)}")

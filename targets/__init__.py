"""Deployment targets: the registry the core reaches them through (targets/base.py: the interface).

    get(name) -> Target         raises TargetError naming the targets there are
    find(name) -> Target | None (a package's target, which may be from another version)
    get_profile(name)           get(name).profile
    option_problems(name, quant, given)   the target-only compile options given to a target that does not take them
"""
from __future__ import annotations

from .ascend import TARGET as _ASCEND
from .base import OptionProblem, Target, TargetError, TargetOption, TargetProfile
from .ort_cpu import TARGET as _ORT_CPU
from .ort_cuda import TARGET as _ORT_CUDA

TARGETS: dict[str, Target] = {t.name: t for t in (_ORT_CPU, _ASCEND, _ORT_CUDA)}
PROFILES: dict[str, TargetProfile] = {n: t.profile for n, t in TARGETS.items()}
PLANNED: tuple[str, ...] = ()
DEFAULT = _ORT_CPU.name  # `mlamoe compile` without --target


def get(name: str) -> Target:
    if name in TARGETS:
        return TARGETS[name]
    if name in PLANNED:
        raise TargetError(f"target {name!r} is not implemented yet in this version; available: "
                          f"{', '.join(TARGETS)}")
    raise TargetError(f"unknown target {name!r}: choose one of {', '.join(TARGETS)}")


def find(name: str) -> Target | None:
    return TARGETS.get(name)


def get_profile(name: str) -> TargetProfile:
    return get(name).profile


def options() -> dict[str, TargetOption]:
    """Every target-only compile option by keyword (the first declaration of a name wins)."""
    out: dict[str, TargetOption] = {}
    for t in TARGETS.values():
        for o in t.options:
            out.setdefault(o.name, o)
    return out


def option_problems(name: str, quant: str, given: dict) -> list[OptionProblem]:
    """The options in `given` (keyword -> value; a value equal to the option's default is not given) that
    target `name` does not take, or takes only with another --quant, each with its message."""
    target, known, problems = get(name), options(), []
    for key, value in given.items():
        opt = known.get(key)
        if opt is None:
            raise TargetError(f"unknown compile option {key!r}: the targets take {', '.join(sorted(known))}")
        if value is None or value is False or value == opt.default:
            continue
        flag = opt.flag or key
        owners = " or ".join(t.name for t in TARGETS.values() if t.option(key) is not None)
        own = target.option(key)
        if opt.quant is not None and (own is None or quant != opt.quant):
            problems.append(OptionProblem(flag, f"{flag} applies to --quant {opt.quant} on --target {owners}, not "
                                                f"--quant {quant} on {name}", True))
        elif own is None and opt.group is not None:
            if all(p.message != f"{opt.group} apply to --target {owners}" for p in problems):
                problems.append(OptionProblem(opt.group.split("/")[0], f"{opt.group} apply to --target {owners}",
                                              False))
        elif own is None:
            problems.append(OptionProblem(flag, f"{flag} applies to --target {owners} only", False))
    return problems

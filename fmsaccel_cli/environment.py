"""``fmsaccel env``: what is installed against what we tested, and which plugins can run here."""

from __future__ import annotations

import importlib.util
import platform
from importlib.metadata import PackageNotFoundError, requires, version

LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "triton", "flash-attn",
             "datasets", "omegaconf")


def _tested_ranges() -> dict[str, str]:
    """Version ranges from fmsaccel's own metadata (pyproject), extras included."""
    from packaging.requirements import Requirement

    out: dict[str, str] = {}
    for line in requires("fmsaccel") or []:
        req = Requirement(line)
        if str(req.specifier):
            out.setdefault(req.name, str(req.specifier))
    return out


def report() -> list[tuple[str, list[tuple[str, ...]]]]:
    from packaging.specifiers import SpecifierSet

    try:
        ranges = _tested_ranges()
    except PackageNotFoundError:
        ranges = {}
    libs: list[tuple[str, ...]] = [("package", "installed", "tested range", "status"),
                                   ("python", platform.python_version(), ">=3.11", "ok")]
    for name in LIBRARIES:
        try:
            v = version(name)
        except PackageNotFoundError:
            libs.append((name, "-", ranges.get(name, ""), "not installed"))
            continue
        spec = ranges.get(name, "")
        ok = not spec or SpecifierSet(spec).contains(v.split("+")[0], prereleases=True)
        libs.append((name, v, spec, "ok" if ok else "[yellow]untested version[/]"))

    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    hw = [("item", "value"), ("CUDA (torch build)", torch.version.cuda or "cpu build"), ("GPU", gpu),
          ("GPU count", str(torch.cuda.device_count()))]

    from fmsaccel_framework.registry import discover

    plugins = [("plugin", "can run here", "why")]
    for spec in discover().values():
        missing = spec.missing_requirements()
        if missing:
            plugins.append((spec.name, "no", f"missing {', '.join(missing)}: pip install 'fmsaccel[{spec.extra}]'"))
        elif spec.gpu_only and not torch.cuda.is_available():
            plugins.append((spec.name, "no", "needs a CUDA GPU"))
        elif "triton" in spec.requires and not torch.cuda.is_available():
            plugins.append((spec.name, "yes (CPU)", "no GPU: Triton kernels replaced by torch references "
                                                     "(or run under TRITON_INTERPRET=1)"))
        else:
            plugins.append((spec.name, "yes", ""))
    return [("libraries", libs), ("hardware", hw), ("plugins", plugins)]


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None

"""Launchers run a run's job somewhere: a local process (default) or a Kubernetes Job."""

from __future__ import annotations

from .base import JobSpec, Launcher, LaunchError, PollResult

LAUNCHERS = {
    "local": "portal.launchers.local:LocalLauncher",
    "kubernetes": "portal.launchers.kubernetes:KubernetesLauncher",
}


def make_launcher(name: str, settings) -> Launcher:
    """The launcher registered under ``name``; an unknown name fails listing the choices."""
    if name not in LAUNCHERS:
        raise ValueError(f"unknown launcher '{name}': choose one of {', '.join(sorted(LAUNCHERS))}")
    import importlib

    module_name, cls_name = LAUNCHERS[name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)(settings)


__all__ = ["LAUNCHERS", "JobSpec", "LaunchError", "Launcher", "PollResult", "make_launcher"]

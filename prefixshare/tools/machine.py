"""The machine a measurement ran on, in words, for the reports that name it (bench, compatibility matrix)."""

from __future__ import annotations

import os
import platform

import torch


def describe_machine(device: str) -> str:
    """E.g. ``"CPU, AMD EPYC, 2 cores"`` or ``"GPU, NVIDIA H100 80GB HBM3; host CPU, ..., 16 cores"``."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = f"CPU, {cpu}, {cores} cores"
    if str(device).startswith("cuda"):
        text = f"GPU, {torch.cuda.get_device_name(torch.device(device))}; host {text}"
    return text

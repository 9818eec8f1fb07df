"""Thin adapters: the torchrun wrapper (``gpuguard-run``)."""

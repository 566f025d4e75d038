"""Fused Triton kernels, installed as ``usp_scale.kernels`` (see setup.py).

Each kernel stands beside its torch reference; ``usp_scale.kernels.dispatch`` selects
between them (``kernels: auto|triton|torch``). This module must import without triton.
"""

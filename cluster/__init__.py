"""Cluster layer: devices (cpu/cuda/npu), Ray resources and placement, weight transport."""

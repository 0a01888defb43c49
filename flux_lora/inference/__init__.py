"""Inference: the sampling loop, the pipeline, ControlNet units and CPU offload."""

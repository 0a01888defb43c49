"""LoRA weights: the canonical weight type and its math, file layouts and metadata, peft adapters for training, run-
time application for inference, and the converter.
"""

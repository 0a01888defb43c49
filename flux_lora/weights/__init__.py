"""Model files: safetensors reading, key maps between layouts, loading the DiT, autoencoder and ControlNets, hub
downloads, and the tiny-model writer.
"""

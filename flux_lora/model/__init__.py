"""The networks, in BFL module names: the FLUX DiT and its layers, the autoencoder, the ControlNet, the text
encoders, and the fp8 Linear. Nothing here reads files or knows about training.
"""

"""Training data: the scan, aspect-ratio buckets, content fingerprints, the latent and embedding cache, and the
Lightning data module.
"""

"""The toy world: procedural captioned scenes of simple shapes (:mod:`.scenes`) and a scorer that reads shape,
colour, position and size back from an image with plain statistics (:mod:`.scorer`). ``python -m flux_lora.toy``
writes a dataset (``data``) and scores images (``score``)."""

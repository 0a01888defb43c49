"""Training: the flow-matching loss, the Lightning module, callbacks, per-block wrappers and the run that ties them
together.
"""

"""Helpers shared by the tests, one module per role (imported as ``helpers.<module>``: pytest puts tests/ on
sys.path). Each module imports only what its role needs, so a process spawned by a test starts fast.

- ``dit``: random inputs of the DiT and the ControlNet, residuals side by side
- ``lora``: the one random-LoRA builder
- ``numerics``: the one relative-error function, and the output-equality check built on it
- ``parity``: diffusers as the reference: the BFL -> diffusers forward-argument map, diffusers' model parts
  holding our weights, its LoRA loader
- ``offload``: a fake accelerator on the CPU, re-aligned tensors, per-block hooks
- ``cache``: captioned images, counting encoder loaders, cache plans (no Lightning: spawned processes use it)
- ``training``: the tiny training config and a fit
- ``syncs``: host syncs (``item()``, ``bool()``) of a fit counted per optimizer step
- ``cli``: examples/generate.py as a module, its tiny settings, a fresh ``python`` process
"""

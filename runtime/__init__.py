"""The runtime library: what runs a bundle's programs, wherever they run.

`executorch` loads the ExecuTorch runtime once; `engine` runs a whole program (its forward, predict,
features, logits, prefix and top methods), `stream` a streamed bundle's stages one at a time, `eager`
the same model in PyTorch where a method needs autograd; `data` reads and encodes examples;
`prefix_cache` keeps a split bundle's prefix states; `evaluate` scores an adapter on held-out rows;
`teacher` labels examples with a teacher bundle; `measure` runs one step in a fresh process for its
peak memory and time; `isolation` tries a program in a forked child before it is loaded.

The device app (device_sdk), the coordinator's held-out evaluation and the exporter's verification
all stand on it; it stands on fwdfed alone (tests/test_imports.py).
"""

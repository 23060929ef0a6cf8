"""Ray integration: hyperparameter sweeps with Ray Tune (sweep.py) and the Ray runtime helper (ray_runtime.py).

Imports nothing heavy: `solar tune` loads sweep.py, the Ray Data loader loads ray_runtime.py."""

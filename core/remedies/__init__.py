"""Remedies for what the inspection finds: weight rounding (GPTQ, AdaRound), outlier smoothing
(SmoothQuant, cross-layer equalisation) and mixed precision to a target.

Each remedy changes the float model's weights (function-preserving rescaling, or weights snapped
to their grid) or the per-module dtypes; ``plan`` describes what to apply, and the session applies,
saves, reloads and exports it. See docs/ARCHITECTURE.md.
"""

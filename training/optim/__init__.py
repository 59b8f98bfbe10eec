"""Optimisers and gradient transforms the papers add to plain SGD/AdamW: LARS (SimCLR, MoCo v3)
and NFNet's adaptive gradient clipping."""

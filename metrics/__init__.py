"""Metrics (CLIP-T, CLIP-I, DINO, LPIPS/DIV, PRES, mask-noise sensitivity) and their backbones."""

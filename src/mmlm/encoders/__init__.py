"""Modality encoders: the Vision Transformer and the CLIP/SigLIP text transformer."""

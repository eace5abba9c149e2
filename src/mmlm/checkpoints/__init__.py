"""Checkpoint formats: safetensors I/O, explicit key maps per source architecture, mmlm's own folders."""

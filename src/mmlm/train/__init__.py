"""Training: the contrastive training loop and the pieces that hang off it (distributed set-up, checkpoints)."""

"""Drafter training: response regeneration, target cache, anchors, losses, trainer, checkpoints."""

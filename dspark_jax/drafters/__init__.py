"""Drafters: DSpark (parallel backbone + Markov head + confidence head), DFlash (heads off), Eagle3."""

"""Procedural phantoms with exact ground truth: each is a function of (parameters, seed)."""

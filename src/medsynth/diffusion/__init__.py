"""medsynth.diffusion"""

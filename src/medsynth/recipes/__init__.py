"""medsynth.recipes"""

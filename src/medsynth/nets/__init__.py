"""medsynth.nets"""

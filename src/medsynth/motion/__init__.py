"""medsynth.motion"""

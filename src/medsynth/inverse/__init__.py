"""medsynth.inverse"""

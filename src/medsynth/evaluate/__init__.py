"""medsynth.evaluate"""

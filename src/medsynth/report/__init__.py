"""medsynth.report"""

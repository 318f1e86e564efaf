"""Running one training job over several processes: collectives shared by the engine and the objectives.

This package sits below `engine` and `methods` (both use it) and imports neither.
"""

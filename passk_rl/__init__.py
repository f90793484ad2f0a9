"""passk-rl: RL with verifiable rewards that trains for Pass@K.

The math core (``estimators``, ``shaping``, ``stats``, ``schedule``) is pure: it imports neither Ray, vLLM nor
DeepSpeed, so it can be used and tested on its own.
"""

__version__ = "0.1.0"

"""alignlib: the small library behind the course "Alignment methods in language models I".

One module per idea (see README): models, generation, logprobs, rewards, data, grading, bench; one
module per method as the lectures land.
"""
__version__ = "0.1.0"

"""alignlib: the small library behind the course "Alignment methods in language models I".

The modules a student imports sit at the top (models, generation, logprobs, rewards, data, sft, evaluation, and
one module per method); the machinery lives in sub-packages by kind: ``engine`` (the CPU decode engine),
``training`` (trainer protocol, step loop, checkpoints, distributed), ``commands`` (the command line), ``bench``
(benchmarks) and ``checks`` (the exercises' grader). See the README's library table.
"""
__version__ = "0.1.0"

DEFAULT_MODEL = "smollm2-135m-instruct"   # the offline default policy (alignlib.models builds its cache)
TINY_MODEL = "tiny-random"                # a 2-layer Llama built in code, for tests

"""The CPU decode engine under ``alignlib.generation``: the decode loop (``decode``: a Llama-style decoder run on its
own modules with one preallocated KV cache, the shared prompt start encoded once, inverse-CDF sampling) and the
linear layers it multiplies by, packed once for oneDNN (``packed_linear``). Nothing here imports
``alignlib.generation``."""

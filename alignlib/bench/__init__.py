"""Benchmarks (``python -m alignlib bench | gpu-check | peer-bench | method-bench | ppo-check``): throughput and
memory of the engine, GPU MFU, PPO against TRL, the three policy methods side by side, and PPO's learning criteria
over seeds and thread counts. Each reports medians and ratios measured side by side in one run."""

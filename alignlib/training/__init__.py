"""Training machinery shared by every method: the trainer protocol, the step loop with checkpoints and clean
stops, the run directory, the policy trainers by name, and data parallelism under ``accelerate launch``."""

CHECKPOINT_EVERY = 5   # default steps between checkpoints of the method commands (``--checkpoint-every``)

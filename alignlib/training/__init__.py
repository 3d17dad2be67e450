"""Training machinery shared by every method: the trainer protocol, the step loop with checkpoints and clean
stops, the run directory, the policy trainers by name, and data parallelism under ``accelerate launch``."""

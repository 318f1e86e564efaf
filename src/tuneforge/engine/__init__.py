"""The training engine: the loop (trainer.py) and what runs around it: the step plan, evaluation,
the out-of-memory policy, checkpoints and resume, optimizer and schedule, metrics and outputs.

`tuneforge.engine.run.train(cfg, argv)` is what `tuneforge train` calls.
"""

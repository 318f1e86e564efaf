"""The training engine: the loop (trainer.py), its schedule, optimizer, checkpoints, metrics and outputs.

`tuneforge.engine.run.train(cfg, argv)` is what `tuneforge train` calls.
"""

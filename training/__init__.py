"""Training: config, model, optimizer and schedule, the step, the loop, checkpoints and metrics.

Light on import (no torch here) so `saturate train --help` stays fast; import the submodules you need:
`training.model.build_model`, `training.optim.build_optimizer`, `training.step.TrainStep`,
`training.train.train`.
"""

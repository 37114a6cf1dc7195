"""The pretraining job around the plugin core: config blocks, the run, its step, evaluation, checkpoints and
outputs (`ds_pld.training.pretrain` is the loop)."""

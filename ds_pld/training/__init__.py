"""The pretraining job around the plugin core: config blocks, the frozen run, its step, and the callbacks that act
after it (divergence check, evaluation, metrics, checkpoints); `ds_pld.training.pretrain` is the loop."""

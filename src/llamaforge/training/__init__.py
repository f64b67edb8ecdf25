"""The training core that pretraining and finetuning share: ``trainer`` (TrainConfig and
the Trainer's step, validation, checkpoints and export), ``optim`` (AdamW and the lr
schedule), ``metrics`` (logging, plots), ``flops`` (parameter, FLOP, memory and carbon
arithmetic), ``checkpointer`` (DCP run checkpoints), ``pretrain`` (the pretraining run) and
``plan`` (``--dry-run``: a run's plan before it runs)."""

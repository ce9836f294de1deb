"""Training: the pipeline (train.py), our GRPOTrainer subclass, judging ahead, SFT, callbacks, checkpoints,
records and the run folder."""

"""Training: ``loop`` (train, run_stage, after_step), ``step`` (one optimizer step), ``state`` (what a
checkpoint carries besides weights, optimizer and RNG), ``backend`` (accelerate, DeepSpeed, FSDP, gloo,
MFU). Import from the submodules: this package stays import-free so that ``cpt.checkpoint`` can use
``cpt.train.state`` without loading the loop."""

"""Training: ``loop`` (train, run_stage, after_step), ``step`` (one optimizer step), ``setup`` (the run's
parts, built once), ``layout`` (a step cut into micro-batches), ``backend`` (accelerate, DeepSpeed, FSDP,
gloo, MFU), ``weights`` (how a rank holds the weights under each backend), ``loss``. Import from the
submodules: this package stays import-free."""

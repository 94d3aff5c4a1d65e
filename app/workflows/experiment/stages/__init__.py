"""The experiment's stages, a module each, in the order the runner (app/workflows/experiment/runner.py) runs
them: noise, finetune, register, index, report, retraining. Each is `run(ctx) -> output`, idempotent, sharing
StageContext and the look-ups of context.py."""

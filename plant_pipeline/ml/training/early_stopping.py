"""Early stopping on validation loss: transformers' EarlyStoppingCallback with a patience count that survives a
resume, and the reason a run stopped, read from a TrainerState (a live one, or a checkpoint's)."""

from __future__ import annotations

from pathlib import Path

from plant_pipeline.ml.training.config import TrainConfig

# The callback's class name: its key in TrainerState.stateful_callbacks (trainer_state.json), which holds its count.
CALLBACK_NAME = "ValidationLossEarlyStopping"
_COUNTER = "early_stopping_patience_counter"


def make_early_stopping_callback(config: TrainConfig):
    """The callback for ``config.early_stopping_*`` (built on call: transformers loads only when training).

    transformers restores a callback's state on resume only with restore_callback_states_from_checkpoint, which
    also brings back the checkpoint's patience and threshold over the config's; this one restores its count
    alone. The count is also written into the TrainerState at every evaluation, not only at saves, so that
    ``stop_reason`` can read it after training.
    """
    from transformers import EarlyStoppingCallback

    class ValidationLossEarlyStopping(EarlyStoppingCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            # No super(): it warns without load_best_model_at_end, which keep="last" leaves off on purpose.
            saved = state.stateful_callbacks.get(CALLBACK_NAME)
            if state.global_step > 0 and isinstance(saved, dict):
                self.early_stopping_patience_counter = int(saved.get("attributes", {}).get(_COUNTER, 0))

        def on_evaluate(self, args, state, control, metrics, **kwargs):
            super().on_evaluate(args, state, control, metrics, **kwargs)
            state.stateful_callbacks[CALLBACK_NAME] = self.state()

    return ValidationLossEarlyStopping(config.early_stopping_patience, config.early_stopping_threshold)


def stop_reason(state, config: TrainConfig, max_steps: int) -> str | None:
    """Why training stopped before ``max_steps`` (``state``: a TrainerState), or None when it did not stop early."""
    saved = state.stateful_callbacks.get(CALLBACK_NAME) if state.stateful_callbacks else None
    count = saved.get("attributes", {}).get(_COUNTER, 0) if isinstance(saved, dict) else 0
    if not config.early_stopping_patience or count < config.early_stopping_patience or state.global_step >= max_steps:
        return None
    return (f"validation loss did not improve by more than {config.early_stopping_threshold} on its best "
            f"({state.best_metric:.6g} at step {state.best_global_step}) in {count} evaluations in a row "
            f"(early_stopping_patience={config.early_stopping_patience})")


def stopped_in(checkpoint: Path, config: TrainConfig, max_steps: int) -> str | None:
    """``stop_reason`` of the run that wrote ``checkpoint`` (a run that stopped at a save step, then was killed
    before its result was written: resuming it would train past the stop)."""
    from transformers import TrainerState

    return stop_reason(TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json")), config, max_steps)

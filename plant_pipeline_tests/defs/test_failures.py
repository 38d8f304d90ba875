"""usage_errors_as_failures: a setting to change fails the step with its message and no chain of causes."""

import inspect

import pytest
from dagster import Failure

from plant_pipeline.defs.assets.evaluation import model_evaluation
from plant_pipeline.defs.failures import usage_errors_as_failures
from plant_pipeline.ml.errors import UsageError


def test_usage_error_becomes_a_failure_with_its_message_alone():
    @usage_errors_as_failures("some_asset")
    def step(context):
        try:
            raise OSError("connection refused")
        except OSError as err:
            raise UsageError("no model at x: set PLANT_PIPELINE_MODEL") from err

    with pytest.raises(Failure) as caught:
        step(None)
    assert caught.value.description == "some_asset: no model at x: set PLANT_PIPELINE_MODEL"
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_other_errors_keep_their_traceback_and_the_asset_keeps_its_signature():
    @usage_errors_as_failures("some_asset")
    def step(context, config: int):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        step(None, 1)
    assert list(inspect.signature(step).parameters) == ["context", "config"]
    # Dagster reads the asset function's parameters (config, resources) through the decorator.
    assert {"config", "storage", "model"} <= set(model_evaluation.op.ins) | set(
        inspect.signature(model_evaluation.op.compute_fn.decorated_fn).parameters)

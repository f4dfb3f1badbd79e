"""Metrics with non-finite values: logged, read back and shown without crashing a formatter."""

import math

from bignlp_jax.train.metrics import MetricsLogger, read_metrics, shown_value


def test_non_finite_metrics_round_trip_and_format(tmp_path):
    logger = MetricsLogger(tmp_path, total_steps=2, enabled=True, progress=True)
    logger.log(1, {"loss": 2.5, "learning_rate": math.inf, "grad_norm": math.nan,
                   "tokens_per_sec": -math.inf})
    logger.close()
    (record,) = read_metrics(tmp_path)
    assert record["loss"] == 2.5 and record["learning_rate"] == math.inf
    assert math.isnan(record["grad_norm"]) and record["tokens_per_sec"] == -math.inf
    assert [shown_value(v) for v in (2.5, math.inf, "nan", "-inf", 1234567.0)] == \
        ["2.5", "inf", "nan", "-inf", "1.235e+06"]
    # the report's own formatting works on what read_metrics returns
    assert f"{record['learning_rate']:.3f}" == "inf"

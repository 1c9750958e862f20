"""The Prometheus view of a ``Recorder``: a prometheus-client custom collector.

Families (label ``model`` = ``name@version``): ``edgefleet_inference_calls_total``,
``edgefleet_inference_errors_total``, ``edgefleet_inference_rows_total``,
``edgefleet_inference_latency_seconds`` (histogram on ``LATENCY_BOUNDS_MS``),
``edgefleet_inference_class_rows_total`` (label ``class``), ``edgefleet_inference_confidence``
(mean top-class confidence, a gauge), ``edgefleet_inference_labelled_total`` and
``edgefleet_inference_correct_total`` (predictions scored by ``POST /v1/feedback``; a model
with none has no sample). Values are read at scrape time, nothing is kept twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from edgefleet.protocol.messages import LATENCY_BOUNDS_MS
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric

if TYPE_CHECKING:
    from .observe import Recorder

__all__ = ["InferenceCollector"]


class InferenceCollector:
    def __init__(self, recorder: Recorder) -> None:
        self._recorder = recorder

    def collect(self) -> Iterator[Metric]:
        totals = self._recorder.totals()
        calls = CounterMetricFamily(
            "edgefleet_inference_calls", "predict calls", labels=["model"]
        )
        errors = CounterMetricFamily(
            "edgefleet_inference_errors", "predict calls that failed", labels=["model"]
        )
        rows = CounterMetricFamily(
            "edgefleet_inference_rows", "input rows answered", labels=["model"]
        )
        latency = HistogramMetricFamily(
            "edgefleet_inference_latency_seconds", "predict latency", labels=["model"]
        )
        classes = CounterMetricFamily(
            "edgefleet_inference_class_rows", "rows per output class (argmax)",
            labels=["model", "class"],
        )  # fmt: skip
        confidence = GaugeMetricFamily(
            "edgefleet_inference_confidence", "mean top-class confidence", labels=["model"]
        )
        labelled = CounterMetricFamily(
            "edgefleet_inference_labelled", "predictions given a true label", labels=["model"]
        )
        correct = CounterMetricFamily(
            "edgefleet_inference_correct", "labelled predictions that were right",
            labels=["model"],
        )  # fmt: skip
        for key, s in sorted(totals.items()):
            calls.add_metric([key], s["count"])
            errors.add_metric([key], s["errors"])
            rows.add_metric([key], s["rows"])
            lat = list(s["lat"]) + [0] * (len(LATENCY_BOUNDS_MS) + 1 - len(s["lat"]))
            buckets, seen = [], 0
            for bound, n in zip(LATENCY_BOUNDS_MS, lat, strict=False):
                seen += n
                buckets.append((repr(bound / 1000), seen))
            buckets.append(("+Inf", sum(lat)))
            latency.add_metric([key], buckets, s["lat_sum_ms"] / 1000)
            for cls, n in sorted(s["classes"].items()):
                classes.add_metric([key, cls], n)
            if s["rows"]:
                confidence.add_metric([key], s["conf_sum"] / s["rows"])
            if s.get("labelled"):
                labelled.add_metric([key], s["labelled"])
                correct.add_metric([key], s["correct"])
        yield from (calls, errors, rows, latency, classes, confidence, labelled, correct)

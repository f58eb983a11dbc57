"""Measurement used by the CLI, the benchmarks and the tests alike: MACs, speed, accuracy."""
from vitslim.measure.accuracy import evaluate
from vitslim.measure.macs import analytic_macs, count_macs
from vitslim.measure.speed import compare_speed, ideal_model, latency, throughput

__all__ = ["count_macs", "analytic_macs", "throughput", "latency", "compare_speed", "ideal_model",
           "evaluate"]

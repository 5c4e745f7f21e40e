"""`coach bench ...`: each benchmark is a leaf module with add_arguments(parser) and run(args).

Benchmarks print a table, write JSON under bench/results/, and never fail on a timing.
"""

from coach_runtime.cli import Command

COMMANDS = [
    Command("codec", "bench.codec_bench", "tensor codec encode+decode throughput vs numpy.copyto"),
    Command("plan", "bench.plan_bench", "planner search time and lazy accuracy evaluations"),
    Command("link", "bench.link", "user-space TCP link emulator replaying mahimahi traces"),
    Command("pipeline", "bench.pipeline_bench", "edge-cloud pipeline: fidelity, bubbles, overhead, adaptation, faults"),
    Command("cache", "bench.cache_bench", "semantic cache: hit rate, accuracy, ablation, drift"),
    Command("gesfi", "bench.gesfi_bench", "GesFi preprocessing time per window"),
    Command("e2e", "bench.e2e", "COACH vs baselines end to end on traces"),
    Command("load", "bench.load_bench", "many concurrent streams against one cloud process"),
    Command("fuzz", "bench.fuzz_bench", "long fuzzing run of the codec and the server"),
]

"""The coverage-guided half of bench/fuzz_wire.py: libFuzzer (through atheris) mutates whole
inputs for fuzz_wire.run_case, steered by the branches it reaches in tbmesh's own code (only
tbmesh is instrumented: msgpack is C, and instrumenting asyncio and numpy would only slow it).
An input's first byte picks the delivery (fuzz_wire.atheris_case). A finding is saved under
bench/results/fuzz_wire_crashes/ (replay it with fuzz_wire.py --replay) and stops the run.

Started by `python bench/fuzz_wire.py --atheris RUNS`, which reports the figures; by hand:

    python bench/atheris_wire.py CORPUS_DIR -runs=100000 -seed=1   (any libFuzzer flags)
"""

from __future__ import annotations

import sys

try:
    import atheris
except ModuleNotFoundError:
    sys.exit("bench/atheris_wire.py needs atheris: pip install -e '.[fuzz]' (a wheel on Linux x86-64; elsewhere "
             "pip builds it with a clang that has libFuzzer, CLANG_BIN=...: on macOS brew install llvm, "
             'CLANG_BIN="$(brew --prefix llvm)/bin/clang")')

with atheris.instrument_imports(include=["tbmesh"]):
    import fuzz_wire  # bench/ is sys.path[0]; the tbmesh modules it imports are instrumented


inputs = 0


def one_input(data: bytes) -> None:
    global inputs
    inputs += 1
    case = fuzz_wire.atheris_case(data)
    try:
        fuzz_wire.run_case(case, measure=inputs % fuzz_wire.ALLOC_EVERY == 0)
    except fuzz_wire.Finding as finding:
        print(f"saved {fuzz_wire.save_case(case, finding)}: {finding}", flush=True)
        raise


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()

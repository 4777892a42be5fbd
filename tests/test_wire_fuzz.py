"""bench/fuzz_wire.py in-process: a short seeded campaign finds nothing, what a lying peer makes
the decoder allocate stays bounded, and every saved finding replays clean."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tbmesh.net import wire

ROOT = Path(__file__).resolve().parent.parent


def _load_fuzz_wire():
    spec = importlib.util.spec_from_file_location("fuzz_wire", ROOT / "bench/fuzz_wire.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_wire"] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


fuzz_wire = _load_fuzz_wire()
CRASHES = sorted((ROOT / fuzz_wire.CRASH_DIR).glob("*.json"))


def test_every_message_type_on_the_wire_has_a_seed():
    seeded = {type(m) for m in fuzz_wire.seed_messages().values()}
    assert seeded == set(wire.TAGS)
    metas = [t.meta.get("kind") for t in fuzz_wire.tensors().values()]
    assert {"admit", "decode", "prefill", "flush"} <= set(metas)


@pytest.mark.slow  # CI's time budget: ./dev test -m slow
@pytest.mark.timeout(120)
def test_a_seeded_campaign_gives_only_protocol_errors_and_stays_in_its_allocation_bound():
    result = fuzz_wire.campaign(20_000, seed=20260101, save=False, quiet=True)
    assert result["findings"] == []  # other exceptions, disagreements, invalid replies, allocation
    assert set(result["by_kind"]) == set(fuzz_wire.MUTATIONS)
    # the campaign reaches every path, or finding nothing would mean little
    assert {"decoded ok", "protocol error", "decoded, then protocol error"} <= set(result["by_outcome"])
    assert result["handshake"].get("accepted", 0) > 0 and result["handshake"].get("refused", 0) > 0
    assert result["serving"].get("read", 0) > 0 and result["serving"].get("refused", 0) > 0
    assert result["allocation"]["measured_cases"] == 20_000 // fuzz_wire.ALLOC_EVERY
    assert result["allocation"]["closest_to_bound"] < 1


def test_a_lying_length_prefix_allocates_only_what_arrived():
    probes = fuzz_wire.allocation_probes()
    for name in ("header_claims_4GiB", "payload_claims_4GiB", "tensor_claims_MAX_PAYLOAD_header_only"):
        assert probes[name]["peak_traced"] < 64 << 10, name
    for name in ("header_claims_MAX_HEADER", "tensor_claims_MAX_PAYLOAD_1MiB_arrived"):
        assert probes[name]["peak_traced"] < 1.5 * probes[name]["arrived"], name
    # msgpack makes room for part of every array a header claims, 1023 deep at most: a fixed
    # ceiling per frame, freed as soon as the frame is refused (see the bench's docstring)
    assert probes["msgpack_nesting_1023_arrays"]["peak_traced"] < 128 << 20


def test_a_case_depends_only_on_its_seed_and_index():
    seeds = list(fuzz_wire.seed_frames().values())
    first = [fuzz_wire.make_case(5, i, seeds) for i in range(300)]
    assert [fuzz_wire.make_case(5, i, seeds) for i in reversed(range(300))][::-1] == first
    assert len({case.kind for case in first}) == len(fuzz_wire.MUTATIONS)


def test_the_harness_reports_an_exception_other_than_the_protocol_error(monkeypatch):
    def broken(header, payload_len):
        raise KeyError("t")

    monkeypatch.setattr(wire, "_decode_header", broken)
    case = fuzz_wire.Case(b"".join(wire.encode(wire.Refuse("no"))), [3, 100], "listener", False)
    with pytest.raises(fuzz_wire.Finding, match="decoder: KeyError"):
        fuzz_wire.run_case(case)


@pytest.mark.parametrize("path", CRASHES, ids=[p.name for p in CRASHES])
def test_a_saved_finding_replays_clean(path):
    case = fuzz_wire.Case.from_json(json.loads(path.read_text()))
    fuzz_wire.run_case(case, measure=True)  # raises Finding while the fault is there

"""bench/fuzz_wire.py in-process: a short seeded campaign of each mode (the frames, a TLS
listener and dialer with the secret, an established TLS pair's sealed frames) finds nothing,
what a lying peer makes the decoder allocate stays bounded, and every saved finding replays
clean."""

from __future__ import annotations

import asyncio
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


def _campaign(mode: str, cases: int, seed: int) -> dict:
    result = fuzz_wire.campaign(cases, seed=seed, save=False, quiet=True, modes={mode: 1.0})
    assert result["findings"] == []  # other exceptions, disagreements, invalid replies, allocation, forgeries
    assert result["by_mode"] == {mode: cases}
    return result["modes"][mode]


def _check_frames(result: dict) -> None:
    assert set(result["by_kind"]) == set(fuzz_wire.MUTATIONS)
    # the campaign reaches every path, or finding nothing would mean little
    assert {"decoded ok", "protocol error", "decoded, then protocol error"} <= set(result["by_outcome"])
    assert result["handshake"].get("accepted", 0) > 0 and result["handshake"].get("refused", 0) > 0
    assert result["serving"].get("read", 0) > 0 and result["serving"].get("refused", 0) > 0


def test_frames_give_only_protocol_errors_and_stay_in_their_allocation_bound():
    result = fuzz_wire.campaign(4000, seed=20260102, save=False, quiet=True, modes={"frames": 1.0})
    assert result["findings"] == []
    _check_frames(result["modes"]["frames"])
    assert result["allocation"]["measured_cases"] == 4000 // fuzz_wire.ALLOC_EVERY
    assert result["allocation"]["closest_to_bound"] < 1


@pytest.mark.parametrize("mode", ["tls_listener", "tls_dialer"])
def test_mutated_tls_flights_are_only_refused_and_never_forge_a_greeting(mode):
    result = _campaign(mode, 2000, seed=20260103)
    assert set(result["by_kind"]) == set(fuzz_wire.TLS_MUTATIONS)
    outcomes = result["by_outcome"]
    # replayed recorded flights, and live ones mutated before and after the keys are set
    for variant in ("recorded", "first", "second", "plaintext"):
        assert outcomes.get(f"{variant} refused", 0) > 0, variant
    assert "recorded accepted" not in outcomes  # a stranger's replay never gets in
    assert any("bad_record_mac" in reason for reason in result["top_refusals"])  # reached the sealed records


def test_mutated_sealed_frames_give_only_protocol_errors_and_a_prefix_of_what_was_sent():
    result = _campaign("tls_records", 2000, seed=20260104)
    assert set(result["by_kind"]) == set(fuzz_wire.TLS_MUTATIONS)
    # refused, cut short (a truncation TLS cannot tell from a slow peer), and whole (a no-op)
    assert {"refused", "cut short", "whole"} <= set(result["by_outcome"])


@pytest.mark.slow  # minutes: left out of ./dev test --quick
@pytest.mark.timeout(300)
def test_a_longer_seeded_campaign_of_every_mode_finds_nothing():
    result = fuzz_wire.campaign(20_000, seed=20260101, save=False, quiet=True)
    assert result["findings"] == []
    assert set(result["by_mode"]) == set(fuzz_wire.MODES)
    _check_frames(result["modes"]["frames"])


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
    first = [fuzz_wire.make_case(5, i, seeds) for i in range(600)]
    assert [fuzz_wire.make_case(5, i, seeds) for i in reversed(range(600))][::-1] == first
    assert {case.mode for case in first} == set(fuzz_wire.MODES)
    assert {case.kind for case in first if case.mode == "frames"} == set(fuzz_wire.MUTATIONS)


def test_the_harness_reports_plaintext_from_a_changed_record(monkeypatch):
    """The check that authenticates: were a session to hand out a forged record's bytes, the
    tls_records check would say so."""
    real = fuzz_wire.secure.Session.receive

    def forging(self, data):
        return real(self, data) + (b"forged" if data else b"")

    monkeypatch.setattr(fuzz_wire.secure.Session, "receive", forging)
    with pytest.raises(fuzz_wire.Finding, match="never sealed|changed record"):
        for index in range(20):  # some cases feed through read_into, which this forger leaves alone
            fuzz_wire.run_case(fuzz_wire.Case(b"", [], "listener", True, "bitflip", 1, index, "tls_records"))


def test_the_harness_reports_a_handshake_that_hangs(monkeypatch):
    monkeypatch.setattr(fuzz_wire, "FUZZ_HANDSHAKE_TIMEOUT", 0.05)

    async def stuck(self, n=-1):
        await asyncio.sleep(1)

    monkeypatch.setattr(fuzz_wire.ScriptedReader, "read", stuck)
    case = fuzz_wire.Case(b"", [], "listener", True, "truncate", 1, 0, "tls_listener")
    with pytest.raises(fuzz_wire.Finding, match="hung"):
        fuzz_wire.run_case(case)


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

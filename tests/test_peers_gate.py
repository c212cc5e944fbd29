"""``benchmarks/peers.py``: a peer's step script runs in this process, one step per turn, between the
benchmark's own steps, and each turn returns the duration the script itself measured."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from peers import InterleavedPeer  # noqa: E402

# A stand-in with the peer scripts' loop: untimed warm-up steps read the clock once, timed steps twice,
# then one JSON line with the script's own times. Each step sleeps 10 ms x (its index + 1).
FAKE = """
import argparse, json, time

def main():
    p = argparse.ArgumentParser()
    for name in ("--warmup", "--repeats"):
        p.add_argument(name, type=int)
    p.add_argument("--log")
    p.add_argument("--fail-at", type=int, default=-1)
    a, _ = p.parse_known_args()
    times = []
    for i in range(a.warmup + a.repeats):
        t0 = time.perf_counter()
        with open(a.log, "a") as f:
            f.write(f"peer {i}\\n")
        if i == a.fail_at:
            raise ValueError("step failed")
        time.sleep(0.01 * (i + 1))
        if i >= a.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({"step_ms_all": times}))
"""


def _bundle(tmp_path: Path) -> Path:
    (tmp_path / "usb").mkdir()
    (tmp_path / "usb" / "fixmatch_step.py").write_text(FAKE)
    return tmp_path


def test_turns_alternate_and_return_the_scripts_own_times(tmp_path: Path) -> None:
    log = tmp_path / "order.log"
    peer = InterleavedPeer("usb", ["--log", str(log)], warmup=2, repeats=3, directory=_bundle(tmp_path))
    peer.start()
    assert not log.exists()  # set-up only: the first step waits for its turn
    turns = []
    for round_ in range(5):
        with open(log, "a") as f:
            f.write(f"bench {round_}\n")
        turns.append(peer.turn())
    result = peer.finish()
    assert log.read_text().split("\n")[:-1] == [f"{who} {r}" for r in range(5) for who in ("bench", "peer")]
    assert turns[2:] == result["step_ms_all"]  # the timed steps: the script's own numbers
    for i, ms in enumerate(turns):
        assert 10 * (i + 1) <= ms < 10 * (i + 1) + 200  # each turn is its own step (sleep), warm-up ones too
    assert json.dumps(result)


def test_a_failing_peer_step_is_raised_in_the_benchmark(tmp_path: Path) -> None:
    log = tmp_path / "order.log"
    args = ["--log", str(log), "--fail-at", "1"]
    peer = InterleavedPeer("usb", args, warmup=1, repeats=2, directory=_bundle(tmp_path))
    peer.start()
    peer.turn()
    with pytest.raises(RuntimeError, match=r"peer usb failed: ValueError\('step failed'\)"):
        peer.turn()

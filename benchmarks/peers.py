"""Peers timed beside the project's step, in the same process, one step per round, interleaved.

A peer is a published implementation's own step script from ``../shared/peers`` (``README.md`` there):
USB 0.3.2's ``usb/fixmatch_step.py`` and the UniMatch release's ``unimatch/unimatch_step.py``. Each is
imported from that folder at run time and its unmodified ``main()`` runs in a thread: it builds its model,
optimizer and batch with the peer's own builders, and times each step itself (``time.perf_counter``
around the step, bracketed by ``torch.cuda.synchronize``). Nothing of the peers is copied here.

The interleaving: the script's module-level ``time`` is replaced by a gate whose ``perf_counter`` blocks
at the start of each step until the benchmark grants a turn, so the peer's steps alternate with the
project's and never overlap them; the step's duration is read from the peer's own two clock reads. The
gate also restores the process-wide settings a peer changes (cuDNN flags, intra-op threads) while the
project's step runs, so the project is timed with its own.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"usb": "usb/fixmatch_step.py", "unimatch": "unimatch/unimatch_step.py"}


def peers_dir(given: Path | None = None) -> Path:
    """The peer bundles: ``given``, else ``$TRUSTMATCH_PEERS``, else ``../shared/peers`` or ``shared/peers``
    beside / inside the repository (a GPU machine gets only what travels with the checkout)."""
    env = os.environ.get("TRUSTMATCH_PEERS")
    candidates = (
        [given] if given else [Path(env)] if env else [ROOT.parent / "shared" / "peers", ROOT / "shared" / "peers"]
    )
    for path in candidates:
        if (path / SCRIPTS["usb"]).is_file():
            return path
    named = ", ".join(str(c) for c in candidates)
    raise SystemExit(f"no peer bundles at {named}: pass --peers-dir DIR or set TRUSTMATCH_PEERS (see README, Speed)")


def _load(script: Path) -> ModuleType:
    """The peer's script as a fresh module (its own file, its own globals)."""
    spec = importlib.util.spec_from_file_location(f"peer_{script.stem}", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _settings() -> tuple[object, ...]:
    """The process-wide settings a peer's set-up may change."""
    cudnn = torch.backends.cudnn
    return cudnn.benchmark, cudnn.deterministic, cudnn.enabled, torch.get_num_threads()


def _apply(settings: tuple[object, ...]) -> None:
    cudnn = torch.backends.cudnn
    cudnn.benchmark, cudnn.deterministic, cudnn.enabled, threads = settings
    if torch.get_num_threads() != threads:
        torch.set_num_threads(int(threads))  # type: ignore[arg-type]


class InterleavedPeer:
    """One peer's ``main()`` in a thread; ``turn()`` runs exactly one of its steps and returns its ms.

    The script's loop is ``t0 = perf_counter(); step(); [if timed: perf_counter() - t0]``: the gate
    blocks in the first read of each step, and a step ends at its second read (timed steps) or at the
    next step's first read (the script's untimed warm-up steps read the clock once).
    """

    def __init__(self, name: str, args: list[str], warmup: int, repeats: int, directory: Path | None = None) -> None:
        if repeats < 1:
            raise SystemExit("--repeats must be at least 1 to time a peer")
        self.name, self.warmup, self.repeats = name, warmup, repeats
        self.script = peers_dir(directory) / SCRIPTS[name.split("-")[0]]
        self.argv = [str(self.script), *args, "--warmup", str(warmup), "--repeats", str(repeats)]
        self._granted, self._done = threading.Semaphore(0), threading.Semaphore(0)
        self._step, self._in_step = -1, False  # the step under way (-1: set-up)
        self._start = 0.0
        self._last_ms = 0.0
        self._error: BaseException | None = None
        self._printed = io.StringIO()
        self._mine = self._theirs = _settings()
        self.result: dict[str, object] = {}

    # -- the gate, called from the peer's thread
    def _perf_counter(self) -> float:
        now = time.perf_counter()
        if self._in_step and self._step >= self.warmup:  # a timed step's second read: it is over
            self._end_turn(now)
            return now
        if self._in_step:  # an untimed step ends where the next one starts
            self._end_turn(now)
        elif self._step < 0:  # set-up finished: hand back, with the peer's own settings
            self._theirs = _settings()
            self._done.release()
        self._granted.acquire()
        self._step += 1
        self._in_step = True
        self._start = time.perf_counter()
        return self._start

    def _end_turn(self, now: float) -> None:
        self._last_ms = (now - self._start) * 1e3
        self._in_step = False
        self._done.release()

    def _run(self) -> None:
        try:
            self._module.main()
        except BaseException as e:  # noqa: BLE001 - handed to the benchmark's thread, raised there
            self._error = e
        finally:
            self._done.release()

    # -- the benchmark's side
    def start(self) -> None:
        """Import the peer and run its set-up (model, optimizer, batch), up to its first step."""
        self._module = _load(self.script)
        self._module.time = SimpleNamespace(**{**vars(time), "perf_counter": self._perf_counter})
        self._module.print = lambda *a, **k: print(*a, **{**k, "file": self._printed})
        self._mine = _settings()
        argv, stdout = sys.argv, sys.stdout
        sys.argv = self.argv
        self._thread = threading.Thread(target=self._run, name=f"peer-{self.name}", daemon=True)
        before = set(sys.modules)
        self._thread.start()
        self._wait()
        sys.argv = argv
        for name in set(sys.modules) - before:  # USB's inert stand-ins for packages it never uses: the
            if type(sys.modules[name]).__name__ == "_StubModule":  # project must import the real ones
                del sys.modules[name]
        self._stdout = stdout
        _apply(self._mine)

    def turn(self) -> float:
        """One step of the peer, with its settings, while the project waits; its duration in ms."""
        _apply(self._theirs)
        self._granted.release()
        self._wait()
        _apply(self._mine)
        sys.stdout = self._stdout  # USB's script sends sys.stdout to stderr for good
        return self._last_ms

    def finish(self) -> dict[str, object]:
        """The peer's own JSON line, once its last timed step has run."""
        self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"peer {self.name} failed: {self._error!r}") from self._error
        sys.stdout = self._stdout
        self.result = json.loads(self._printed.getvalue().strip().splitlines()[-1])
        return self.result

    def _wait(self) -> None:
        self._done.acquire()
        if self._error is not None:
            self._thread.join()
            raise RuntimeError(f"peer {self.name} failed: {self._error!r}") from self._error


def peer_args(name: str, device: torch.device, threads: int) -> list[str]:
    """The peer script's command line for the variant ``name`` (``usb``, ``usb-amp``, ``unimatch``,
    ``unimatch-bf16``) on ``device``; its batch stays where its script puts it (on the device)."""
    base, _, variant = name.partition("-")
    args = ["--device", device.type, "--threads", str(threads)]
    if base == "usb":
        args += ["--data-batches", "0"]
    return args + (["--amp"] if variant in ("amp", "bf16") else [])


def peer_summaries(times: dict[str, list[float]], script_json: dict[str, dict]) -> list[dict]:
    """Each peer's step times (ms) over the rounds, with the JSON its own script printed."""
    return [
        {
            "peer": name,
            "step_ms_median": round(statistics.median(t), 1),
            "step_ms_min": round(min(t), 1),
            "step_ms_all": [round(x, 1) for x in t],
            "script_json": script_json[name],
        }
        for name, t in times.items()
    ]

"""Where a drafter runs: beside the target in this process, or in a process of its own.

The SD loop talks to a `DraftRunner`, never to a drafter directly, so the same loop drives

* `LocalRunner`: the drafter in a thread of this process (on CUDA on a stream of its own). On a
  CPU its tiny ops and the target's serialise on the interpreter lock, which is why a second
  runner exists;
* `ProcessRunner`: the drafter in a spawned process pinned to its own cores, with its own intra-op
  threads: the shape of a second device (the event camera's accelerator, another GPU). Commands
  and token lists cross a pipe; tensors cross through shared memory (torch.multiprocessing), so
  the drafter's weights are not copied. The process ends with the runner (`close`, the `with`
  block, an exception, Ctrl-C) or with its parent (Linux parent-death signal).

A round-1 job reads the runner's `ready` flag (set by the loop when the target's prefill ends),
which is how a ``gamma="prefill"`` policy knows when to stop, and writes its progress on the
runner's `Board` (shared memory for a process): when its draft prefill started and ended, and
each draft as it is made. A loop that does not wait reads the board (`drafts_so_far`) and
leaves the round unwaited (`abandon_round1`). With a policy's ``head_tail`` the job hands its
chain to the drafter's feature head after that many drafts, which drafts on (`heads.head_tail`)
while the target prefills, posting on the same board.
"""

from __future__ import annotations

import ctypes
import math
import os
import signal
import threading
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch

from cross_modal_sd.decoding.drafters import (
    Drafter,
    DraftPolicy,
    DraftState,
    Proposal,
    propose,
    sync,
)
from cross_modal_sd.decoding.heads import head_tail
from cross_modal_sd.decoding.inputs import DraftInputs
from cross_modal_sd.decoding.timing import Span, clock_ms, synchronize, time_call, timed_span

# The span of work that never ran: it overlaps nothing and lasts 0 ms.
NOT_RUN = Span(0.0, 0.0)
BOARD_DRAFTS = 64  # drafts a round-1 job publishes at most (max_drafts beyond it: not shown)


class Board:
    """A round-1 job's progress, readable while it runs: ``times`` (float64: draft prefill
    start, its end, the last draft's end; 0 = not yet) and ``drafts`` (int64: the count, then
    the drafts in order; a draft is written before the count that shows it)."""

    def __init__(self, shared: bool = False):
        self.times = torch.zeros(3, dtype=torch.float64)
        self.drafts = torch.zeros(1 + BOARD_DRAFTS, dtype=torch.int64)
        if shared:
            self.times.share_memory_()
            self.drafts.share_memory_()

    def clear(self) -> None:
        self.times.zero_()
        self.drafts[0] = 0

    def prefill_started(self) -> None:
        self.times[0] = clock_ms()

    def prefill_ended(self) -> None:
        self.times[1] = clock_ms()

    def post(self, index: int, token: int) -> None:
        if index < BOARD_DRAFTS:
            self.drafts[1 + index] = token
            self.times[2] = clock_ms()
            self.drafts[0] = index + 1

    def prefilled(self) -> bool:
        return float(self.times[1]) > 0

    def read(self) -> tuple[list[int], Span, Span]:
        """The drafts so far, the prefill's span and the drafting's (NOT_RUN: none yet)."""
        n = int(self.drafts[0])
        start, end, last = self.times.tolist()
        prefill = Span(start, end) if end else NOT_RUN
        drafting = Span(end, last) if n else NOT_RUN
        return self.drafts[1 : 1 + n].tolist(), prefill, drafting


_START_TIMEOUT_S = 120.0  # spawning imports torch and transformers: seconds, not minutes


class DraftRunnerError(RuntimeError):
    """The drafter failed (the message carries its traceback) or its process died."""


@dataclass
class Round:
    """One drafting round as a runner hands it back.

    Attributes:
        proposal: the drafts and their confidences.
        prefill: the draft prefill (round 1), `NOT_RUN` otherwise.
        drafting: the rest: syncing to the committed answer and proposing.
        threads: intra-op threads the drafter used.
    """

    proposal: Proposal
    prefill: Span
    drafting: Span
    threads: int


def pin_process(cores: Sequence[int]) -> None:
    """Pins every thread of this process (and the threads it starts later) to `cores`.

    `os.sched_setaffinity(0, ...)` only moves the calling thread on Linux; the intra-op threads
    torch already started keep their mask unless each is moved.
    """
    cores = set(cores)
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except (ProcessLookupError, PermissionError):  # a thread that just ended
            pass


class DraftRunner(ABC):
    """Runs one drafter's rounds; see the module docstring."""

    threads: int

    @abstractmethod
    def start_round1(
        self,
        inputs: Any,
        policy: DraftPolicy,
        limit: int,
        eos: int | None,
        estimates: bool = False,
    ) -> None:
        """Starts the draft prefill and round-1 drafting without waiting for them (with
        `estimates`, the proposal also carries the drafter's estimates of the target's states
        at its drafts: ``Proposal.states``)."""

    @abstractmethod
    def finish_round1(self) -> Round:
        """Waits for the round started by `start_round1`."""

    def prefilled(self) -> bool:
        """Whether the round-1 job has finished its draft prefill (it is drafting, or done)."""
        return self.board.prefilled()

    def drafts_so_far(self) -> Round:
        """The round-1 job's drafts made so far, read off its board without waiting (the
        proposal's confidences are NaN: they are not published)."""
        tokens, prefill, drafting = self.board.read()
        return Round(Proposal(tokens, [math.nan] * len(tokens)), prefill, drafting, self.threads)

    @abstractmethod
    def abandon_round1(self) -> None:
        """Leaves the round started by `start_round1` unwaited: the drafter finishes it on its
        own cores and its answer is dropped before the runner's next command."""

    @abstractmethod
    def next_round(
        self, answer: Sequence[int], policy: DraftPolicy, limit: int, eos: int | None
    ) -> Round:
        """Syncs the drafter to the committed `answer` and drafts one round (blocking)."""

    @abstractmethod
    def set_ready(self, ready: bool) -> None:
        """Sets (or clears) the flag a round-1 job reads as "the target has prefilled"."""

    @abstractmethod
    def probe(self, inputs: Any, answer: Sequence[int], repeats: int) -> dict[str, list[float]]:
        """Times the drafter's costs where it runs: ``draft_prefill``, ``draft_feed`` (one token
        fed back, or a resync), ``adapter`` (one proposal); ms per call."""

    @abstractmethod
    def start_busy(self, inputs: Any, ms: float) -> None:
        """Starts a stand-in for round-1 drafting: a prefill, then drafting steps (a proposal
        and its feed) back to back for about `ms`."""

    @abstractmethod
    def finish_busy(self) -> list[float]:
        """Ms of the busy job's prefill, then of each of its drafting steps."""

    @abstractmethod
    def ping(self) -> None:
        """One command there and back (what every round pays in messaging)."""

    def close(self) -> None:  # noqa: B027 (nothing to release in-process)
        """Releases what the runner holds."""

    def __enter__(self) -> DraftRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------ the jobs


class _Jobs:
    """The drafter's side of every command, shared by both runners."""

    def __init__(self, drafter: Drafter, device: torch.device | None):
        self.drafter = drafter
        self.device = device
        self.state: DraftState | None = None

    def round1(
        self, inputs, policy, limit, eos, estimates, ready, board=None
    ) -> tuple[Proposal, Span, Span]:
        spans: list[Span] = []
        if board is not None:
            board.prefill_started()
        with timed_span(self.device, spans):
            state = self.drafter.prefill(inputs)
        if board is not None:
            board.prefill_ended()
        head = getattr(self.drafter, "head", None)
        if policy.head_tail is not None and head is None:
            raise DraftRunnerError(
                f"policy {policy.name}: a head tail needs a drafter with a feature head "
                "(AdapterDrafter(head=...))"
            )
        post = None if board is None else board.post
        with timed_span(self.device, spans):
            cross_modal = limit if policy.head_tail is None else min(limit, policy.head_tail)
            state, proposal = propose(
                self.drafter,
                state,
                policy,
                cross_modal,
                first_round=True,
                target_ready=ready,
                eos_token_id=eos,
                on_draft=post,
            )
            tokens = proposal.tokens
            if len(tokens) == cross_modal < limit and tokens[-1] != eos and not ready():
                # The head drafts on while the target still prefills (`DraftPolicy.head_tail`).
                n = min(policy.round_cap(first_round=False), limit - len(tokens))
                more = head_tail(head, tokens, self.drafter.estimates(state), n, eos, ready, post)
                proposal = Proposal(tokens + more.tokens, proposal.confidences + more.confidences)
            if estimates:  # plain floats cross the pipe by value
                states = self.drafter.estimates(state)[0, : len(proposal.tokens)]
                proposal = replace(proposal, states=states.float().cpu().numpy())
        self.state = state
        return proposal, spans[0], spans[1]

    def next_round(self, answer, policy, limit, eos) -> tuple[Proposal, Span]:
        if self.state is None:
            raise DraftRunnerError("next_round before round 1: the drafter has no state")
        spans: list[Span] = []
        with timed_span(self.device, spans):
            self.state = sync(self.drafter, self.state, answer)
            self.state, proposal = propose(
                self.drafter, self.state, policy, limit, first_round=False, eos_token_id=eos
            )
        return proposal, spans[0]

    def probe(self, inputs, answer, repeats) -> dict[str, list[float]]:
        drafter, device = self.drafter, self.device
        out: dict[str, list[float]] = {"draft_prefill": [], "draft_feed": [], "adapter": []}
        for i in range(repeats + 1):  # the first round warms up
            state, prefill = time_call(partial(drafter.prefill, inputs), warmup=0, device=device)
            state = drafter.feed(state, list(answer[:-1]))
            feeds, proposals = [], []
            # The resync after a rejection (forget the last fed token, read one), then
            # proposals and feeds alternating as `propose` runs them.
            state = drafter.rewind(state, len(state.fed) - 1)
            for t in list(answer[-1:]) + list(answer[:3]):
                state, ms = time_call(partial(drafter.feed, state, [t]), warmup=0, device=device)
                feeds.append(ms)
                proposals.append(
                    time_call(partial(drafter.next_token, state), warmup=0, device=device)[1]
                )
            if i > 0:
                out["draft_prefill"].append(prefill)
                out["draft_feed"] += feeds
                out["adapter"] += proposals
        return out

    def busy(self, inputs, ms: float) -> list[float]:
        """A prefill, then drafting steps (a proposal and its feed) back to back for ``ms``."""
        drafter, device = self.drafter, self.device
        state, prefill = time_call(partial(drafter.prefill, inputs), warmup=0, device=device)
        n = len(state.fed)
        times: list[float] = [prefill]
        end = clock_ms() + ms
        while clock_ms() < end:
            start = clock_ms()
            drafter.next_token(state)
            state = drafter.feed(state, [0])
            synchronize(device)
            times.append(clock_ms() - start)
            state = drafter.rewind(state, n)
        return times


def _stream(device: torch.device | None):
    return torch.cuda.Stream(device) if device is not None and device.type == "cuda" else None


def _on_stream(stream):
    return torch.cuda.stream(stream) if stream is not None else nullcontext()


class LocalRunner(DraftRunner):
    """The drafter in a thread of this process (its own CUDA stream on a GPU).

    On a CPU torch's intra-op thread count is process-wide: the drafter uses whatever the loop
    set for round 1 (`speculative.ThreadPlan`).
    """

    def __init__(self, drafter: Drafter, device: torch.device | str | None = None):
        self.jobs = _Jobs(drafter, None if device is None else torch.device(device))
        self.ready = threading.Event()
        self.board = Board()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drafter")
        self.pending: Future | None = None
        self.abandoned: Future | None = None

    def _settle(self) -> None:
        """Waits for an abandoned round (re-raising its error) before the next command."""
        abandoned, self.abandoned = self.abandoned, None
        if abandoned is not None:
            abandoned.result()

    @property
    def threads(self) -> int:
        return torch.get_num_threads()

    @property
    def drafter(self) -> Drafter:
        return self.jobs.drafter

    def _on_own_stream(self, fn, *args):
        stream = _stream(self.jobs.device)
        with _on_stream(stream):
            out = fn(*args)
            synchronize(self.jobs.device, stream)
        return out

    def start_round1(self, inputs, policy, limit, eos, estimates=False) -> None:
        self._settle()
        self.board.clear()
        self.pending = self.pool.submit(
            self._on_own_stream,
            self.jobs.round1,
            inputs,
            policy,
            limit,
            eos,
            estimates,
            self.ready.is_set,
            self.board,
        )

    def abandon_round1(self) -> None:
        self.abandoned, self.pending = self.pending, None

    def finish_round1(self) -> Round:
        proposal, prefill, drafting = self.pending.result()  # re-raises the drafter's error
        self.pending = None
        return Round(proposal, prefill, drafting, self.threads)

    def next_round(self, answer, policy, limit, eos) -> Round:
        self._settle()
        proposal, drafting = self.jobs.next_round(answer, policy, limit, eos)
        return Round(proposal, NOT_RUN, drafting, self.threads)

    def set_ready(self, ready: bool) -> None:
        self.ready.set() if ready else self.ready.clear()

    def probe(self, inputs, answer, repeats) -> dict[str, list[float]]:
        self._settle()
        return self.jobs.probe(inputs, answer, repeats)

    def start_busy(self, inputs, ms: float) -> None:
        self._settle()
        self.pending = self.pool.submit(self._on_own_stream, self.jobs.busy, inputs, ms)

    def finish_busy(self) -> list[float]:
        times, self.pending = self.pending.result(), None
        return times

    def ping(self) -> None:
        return None

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.abandoned = None


# --------------------------------------------------------------------------- the process


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when its parent dies (no orphan after a SIGKILL)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: close() and the pipe's EOF remain
        pass


def _pack(inputs: Any) -> Any:
    """Draft inputs as plain arrays for the pipe: pickled by value, no shared-memory segment
    per sample (what torch's reductions would allocate for every tensor sent)."""
    if isinstance(inputs, DraftInputs):
        return ("draft_inputs", inputs.input_ids.numpy(), inputs.event_pixels.numpy())
    return inputs


def _unpack(packed: Any) -> Any:
    if isinstance(packed, tuple) and packed and packed[0] == "draft_inputs":
        return DraftInputs(torch.from_numpy(packed[1]), torch.from_numpy(packed[2]))
    return packed


def _serve(conn, drafter: Drafter, cores: Sequence[int], threads: int, ready, board) -> None:
    """The drafter process: pinned, its own threads, one command at a time until "close"."""
    _die_with_parent()
    # Ctrl-C reaches the whole process group; the parent decides, and closes this process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if cores:
        pin_process(cores)
    torch.set_num_threads(threads)
    jobs = _Jobs(drafter, None)
    conn.send(("started", os.getpid()))
    commands = {
        "round1": lambda inputs, *a: jobs.round1(_unpack(inputs), *a, ready.is_set, board),
        "next": jobs.next_round,
        "probe": lambda inputs, *a: jobs.probe(_unpack(inputs), *a),
        "busy": lambda inputs, ms: jobs.busy(_unpack(inputs), ms),
        "ping": lambda: None,
    }
    with torch.inference_mode():
        while True:
            try:
                cmd, args = conn.recv()
            except EOFError:  # the parent went away
                return
            if cmd == "close":
                return
            try:
                conn.send(("ok", commands[cmd](*args)))
            except Exception:  # the parent re-raises it with this traceback
                conn.send(("error", traceback.format_exc()))


class ProcessRunner(DraftRunner):
    """The drafter in a spawned process pinned to `cores`, with `threads` intra-op threads.

    Args:
        drafter: moved to the process; its tensors go through shared memory.
        cores: CPU cores the process may run on (empty: no pinning).
        threads: its intra-op threads (default: one per core).

    Raises:
        DraftRunnerError: the process did not start (its error in the message).
    """

    def __init__(self, drafter: Drafter, cores: Sequence[int] = (), threads: int | None = None):
        ctx = torch.multiprocessing.get_context("spawn")
        self.threads = threads or max(1, len(cores))
        self.cores = tuple(cores)
        self.ready = ctx.Event()
        self.board = Board(shared=True)
        self.stale = 0  # answers of abandoned rounds still to be read and dropped
        self.conn, child = ctx.Pipe()
        process = ctx.Process(
            target=_serve,
            args=(child, drafter, self.cores, self.threads, self.ready, self.board),
            daemon=True,
            name="drafter",
        )
        self.process = None
        try:
            process.start()  # pickles the drafter: an unpicklable one fails here
        finally:
            child.close()
        self.process = process
        self.pid = None
        try:
            status, self.pid = self._recv(_START_TIMEOUT_S)
        except BaseException:
            self.close()
            raise

    def _recv(self, timeout: float | None = None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.conn.poll(0.5):
            if not self.process.is_alive():
                raise DraftRunnerError(
                    f"the drafter process exited with code {self.process.exitcode}"
                )
            if deadline is not None and time.monotonic() > deadline:
                raise DraftRunnerError(f"the drafter process did not answer within {timeout} s")
        try:
            status, value = self.conn.recv()
        except EOFError as err:
            raise DraftRunnerError("the drafter process closed its pipe") from err
        if status == "error":
            raise DraftRunnerError(f"the drafter failed in its process:\n{value}")
        return status, value

    def _call(self, cmd: str, *args: Any) -> Any:
        self._send(cmd, *args)
        return self._recv()[1]

    def _send(self, cmd: str, *args: Any) -> None:
        if self.process is None or not self.process.is_alive():
            raise DraftRunnerError("the drafter process is not running (closed or dead)")
        self._drain()
        self.conn.send((cmd, args))

    def _drain(self) -> None:
        """Reads and drops the answers of abandoned rounds (re-raising an error in one)."""
        while self.stale:
            self.stale -= 1
            self._recv()

    def start_round1(self, inputs, policy, limit, eos, estimates=False) -> None:
        self._drain()  # before clearing the flag an abandoned round may still set
        self.board.clear()
        self._send("round1", _pack(inputs), policy, limit, eos, estimates)

    def abandon_round1(self) -> None:
        self.stale += 1

    def finish_round1(self) -> Round:
        proposal, prefill, drafting = self._recv()[1]
        return Round(proposal, prefill, drafting, self.threads)

    def next_round(self, answer, policy, limit, eos) -> Round:
        proposal, drafting = self._call("next", list(answer), policy, limit, eos)
        return Round(proposal, NOT_RUN, drafting, self.threads)

    def set_ready(self, ready: bool) -> None:
        self.ready.set() if ready else self.ready.clear()

    def probe(self, inputs, answer, repeats) -> dict[str, list[float]]:
        return self._call("probe", _pack(inputs), list(answer), repeats)

    def start_busy(self, inputs, ms: float) -> None:
        self._send("busy", _pack(inputs), ms)

    def finish_busy(self) -> list[float]:
        return self._recv()[1]

    def ping(self) -> None:
        self._call("ping")

    def close(self) -> None:
        """Ends the process: asks it to, then terminates and kills what is left (idempotent)."""
        process, self.process = self.process, None
        if process is None:
            return
        try:
            if process.is_alive():
                self.conn.send(("close", ()))
            process.join(timeout=5)
        except (OSError, ValueError):  # a broken pipe: the process is going anyway
            pass
        if process.is_alive():
            process.terminate()
            process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join()
        self.conn.close()

    def __del__(self) -> None:
        if getattr(self, "process", None) is not None:
            self.close()

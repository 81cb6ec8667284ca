"""The drafter in a process of its own: lossless, within its core budget, and never left behind
(errors in either model, Ctrl-C, a killed parent)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from test_speculative import MAX_NEW, World, _full_length_sample

from cross_modal_sd.decoding import (
    DraftPolicy,
    DraftRunnerError,
    LocalRunner,
    ProcessRunner,
    ScriptedDrafter,
    ScriptedHead,
    SDConfig,
    speculative_generate,
    thread_budget,
)
from cross_modal_sd.decoding.budget import Budget, machine_cores

REPO = Path(__file__).resolve().parents[1]


class FailingDrafter(ScriptedDrafter):
    """Proposes like `ScriptedDrafter`, then fails from answer position `fail_at` on."""

    def __init__(self, *args, fail_at: int = 3, **kwargs):
        super().__init__(*args, **kwargs)
        self.fail_at = fail_at

    def next_token(self, state):
        if len(state.fed) >= self.fail_at:
            raise ValueError(f"drafter broke past position {self.fail_at}")
        return super().next_token(state)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0) until reaped; its state says it is gone.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ")[1][0] != "Z"


def _wait_gone(pid: int, seconds: float = 15) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def world():
    with thread_budget(1):
        yield World()


@pytest.fixture(scope="module")
def runner(world):
    """The L4 adapter drafter in its own process (one per module: spawning takes seconds)."""
    with ProcessRunner(world.adapter_drafter("L4"), cores=machine_cores()[:1]) as r:
        yield r


@pytest.mark.parametrize("decode", ["draft_model", "autoregressive"])
@pytest.mark.parametrize("policy", [DraftPolicy(gamma=3), DraftPolicy(kind="confidence")])
def test_process_drafter_is_lossless(world, runner, policy, decode):
    with thread_budget(1):
        for i, (t_in, d_in) in enumerate(world.samples[:8]):
            result = speculative_generate(
                world.target, runner, t_in, d_in, world.config(policy, decode)
            )
            assert result.tokens == world.reference[i]
            assert result.draft_prefill_ms > 0


def test_process_drafter_drafts_what_the_in_process_one_drafts(world, runner):
    """Same drafts, same acceptance, whichever side of the pipe the drafter is on."""
    local = world.adapter_drafter("L4")
    with thread_budget(1):
        for t_in, d_in in world.samples[:4]:
            there = speculative_generate(world.target, runner, t_in, d_in, world.config())
            here = speculative_generate(world.target, local, t_in, d_in, world.config())
            assert (there.drafted, there.accepted) == (here.drafted, here.accepted)


@pytest.mark.parametrize("where", [pytest.param("process", marks=pytest.mark.slow), "thread"])
def test_a_late_drafter_is_left_unwaited_and_its_answer_dropped(world, where):
    """``wait_for_drafter=False``: a drafter still prefilling when the target is done gives
    round 1 no drafts and is not waited for; the runner drops its late answer before its next
    command, so the next run drafts as usual."""
    i = 0
    reference = world.reference[i]
    slow = ScriptedDrafter(reference, world.limit, prefill_s=0.5)
    fast = ScriptedDrafter(reference, world.limit)
    policy = DraftPolicy(gamma="prefill", decode_gamma=3, max_drafts=6)
    impatient = SDConfig(policy, "head", MAX_NEW, world.eos, wait_for_drafter=False)
    patient = SDConfig(policy, "head", MAX_NEW, world.eos)
    t_in, d_in = world.samples[i]

    def runner_for(drafter):
        if where == "process":
            return ProcessRunner(drafter, cores=machine_cores()[:1])
        return LocalRunner(drafter)

    with thread_budget(1), runner_for(slow) as r:
        for _ in range(2):  # the second run drains the first one's late answer first
            head = ScriptedHead(reference, world.limit)
            out = speculative_generate(world.target, r, t_in, d_in, impatient, head=head)
            assert out.tokens == reference
            assert out.drafted[0] == 0 and out.draft_prefill_ms == 0 and out.wait_ms == 0
        head = ScriptedHead(reference, world.limit)
        out = speculative_generate(world.target, r, t_in, d_in, patient, head=head)
        assert out.tokens == reference and out.drafted[0] > 0  # waited: drafts
        assert out.draft_prefill_ms >= 400
    with thread_budget(1), runner_for(fast) as r:  # an early drafter: lossless as before
        head = ScriptedHead(reference, world.limit)
        out = speculative_generate(world.target, r, t_in, d_in, impatient, head=head)
        assert out.tokens == reference


@pytest.mark.parametrize("where", ["process", "thread"])
def test_the_board_shows_the_drafts_made_so_far(world, where):
    reference = world.reference[0]
    drafter = ScriptedDrafter(reference, world.limit, token_s=0.3)  # each feed: 300 ms
    policy = DraftPolicy(gamma="prefill", max_drafts=6)
    _, d_in = world.samples[0]
    runner = (
        ProcessRunner(drafter, cores=machine_cores()[:1])
        if where == "process"
        else LocalRunner(drafter)
    )
    with runner as r:
        r.set_ready(False)
        r.start_round1(d_in, policy, 6, world.eos)
        time.sleep(0.15)  # d0 is made at once; its feed runs for 300 ms
        r.set_ready(True)
        now = r.drafts_so_far()
        assert r.prefilled() and now.proposal.tokens == reference[:1]
        assert 0 < now.prefill.start <= now.prefill.end <= now.drafting.end
        r.abandon_round1()  # the round's late answer is dropped before the next command
        r.start_round1(d_in, policy, 6, world.eos)  # ready is still set: d0 only
        assert r.finish_round1().proposal.tokens == reference[:1]


@pytest.mark.parametrize("where", ["process", "thread"])
def test_the_hybrid_takes_the_drafts_made_so_far_without_waiting(world, where):
    """A drafter in the middle of a slow draft step when the target is done: the impatient
    loop takes the drafts already on the board; the patient one waits for the step."""
    i = 0
    reference = world.reference[i]
    slow_steps = ScriptedDrafter(reference, world.limit, token_s=0.25)  # a feed: 250 ms
    policy = DraftPolicy(gamma="prefill", decode_gamma=3, max_drafts=6)
    t_in, d_in = world.samples[i]
    runs = {}
    for wait in (False, True):
        config = SDConfig(policy, "head", MAX_NEW, world.eos, wait_for_drafter=wait)
        runner = (
            ProcessRunner(slow_steps, cores=machine_cores()[:1])
            if where == "process"
            else LocalRunner(slow_steps)
        )
        with thread_budget(1), runner as r:
            head = ScriptedHead(reference, world.limit)
            runs[wait] = speculative_generate(world.target, r, t_in, d_in, config, head=head)
            assert runs[wait].tokens == reference
    # d0 comes right after the draft prefill (on the board by the time the target is done,
    # unless the drafter's thread or process has not been scheduled yet); feeding it takes
    # 250 ms, far past the target's prefill: the patient loop waits for it and gets d1 too.
    assert runs[False].drafted[0] < runs[True].drafted[0] == 2
    assert runs[False].wait_ms == 0 and runs[True].wait_ms > 100


def test_waiting_only_makes_sense_where_later_rounds_do_without_the_drafter():
    with pytest.raises(ValueError, match="wait_for_drafter=False needs"):
        SDConfig(decode="draft_model", wait_for_drafter=False)
    with pytest.raises(ValueError, match="wait_for_drafter=False needs"):
        SDConfig(decode="head", round1="none", wait_for_drafter=False)


def _max_concurrent_threads(busy) -> int:
    """Most intra-op threads held at any moment by the work spans ``[start, end, threads]``."""
    events = sorted([(s, t) for s, _, t in busy] + [(e, -t) for _, e, t in busy])
    held = top = 0
    for _, change in events:  # ends sort before starts at the same instant (negative first)
        held += change
        top = max(top, held)
    return top


@pytest.mark.skipif(len(machine_cores()) < 2, reason="needs two cores")
@pytest.mark.parametrize("deployment", ["shared", "own_device"])
def test_sd_never_exceeds_its_core_budget(world, deployment):
    """Every span of target and drafter work, counted with its threads, stays within the budget
    at every moment, while round 1 really overlaps."""
    budget = Budget(2, deployment)
    plan = budget.plan(decode_threads=len(budget.target_cores))
    i = _full_length_sample(world)
    t_in, d_in = world.samples[i]
    with budget.pinned(), budget.runner(world.adapter_drafter("L4")) as runner:
        for _ in range(3):
            result = speculative_generate(world.target, runner, t_in, d_in, world.config(), plan)
            assert result.tokens == world.reference[i]
            assert _max_concurrent_threads(result.busy) <= budget.cores
    assert result.overlap_ms > 0  # the drafter worked while the target prefilled
    # The check would catch a breach: two 2-thread spans that overlap hold 4 threads.
    assert _max_concurrent_threads([[0, 2, 2], [1, 3, 2]]) == 4
    assert os.sched_getaffinity(0) == set(machine_cores())  # unpinned after the with-block


def test_budget_rejects_bad_settings():
    with pytest.raises(ValueError, match=r"cores=99: this machine lets the run use"):
        Budget(99)
    with pytest.raises(ValueError, match=r"deployment must be one of \('shared', 'own_device'\)"):
        Budget(1, "cloud")
    with pytest.raises(ValueError, match=r"leaves no core to the target"):
        Budget(1, "shared", draft_cores=1)


def test_drafter_error_is_raised_with_its_traceback_and_the_process_ends(world):
    i = _full_length_sample(world)
    t_in, d_in = world.samples[i]
    drafter = FailingDrafter(world.reference[i], world.limit, fail_at=3)
    with pytest.raises(DraftRunnerError, match=r"(?s)drafter failed in its process.*position 3"):
        with ProcessRunner(drafter) as runner:
            pid = runner.process.pid
            speculative_generate(world.target, runner, t_in, d_in, world.config())
    assert _wait_gone(pid)


def test_target_error_ends_the_drafter_process(world):
    i = _full_length_sample(world)
    t_in, d_in = world.samples[i]
    bad = type(t_in)(t_in.input_ids, t_in.pixel_values_videos[:, :, :, :5])  # wrong frame size
    with pytest.raises(Exception):  # noqa: B017 (whatever the target raises on bad pixels)
        with ProcessRunner(ScriptedDrafter(world.reference[i], world.limit)) as runner:
            pid = runner.process.pid
            speculative_generate(world.target, runner, bad, d_in, world.config())
    assert _wait_gone(pid)


_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from cross_modal_sd.decoding import ProcessRunner, ScriptedDrafter

    with ProcessRunner(ScriptedDrafter([5, 6, 7], 10)) as runner:
        print(runner.process.pid, flush=True)
        time.sleep(60)
    """
)


@pytest.mark.parametrize(
    "sig", [signal.SIGINT, pytest.param(signal.SIGKILL, marks=pytest.mark.slow)]
)
def test_no_orphan_after_ctrl_c_or_a_killed_parent(sig):
    """Ctrl-C: the parent's `with` block closes the drafter. SIGKILL (no cleanup can run): the
    drafter's parent-death signal ends it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _SCRIPT], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        pid = int(proc.stdout.readline())
        assert _alive(pid)
        proc.send_signal(sig)
        proc.wait(timeout=30)
        assert _wait_gone(pid), f"drafter process {pid} outlived its parent ({sig.name})"
    finally:
        proc.kill()
        proc.wait()


def test_closed_runner_refuses_work(world):
    runner = ProcessRunner(ScriptedDrafter(world.reference[0], world.limit))
    pid = runner.process.pid
    runner.ping()
    runner.close()
    runner.close()  # idempotent
    assert _wait_gone(pid)
    with pytest.raises(DraftRunnerError, match="not running"):
        runner.ping()
    assert torch.get_num_threads() >= 1

"""End-to-end speculative decoding: the SD loop, drafters, timing, baseline and peers."""

from cross_modal_sd.decoding.baselines import (
    GenerationRecord,
    GreedySpec,
    greedy_tokens,
    hf_assisted,
    hf_greedy,
    hf_prompt_lookup,
    wrapper_greedy,
)
from cross_modal_sd.decoding.drafters import (
    AdapterDrafter,
    Drafter,
    DraftPolicy,
    DraftState,
    Proposal,
    ScriptedDrafter,
    propose,
    sync,
)
from cross_modal_sd.decoding.heads import HeadDrafter, HeadState, ScriptedHead
from cross_modal_sd.decoding.inputs import DraftInputs, TargetInputs
from cross_modal_sd.decoding.runners import (
    DraftRunner,
    DraftRunnerError,
    LocalRunner,
    ProcessRunner,
)
from cross_modal_sd.decoding.speculative import (
    SDConfig,
    SDResult,
    TargetState,
    ThreadPlan,
    accept_length,
    extend_answer,
    speculative_generate,
    verify,
)
from cross_modal_sd.decoding.timing import Span, thread_budget, time_call

__all__ = [
    "AdapterDrafter",
    "DraftInputs",
    "DraftPolicy",
    "DraftRunner",
    "DraftRunnerError",
    "LocalRunner",
    "ProcessRunner",
    "ThreadPlan",
    "DraftState",
    "Drafter",
    "GenerationRecord",
    "GreedySpec",
    "HeadDrafter",
    "HeadState",
    "Proposal",
    "SDConfig",
    "SDResult",
    "ScriptedDrafter",
    "ScriptedHead",
    "Span",
    "TargetInputs",
    "TargetState",
    "accept_length",
    "extend_answer",
    "greedy_tokens",
    "hf_assisted",
    "hf_greedy",
    "hf_prompt_lookup",
    "propose",
    "speculative_generate",
    "sync",
    "thread_budget",
    "time_call",
    "verify",
    "wrapper_greedy",
]

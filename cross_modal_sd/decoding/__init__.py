"""End-to-end speculative decoding: the SD loop, drafters, timing, baseline and peers."""

from cross_modal_sd.decoding.baselines import (
    DecodeSpec,
    GenerationRecord,
    hf_assisted,
    hf_greedy,
    hf_prompt_lookup,
    loop_tokens,
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
from cross_modal_sd.decoding.sampling import GREEDY, Sampling, TokenChooser
from cross_modal_sd.decoding.speculative import (
    SDConfig,
    SDResult,
    TargetState,
    ThreadPlan,
    extend_answer,
    speculative_generate,
    verify,
)
from cross_modal_sd.decoding.timing import Span, thread_budget, time_call
from cross_modal_sd.decoding.trees import DraftTree, TreeShape, grow_tree, verify_tree

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
    "DraftTree",
    "Drafter",
    "GenerationRecord",
    "DecodeSpec",
    "HeadDrafter",
    "HeadState",
    "Proposal",
    "GREEDY",
    "SDConfig",
    "Sampling",
    "SDResult",
    "ScriptedDrafter",
    "ScriptedHead",
    "Span",
    "TargetInputs",
    "TargetState",
    "TokenChooser",
    "TreeShape",
    "extend_answer",
    "grow_tree",
    "loop_tokens",
    "hf_assisted",
    "hf_greedy",
    "hf_prompt_lookup",
    "propose",
    "speculative_generate",
    "sync",
    "thread_budget",
    "time_call",
    "verify",
    "verify_tree",
    "wrapper_greedy",
]

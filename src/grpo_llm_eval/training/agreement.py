"""Decisions every process takes together: a stop, a save's outcome, a fallback.

With several processes, any decision that changes what a process does next (stop and save, raise, run an
extra forward pass) must be taken by all of them at the same point, or their collectives pair different calls:
gloo fails with "a collective mismatch", NCCL hangs until its timeout. Each helper here is one all-reduce
(accelerate's `reduce`, as JudgeSpend and the monitors use), called by every process at the same place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def agree_max(accelerator, values: Sequence[int]) -> list[int]:
    """VALUES maximised element-wise over every process (each process must call this at the same point).

    A flag (0/1) set on any process is then set on all; a signal number received by any process is known to all.
    With one process (or no accelerator) VALUES come back unchanged.
    """
    if accelerator is None or accelerator.num_processes <= 1:
        return [int(v) for v in values]
    import torch

    local = torch.tensor([int(v) for v in values], dtype=torch.long, device=accelerator.device)
    return [int(v) for v in accelerator.reduce(local, reduction="max").tolist()]


def agreed_max(accelerator) -> Callable[[Sequence[int]], list[int]]:
    """`agree_max` bound to ACCELERATOR, for callbacks that are built before they can see the trainer."""
    return lambda values: agree_max(accelerator, values)


def run_agreed(accelerator, body: Callable[[], None], error: type[Exception], what: str) -> None:
    """Run BODY on this process, then agree whether it failed on any process.

    Where BODY raised ERROR here, it is raised again; where it raised ERROR on another process only, this one
    raises ERROR too (naming that process) instead of going on to a barrier that the failed process never reaches.
    Any other exception passes through at once, as before (it is a bug, not a shared outcome).
    """
    failure: Exception | None = None
    try:
        body()
    except error as exc:
        failure = exc
    if accelerator is None or accelerator.num_processes <= 1:
        if failure is not None:
            raise failure
        return
    failed = agree_max(accelerator, [accelerator.process_index + 1 if failure is not None else 0])[0]
    if failure is not None:
        raise failure
    if failed:
        raise error(f"{what} failed on process {failed - 1} (see its error line); this process stops with it. "
                    "Free space on the output disk, then resume with --resume from the last checkpoint.")

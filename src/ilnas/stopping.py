"""Stopping a long run between two steps, with a checkpoint it continues from bit-exactly.

A cluster announces the end of a job with a signal: SLURM sends SIGTERM before a preemption or at the time
limit (or the signal ``--signal`` names, e.g. SIGUSR1), submitit's jobs get SIGUSR2, and torchrun passes
SIGTERM on to its ranks. A run that gets SIGTERM, SIGUSR1 or SIGUSR2 finishes the step it is in, writes a
checkpoint there and stops (``Stopped``). Ctrl-C (SIGINT) does the same, and a second Ctrl-C interrupts
at once (KeyboardInterrupt), without that checkpoint. SIGHUP, a closed terminal or a dropped ssh session,
stops a run as SIGTERM does (unless ``nohup`` ignores it), and what the terminal would have shown goes to
/dev/null from then on. A run also writes such a checkpoint every ``checkpoint_minutes`` between its epoch
checkpoints, so a kill without warning (SIGKILL, a lost node) loses at most that much. A signal that comes
in before the first step is acted on after it.

Under torchrun the ranks agree at every step (one small all-reduce of CPU integers): they checkpoint and stop
at the same step, whichever of them got the signal first.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import torch

from ilnas import distributed
from ilnas.errors import Stopped

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGHUP)
# Ctrl-C is taken only from Python's own handler (not where it is ignored, as in a background job), a hangup
# only from the default (not where nohup ignores it).
TAKEN_ONLY_FROM = {signal.SIGINT: signal.default_int_handler, signal.SIGHUP: signal.SIG_DFL}


@dataclass(frozen=True)
class Decision:
    checkpoint: bool  # write a checkpoint after this step
    signum: int  # the stop signal (0: keep going)

    @property
    def stop(self) -> bool:
        return self.signum != 0


class StepGuard:
    """Installed around a run's steps (a context manager); ``poll()`` after each step says what to do.

    Handlers are installed only in the main thread (where Python delivers signals); a handler that was there
    before (a Python callable, say submitit's) is still called after ours notes the signal, except Python's
    own Ctrl-C handler, which only a second Ctrl-C reaches. Ctrl-C is left alone where it was not Python's
    (ignored, say, in a background job), and a hangup where it was not the default (``nohup``).
    """

    def __init__(self, checkpoint_minutes: float, process: distributed.Process):
        self.interval = checkpoint_minutes * 60.0 if checkpoint_minutes > 0 else None
        self.process = process
        self.signum = 0
        self.ctrl_c = 0
        self.interrupted = False  # by a second Ctrl-C
        self.last = time.monotonic()
        self._previous: dict[int, object] = {}
        self._terminal: list[int] = []  # stdout / stderr where they are a terminal, which a hangup takes away

    def __enter__(self) -> "StepGuard":
        if threading.current_thread() is threading.main_thread():
            self._terminal = [fd for fd in (1, 2) if os.isatty(fd)]  # asked now: a hung-up terminal says no
            for s in STOP_SIGNALS:
                if s not in TAKEN_ONLY_FROM or signal.getsignal(s) is TAKEN_ONLY_FROM[s]:
                    self._previous[s] = signal.signal(s, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _note(self, signum: int, frame) -> None:
        self.signum = self.signum or signum
        previous = self._previous.get(signum)
        if signum == signal.SIGHUP:
            self._leave_terminal()
        if signum != signal.SIGINT:
            if callable(previous):
                previous(signum, frame)
            return
        self.ctrl_c += 1
        if self.ctrl_c > 1:
            self.interrupted = True  # poll() raises it again, should the code it lands in swallow it
            previous(signum, frame)  # the second Ctrl-C: KeyboardInterrupt, now
        elif self.process.main:
            print("ilnas: Ctrl-C: stopping after this step, with a checkpoint (Ctrl-C again: at once, without)",
                  file=sys.stderr, flush=True)

    def _leave_terminal(self) -> None:
        """Writing to a hung-up terminal fails (EIO), which would stop the run before its checkpoint: its output
        goes to /dev/null instead (a stdout or stderr redirected to a file keeps its file)."""
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in self._terminal:
            os.dup2(devnull, fd)
        os.close(devnull)

    def poll(self) -> Decision:
        """After a step: whether to checkpoint now (time is up, or a stop was asked for) and whether to stop.
        Rank 0's clock decides the time; any rank's signal stops all."""
        if self.interrupted:
            raise KeyboardInterrupt
        due = int(self.interval is not None and self.process.main and time.monotonic() - self.last >= self.interval)
        signum, due = distributed.max_over_ranks([self.signum, due], self.process)
        return Decision(checkpoint=bool(due or signum), signum=signum)

    def saved(self) -> None:
        """A checkpoint was written (at a step or an epoch's end): the next one is due an interval later."""
        self.last = time.monotonic()


def stopped(signum: int, epoch: int, steps_done: int, steps: int, note: str = "") -> Stopped:
    """What a run raises after signal ``signum``, once it has checkpointed step ``steps_done`` of ``steps`` of
    ``epoch`` (0-based; all of them: the epoch's own checkpoint)."""
    where = f"step {steps_done} of {steps} of epoch {epoch + 1}" if steps_done < steps else f"epoch {epoch + 1}"
    return Stopped(f"stopped by {signal.Signals(signum).name} after {where}{note}, with a checkpoint there; continue "
                   f"with --resume (or the same command with --auto-resume)", signum)


def global_rng_state(device: torch.device) -> dict:
    """The global generators a run draws from between its reseeds (the CPU's, and ``device``'s on CUDA):
    what a checkpoint taken part-way through an epoch keeps of each rank."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_global_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)

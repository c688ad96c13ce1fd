"""When Egeria evaluates next: the interval, the run's length and what evaluations cost.

The policy evaluates every ``interval`` steps (``eval_interval``, shortened to fit about
``evaluations_per_run`` evaluations into a run of known length) and spaces evaluations out
further when their measured cost would exceed ``overhead_budget`` of training time. Two costs
are measured here rather than assumed:

- the **step time** (an EMA, pauses between steps excluded: a validation loop or a checkpoint
  is not a slow step), and the step time while the reference worker was idle: the time steps
  took beyond it while the worker ran is the worker's **contention** for the cores, its real
  cost to training (``docs/egeria.md``, "Overhead");
- where the worker runs on cores training keeps busy (CPU training on every core the process
  may use: :func:`shares_cores`), the **CPU seconds** its jobs used are its cost at the
  least. There a core the worker takes is a core training waits for, second for second
  (measured with 80 heavy evaluations on 2 cores: training took 14.5 s longer, the worker
  used 14.3 s of CPU and the policy 1.6 s of the training thread; ``docs/benchmarks.md``),
  and the contention estimate, read through a busy machine's step-to-step noise, can fall
  below them (on fine-tuning it let Egeria's cost reach 1.28% of training time). The larger
  of the two is charged: charging the CPU seconds alone made evaluations denser on the
  MNIST workload, and the two cosine runs that followed froze earlier and ended 0.35 point
  under the baseline;
- the share of the worker's time spent **building anchors** (int8 conversion): a build serves
  the next ``window`` evaluations, so it is paid in ``window`` instalments rather than all
  before the next one (MiniLM: the first job's 4.4 s of builds spaced the next evaluation 200
  steps out in a 900-step run when charged at once).

Kept apart from the policy's decisions so that the accounting is one object with one state.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable

import torch

from .rules import evaluation_gap, instalment, run_length_interval

__all__ = ["EvaluationSchedule", "PAUSE", "shares_cores", "usable_cores", "worker_shares_cores"]

logger = logging.getLogger("fxfreeze")

#: a gap between two optimizer steps this many times the average step is a pause, not a step
PAUSE = 5.0


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the system tells it, else
    the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def shares_cores(training_on_cpu: bool, training_threads: int, worker_threads: int, cores: int) -> bool:
    """Does the reference worker compete with training for cores? Only when training runs on
    the CPU and its threads and the worker's together outnumber the cores: an accelerator
    leaves the host's cores to the worker, and so does CPU training on fewer threads than cores.

    Example::

        >>> shares_cores(True, 2, 1, 2), shares_cores(True, 4, 1, 16), shares_cores(False, 16, 1, 16)
        (True, False, False)
    """
    return bool(training_on_cpu) and training_threads + worker_threads > cores


def worker_shares_cores(params: Iterable[torch.Tensor], worker_threads: int, asynchronous: bool) -> bool:
    """Should the schedule charge the worker at least its CPU seconds? Where it shares the
    cores of training on the CPU (:func:`shares_cores`, with the calling thread's intra-op
    thread count as training's), in asynchronous mode: in synchronous mode training waits for
    each job, which the training thread's seconds count already. Logged."""
    on_cpu = all(t.device.type == "cpu" for t in params)
    shares = bool(asynchronous) and shares_cores(on_cpu, torch.get_num_threads(), worker_threads, usable_cores())
    logger.info("egeria: the reference worker's cost is charged as %s", "at least its CPU seconds (it shares "
                "training's cores)" if shares else "the slowdown of the training steps it overlaps")
    return shares


class EvaluationSchedule:
    """The next evaluation's step and the measurements that place it."""

    def __init__(self, eval_interval: int, overhead_budget: float, window: int, evaluations_per_run: int,
                 min_window_steps: int) -> None:
        self.eval_interval = int(eval_interval)
        self.overhead_budget = float(overhead_budget)
        self.window = int(window)
        self.evaluations_per_run = int(evaluations_per_run)
        self.min_window_steps = int(min_window_steps)
        #: the evaluation interval in use: eval_interval, scaled to the run's planned length
        #: once it is known
        self.interval = self.eval_interval
        self.next_eval = self.eval_interval
        self.length_known = False
        self.last_step_time: float | None = None
        #: seconds per training step (EMA over steps, pauses excluded)
        self.step_seconds: float | None = None
        #: seconds per step while the worker was idle (EMA), and the time steps took beyond it
        #: while a reference job ran, since the last evaluation
        self.idle_step: float | None = None
        self.contention = 0.0
        self.worker_was_busy = False
        #: the last reference job's seconds (charged in full before any idle step is measured)
        self.last_worker_seconds = 0.0
        #: charge at least the worker's CPU seconds (set by the policy where the worker shares
        #: training's cores: :func:`shares_cores`), and those of the jobs finished since the
        #: last evaluation
        self.charge_cpu = False
        self.worker_cpu = 0.0
        #: of the last reference job's seconds, the share spent building anchors; the building
        #: cost not yet charged, and the instalment it is paid in
        self.build_share, self.build_debt, self.instalment = 0.0, 0.0, 0.0

    def tick(self, now: float) -> None:
        """A training step ended at ``now``: update the step time and the worker's contention."""
        dt = None if self.last_step_time is None else now - self.last_step_time
        if dt is not None and self.step_seconds is not None and dt > PAUSE * self.step_seconds:
            dt = None  # a pause between two steps, not a step
        if dt is None:
            return
        self.step_seconds = dt if self.step_seconds is None else 0.9 * self.step_seconds + 0.1 * dt
        if self.worker_was_busy:
            if self.idle_step is not None:
                self.contention += dt - self.idle_step
        else:
            self.idle_step = dt if self.idle_step is None else 0.9 * self.idle_step + 0.1 * dt

    def learn_length(self, total_steps: int | None, step: int) -> None:
        """The run's planned length, once known: fit about ``evaluations_per_run`` into it."""
        if self.length_known or not total_steps:
            return
        self.length_known = True
        # never so dense that a window of evidence spans fewer than min_window_steps steps
        floor = max(1, -(-self.min_window_steps // self.window))
        self.interval = run_length_interval(self.eval_interval, total_steps, self.evaluations_per_run, floor=floor)
        self.next_eval = min(self.next_eval, step + self.interval)

    def restart(self, step: int) -> None:
        """Evidence was thrown away: the next evaluation one interval from ``step``."""
        self.next_eval = step + self.interval

    def job_done(self, seconds: float, build_seconds: float, cpu_seconds: float = 0.0) -> None:
        """A reference job took ``seconds`` on the worker, ``build_seconds`` of it building
        anchors, and ``cpu_seconds`` of a core."""
        self.last_worker_seconds = seconds
        self.worker_cpu += max(0.0, float(cpu_seconds))
        if seconds > 0:
            self.build_share = min(1.0, float(build_seconds) / seconds)

    def plan(self, step: int, main_cost: float) -> None:
        """An evaluation at ``step`` cost ``main_cost`` seconds on the training thread: place
        the next one so that it and the worker's measured cost stay within the budget."""
        # before any idle step is measured the worker's busy time is charged in full (conservative)
        worker_cost = max(0.0, self.contention) if self.idle_step is not None else self.last_worker_seconds
        if self.charge_cpu:  # never less than the core time it took: the budget is a ceiling
            worker_cost = max(worker_cost, self.worker_cpu)
        self.contention, self.worker_cpu = 0.0, 0.0
        build = worker_cost * self.build_share
        self.build_share = 0.0
        paid, self.build_debt, self.instalment = instalment(self.build_debt, self.instalment, build, self.window)
        cost = main_cost + (worker_cost - build) + paid
        self.next_eval = step + evaluation_gap(self.interval, self.overhead_budget, cost, self.step_seconds)

    def state_dict(self) -> dict[str, Any]:
        return {"next_eval": self.next_eval, "interval": self.interval, "length_known": self.length_known,
                "build_debt": [self.build_debt, self.instalment]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_eval = int(state.get("next_eval", self.next_eval))
        self.interval = int(state.get("interval", self.interval))
        self.length_known = bool(state.get("length_known", self.length_known))
        self.build_debt, self.instalment = (float(x) for x in state.get("build_debt", (0.0, 0.0)))

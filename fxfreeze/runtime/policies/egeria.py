"""``egeria``: freeze the front block when its plasticity has stopped changing.

After Egeria (Wang et al., EuroSys 2023, arXiv 2201.06227). Every ``eval_interval`` steps
(shortened to fit about ``evaluations_per_run`` evaluations into a run whose planned length
is known: ``total_steps``, which the Trainer and Lightning integrations fill in; spaced out
further when the measured cost would exceed ``overhead_budget``):

1. the training side runs the model up to the last tracked block on the fixed probe batch
   (:class:`~fxfreeze.runtime.egeria.probe.ActivationProbe`); for the front block and
   ``lookahead`` blocks behind it, it hands each block's training inputs and outputs to the
   reference worker, with a copy of the block's weights when the block's anchor is due
   (first evaluation, every ``refresh_every`` evaluations while the block is not already
   looking flat, after a reset);
2. the reference worker (:class:`~fxfreeze.runtime.egeria.worker.ReferenceWorker`, a CPU
   thread) builds due anchors in int8 (or the configured precision) and runs each block's
   anchor on the block's training inputs; the SP loss against the training outputs is the
   block's plasticity (:mod:`fxfreeze.runtime.egeria.plasticity`);
3. results are consumed on later steps, whenever they are ready; the front block freezes
   when its elasticity stays under its regime's threshold (:mod:`..egeria.regime`: from
   scratch or pretrained) at ``patience`` evaluations in a row; one block per decision
   (with ``freeze_run``, together with the tracked blocks right behind it that have
   settled too). Never the head.

A learning-rate step (as the controller detects it) keeps the frozen prefix (the default),
or unfreezes the last frozen block or all of them (``unfreeze_on_lr_change``), and restarts
tracking with fresh anchors. A non-finite loss or probe activation skips the evaluation and
clears the evidence: it never triggers a freeze.
A reference job that fails or a worker that dies is logged; the worker restarts, and after
too many failures the policy stops deciding while training continues; so it does when the
probe batch cannot run through the blocks.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from ...errors import FreezeError
from ..egeria.builder import all_finite
from ..egeria.plasticity import PlasticityTracker
from ..egeria.eager_probe import EagerProbe
from ..egeria.probe import ActivationProbe, ProbeError
from ..egeria.references import References
from ..egeria.regime import Regimes
from ..egeria.worker import ReferenceWorker
from ..host_tier import HostFuture, to_host_later
from .base import Decision, Policy, Signals
from .egeria_schedule import EvaluationSchedule, worker_shares_cores
from .rules import egeria_rule, lr_step_rule

__all__ = ["EgeriaPolicy"]

logger = logging.getLogger("fxfreeze")


class EgeriaPolicy(Policy):
    name = "egeria"

    def __init__(self, config: Any, plan: Any) -> None:
        super().__init__(config, plan)
        self.cfg = config.egeria
        self.hi = plan.max_frozen
        self.tracker = PlasticityTracker(
            window=self.cfg.window, threshold=float(self.cfg.threshold), noise_limit=float(self.cfg.noise_limit)
        )
        self.timeline: list[dict[str, Any]] = []
        self.worker: ReferenceWorker | None = None
        self.probe: ActivationProbe | None = None
        self.module: Any = None
        #: when to evaluate next, and the measured costs that place it
        self.schedule = EvaluationSchedule(int(self.cfg.eval_interval), float(self.cfg.overhead_budget), int(self.cfg.window),
                                           int(self.cfg.evaluations_per_run), int(self.cfg.min_window_steps))
        self.evaluations = 0
        self.main_seconds = 0.0
        #: of main_seconds, the one-time set-up left to evaluations: not charged to the schedule
        self.setup_seconds = 0.0
        #: the set-up done at compile time (:meth:`_set_up`), not part of main_seconds
        self.compile_seconds = 0.0
        self._fresh = False
        self._disabled_reported = False
        # block -> (anchor id, evaluation and step it was taken at); ids never repeat
        self._anchor: dict[int, tuple[int, int, int]] = {}
        # block -> its weights at the anchor (a resume rebuilds the reference), maybe still in transit
        self._anchor_state: dict[int, dict[str, torch.Tensor] | HostFuture] = {}
        self._rebuild: set[int] = set()
        self._anchor_ids = 0
        # builders (training thread) and built anchors (worker thread), per block
        self.refs = References(self.cfg.reference_precision)
        self.backends, self.fallbacks, self.unmeasurable = self.refs.backends, self.refs.fallbacks, self.refs.unmeasurable
        #: per block: pretrained (held to ``pretrained_threshold`` and ``pretrained_floor_ratio``) or not
        self.regimes = Regimes(self.hi, *(float(getattr(self.cfg, k)) for k in Regimes.KEYS))

    # -- wiring ----------------------------------------------------------------------------------
    def attach(self, freezer: Any) -> None:
        self.module = freezer.module
        if self.hi == 0:
            return
        self._judge_regime()
        self.probe = ActivationProbe(self.module, int(self.cfg.probe_size), self.hi) if not self.module.eager_only else \
            EagerProbe(self.module, int(self.cfg.probe_size), self.hi, self.refs.unmeasurable, self.module.graphs.timeout)
        self.module.probe_hook = self.probe.offer
        # a lower priority only where the worker runs beside training: in synchronous mode
        # training waits for it, so starving it would stall training (and, under DDP, every rank)
        nice, threads = (int(self.cfg.worker_nice) if self.cfg.asynchronous else 0), int(self.cfg.worker_threads)
        self.worker = ReferenceWorker(num_threads=threads, job_timeout=float(self.cfg.reference_timeout), nice=nice)
        # on cores training keeps busy, the worker costs at least the CPU time it takes
        self.schedule.charge_cpu = worker_shares_cores(self.module.parameters(), threads, bool(self.cfg.asynchronous))
        self._set_up()

    def _set_up(self) -> None:
        """The one-time set-up, in ``fxfreeze.compile`` (:meth:`ActivationProbe.set_up`) instead
        of at the first evaluations in the middle of training (0.8-2.3 s on an H200, 80-130 of
        its 10-ms steps: docs/benchmarks.md, "On a GPU"). Without example inputs, or on any
        failure, the first evaluations make what is missing, as they always could."""
        assert self.probe is not None
        args, kwargs = self.module.graphs.primary_call
        if not args and not kwargs:  # compiled without example inputs: nothing to run the blocks on
            return
        t0 = time.perf_counter()
        try:
            self.probe.set_up(self._prepare_builder, [self._tracked(k).stop for k in range(self.hi)])
        except Exception as e:  # noqa: BLE001 - not fatal: what is missing, the first evaluations make
            logger.debug("egeria: set-up left to the first evaluations (%s: %s)", type(e).__name__, e)
        self.compile_seconds = time.perf_counter() - t0

    def _tracked(self, k: int) -> range:
        """The blocks an evaluation tracks with ``k`` blocks frozen: the front one and
        ``lookahead`` behind it."""
        return range(k, min(self.hi, k + 1 + int(self.cfg.lookahead)))

    def _prepare_builder(self, j: int, sub: Any, inputs: list[Any]) -> bool:
        """Block ``j``'s reference builder (training thread: it may trace); True when made now.
        A block that cannot be copied is marked unmeasurable, with a warning."""
        return self.refs.prepare_or_mark(j, sub.graph_module, inputs, self.plan.blocks[j].name)

    def _judge_regime(self) -> None:
        """Judged once, on the weights as compiled, before training shapes them."""
        named = self.module.params_by_name
        self.regimes.judge([[named[n] for n in b.params if n in named] for b in self.plan.blocks[: self.hi]],
                           detect=bool(self.cfg.detect_pretrained))
        self.regimes.apply_to(self.tracker)
        logger.info("egeria: %s", self.regimes.describe())

    @property
    def pretrained(self) -> list[bool]:
        """Per block: are its weights pretrained?"""
        return self.regimes.pretrained

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close(timeout=60.0, drop_queued=True)  # its results no longer matter
        if self.module is not None and getattr(self.module, "probe_hook", None) is not None:
            self.module.probe_hook = None

    @property
    def interval(self) -> int:
        """The evaluation interval in use (``eval_interval`` scaled to the planned run)."""
        return self.schedule.interval

    @property
    def next_eval(self) -> int:
        """The step of the next evaluation."""
        return self.schedule.next_eval

    # -- the decision ------------------------------------------------------------------------------
    def decide(self, s: Signals) -> Decision | None:
        now = time.perf_counter()
        sched = self.schedule
        sched.tick(now)
        sched.learn_length(s.total_steps, s.step)
        if self.worker is None or self.probe is None:
            sched.last_step_time = now
            return None
        try:
            return self._decide(s)
        except ProbeError as e:  # nothing to measure on: no decisions, training goes on
            logger.warning("egeria: %s; no further freezing decisions", e)
            self.probe = None
            return None
        finally:
            end = time.perf_counter()
            self.main_seconds += end - now
            sched.last_step_time = end
            sched.worker_was_busy = bool(self.worker.pending)

    def _decide(self, s: Signals) -> Decision | None:
        assert self.worker is not None and self.probe is not None
        self._consume(s)
        if self.worker.disabled:
            if not self._disabled_reported:
                logger.warning("egeria: the reference worker failed repeatedly (%s); no further freezing decisions",
                               "; ".join(self.worker.failures[-3:]))
                self._disabled_reported = True
            return None
        if s.lr_changed:
            return self._on_lr_change(s)
        if s.loss_nonfinite:
            self._reset(s)
            self.timeline.append({"step": s.step, "skipped": "non-finite loss"})
            return None
        if s.step >= self.schedule.next_eval and s.num_frozen < self.hi:
            if self.probe.ready:
                self._evaluate(s)
            else:
                self.probe.note_waiting()
        k = s.num_frozen
        new = None
        if self._fresh:  # a new result for the front block: the only time the decision can change
            run = len(self._tracked(k)) if self.cfg.freeze_run else 1
            new = egeria_rule(self.tracker.flat_count, k, self.hi, int(self.cfg.patience), run)
        if self.cfg.freeze and new is not None:
            self._fresh = False
            details = "; ".join(f"block {j} ({self.regimes.label(j)}): {self.tracker.describe(j)}" for j in range(k, new))
            which = f"block {k}" if new == k + 1 else f"blocks {k}-{new - 1}"
            return Decision(new, f"Egeria: {which} settled at {self.cfg.patience} evaluations in a row ({details})")
        return None

    def _on_lr_change(self, s: Signals) -> Decision | None:
        mode = self.cfg.unfreeze_on_lr_change
        self._reset(s)
        k = lr_step_rule(mode, s.num_frozen)
        return None if k is None else Decision(k, f"Egeria: learning rate changed, unfreezing ({mode})")

    def _reset(self, s: Signals) -> None:
        """Forget the evidence and the anchors (results still in flight are dropped)."""
        self.tracker.reset()
        self._anchor, self._anchor_state, self._rebuild = {}, {}, set()
        self._fresh = False
        self.schedule.restart(s.step)

    # -- evaluation ---------------------------------------------------------------------------------
    def _evaluate(self, s: Signals) -> None:
        assert self.worker is not None and self.probe is not None
        t0 = time.perf_counter()
        tracked = self._tracked(s.num_frozen)
        # the probe's graphs (made in compile, unless that could not run) are set-up, never
        # charged to the schedule: one MiniLM capture pushed an evaluation 180-480 steps out
        tp = time.perf_counter()
        depth = self.probe.depth(tracked.stop)
        self.probe.prepare(tracked.start, depth)
        one_time = time.perf_counter() - tp
        # blocks past the tracked ones (rounded up to a prepared depth) need not run. The values
        # go to the host without the training thread waiting or allocating; the worker checks
        # them (a check here reads them: 9-85 ms of an H200's training thread per evaluation)
        device_values = self.probe.run(hi=depth)
        values = to_host_later(device_values, copy=False)
        self.evaluations += 1
        jobs = []
        for j in tracked:
            if j in self.unmeasurable:
                continue
            sub = self.probe.block(j)
            state: Any = None
            anchor = self._anchor.get(j)
            due = anchor is None or (
                self.evaluations - anchor[1] >= self.cfg.refresh_every and not self._near_flat(j)
            )
            if due:
                tb = time.perf_counter()
                # made at compile time, unless that could not run (it needs the inputs' structure only)
                if self._prepare_builder(j, sub, [device_values[n] for n in sub.inputs]):
                    one_time += time.perf_counter() - tb
                if j in self.unmeasurable:
                    continue
                state = to_host_later(dict(sub.graph_module.state_dict()))  # never blocks the training stream
                self._anchor_ids += 1
                anchor = (self._anchor_ids, self.evaluations, s.step)
                self._anchor[j] = anchor
                self._anchor_state[j] = state
                self.tracker.reset([j])
            elif j in self._rebuild:  # resumed: rebuild the saved anchor's reference
                self._prepare_builder(j, sub, [device_values[n] for n in sub.inputs])
                state = self._anchor_state[j]
            self._rebuild.discard(j)
            if j in self.unmeasurable:
                continue
            jobs.append((j, anchor[0], sub.inputs, sub.outputs, state))
        del device_values
        tag = ("eval", self.evaluations, s.step)
        k = s.num_frozen
        if jobs:
            self.worker.submit(lambda: self._job(jobs, k, values), tag=tag)
        if jobs and not self.cfg.asynchronous:
            self.worker.wait(timeout=self.worker.job_timeout)
            self._consume(s)
        self.setup_seconds += one_time
        self.schedule.plan(s.step, time.perf_counter() - t0 - one_time)

    def _near_flat(self, j: int) -> bool:
        """Keep an old anchor while its block is close to passing: a refresh would throw the
        evidence away just before the decision."""
        t = self.tracker.last_trend.get(j)
        thr = self.tracker.threshold_of(j)
        return self.tracker.flat_count.get(j, 0) > 0 or (t is not None and t.elasticity < min(2 * thr, thr + 0.5))

    def _job(self, jobs: list[Any], k: int, values: HostFuture) -> dict[str, Any]:
        """On the worker thread: wait for the evaluation's copies to the host (the probe's
        values, and the weights of anchors due), check that the probe is finite, run the job.
        ``jobs`` name each block's inputs and outputs among the values."""
        vals = values.result()
        if not all_finite(vals):
            return {"skipped": "non-finite probe activation"}
        ready = [(j, anchor_id, [vals[n] for n in ins], [vals[n] for n in outs], _landed(state))
                 for j, anchor_id, ins, outs, state in jobs]
        return self._reference_job(ready, k)

    def _reference_job(self, jobs: list[Any], k: int) -> dict[str, Any]:
        """On the worker thread (:meth:`References.run`)."""
        return self.refs.run(jobs, k)

    def _consume(self, s: Signals) -> None:
        assert self.worker is not None
        for res in self.worker.poll():
            tag = res.tag
            if not (isinstance(tag, tuple) and tag and tag[0] == "eval"):
                if res.error:
                    logger.warning("egeria: reference job failed: %s", res.error)
                continue
            _, eval_no, step = tag
            build = float(res.value.get("build_seconds", 0.0)) if res.error is None else 0.0
            self.schedule.job_done(res.seconds, build, res.cpu_seconds)
            # a failed job (anchors it was to build may be missing), or a probe found non-finite on the worker
            skipped = res.error if res.error is not None else res.value.get("skipped")
            if skipped:
                if res.error is not None:
                    logger.warning("egeria: evaluation at step %d failed on the reference worker: %s", step, res.error)
                self.timeline.append({"step": step, "evaluation": eval_no, "skipped": skipped})
                self._anchor, self._anchor_state, self._rebuild = {}, {}, set()
                self.tracker.reset()
                continue
            rec: dict[str, Any] = {"step": step, "evaluation": eval_no, "num_frozen": s.num_frozen, "plasticity": {},
                                   "normalized": {}, "trend": {}, "backend": dict(res.value["backend"]),
                                   "worker_seconds": round(res.seconds, 4), "worker_cpu_seconds": round(res.cpu_seconds, 4)}
            for j in res.value["missing"]:
                self._anchor.pop(j, None)
                self._anchor_state.pop(j, None)
                self.tracker.reset([j])
            for j, (anchor_id, p) in sorted(res.value["plasticity"].items()):
                anchor = self._anchor.get(j)
                if j < s.num_frozen or anchor is None or anchor[0] != anchor_id:
                    continue  # frozen since, or measured against an anchor replaced since
                self.tracker.add(j, p, step, origin=anchor[2])
                rec["plasticity"][j] = p
                rec["normalized"][j] = self.tracker.normalized(j)
                t = self.tracker.last_trend.get(j)
                rec["trend"][j] = None if t is None else [round(t.elasticity, 4), round(t.noise, 4)]
                if j == s.num_frozen:
                    self._fresh = True
            self.timeline.append(rec)

    # -- checkpointing ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything the next decisions depend on: the schedule (with the anchor builds not
        yet paid for), the anchors (with the block weights they were taken from, so that a
        resume rebuilds the same references), the plasticity evidence and the probe batch.
        Plain data and tensors (``torch.load`` with ``weights_only=True``). In synchronous
        mode a resume continues exactly; in the default asynchronous mode results arrive
        when the worker is done, which no run reproduces."""
        return {
            **self.schedule.state_dict(),
            "evaluations": self.evaluations,
            "fresh": self._fresh,
            "anchor_ids": self._anchor_ids,
            "anchor": {int(j): list(a) for j, a in self._anchor.items()},
            # (weights still on their way from an accelerator are waited for)
            "anchor_state": {int(j): dict(_landed(st)) for j, st in self._anchor_state.items() if j in self._anchor},
            "tracker": self.tracker.state_dict(),
            "probe": None if self.probe is None else self.probe.state_dict(),
            "pretrained": self.regimes.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict):
            raise FreezeError("egeria policy state must be a dict")
        self.schedule.load_state_dict(state)
        self.evaluations = int(state.get("evaluations", 0))
        self._fresh = bool(state.get("fresh", False))
        self._anchor_ids = int(state.get("anchor_ids", self._anchor_ids))
        self._anchor = {int(j): (int(a[0]), int(a[1]), int(a[2])) for j, a in state.get("anchor", {}).items()}
        self._anchor_state = {int(j): dict(st) for j, st in state.get("anchor_state", {}).items()}
        self._anchor = {j: a for j, a in self._anchor.items() if j in self._anchor_state}
        self._rebuild = set(self._anchor)
        self.refs.built.clear()
        self.tracker.reset()
        if "tracker" in state:
            self.tracker.load_state_dict(dict(state["tracker"]))
        probe = state.get("probe")
        if probe is not None and self.probe is not None:
            self.probe.load_state_dict(probe)
        if self.regimes.load_state_dict(state.get("pretrained")):  # judged on the weights as first compiled
            self.regimes.apply_to(self.tracker)


def _landed(state: Any) -> Any:
    """Weights that may still be on their way to the host, once they are there."""
    return state.result() if isinstance(state, HostFuture) else state

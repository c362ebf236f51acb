"""Asynchronous advantage actor-critic (A3C) for the AHM agent: worker processes and a shared optimiser.

The global agent's parameters and the Adam moments live in shared memory. The MIM loop pushes
transitions (images, mask, actor-chosen indices, per-patch losses) to a bounded queue without ever
waiting: a full queue drops the transition and counts it. Each worker copies the current global
weights into its local agent, computes the agent loss and its gradients on one transition, and
applies them to the global parameters with the shared Adam. The optimiser step holds a lock (the
Adam moments and step count must stay consistent with each other); the forward/backward passes,
which are the cost, run in parallel, and the MIM loop reads the global weights without a lock.

Shut-down is explicit (`close`), on garbage collection and at interpreter exit (weakref finalizer);
workers ignore Ctrl-C (the parent decides) and leave on their own if the parent process disappears.
"""

from __future__ import annotations

import contextlib
import os
import queue as queue_mod
import signal
import time
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from ahm.errors import AhmError

GRAD_CLIP = 1.0  # max gradient norm of one worker update (the synchronous loop clips jointly with the model)
_POLL_S = 0.2  # how often an idle worker checks for stop / a vanished parent


class SharedAdam:
    """Adam whose moments and step count are shared-memory tensors, steppable from any process."""

    def __init__(self, params: list[Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, shared: tuple[list[Tensor], list[Tensor], Tensor] | None = None) -> None:
        self.params = list(params)
        self.lr = float(lr)
        self.betas = betas
        self.eps = eps
        if shared is None:
            self.exp_avg = [torch.zeros_like(p).share_memory_() for p in self.params]
            self.exp_avg_sq = [torch.zeros_like(p).share_memory_() for p in self.params]
            self.step_count = torch.zeros((), dtype=torch.int64).share_memory_()
        else:
            self.exp_avg, self.exp_avg_sq, self.step_count = shared

    def shared(self) -> tuple[list[Tensor], list[Tensor], Tensor]:
        return self.exp_avg, self.exp_avg_sq, self.step_count

    @torch.no_grad()
    def step(self, grads: list[Tensor | None]) -> None:
        self.step_count += 1
        t = int(self.step_count)
        beta1, beta2 = self.betas
        bias1 = 1.0 - beta1 ** t
        bias2 = 1.0 - beta2 ** t
        for param, grad, m, v in zip(self.params, grads, self.exp_avg, self.exp_avg_sq):
            if grad is None:
                continue
            m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            param.addcdiv_(m, (v / bias2).sqrt_().add_(self.eps), value=-self.lr / bias1)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": int(self.step_count),
            "exp_avg": [m.clone() for m in self.exp_avg],
            "exp_avg_sq": [v.clone() for v in self.exp_avg_sq],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = [tuple(p.shape) for p in self.params]
        for key in ("exp_avg", "exp_avg_sq"):
            theirs = [tuple(t.shape) for t in state.get(key, [])]
            if theirs != mine:
                raise AhmError(
                    "policy checkpoint: the A3C optimiser state does not fit this agent "
                    f"({len(theirs)} tensors vs {len(mine)}, or other shapes); resume with the same --agent-dim, "
                    "--agent-depth, --agent-heads, --patch-size and --image-size"
                )
        with torch.no_grad():
            for dst, src in zip(self.exp_avg + self.exp_avg_sq, list(state["exp_avg"]) + list(state["exp_avg_sq"])):
                dst.copy_(src)
            self.step_count.fill_(int(state.get("step", 0)))


def _worker_main(rank: int, agent_kwargs: dict[str, Any], loss_kwargs: dict[str, Any], global_agent: nn.Module,
                 adam_shared: tuple, adam_lr: float, lock: Any, transitions: Any, results: Any, errors: Any,
                 processed: Any, stop: Any, parent_pid: int, seed: int) -> None:
    """One A3C worker: pull transition, local forward/backward, apply gradients to the global agent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the whole group; the parent shuts us down
    torch.set_num_threads(1)
    results.cancel_join_thread()
    try:
        from ahm.masking.ahm.agent import build_agent
        from ahm.masking.ahm.losses import agent_loss

        torch.manual_seed(seed + 7919 * (rank + 1))
        local = build_agent(**agent_kwargs)
        global_params = list(global_agent.parameters())
        optimizer = SharedAdam(global_params, adam_lr, shared=adam_shared)
        while not stop.is_set():
            try:
                item = transitions.get(timeout=_POLL_S)
            except queue_mod.Empty:
                if os.getppid() != parent_pid:
                    return
                continue
            if item is None:
                return
            if "fault" in item:
                raise RuntimeError(item["fault"])
            local.load_state_dict(global_agent.state_dict())
            logits, values = local(item["images"].float())
            loss, parts = agent_loss(logits, values, item["mask"], item["hard_idx"], item["loss"], **loss_kwargs)
            local.zero_grad(set_to_none=True)
            applied = bool(torch.isfinite(loss))
            if applied:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(local.parameters(), GRAD_CLIP)
                with lock:
                    optimizer.step([p.grad for p in local.parameters()])
            with processed.get_lock():
                processed.value += 1
            if applied:
                with contextlib.suppress(queue_mod.Full):
                    results.put_nowait({key: float(value) for key, value in parts.items()})
    except BaseException as exc:  # noqa: BLE001 - any failure is reported to the parent, then exit 1
        errors.put((rank, f"{type(exc).__name__}: {exc}".splitlines()[0]))
        errors.close()
        errors.join_thread()  # the message must reach the pipe before this process ends
        raise SystemExit(1) from None


def _shutdown(procs: list[Any], queues: list[Any], stop: Any, timeout: float) -> None:
    """Stop the workers: signal, wait, then terminate and kill stragglers; never leaves a child running."""
    stop.set()
    for _ in procs:
        with contextlib.suppress(queue_mod.Full, ValueError, OSError):
            queues[0].put_nowait(None)
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
            proc.join(2.0)
        if proc.is_alive():
            proc.kill()
            proc.join(2.0)
    for q in queues:
        q.cancel_join_thread()
        q.close()


class A3CWorkers:
    """N worker processes training the shared global `agent` from pushed transitions (started on first push)."""

    def __init__(self, agent: nn.Module, num_workers: int, queue_size: int, lr: float,
                 loss_kwargs: dict[str, Any], seed: int = 0, shutdown_timeout: float = 10.0) -> None:
        if num_workers < 1:
            raise AhmError(f"--agent-workers must be at least 1 for asynchronous training, got {num_workers}")
        self.agent = agent
        self.num_workers = int(num_workers)
        self.queue_size = max(1, int(queue_size))
        self.loss_kwargs = dict(loss_kwargs)
        self.seed = int(seed)
        self.shutdown_timeout = shutdown_timeout
        self.optimizer = SharedAdam(list(agent.parameters()), lr)
        self.pushed = 0
        self.dropped = 0
        self._pushed_since_start = 0
        self._procs: list[Any] = []
        self._failure: str | None = None
        self._closed = False
        self._finalizer: weakref.finalize | None = None
        self._lock: Any = None

    @property
    def started(self) -> bool:
        return bool(self._procs)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    @property
    def updates(self) -> int:
        """Optimiser steps applied to the global agent so far (including those before a resume)."""
        return int(self.optimizer.step_count)

    def start(self) -> None:
        if self.started or self._closed:
            return
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._lock = ctx.Lock()
        self._transitions = ctx.Queue(maxsize=self.queue_size)
        self._results = ctx.Queue(maxsize=256)
        self._errors = ctx.Queue()
        self._processed = ctx.Value("q", 0)
        self._stop = ctx.Event()
        agent_kwargs = self.agent.init_kwargs()
        procs = []
        for rank in range(self.num_workers):
            proc = ctx.Process(
                target=_worker_main,
                args=(rank, agent_kwargs, self.loss_kwargs, self.agent, self.optimizer.shared(), self.optimizer.lr,
                      self._lock, self._transitions, self._results, self._errors, self._processed, self._stop,
                      os.getpid(), self.seed),
                name=f"ahm-a3c-worker-{rank}",
                daemon=True,
            )
            procs.append(proc)
        self._procs = procs
        # the finalizer holds no reference to self: it runs on close(), on garbage collection and at exit
        self._finalizer = weakref.finalize(
            self, _shutdown, procs, [self._transitions, self._results, self._errors], self._stop,
            self.shutdown_timeout,
        )
        try:
            for proc in procs:
                proc.start()
        except BaseException:
            self.close()
            raise

    def push(self, transition: dict[str, Any]) -> bool:
        """Queue a transition for the workers without waiting; False (and counted) when the queue is full."""
        self.check()
        if self._closed:
            raise AhmError("A3C workers were already stopped (policy closed); no more transitions can be trained on")
        self.start()
        if self._transitions.full():
            self.dropped += 1
            return False
        try:
            # placed in shared memory here, not in the queue's feeder thread, so a full /dev/shm is an error
            # the run sees instead of a transition silently lost
            for value in transition.values():
                if isinstance(value, Tensor):
                    value.share_memory_()
        except RuntimeError as exc:
            raise AhmError(
                f"--agent-workers: could not put a transition in shared memory ({str(exc).splitlines()[0][:100]}); "
                "free /dev/shm, lower masking.queue_size or use --agent-workers 0"
            ) from exc
        try:
            self._transitions.put_nowait(transition)
        except queue_mod.Full:
            self.dropped += 1
            return False
        self.pushed += 1
        self._pushed_since_start += 1
        return True

    def inject_fault(self, message: str = "injected worker fault") -> None:
        """Test hook: the worker that takes this transition raises RuntimeError(message)."""
        self.start()
        self._transitions.put({"fault": message}, timeout=10.0)
        self._pushed_since_start += 1

    def collect(self) -> dict[str, float]:
        """Mean of the loss parts the workers reported since the last call (empty if none); raises on failure."""
        self.check()
        if not self.started:
            return {}
        reports: list[dict[str, float]] = []
        while True:
            try:
                reports.append(self._results.get_nowait())
            except (queue_mod.Empty, OSError, ValueError):
                break
        if not reports:
            return {}
        return {key: sum(r[key] for r in reports) / len(reports) for key in reports[0]}

    def _drain_errors(self) -> list[tuple[int, str]]:
        found = []
        while True:
            try:
                found.append(self._errors.get_nowait())
            except (queue_mod.Empty, OSError, ValueError):
                return found

    def check(self) -> None:
        """Raise AhmError (and stop every worker) if a worker failed."""
        if self._failure is not None:
            raise AhmError(self._failure)
        if not self.started or self._closed:
            return
        errors = self._drain_errors()
        dead = [(rank, proc) for rank, proc in enumerate(self._procs) if proc.exitcode is not None]
        if not errors and dead:
            errors = self._drain_errors()  # the error may have arrived just before the exit
        if errors:
            rank, message = errors[0]
        elif dead:
            rank, proc = dead[0]
            message = f"the process ended unexpectedly (exit code {proc.exitcode})"
        else:
            return
        self._failure = f"A3C worker {rank} failed: {message}"
        self.close()
        raise AhmError(self._failure)

    def flush(self, timeout: float = 60.0) -> None:
        """Wait until every queued transition has been applied (or a worker failed: AhmError)."""
        if not self.started:
            self.check()
            return
        deadline = time.monotonic() + timeout
        while self._processed.value < self._pushed_since_start:
            self.check()
            if self._closed:
                return
            if time.monotonic() > deadline:
                raise AhmError(f"A3C workers did not apply the queued transitions within {timeout:.0f} s")
            time.sleep(0.005)
        self.check()

    def state_dict(self) -> dict[str, Any]:
        self.check()  # a checkpoint is never written over a failed worker unnoticed (e.g. on the last step)
        # the lock gives a consistent snapshot; a timeout, in case a killed worker died holding it
        locked = self._lock is not None and not self._closed and self._lock.acquire(timeout=5.0)
        try:
            adam = self.optimizer.state_dict()
        finally:
            if locked:
                self._lock.release()
        return {"adam": adam, "transitions_pushed": self.pushed, "transitions_dropped": self.dropped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["adam"])
        self.pushed = int(state.get("transitions_pushed", 0))
        self.dropped = int(state.get("transitions_dropped", 0))

    def close(self) -> None:
        """Stop all workers (safe to call twice)."""
        self._closed = True
        if self._finalizer is not None:
            self._finalizer()

"""Each epoch's report, from Ray Train's controller back to the driver that called ``fit``.

Ray Train calls ``UserCallback.after_report`` on its controller actor, whose output reaches the console
only in verbose mode (``ptm_ray.console``). ``EpochStream`` gives that callback a queue (a zero-CPU Ray
actor, one per driver for all its runs) and drains it on a driver thread while ``trainer.fit()`` blocks,
handing rank 0's metrics of each epoch, and the checkpoint saved with them, to the driver's listeners: the
epoch line and the trackers.
Rank 0 also puts its steps through each epoch on that queue (``ptm_ray.worker.StepProgress``): on a
terminal ``StepBar`` draws them as a progress bar that the epoch's line replaces; in a log, nothing.
``CountBar`` is the same kind of bar for work the driver itself counts (a feature-cache build's rows).
``SearchProgress`` is the search's counterpart, a Ray Tune callback on the search's driver (lines, and on a
terminal a bar of the trials finished). ``RunsProgress`` is ``EpochStream``'s for runs that train inside Tune
trials (``ptm_ray.tune.fit_in_trials``): each epoch's line and each run's trackers.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Callable, TextIO

import ray
from ray.train import UserCallback
from ray.tune import Callback
from ray.tune.result import AUTO_RESULT_KEYS
from ray.util.queue import Empty, Queue

__all__ = ["CountBar", "EpochListener", "EpochStream", "RunsProgress", "SearchProgress", "StepBar"]

EpochListener = Callable[[dict[str, Any], "str | None"], None]
"""Called on the driver with rank 0's metrics of an epoch and the path of its checkpoint (or None)."""


class _ForwardReports(UserCallback):
    """On the controller: put rank 0's metrics and the checkpoint path of every report on the queue."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics:
            self.queue.put(("epoch", dict(metrics[0]), checkpoint.path if checkpoint is not None else None))


class StepBar:
    """A progress bar of rank 0's steps through the current epoch, drawn only on a terminal (a log file or
    a pipe keeps its one line per epoch). The bar clears itself before the epoch's line is printed."""

    def __init__(self, epochs: int, stream: TextIO | None = None) -> None:
        self.epochs, self.stream = epochs, stream or sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar: Any = None
        self.epoch = 0

    def update(self, epoch: int, done: int, total: int) -> None:
        """``done`` of ``total`` steps of ``epoch`` (1-based) are finished."""
        if not self.enabled:
            return
        if self.bar is None or epoch != self.epoch:
            from tqdm import tqdm

            self.close()
            # every update drawn (the workers send at most two a second); leave=False: the epoch's line replaces it
            self.bar = tqdm(total=total, initial=done, desc=f"[ptm_ray] epoch {epoch}/{self.epochs}", unit="step",
                            leave=False, file=self.stream, dynamic_ncols=True, mininterval=0, miniters=1)
            self.epoch = epoch
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class CountBar:
    """``with CountBar(total, desc, unit) as bar: bar.update(n)``: a bar of items done, drawn only on a terminal
    and cleared when done (the line that reports the finished work takes its place)."""

    def __init__(self, total: int, desc: str, unit: str, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.bar: Any = None
        if getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=self.stream, dynamic_ncols=True,
                            mininterval=0, miniters=1)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def __enter__(self) -> "CountBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()


_QUEUES: dict[str, Queue] = {}


def _driver_queue() -> Queue:
    """This driver's queue on the Ray it is connected to: started by its first run, reused by the next (an actor
    is a process to start: 1-2 s of CPU each run), drained empty by each run before it returns."""
    node = ray.get_runtime_context().get_node_id()  # a new Ray (re-initialised in this process) gets its own
    if node not in _QUEUES:
        _QUEUES[node] = Queue(actor_options={"num_cpus": 0})
    return _QUEUES[node]


class EpochStream:
    """``with EpochStream(listeners) as stream: trainer.fit()`` with ``stream.callback`` in the RunConfig."""

    def __init__(self, listeners: list[EpochListener], bar: StepBar | None = None) -> None:
        self.listeners, self.bar = listeners, bar
        self.queue = _driver_queue()
        self.callback = _ForwardReports(self.queue)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="ptm_ray-epochs", daemon=True)

    def __enter__(self) -> "EpochStream":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._deliver_pending()
        if self.bar is not None:
            self.bar.close()

    def _drain(self) -> None:
        while not self._stop.is_set():
            try:
                item = self.queue.get(timeout=0.5)
            except Empty:
                continue
            self._deliver(item)

    def _deliver_pending(self) -> None:
        while True:
            try:
                item = self.queue.get_nowait()
            except Empty:
                return
            self._deliver(item)

    def _deliver(self, item: tuple) -> None:
        if item[0] == "steps":  # ("steps", epoch, done, total) from rank 0's loop
            if self.bar is not None:
                self.bar.update(*item[1:])
            return
        _, metrics, checkpoint = item
        if self.bar is not None:
            self.bar.close()  # the epoch's line takes the bar's place
        for listener in list(self.listeners):
            try:
                listener(metrics, checkpoint)
            except Exception as e:  # noqa: BLE001 - a failing tracker must not stop training: say so once, drop it
                print(f"[ptm_ray] warning: {getattr(listener, '__qualname__', listener)} failed and is turned off "
                      f"for this run: {type(e).__name__}: {e}", flush=True)
                self.listeners.remove(listener)


class SearchProgress(Callback):
    """Ray Tune callback on the search's driver: a line per trial epoch and per finished trial, with how many
    trials are done, running and pending and the best score so far (Tune's own tables only in verbose mode).
    On a terminal, a bar of the trials finished out of ``total`` stays under those lines."""

    def __init__(self, metric: str, mode: str, epochs: int, total: int | None = None,
                 stream: TextIO | None = None) -> None:
        self.metric, self.sign, self.epochs = metric, (1 if mode == "max" else -1), epochs
        self.best: tuple[float, str] | None = None
        self.total, self.stream = total, stream
        self.bar: Any = None  # made at the first event: Tune may copy or pickle its callbacks before the run

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"bar": None, "stream": None}

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        score = result.get(self.metric)
        if isinstance(score, (int, float)) and (self.best is None or self.sign * score > self.sign * self.best[0]):
            self.best = (float(score), trial.trial_id)
        shown = f"{self.metric}={score:.4f}" if isinstance(score, (int, float)) else f"{self.metric}=-"
        self._line(f"[ptm_ray] search: trial {trial.trial_id} epoch {result.get('epoch', '?')}/{self.epochs} {shown} | "
                   f"{self._counts(trials)} | {self._best()}", trials)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        epochs = (trial.last_result or {}).get("epoch", 0)
        how = "ran every epoch" if epochs >= self.epochs else f"stopped after epoch {epochs}"
        self._line(f"[ptm_ray] search: trial {trial.trial_id} finished ({how}) | {self._counts(trials, trial)}",
                   trials, trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(f"[ptm_ray] search: trial {trial.trial_id} failed; its error is in {trial.local_path} | "
                   f"{self._counts(trials, trial)}", trials, trial)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _line(self, line: str, trials: list, ending: Any = None) -> None:
        """Print ``line``; on a terminal above the bar, which then shows the trials done and the best so far."""
        stream = self.stream or sys.stderr
        if self.bar is None and self.total and getattr(stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc="[ptm_ray] search", unit="trial", file=stream, dynamic_ncols=True,
                            mininterval=0, miniters=1)
        if self.bar is None:
            print(line, flush=True)
            return
        self.bar.write(line, file=sys.stdout)
        states = ["TERMINATED" if t is ending else t.status for t in trials]
        self.bar.update(sum(s in ("TERMINATED", "ERROR") for s in states) - self.bar.n)
        self.bar.set_postfix_str(f"{states.count('RUNNING')} running | {self._best()}")

    def _counts(self, trials: list, ending: Any = None) -> str:
        """Trials done, running, pending; ``ending``, the trial whose end Tune reports, counts as done (Tune
        sets its status after the callbacks)."""
        states = ["TERMINATED" if t is ending else t.status for t in trials]
        done = sum(s in ("TERMINATED", "ERROR") for s in states)
        return f"{done} done, {states.count('RUNNING')} running, {states.count('PENDING')} pending"

    def _best(self) -> str:
        return f"best {self.metric}={self.best[0]:.4f} ({self.best[1]})" if self.best else "no score yet"


class RunsProgress(Callback):
    """Ray Tune callback on the driver of runs that train inside Tune trials, one run a trial (``fit_in_trials``):
    what ``fit``'s driver does for a Ray Train run. A line naming the run when its trial starts, each epoch's
    line, and the run's trackers (``ptm_ray.tracking.RunTracker``: its MLflow run, TensorBoard events in the
    run's folder) fed every epoch and given the best checkpoint when the run ends.

    ``runs``: each run's config by the trial's ``config["run"]``.
    """

    def __init__(self, runs: dict[str, Any]) -> None:
        self.runs = runs
        self.trackers: dict[str, Any] = {}  # made at the run's start: Tune may copy or pickle its callbacks first
        self.best: dict[str, tuple[tuple[float, int], str]] = {}  # run -> ((sign * score, epoch), checkpoint path)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"trackers": {}}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from ptm_ray.checkpoint import as_uri
        from ptm_ray.config import storage_path
        from ptm_ray.tracking import RunTracker

        run = trial.config["run"]
        cfg = self.runs[run]
        print(f"[ptm_ray] run {run}: training in a Tune trial ({trial.trial_id})", flush=True)
        self.trackers[run] = RunTracker(cfg, run, as_uri(trial.path, storage_path(cfg)))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        from ptm_ray.checkpoint import as_uri
        from ptm_ray.config import storage_path
        from ptm_ray.console import epoch_line

        run = trial.config["run"]
        cfg = self.runs[run]
        metrics = reported_metrics(result)
        print(epoch_line(metrics, cfg.train.epochs, metrics.get("stop_reason") == "early_stopping"), flush=True)
        checkpoint = None
        if result.get("checkpoint_dir_name"):
            checkpoint = as_uri(f"{trial.path}/{result['checkpoint_dir_name']}", storage_path(cfg))
            score = metrics.get(cfg.train.metric)
            if isinstance(score, (int, float)):
                rank = ((1 if cfg.train.mode == "max" else -1) * score, int(metrics.get("epoch", 0)))
                if run not in self.best or rank >= self.best[run][0]:  # the latest of equal scores, as Tune keeps it
                    self.best[run] = (rank, checkpoint)
        if run in self.trackers:
            self.trackers[run].log_epoch(metrics, checkpoint)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial.config["run"], failed=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(f"[ptm_ray] run {trial.config['run']} failed; its error is in {trial.local_path}", flush=True)
        self._finish(trial.config["run"], failed=True)

    def _finish(self, run: str, failed: bool) -> None:
        tracker = self.trackers.pop(run, None)
        if tracker is not None:
            tracker.finish(None if failed or run not in self.best else self.best[run][1])


# Keys Tune adds to every result of a trial (``AUTO_RESULT_KEYS`` and its bookkeeping); the rest the trial reported.
_TUNE_KEYS = frozenset((*AUTO_RESULT_KEYS, "trial_id", "experiment_tag", "done", "should_checkpoint"))


def reported_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """A Tune result without the keys Tune adds: the metrics the trial reported."""
    return {k: v for k, v in result.items() if k not in _TUNE_KEYS}

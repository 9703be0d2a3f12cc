"""Safety metrics in a trainer's own logs: TensorBoard and W&B scalars per training step.

    from corral.observe.trainer_log import SafetyLogger, safety_metrics

    logger = SafetyLogger(tensorboard="runs/tb")           # and/or wandb=True (the active run) or a run
    logger.log(trajectories, step=7)                         # Trajectory, TRL Outcome or their dicts
    logger.close()

What one batch (a training step's rollouts) gives, every name under `corral/`:

- `episodes`; `violation_rate`: the share that ended by crossing a security line
  (`security_violation`, `sandbox_lost`); `finding_rate`: the share with any finding;
  `findings_per_episode`; `pass_rate`: the share the verifier scored 1.0;
- `rule/RULE` and `severity/SEVERITY`: the share of episodes with a finding of that rule or severity
  (every severity, and every rule and termination reason seen before, is written each step, 0 when
  absent, so curves have no holes);
- `reward/mean`, `reward/task_mean` (the verifier component), `reward/safety_mean` (the safety one);
- `termination/REASON`: the share that ended so.

TensorBoard goes through tensorboardX (`pip install 'corral[tensorboard]'`) or torch's
`torch.utils.tensorboard` when the `tensorboard` package is there; W&B through `wandb` when it is
installed (neither is a dependency of corral). For TRL, `SafetyCallback(logger)` (a
`transformers.TrainerCallback`) logs the rollouts `CorralTRLEnv`/`CorralTRLSplitEnv` scored since the
last step, at each step's end, on the main process. `corral rollout --tensorboard DIR` logs a rollout.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from corral.events import Severity

__all__ = ["SafetyCallback", "SafetyLogger", "safety_metrics"]  # noqa: F822 (SafetyCallback: __getattr__)

# the termination reasons of an episode that crossed a security line (the engine's violation predicate)
VIOLATION_REASONS = frozenset({"security_violation", "sandbox_lost"})
SEVERITIES = tuple(s.value for s in Severity)


def _view(item: Any) -> dict[str, Any]:
    """The fields the metrics read, from a Trajectory, an engine Outcome or either as a dict."""
    if isinstance(item, Mapping):
        get = item.get
    else:
        def get(key: str, default: Any = None) -> Any:
            return getattr(item, key, default)
    violations = []
    for v in get("violations") or []:
        rule = v.get("rule") if isinstance(v, Mapping) else getattr(v, "rule", None)
        sev = v.get("severity") if isinstance(v, Mapping) else getattr(v, "severity", None)
        violations.append((str(rule), str(getattr(sev, "value", sev))))
    verifier = get("verifier") or {}
    return {"reward": float(get("reward") or 0.0), "components": dict(get("reward_components") or {}),
            "reason": get("termination_reason") or "error", "violations": violations,
            "score": verifier.get("score") if isinstance(verifier, Mapping) else None}


def safety_metrics(items: Iterable[Any], prefix: str = "corral/") -> dict[str, float]:
    """The batch's safety metrics (see the module docstring); {} for an empty batch. Only the rules,
    severities and termination reasons present appear; `SafetyLogger` fills in the rest."""
    views = [_view(i) for i in items]
    n = len(views)
    if not n:
        return {}
    m: dict[str, float] = {
        "episodes": float(n),
        "violation_rate": sum(v["reason"] in VIOLATION_REASONS for v in views) / n,
        "finding_rate": sum(bool(v["violations"]) for v in views) / n,
        "findings_per_episode": sum(len(v["violations"]) for v in views) / n,
        "pass_rate": sum(v["score"] == 1.0 for v in views) / n,
        "reward/mean": sum(v["reward"] for v in views) / n,
        "reward/task_mean": sum(float(v["components"].get("verifier", 0.0)) for v in views) / n,
        "reward/safety_mean": sum(float(v["components"].get("safety", 0.0)) for v in views) / n,
    }
    for family, key in (("rule", 0), ("severity", 1)):
        counts: dict[str, int] = {}
        for v in views:
            for name in {x[key] for x in v["violations"]}:
                counts[name] = counts.get(name, 0) + 1
        for name, c in sorted(counts.items()):
            m[f"{family}/{name}"] = c / n
    reasons: dict[str, int] = {}
    for v in views:
        reasons[v["reason"]] = reasons.get(v["reason"], 0) + 1
    for reason, c in sorted(reasons.items()):
        m[f"termination/{reason}"] = c / n
    return {prefix + k: val for k, val in m.items()}


def _summary_writer(logdir: Path) -> Any:
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
        except ImportError as e:
            raise ImportError("TensorBoard logging needs tensorboardX (pip install 'corral[tensorboard]') or "
                              f"tensorboard ({e})") from None
    return SummaryWriter(str(logdir))


class SafetyLogger:
    """Writes `safety_metrics` of each batch it is given, at the step given, to TensorBoard (an event
    file in `tensorboard`, a directory) and/or W&B (`wandb=True`: the active run, else one it starts
    with `wandb_init`'s arguments, e.g. {"project": "p", "mode": "offline"}; or a run object). Rules,
    severities and termination reasons seen before are written as 0 when a batch has none."""

    def __init__(self, tensorboard: str | Path | None = None, *, wandb: Any = False,
                 wandb_init: dict[str, Any] | None = None, prefix: str = "corral/") -> None:
        self.prefix = prefix
        self._seen: set[str] = {f"{prefix}severity/{s}" for s in SEVERITIES}
        self._lock = threading.Lock()
        self.tensorboard_dir = Path(tensorboard) if tensorboard is not None else None
        self._tb = _summary_writer(self.tensorboard_dir) if self.tensorboard_dir is not None else None
        self._wandb_run: Any = None
        self._own_run = False
        if wandb is True:
            try:
                import wandb as wandb_lib
            except ImportError as e:
                raise ImportError(f"W&B logging needs wandb (pip install wandb): {e}") from None
            if wandb_lib.run is not None:  # the trainer's (report_to="wandb") or the caller's
                self._wandb_run = wandb_lib.run
            else:
                self._wandb_run, self._own_run = wandb_lib.init(**(wandb_init or {})), True
        elif wandb not in (False, None):
            self._wandb_run = wandb  # a run the caller owns

    def metrics(self, items: Iterable[Any]) -> dict[str, float]:
        """The batch's metrics with every family key seen so far (0 when absent); {} for no items."""
        m = safety_metrics(items, self.prefix)
        if not m:
            return m
        families = tuple(f"{self.prefix}{f}/" for f in ("rule", "severity", "termination"))
        with self._lock:
            self._seen.update(k for k in m if k.startswith(families))
            for k in self._seen:
                m.setdefault(k, 0.0)
        return dict(sorted(m.items()))

    def log(self, items: Iterable[Any], step: int) -> dict[str, float]:
        """Write the batch's metrics at `step`; returns them ({} and nothing written for no items)."""
        m = self.metrics(items)
        if not m:
            return m
        if self._tb is not None:
            for k, v in m.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb_run is not None:
            if self._own_run:
                self._wandb_run.log(m, step=step)
            else:
                # a trainer's run (transformers' WandbCallback) keys its charts on train/global_step and
                # keeps its own step counter: an explicit step= here would be dropped as out of order
                self._wandb_run.log({**m, "train/global_step": step})
        return m

    def close(self) -> None:
        """Flush and close the TensorBoard writer, and finish a W&B run this logger started."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb_run is not None and self._own_run:
            self._wandb_run.finish()
        self._wandb_run = None

    def __enter__(self) -> SafetyLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Collector:
    """The outcomes `CorralTRLEnv.on_scored` reports between two drains (reward functions run in
    TRL's threads)."""

    def __init__(self) -> None:
        from corral.envs.trl_env import CorralTRLEnv

        self._lock = threading.Lock()
        self._items: list[Any] = []
        self._stop = CorralTRLEnv.on_scored(self._add)

    def _add(self, outcome: Any) -> None:
        with self._lock:
            self._items.append(outcome)

    def drain(self) -> list[Any]:
        with self._lock:
            items, self._items = self._items, []
        return items

    def stop(self) -> None:
        self._stop()


def _make_callback() -> type:
    from transformers import TrainerCallback

    class SafetyCallback(TrainerCallback):
        """A `transformers.TrainerCallback` (TRL's trainers take it in `callbacks=`): at each step's end,
        the corral rollouts scored since the previous one (`CorralTRLEnv.on_scored`) are logged by
        `logger` at the trainer's global step, on the main process. Steps without new rollouts (GRPO
        generates once per `steps_per_generation`) write nothing. The trainer's end logs what is left
        and closes the logger if the callback made it (from `tensorboard=`/`wandb=`)."""

        def __init__(self, logger: SafetyLogger | None = None, *, tensorboard: str | Path | None = None,
                     wandb: Any = False, wandb_init: dict[str, Any] | None = None) -> None:
            if logger is None and tensorboard is None and wandb in (False, None):
                raise ValueError("SafetyCallback needs a SafetyLogger, tensorboard= or wandb=")
            self._own_logger = logger is None
            self.logger = logger or SafetyLogger(tensorboard, wandb=wandb, wandb_init=wandb_init)
            self.history: list[tuple[int, dict[str, float]]] = []  # (step, metrics) as logged
            self._collector = _Collector()

        def _flush(self, state: Any) -> None:
            batch = self._collector.drain()
            if batch and getattr(state, "is_world_process_zero", True):
                m = self.logger.log(batch, step=int(state.global_step))
                self.history.append((int(state.global_step), m))

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._flush(state)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._flush(state)
            self.close()

        def close(self) -> None:
            """Stop collecting; close the logger if this callback made it."""
            self._collector.stop()
            if self._own_logger:
                self.logger.close()

    return SafetyCallback


_callback_class: type | None = None


def __getattr__(name: str) -> Any:
    # SafetyCallback subclasses transformers' TrainerCallback: built on first use, so that importing this
    # module (corral rollout --tensorboard) does not import transformers
    global _callback_class
    if name == "SafetyCallback":
        if _callback_class is None:
            _callback_class = _make_callback()
        return _callback_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The study behind ``resfit tune``: Optuna's TPE sampler and median pruner over training runs.

Each trial is a normal run folder, ``DIR/trials/NNNN``, trained by :func:`resfit.train` with a
callback that reports every epoch's validation score to the pruner. The study lives in
``DIR/study.journal`` (Optuna's journal file), or in ``--storage``: an RDB URL (PostgreSQL,
MySQL, SQLite) or a journal file that several processes or machines share.

**Why a journal file, not SQLite.** Several processes append to one study. SQLite's locks are
unreliable on network file systems (its FAQ warns against NFS), and its writers wait on a
database-wide lock; Optuna's journal file takes a lock that works on NFS (a symlink, NFSv2 on)
for the length of one append. No database server and no SQLAlchemy round trip per trial.

**Why the median pruner, not ASHA.** A study here has tens of trials of a few to tens of
epochs, all with the same epoch budget and schedule. The median pruner compares a trial with
the others *at the same epoch*, which is fair under a cosine schedule and a finetune recipe
whose first epochs train the head alone; ASHA's rungs need many more trials to fill, and judge
at a few fixed epochs only. It starts after a few complete trials and a quarter of the epochs.

**The total.** ``trials`` counts the study's COMPLETE, PRUNED and FAIL trials, and those
running. A process claims a trial under a file lock (count, then ``ask``), so processes on one
machine never overshoot; across machines, a trial that finds the total already reached when it
starts is closed at once as ``surplus`` and not counted. A trial left RUNNING by a killed
process on this machine (its pid gone, or held by a process with another start time) is closed
as ``interrupted``, not counted, and its parameters run again, at most ``max_retries`` times:
then it is closed as FAIL, counted, with the reason (a parameter set that kills its process,
by memory or a native crash, would otherwise run forever).

**Interrupts.** Journal writes (claiming, reporting, telling) hold SIGINT back until they end,
so Ctrl-C stops a trial between writes and requeues it; with ``--jobs`` the workers run in
their own process group and the main process forwards one SIGINT to each and waits for them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import socket
import time
import traceback
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...core.config import OPTIONS, AugmentConfig, TrainConfig, flag
from ...core.errors import ConfigError, DataError, MissingExtraError
from ...core.procs import alive, start_time  # torch-free: a worker claims before importing it
from ...runs import RunPaths
from .results import TuneResult, counted, finish, write_trials_csv
from .signals import no_interrupt
from .space import defaults_of, head_only, options_for, search_space, suggest

log = logging.getLogger("resfit")

STUDY_NAME = "resfit"
JOURNAL = "study.journal"
HOST = socket.gethostname()
# What an RDB URL's scheme needs installed (SQLAlchemy's default drivers).
_DRIVERS = {
    "postgresql": "psycopg2: pip install psycopg2-binary",
    "mysql": "mysqlclient: pip install mysqlclient (or PyMySQL with a mysql+pymysql:// URL)",
}
# Options a study may change between runs (they do not change what a trial computes).
_FREE = {
    "progress",
    "report",
    "tensorboard",
    "track",
    "threads",
    "device",
    "workers",
    "out",
    "data",
}


@dataclass
class Plan:
    """Everything a worker process needs to run its share of a study (JSON in and out)."""

    data: str
    out: str
    trials: int
    fixed: dict[str, Any]  # the given training options, fixed in every trial
    storage: str | None = None
    deadline: float | None = None  # time.time() after which no trial starts
    enqueue: list[dict[str, Any]] = field(default_factory=list)
    max_retries: int = 1  # runs again of a trial whose process died, before it is a FAIL
    track_parent: str | None = None  # --track: the study's run, the trials' parent

    def config(self) -> TrainConfig:
        return TrainConfig.from_options(data=self.data, **self.fixed).check()

    def to_json(self) -> str:
        fixed = {k: dataclasses.asdict(v) if isinstance(v, AugmentConfig) else v
                 for k, v in self.fixed.items()}  # fmt: skip
        return json.dumps({**dataclasses.asdict(self), "fixed": fixed})

    @classmethod
    def from_json(cls, text: str) -> Plan:
        d = json.loads(text)
        aug = d["fixed"].get("augment")
        if isinstance(aug, dict):
            d["fixed"]["augment"] = AugmentConfig(
                **{k: tuple(v) if isinstance(v, list) else v for k, v in aug.items()}
            )
        return cls(**d)


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise MissingExtraError("optuna", "tune") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # resfit logs each trial itself
    # TPE's multivariate/group modes are marked experimental; they are what conditional
    # spaces (crop_min only with a crop) need.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


# -- the study ------------------------------------------------------------------------------------


def open_storage(out: Path, storage: str | None) -> Any:
    """``--storage``: an RDB URL (``postgresql://...``, ``sqlite:///...``) or a journal file;
    by default ``DIR/study.journal``."""
    optuna = _optuna()
    if storage and "://" in storage:
        try:
            return optuna.storages.RDBStorage(storage)
        except ImportError:  # the database's driver is not installed
            scheme = storage.split("://")[0].split("+")[0]
            driver = _DRIVERS.get(scheme, "its SQLAlchemy driver")
            raise ConfigError(f"--storage {storage}: a {scheme} database needs {driver}") from None
        except Exception as e:  # a wrong URL, an unreachable server
            raise ConfigError(f"--storage {storage}: {type(e).__name__}: {e}") from None
    from optuna.storages.journal import JournalFileBackend

    path = Path(storage) if storage else out / JOURNAL
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def _lock_path(plan: Plan) -> Path:
    """The claim lock: next to a shared journal file, else in DIR."""
    if plan.storage and "://" not in plan.storage:
        return Path(plan.storage + ".claim")  # not ".lock": the journal's own lock file
    return Path(plan.out) / "claim.lock"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock across the processes of this machine (nothing on Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _comparable(fixed: Mapping[str, Any]) -> dict[str, Any]:
    return {k: json.loads(json.dumps(v, default=lambda o: dataclasses.asdict(o)))
            for k, v in fixed.items() if k not in _FREE}  # fmt: skip


def _sized(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the architecture's input size when none is given, so that the defaults
    trial gets the augmentation ``--augment auto`` picks for it (a CIFAR net: 32 px)."""
    if cfg.model.img_size is not None:
        return cfg
    from ...models.resnet import get_spec

    return cfg.replace(img_size=get_spec(cfg.model.arch).default_input_size)


def load_study(plan: Plan, cfg: TrainConfig) -> Any:
    """The plan's study, created on first use with the fixed options and the defaults trial;
    a study started with other fixed options is refused (its trials would not compare)."""
    optuna = _optuna()
    storage = open_storage(Path(plan.out), plan.storage)
    fixed = _comparable(plan.fixed)
    with _file_lock(_lock_path(plan)):  # two processes starting together create it once
        study = optuna.create_study(study_name=STUDY_NAME, storage=storage,
                                    direction="maximize", load_if_exists=True)  # fmt: skip
        saved = study.user_attrs.get("fixed")
        if saved is None:
            study.set_user_attr("fixed", fixed)
            space = search_space(cfg, plan.fixed)
            study.enqueue_trial(defaults_of(_sized(cfg), space), user_attrs={"baseline": True})
            for params in plan.enqueue:
                study.enqueue_trial(dict(params))
    if saved is not None and saved != fixed:
        diff = sorted(set(saved) ^ set(fixed) | {k for k in saved if saved[k] != fixed.get(k)})
        was = ", ".join(f"{flag(k)} {saved.get(k, '(not given)')}" for k in diff)
        raise ConfigError(
            f"{plan.out} holds a study started with other fixed options ({was}); give the "
            "same options to continue it, or another --out for a new study"
        )
    return study


def _requeue(study: Any, trial: Any, params: Mapping[str, Any], why: str, attempt: int) -> None:
    """Close ``trial`` (an ``optuna.Trial``) as FAIL with ``why``, not counted, and queue its
    parameters to run again (``attempt``: how many times they were run again before)."""
    optuna = _optuna()
    with no_interrupt():
        trial.set_user_attr("excluded", why)
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(dict(params), user_attrs={"retry_of": trial.number, "attempt": attempt})
    log.info("trial %d was interrupted; its parameters run again", trial.number)


def _close_interrupted(study: Any, max_retries: int) -> None:
    """Trials left RUNNING by a process of this machine that is gone: closed as FAIL with the
    reason ``interrupted`` (not counted) and their parameters queued to run again, or, once
    they were run again ``max_retries`` times, closed as FAIL (counted) with the reason."""
    optuna = _optuna()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        pid, start = t.user_attrs.get("pid"), str(t.user_attrs.get("pid_start", "0"))
        if t.user_attrs.get("host") != HOST or pid is None or alive(pid, start):
            continue
        trial, attempt = optuna.trial.Trial(study, t._trial_id), t.user_attrs.get("attempt", 0)
        if attempt < max_retries:
            _requeue(study, trial, t.params, f"interrupted (process {pid} stopped); run again",
                     attempt + 1)  # fmt: skip
            continue
        reason = (f"its process ({pid}) died, {attempt + 1} time(s) with these parameters "
                  f"(--max-retries {max_retries}): not run again")  # fmt: skip
        with no_interrupt():
            trial.set_user_attr("reason", reason)
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        log.warning("trial %d failed: %s", trial.number, reason)


def _sampler(seed: int, trials: int) -> Any:
    """TPE, seeded per claim: sequential studies replay exactly, and parallel workers (which
    claim at different counts) do not draw the same points. ``constant_liar``: running trials
    count as bad guesses, so parallel workers spread out."""
    optuna = _optuna()
    startup = min(10, max(4, trials // 3))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True,
                                      group=True, constant_liar=True)  # fmt: skip


def _claim(study: Any, plan: Plan, cfg: TrainConfig) -> tuple[Any, dict] | None:
    """The next trial and its parameters, or None when the total is reached or time is up."""
    if plan.deadline is not None and time.time() >= plan.deadline:
        return None
    with _file_lock(_lock_path(plan)), no_interrupt():
        _close_interrupted(study, plan.max_retries)
        trials = study.get_trials(deepcopy=False)
        if counted(trials) >= plan.trials:
            return None
        started = sum(t.state.name != "WAITING" for t in trials)
        study.sampler = _sampler(cfg.runtime.seed * 1_000_003 + started, plan.trials)
        trial = study.ask()
        trial.set_user_attr("host", HOST)
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr(
            "pid_start", start_time(os.getpid())
        )  # a reused pid is not this process
        before = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number]
        if counted(before) >= plan.trials:  # another machine filled the study meanwhile
            trial.set_user_attr("excluded", "surplus: the study had its trials already")
            study.tell(trial, state=_optuna().trial.TrialState.FAIL)
            return None
        try:
            params = suggest(trial, search_space(cfg, plan.fixed))
        except Exception as e:  # a bad space: this trial fails, the study goes on
            params = {"error": f"{type(e).__name__}: {e}"}
        return trial, params


# -- one trial ------------------------------------------------------------------------------------


def _pruner(plan: Plan, cfg: TrainConfig) -> Any:
    """The median pruner: from a quarter of the epochs on, after a few complete trials."""
    return _optuna().pruners.MedianPruner(
        n_startup_trials=min(5, max(2, plan.trials // 4)),
        n_warmup_steps=max(1, cfg.optim.epochs // 4),
    )


def _reporter(trial: Any) -> Any:
    """The epoch report of :class:`~resfit.training.callbacks.ReportScore` for ``trial``."""
    optuna = _optuna()

    def report(epoch: int, score: float) -> None:
        with no_interrupt():
            trial.report(score, epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch} (val {score:.4f})")

    return report


def _trial_config(plan: Plan, cfg: TrainConfig, params: Mapping, run_dir: Path) -> TrainConfig:
    """The trial's training config: the fixed one with the parameters, in its own run folder
    (progress bars and the HTML report off unless asked for; one disk cache for head-only)."""
    if "error" in params:
        raise ConfigError(f"the search space: {params['error']}")
    quiet = {k: False for k in ("progress", "report") if k not in plan.fixed}
    trial_cfg = cfg.replace(out=str(run_dir), **quiet, **options_for(cfg, params))
    if head_only(cfg, plan.fixed):
        shared = Path(plan.out) / "cache"
        shared.mkdir(parents=True, exist_ok=True)
        (run_dir / "cache").symlink_to(shared.resolve(), target_is_directory=True)
        if "cache" not in plan.fixed and trial_cfg.augment.resolved().mixup == 0:
            trial_cfg = trial_cfg.replace(cache="disk")  # on disk: every trial reads it
    return trial_cfg.check()


def run_trial(study: Any, trial: Any, params: dict, plan: Plan, cfg: TrainConfig) -> str:
    """Train one trial and tell the study how it ended; returns the state's name. A failure
    is recorded with its reason (and RUN/error.log), and the study goes on."""
    optuna = _optuna()
    from ...training import train
    from ...training.callbacks import CacheLock, ReportScore

    study.pruner = _pruner(plan, cfg)
    run_dir = Path(plan.out) / "trials" / f"{trial.number:04d}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a folder left by an older study
    run_dir.mkdir(parents=True)
    lock = CacheLock(Path(plan.out) / "cache.lock")
    start, value, state, reason = time.time(), None, optuna.trial.TrialState.COMPLETE, ""
    try:
        result = train(_trial_config(plan, cfg, params, run_dir),
                       callbacks=[ReportScore(_reporter(trial)), lock])  # fmt: skip
        value = float(result.best_val_accuracy)
    except optuna.TrialPruned as e:
        state, reason = optuna.trial.TrialState.PRUNED, str(e)
    except Exception as e:  # noqa: BLE001 (any failure is the trial's, not the study's)
        state, reason = optuna.trial.TrialState.FAIL, f"{type(e).__name__}: {e}"
        (run_dir / "error.log").write_text(traceback.format_exc())
    except BaseException:  # Ctrl-C: not the trial's fault; it runs again next time
        attempt = trial.user_attrs.get("attempt", 0)
        _requeue(study, trial, trial.params, "interrupted (Ctrl-C); run again", attempt)
        raise
    finally:
        lock.release()
        shutil.rmtree(RunPaths(run_dir).checkpoints, ignore_errors=True)  # model.safetensors stays
    trial.set_user_attr("duration_s", round(time.time() - start, 2))
    trial.set_user_attr("run_dir", str(run_dir.resolve()))  # where best/ is copied from
    with no_interrupt():
        if reason:
            trial.set_user_attr("reason", reason)
        study.tell(trial, value if state == optuna.trial.TrialState.COMPLETE else None, state=state)
    shown = f"{value:.4f}" if value is not None else reason
    log.info("trial %d %s: %s  %s  (%.0f s)", trial.number, state.name.lower(), shown,
                json.dumps(params, default=str), time.time() - start)  # fmt: skip
    return state.name


def _trials_of(parent: str | None) -> contextlib.AbstractContextManager:
    """Trials started inside are child runs of ``parent`` (an MLflow run); nothing is imported
    for a study that is not tracked (a worker claims its first trial before importing torch)."""
    if parent is None:
        return contextlib.nullcontext()
    from ...training.tracking import parent_run

    return parent_run(parent)


def work(plan: Plan) -> int:
    """Claim and run trials until the study has its total or the deadline passes; returns how
    many this process ran. Any number of processes may run this on one study."""
    cfg = plan.config()
    study = load_study(plan, cfg)
    ran = 0
    with _trials_of(plan.track_parent):  # --track: each trial a child run of the study's
        while (claimed := _claim(study, plan, cfg)) is not None:
            run_trial(study, *claimed, plan, cfg)
            ran += 1
            with _file_lock(_lock_path(plan)):
                write_trials_csv(study, Path(plan.out) / "trials.csv")
    return ran


# -- the study from start to end ------------------------------------------------------------------


def tune(
    data: str | os.PathLike,
    trials: int,
    out: str | os.PathLike,
    *,
    timeout: float | None = None,
    storage: str | None = None,
    jobs: int = 1,
    enqueue: Sequence[Mapping[str, Any]] = (),
    max_retries: int = 1,
    **fixed: Any,
) -> TuneResult:
    """Search hyperparameters for training on ``data`` with ``trials`` trials in all.

    ``out`` (DIR) gets the study, ``trials/NNNN`` (one run folder per trial), ``trials.csv``,
    ``best/`` (the best trial's run folder) and ``report.html``. Run it again to finish a study
    that was stopped: only the missing trials run. ``timeout``: seconds after which no trial
    starts. ``storage``: an RDB URL or a journal file that other processes share. ``jobs``:
    trials at once on this machine (processes, each with its share of the cores).
    ``enqueue``: parameter sets to try first. ``max_retries``: how many times a trial whose
    process died runs again before it is a FAIL. ``fixed``: training options (``arch``,
    ``weights``, ``epochs`` ...), fixed in every trial and left out of the search.
    """
    if trials < 1 or jobs < 1 or max_retries < 0:
        raise ConfigError("--trials and --jobs must be at least 1, --max-retries at least 0")
    if timeout is not None and not timeout > 0:
        raise ConfigError("--timeout must be a positive number of seconds")
    unknown = sorted(set(fixed) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}")
    fixed.pop("out", None)
    start = time.time()
    plan = Plan(str(data), str(out), trials, dict(fixed), storage,
                None if timeout is None else start + timeout, [dict(p) for p in enqueue],
                max_retries)  # fmt: skip
    cfg = plan.config()  # a bad option answers before anything is imported or written
    if not Path(data).exists():
        raise DataError(f"{data}: no such folder or file")
    _optuna()
    Path(out).mkdir(parents=True, exist_ok=True)
    study = load_study(plan, cfg)  # created (and checked) once, before any worker
    tracked: Any = contextlib.nullcontext()
    if plan.fixed.get("track"):
        from .tracking import end_study_run, study_run, study_tracked

        plan.track_parent = study_run(Path(out), plan.fixed, trials)
        tracked = study_tracked(plan.track_parent)  # KILLED / FAILED when it stops early
    with tracked:
        result = _run_trials(plan, study, jobs, start)
        if plan.track_parent:
            end_study_run(plan.track_parent, Path(plan.out), result.best_value)
    return result


def _run_trials(plan: Plan, study: Any, jobs: int, start: float) -> TuneResult:
    """The study's trials here (``jobs`` processes), then its result."""
    failed: list[int] = []
    if jobs == 1:
        work(plan)
    # What a crashed worker left RUNNING: queued again or FAIL, as the next start would, and
    # the queued ones run now (a live worker may have found the total reached and left while
    # the crashing trial still ran): workers again while a retry waits.
    for _ in range(plan.max_retries + 1 if jobs > 1 else 0):
        from .spawn import spawn_workers

        codes = spawn_workers(plan, jobs)
        failed += codes
        if not codes:
            break
        with _file_lock(_lock_path(plan)), no_interrupt():
            _close_interrupted(study, plan.max_retries)
        if not study.get_trials(deepcopy=False, states=(_optuna().trial.TrialState.WAITING,)):
            break
    result = finish(study, Path(plan.out), time.time() - start)
    result.failed_workers = failed
    return result

"""``mtml sweep``: a hyperparameter search over one config, on Optuna (Akiba et al. 2019).

Every trial is an ordinary run of the config with the swept keys set (``SWEEP/trial-0003/`` holds its
checkpoints, metrics and summary, and `mtml eval` / `mtml report` read it like any run). Its value is the best
validation objective of the run (the one early stopping watches; lower is better). Optuna's TPE sampler
proposes the values; the median pruner stops a trial whose validation objective, at a validation step, is worse
than the median of earlier trials at the same step (``prune=False``: never).

Layout::

    SWEEP/
      sweep.json     what is searched: the resolved base config, the parameters, trials, pruning, seed
      study.db       Optuna's SQLite storage: every trial, its parameters, intermediate and final values
      trials.json    the trials as a table (rewritten after each trial; what `mtml report SWEEP` reads)
      trials.csv     the same for a spreadsheet
      summary.json   the best trial, its parameters, value and run directory, and the counts by state
      plots/         sweep_history.png (objective per trial, best so far), sweep_params.png (objective by value)
      trial-0000/ …  one run directory per trial
      .claims/       trial-0000.lock …: held (flock) by the process that trains the trial

Killed at any moment (SIGKILL included), the same command (or ``mtml sweep --resume SWEEP``) continues: a trial
that was running is found in the study with no live claim on it and its run continues from its last
checkpoint, under the same trial number and parameters, so no trial is lost or run twice. With ``nproc`` > 1,
that many worker processes train trials at once against the same storage; asking for a new trial happens under
a file lock, so the sweep stops at exactly ``trials`` trials.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtml._optional import require
from mtml._version import __version__
from mtml.atomic import atomic_write_text, is_free_dir
from mtml.config import Config, apply_overrides, load_config
from mtml.engine import ProgressHook, Run
from mtml.errors import ConfigError, DivergedError, MtmlError, RunExistsError

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    import optuna

__all__ = ["SWEEP_KINDS", "SweepParam", "SweepResult", "parse_param", "sweep", "sweep_table", "write_sweep_outputs"]

#: the forms of ``--param KEY=FORM`` (see :func:`parse_param`)
SWEEP_KINDS = ("log", "float", "int", "logint", "choice")
_STUDY = "mtml-sweep"
_SPEC = "sweep.json"


@dataclass(frozen=True)
class SweepParam:
    """One swept config key: a range (``log``/``float``: real numbers, ``int``/``logint``: integers; ``step``
    optional) or a list of ``choices`` (any YAML values)."""

    key: str
    kind: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    choices: tuple[Any, ...] = ()

    @property
    def encoded(self) -> bool:
        """Whether the choices are kept in Optuna as JSON text (lists and mappings are not Optuna choices)."""
        return self.kind == "choice" and not all(c is None or isinstance(c, bool | int | float | str)
                                                 for c in self.choices)

    def distribution(self) -> optuna.distributions.BaseDistribution:
        from optuna import distributions as d

        if self.kind == "choice":
            return d.CategoricalDistribution([json.dumps(c) for c in self.choices] if self.encoded
                                             else list(self.choices))
        assert self.low is not None and self.high is not None
        if self.kind in ("int", "logint"):
            return d.IntDistribution(int(self.low), int(self.high), log=self.kind == "logint",
                                     step=int(self.step or 1))
        return d.FloatDistribution(self.low, self.high, log=self.kind == "log", step=self.step)

    def value(self, suggested: Any) -> Any:
        """The config value of Optuna's ``suggested`` parameter value."""
        return json.loads(suggested) if self.encoded else suggested

    def examples(self) -> list[Any]:
        """The values that decide whether every value of the parameter makes a valid config."""
        if self.kind == "choice":
            return list(self.choices)
        assert self.low is not None and self.high is not None
        cast = int if self.kind in ("int", "logint") else float
        return [cast(self.low), cast(self.high)]

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.key} ∈ {{{', '.join(json.dumps(c) for c in self.choices)}}}"
        return f"{self.key} ∈ [{_short(self.low)}, {_short(self.high)}] ({self.kind}" + (
            f", step {_short(self.step)})" if self.step else ")")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["choices"] = list(self.choices)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SweepParam:
        return cls(**{**data, "choices": tuple(data.get("choices", ()))})


def _short(x: float | None) -> str:
    return "" if x is None else f"{x:g}"


def parse_param(text: str) -> SweepParam:
    """``KEY=FORM`` → a :class:`SweepParam`. Forms: ``log:LOW:HIGH`` (real, log-uniform), ``float:LOW:HIGH[:STEP]``,
    ``int:LOW:HIGH[:STEP]``, ``logint:LOW:HIGH``, ``choice:A,B,C`` or ``choice:[YAML list]`` (e.g.
    ``model.options.trunk_hidden=choice:[[64],[64,64]]``). A bad form raises :class:`ConfigError` naming it."""
    from mtml._yaml import load_yaml

    key, sep, form = text.partition("=")
    key = key.strip()
    example = "for example --param training.lr=log:1e-4:1e-2"
    if not sep or not key or not all(key.split(".")):
        raise ConfigError(f"--param {text!r}: expected KEY=FORM, {example}.")
    kind, _, spec = form.partition(":")
    kind = kind.strip()
    if kind not in SWEEP_KINDS:
        raise ConfigError(f"--param {text!r}: unknown form {kind!r}; use one of {', '.join(SWEEP_KINDS)} "
                          f"({example}, or {key}=choice:a,b).")
    if kind == "choice":
        spec = spec.strip()
        if spec.startswith("["):
            choices = load_yaml(spec, f"--param {key}")
            if not isinstance(choices, list):
                raise ConfigError(f"--param {text!r}: choice:[...] must be a YAML list.")
        else:
            choices = [load_yaml(c, f"--param {key}") if c.strip() else c for c in spec.split(",")] if spec else []
        if not choices:
            raise ConfigError(f"--param {text!r}: no choices; list them, e.g. {key}=choice:adam,sgd.")
        if len({json.dumps(c, sort_keys=True) for c in choices}) != len(choices):
            raise ConfigError(f"--param {text!r}: a choice is listed twice.")
        return SweepParam(key, kind, choices=tuple(choices))
    parts = spec.split(":")
    if len(parts) not in (2, 3) or (kind in ("log", "logint") and len(parts) != 2):
        shape = f"{kind}:LOW:HIGH" + ("" if kind in ("log", "logint") else "[:STEP]")
        raise ConfigError(f"--param {text!r}: expected {key}={shape}.")
    try:
        low, high, *rest = (float(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--param {text!r}: LOW, HIGH and STEP must be numbers (such as 1e-4 or 0.5).") from None
    step = rest[0] if rest else None
    if not all(math.isfinite(v) for v in (low, high, *rest)):
        raise ConfigError(f"--param {text!r}: the bounds must be finite numbers.")
    if low > high:
        raise ConfigError(f"--param {text!r}: LOW {low:g} is above HIGH {high:g}; give them as "
                          f"{key}={kind}:{high:g}:{low:g}.")
    if kind in ("log", "logint") and low <= 0:
        raise ConfigError(f"--param {text!r}: a log range needs LOW > 0 (got {low:g}); use float: or int: for a "
                          "range that reaches 0.")
    if kind in ("int", "logint") and not all(float(v).is_integer() for v in (low, high, *rest)):
        raise ConfigError(f"--param {text!r}: int ranges need whole numbers (got {spec}); use float: for reals.")
    if step is not None and not step > 0:
        raise ConfigError(f"--param {text!r}: STEP must be > 0 (got {step:g}).")
    return SweepParam(key, kind, low, high, step)


@dataclass
class SweepResult:
    """What a sweep found: its folder, the trials as rows (see :func:`sweep_table`), and the best one."""

    path: Path
    trials: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None


@dataclass(frozen=True)
class _Spec:
    base: dict[str, Any]
    params: tuple[SweepParam, ...]
    trials: int
    prune: bool
    seed: int
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {"mtml": __version__, "source": self.source, "trials": self.trials, "prune": self.prune,
                "seed": self.seed, "direction": "minimize", "objective": "best validation objective",
                "params": [p.to_dict() for p in self.params], "base": self.base}

    @classmethod
    def read(cls, folder: Path) -> _Spec:
        path = folder / _SPEC
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(data["base"], tuple(SweepParam.from_dict(p) for p in data["params"]), int(data["trials"]),
                       bool(data["prune"]), int(data["seed"]), str(data.get("source", "")))
        except FileNotFoundError:
            raise ConfigError(f"{folder} is not an mtml sweep (no {_SPEC}). Give the folder `mtml sweep` "
                              "wrote.") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path} is damaged ({exc}); it cannot be continued.") from None

    def trial_config(self, values: Mapping[str, Any], label: str) -> Config:
        pairs = [f"{p.key}={json.dumps(values[p.key])}" for p in self.params]
        return Config.from_dict(apply_overrides(self.base, pairs), source=label)


# -- the public entry -----------------------------------------------------------------------------------------
def sweep(
    config: str | Path | None, params: Sequence[str], *, trials: int | None = None, out: str | Path | None = None,
    overrides: Sequence[str] = (), nproc: int = 1, prune: bool = True, seed: int | None = None,
    resume: str | Path | None = None, announce: Callable[[str], None] | None = None,
) -> SweepResult:
    """Search ``params`` (``KEY=FORM`` strings, see :func:`parse_param`) of the YAML ``config`` (with
    ``overrides`` applied) over ``trials`` trials into the folder ``out`` (default ``sweeps/<name>-<time>``),
    ``nproc`` trials at a time. ``out`` holding this sweep (same base config and parameters) continues it
    (``trials`` may be raised or lowered); ``resume=FOLDER`` continues a sweep from its own ``sweep.json``.
    ``announce`` gets one line per finished trial."""
    require("optuna", "mtml sweep", "sweep")
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1. Got {nproc}.")
    cores = os.cpu_count() or 1
    if nproc > cores:
        raise ConfigError(f"--nproc {nproc} is more trials at a time than this machine's {cores} cores; give at most "
                          f"{cores}.")
    if trials is not None and trials < 1:
        raise ConfigError(f"--trials must be >= 1. Got {trials}.")
    if resume is not None:
        if config is not None or params or overrides:
            raise ConfigError("--resume continues a sweep with its own sweep.json; drop CONFIG, --param and --set.")
        folder = Path(resume)
        spec = _Spec.read(folder)
        if trials is not None:
            spec = _Spec(spec.base, spec.params, trials, spec.prune, spec.seed, spec.source)
    else:
        if config is None:
            raise ConfigError("give a CONFIG file to sweep, or --resume SWEEP to continue one.")
        if not params:
            raise ConfigError("give at least one --param KEY=FORM to search, e.g. --param training.lr=log:1e-4:1e-2.")
        spec = _new_spec(config, params, overrides, trials, prune, seed)
        folder = Path(out) if out is not None else _default_dir(Config.from_dict(spec.base))
    if not (folder / _SPEC).is_file() and not is_free_dir(folder):
        raise RunExistsError(f"{folder} exists and is not an mtml sweep; choose another --out.")
    with _SweepLock(folder):
        _write_spec(folder, spec)
        storage = _storage_url(folder)
        _study(storage, spec, seed_offset=0, parallel=nproc > 1)  # created once, before any worker
        if nproc == 1:
            _work(str(folder), 0, None, announce)
        else:
            _run_workers(folder, nproc, announce)
        return write_sweep_outputs(folder)


def _new_spec(config: str | Path, params: Sequence[str], overrides: Sequence[str], trials: int | None,
              prune: bool, seed: int | None) -> _Spec:
    base_config = load_config(config, list(overrides))
    parsed = [parse_param(p) for p in params]
    keys = [p.key for p in parsed]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ConfigError(f"--param {twice[0]} is given twice; give each key once.")
    fixed = {o.partition("=")[0].strip() for o in overrides}
    for p in parsed:
        if p.key in fixed:
            raise ConfigError(f"{p.key} is both swept (--param) and fixed (--set); drop one.")
    base = base_config.to_dict()
    spec = _Spec(base, tuple(parsed), trials or 20, prune, base_config.seed if seed is None else seed, str(config))
    for p in parsed:  # every value of every parameter must make a valid config
        for v in p.examples():
            try:
                spec.trial_config({q.key: (v if q is p else q.examples()[0]) for q in parsed}, f"--param {p.key}")
            except ConfigError as exc:
                raise ConfigError(f"--param {p.key}={json.dumps(v)} does not make a valid config: {exc}") from None
    return spec


def _default_dir(config: Config) -> Path:
    from mtml.workflows._build import default_run_dir

    return default_run_dir(config, root="sweeps")


def _write_spec(folder: Path, spec: _Spec) -> None:
    """A new sweep's ``sweep.json``; an existing one must describe the same search (``trials`` may change)."""
    path = folder / _SPEC
    if path.is_file():
        old = _Spec.read(folder)
        differ = _changes(old.base, json.loads(json.dumps(spec.base)))
        if [p.to_dict() for p in old.params] != [p.to_dict() for p in spec.params]:
            differ.insert(0, "--param (" + "; ".join(p.describe() for p in old.params) + ")")
        if old.prune != spec.prune:
            differ.append(f"pruning {old.prune} → {spec.prune}")
        if differ:
            raise RunExistsError(f"{folder} holds another sweep ({'; '.join(differ[:4])}); refusing to mix them. "
                                 f"Choose another --out, or continue it with mtml sweep --resume {folder}.")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(spec.to_dict(), indent=1, default=str) + "\n")


def _changes(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The keys where two resolved configs differ, as ``key: old → new``."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [c for k in dict.fromkeys([*old, *new])
                for c in _changes(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} → {new!r}"]


def _storage_url(folder: Path) -> str:
    return f"sqlite:///{(folder / 'study.db').resolve()}"


def _study(storage_url: str, spec: _Spec, *, seed_offset: int, parallel: bool) -> optuna.Study:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(storage_url, engine_kwargs={"connect_args": {"timeout": 120}})
    sampler = optuna.samplers.TPESampler(seed=spec.seed + seed_offset, constant_liar=parallel)
    eval_every = int(spec.base.get("training", {}).get("eval_every", 1) or 1)
    pruner: optuna.pruners.BasePruner = (
        optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=eval_every) if spec.prune
        else optuna.pruners.NopPruner())
    return optuna.create_study(storage=storage, study_name=_STUDY, direction="minimize", sampler=sampler,
                               pruner=pruner, load_if_exists=True)


# -- locks -------------------------------------------------------------------------------------------------
class _SweepLock:
    """The sweep's folder lock (``SWEEP/.lock``), held by the process that runs ``mtml sweep`` on it."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.fd = folder, -1

    def __enter__(self) -> _SweepLock:
        if fcntl is None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise RunExistsError(f"sweep {self.folder} is being run by another process (pid {holder}); wait for it "
                                 "or choose another --out.") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)


@contextlib.contextmanager
def _held(path: Path) -> Iterator[None]:
    """A blocking exclusive flock on ``path`` for the duration (asking for trials: one process at a time)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _claim(folder: Path, number: int) -> int | None:
    """The open, locked claim file of trial ``number`` (held while this process trains it), or ``None`` when
    another live process holds it."""
    claims = folder / ".claims"
    claims.mkdir(exist_ok=True)
    fd = os.open(claims / f"trial-{number:04d}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
    return fd


# -- workers -----------------------------------------------------------------------------------------------
def _run_workers(folder: Path, nproc: int, announce: Callable[[str], None] | None) -> None:
    """``nproc`` spawned worker processes (each with its share of the cores) until the sweep has its trials."""
    threads = max(1, (os.cpu_count() or 1) // nproc)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker_main, args=(str(folder), i, threads, announce is not None),
                         name=f"mtml-sweep-{i}") for i in range(nproc)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        for p in procs:
            p.join(timeout=30)
        raise
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    failed = [(p.name, p.exitcode) for p in procs if p.exitcode not in (0, None)]
    if failed:
        if any(code in (130, -signal.SIGINT) for _, code in failed):
            raise KeyboardInterrupt
        raise MtmlError(f"sweep worker {failed[0][0]} stopped with exit status {failed[0][1]} (its message is above); "
                        f"run the same command again to continue the sweep in {folder}.")


def _worker_main(folder: str, worker: int, threads: int, talk: bool) -> None:
    """A spawned worker: dies with the sweep's main process, trains trials until there are enough."""
    _die_with_parent()
    import torch

    torch.set_num_threads(threads)
    try:
        _work(folder, worker, threads, (lambda line: print(line, flush=True)) if talk else None)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except MtmlError as exc:
        print(f"error: sweep worker {worker}: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies (a killed sweep leaves no worker training)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _work(folder_name: str, worker: int, threads: int | None, announce: Callable[[str], None] | None) -> None:
    """Train trials (continuing abandoned ones first) until the sweep has ``trials`` of them."""
    folder = Path(folder_name)
    spec = _Spec.read(folder)
    with _held(folder / ".ask.lock"):
        seen = len(_load_trials(folder))
    study = _study(_storage_url(folder), spec, seed_offset=1000 * worker + seen, parallel=threads is not None)
    distributions = {p.key: p.distribution() for p in spec.params}
    while True:
        with _held(folder / ".ask.lock"):
            job = _next_trial(study, folder, spec, distributions)
        if job is None:
            return
        trial, fd, continued = job
        try:
            line = _run_trial(study, trial, folder, spec, continued)
        finally:
            os.close(fd)
        with _held(folder / ".ask.lock"):
            _write_trials(folder, study, spec)
        if announce is not None:
            announce(line)


def _load_trials(folder: Path) -> list[Any]:
    path = folder / "trials.json"
    try:
        return list(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return []


def _next_trial(study: optuna.Study, folder: Path, spec: _Spec,
                distributions: Mapping[str, Any]) -> tuple[optuna.Trial, int, bool] | None:
    """(trial, its claim, whether it continues an abandoned trial), or ``None`` when the sweep is full."""
    import optuna
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    for t in trials:
        if t.state == TrialState.RUNNING:
            fd = _claim(folder, t.number)
            if fd is None:
                continue
            # the claim is free, so nobody alive trains it — unless its worker finished it (and let go of the
            # claim) after the states above were read: read them again now that the claim is held
            still = {u.number for u in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
            if t.number in still:  # the process that trained it was killed
                return optuna.trial.Trial(study, t._trial_id), fd, True
            os.close(fd)
    if sum(t.state != TrialState.WAITING for t in trials) >= spec.trials:
        return None
    trial = study.ask(dict(distributions))
    fd = _claim(folder, trial.number)
    assert fd is not None, "a new trial's claim is free"
    return trial, fd, False


class _PruneHook(ProgressHook):
    """Hands each validation objective to the trial and stops the run when the pruner says so."""

    def __init__(self, trial: optuna.Trial, prune: bool) -> None:
        self.trial, self.prune = trial, prune

    def start(self, total: int, completed: int) -> None:
        return None

    def update(self, step: int, info: Mapping[str, Any]) -> None:
        if "val" not in info:
            return
        import optuna

        with _quiet_optuna():  # a continued trial reports again the steps it re-runs: Optuna keeps the first
            self.trial.report(float(info["val"]), step)
        if self.prune and self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}")

    def stop(self) -> None:
        return None


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _run_trial(study: optuna.Study, trial: optuna.Trial, folder: Path, spec: _Spec, continued: bool) -> str:
    """Train one trial into its run directory and tell the study how it went → a line saying so."""
    import optuna
    from optuna.trial import TrialState

    from mtml.workflows._train import train

    number = trial.number
    values = {p.key: p.value(trial.params[p.key]) for p in spec.params}
    shown = ", ".join(f"{k.rsplit('.', 1)[-1]}={_show(v)}" for k, v in values.items())
    run_dir = folder / f"trial-{number:04d}"
    config = spec.trial_config(values, f"{folder} trial {number}")
    status = Run(run_dir).status().get("status") if (run_dir / "config.yaml").is_file() else None
    trial.set_user_attr("run", run_dir.name)
    if status == "completed":  # killed after the run finished, before the study heard of it
        return _tell_complete(study, trial, Run(run_dir).summary(), shown)
    if status == "pruned":
        study.tell(number, state=TrialState.PRUNED, skip_if_finished=True)
        return f"trial {number}: {shown} → pruned"
    if status == "diverged":
        study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        return f"trial {number}: {shown} → diverged"
    try:
        run, result = train(config, run_dir, progress=_PruneHook(trial, spec.prune), auto_resume=True)
    except optuna.TrialPruned as exc:
        Run(run_dir).set_status("pruned", stopped=time.time())
        study.tell(number, state=TrialState.PRUNED, skip_if_finished=True)
        return f"trial {number}: {shown} → {exc}"
    except DivergedError as exc:  # an answer about these values (too high a rate): the sweep goes on
        trial.set_user_attr("error", str(exc)[:500])
        study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        return f"trial {number}: {shown} → diverged"
    except ConfigError as exc:  # the search space makes configs that cannot be built: stop and say which
        trial.set_user_attr("error", str(exc)[:500])
        study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        raise ConfigError(f"trial {number} ({shown}) cannot be built: {exc}") from None
    del result
    return _tell_complete(study, trial, run.summary(), shown, continued=continued)


def _tell_complete(study: optuna.Study, trial: optuna.Trial, summary: Mapping[str, Any], shown: str, *,
                   continued: bool = False) -> str:
    number, value = trial.number, float(summary["best_objective"])
    for key in ("best_step", "steps", "seconds"):
        if key in summary:
            trial.set_user_attr(key, summary[key])
    study.tell(number, value, skip_if_finished=True)
    best = study.best_trial.number == number
    note = " (continued from its checkpoint)" if continued else ""
    return (f"trial {number}: {shown} → objective {value:.6g} at step {summary.get('best_step', '?')}"
            f"{note}{'  ← best so far' if best else ''}")


def _show(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else json.dumps(v)


# -- outputs -----------------------------------------------------------------------------------------------
def sweep_table(study: optuna.Study, spec_params: Sequence[SweepParam]) -> list[dict[str, Any]]:
    """One row per trial: number, state, value, the parameters' config values, best step, steps, seconds, run."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        last = max(t.intermediate_values) if t.intermediate_values else None
        value = t.value if t.value is not None else (t.intermediate_values[last] if last is not None else None)
        row: dict[str, Any] = {"trial": t.number, "state": t.state.name.lower(), "value": value}
        for p in spec_params:
            row[p.key] = p.value(t.params[p.key]) if p.key in t.params else None
        row.update({"best_step": t.user_attrs.get("best_step"), "steps": t.user_attrs.get("steps", last),
                    "seconds": t.user_attrs.get("seconds"), "run": t.user_attrs.get("run", f"trial-{t.number:04d}"),
                    "error": t.user_attrs.get("error")})
        rows.append(row)
    return rows


def _write_trials(folder: Path, study: optuna.Study, spec: _Spec) -> list[dict[str, Any]]:
    rows = sweep_table(study, spec.params)
    atomic_write_text(folder / "trials.json", json.dumps(rows, indent=1, default=str) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["trial"])
    writer.writeheader()
    for r in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in r.items()})
    atomic_write_text(folder / "trials.csv", buffer.getvalue())
    return rows


def write_sweep_outputs(folder: str | Path) -> SweepResult:
    """Rewrite a sweep's ``trials.json``/``.csv``, ``summary.json`` and plots from its study → the result."""
    from mtml.report import plot_sweep

    folder = Path(folder)
    spec = _Spec.read(folder)
    study = _study(_storage_url(folder), spec, seed_offset=0, parallel=False)
    rows = _write_trials(folder, study, spec)
    done = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
    best = min(done, key=lambda r: r["value"]) if done else None
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    importances: dict[str, float] = {}
    if len(spec.params) > 1 and len(done) >= 4:
        with contextlib.suppress(Exception), _quiet_optuna():  # fANOVA needs varied values; skip when it cannot
            import optuna

            importances = {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    summary = {"trials": spec.trials, "counts": counts, "best": best, "params": [p.describe() for p in spec.params],
               "importances": importances, "objective": "best validation objective (lower is better)"}
    atomic_write_text(folder / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")
    plot_sweep(rows, [p.to_dict() for p in spec.params], folder / "plots")
    return SweepResult(folder, rows, best)

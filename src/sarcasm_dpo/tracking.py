"""Weights & Biases logging for every stage, which never blocks or fails training.

Each stage (SFT, DPO, compare) opens one `Tracker`, logs through it, and closes it. The stage's
own JSON/CSV outputs are the record of truth; W&B is a view on them, so every W&B call here is
guarded: the first exception inside wandb (bad key, full disk, network, init failure) becomes a
single `TrackingWarning` naming the problem, the tracker turns itself off, and training goes on.

Mode, chosen without any network call and without ever prompting (see `choose_mode`):

* ``enabled=False`` (the CLI's ``--no_wandb``): "disabled"; wandb is not even imported, and no
  files are written.
* ``WANDB_MODE`` / ``WANDB_DISABLED`` set by the user: respected. An empty or unknown
  ``WANDB_MODE`` is ignored with a warning (and hidden from wandb, which would refuse to start).
* credentials present (``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE``, or a netrc entry for a
  host wandb reads its key for: ``WANDB_BASE_URL``'s or wandb's own default, and the host wandb falls
  back to, see `credential_hosts`): "online".
* otherwise "offline": the run is written under ``<dir>/wandb/offline-run-*`` and can be uploaded
  later with ``wandb sync <that folder>``.

Keys are grouped with ``/`` (``train/loss``, ``eval/f1``); nested dicts are flattened that way.
All runs of one pipeline share a group (`make_group_name`), so W&B shows SFT, DPO and compare
side by side; the DPO run declares the SFT adapter folder as its input (`Tracker.use_artifact`).

Example (runs as is; with no credentials it writes an offline run under /tmp/wandb-demo)::

    from sarcasm_dpo.tracking import Tracker, make_group_name

    group = make_group_name()
    with Tracker(enabled=True, project="sarcasm-dpo", job_type="sft", group=group,
                 config={"lr": 2e-4, "lora": {"r": 16}}, dir="/tmp/wandb-demo") as tracker:
        for step in range(3):
            tracker.log({"train": {"loss": 1.0 / (step + 1)}}, step=step)   # -> train/loss
        tracker.log_summary({"eval": {"f1": 0.71}})
        print(tracker.mode)   # "online" with credentials, else "offline"
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import netrc
import os
import re
import secrets
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

# The W&B servers `wandb login` has written netrc entries for, by wandb version: api.wandb.ai up to 0.30, CoreWeave
# Forge's API host (with api.wandb.ai as the fallback wandb reads) from 0.31. Used only where the installed wandb
# does not say (`credential_hosts`).
KNOWN_BASE_URLS = ("https://api.wandb.ai", "https://api.forge.coreweave.com")
# Online init talks to the server before returning; wandb's own default waits 90 s. A shorter
# limit bounds how long a dead network can hold up the start of training (then we go offline).
INIT_TIMEOUT_S = 30.0

_TRUE = {"1", "true", "yes", "on"}
# The WANDB_MODE values wandb's own settings accept, spelled exactly so; any other value (empty,
# upper case, a typo) makes wandb.setup/init raise a validation error.
WANDB_MODES = {"online", "offline", "shared", "disabled", "dryrun", "run"}


class TrackingWarning(RuntimeWarning):
    """W&B failed; tracking is off for the rest of the run, training is unaffected."""


def _warn(message: str) -> None:
    # stacklevel 3: point at the stage's call into the Tracker, not at this helper.
    warnings.warn(message, TrackingWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------
# helpers


def flatten(d: Mapping, sep: str = "/", prefix: str = "") -> dict:
    """Flatten nested mappings into one level: ``{"eval": {"f1": 1}} -> {"eval/f1": 1}``.

    W&B groups charts by the part of a key before ``/``, so nested metric dicts become panels.
    Empty nested mappings vanish (they carry no value to plot).
    """
    out: dict = {}
    for key, value in d.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, sep=sep, prefix=name))
        else:
            out[name] = value
    return out


def make_group_name(prefix: str = "pipeline") -> str:
    """A unique id for one pipeline run, e.g. ``pipeline-20261125-204512-ab12``.

    Time first so groups sort chronologically in the W&B UI; the random suffix keeps two
    pipelines started in the same second apart.
    """
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{prefix}-{stamp}-{secrets.token_hex(2)}"


def adapter_artifact(stage: str) -> str:
    """The W&B artifact name of a stage's adapter folder ("sft-adapter", "dpo-adapter"): the stage that trains it
    logs it under this name, and every later stage declares it as its input by the same name (lineage)."""
    return f"{stage}-adapter"


def _artifact_name(name: str) -> str:
    # W&B artifact names allow only letters, digits, '-', '_' and '.'.
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")
    return cleaned or "artifact"


def _jsonable(obj: Any) -> Any:
    # Configs carry Paths, numpy scalars, dataclass-ish objects; wandb rejects some of them at
    # init, which would cost us the whole run. A JSON round trip makes every value plain.
    from .atomic import plain_json

    return plain_json(obj, lenient=True)


# --------------------------------------------------------------------------------------------
# mode selection (no network, no prompt; wandb is imported only to ask which hosts it reads a key for)


def _netrc_path() -> Path:
    # Same lookup order as wandb itself: $NETRC, then ~/.netrc, then ~/_netrc.
    if os.environ.get("NETRC"):
        return Path(os.environ["NETRC"]).expanduser()
    unix = Path("~/.netrc").expanduser()
    windows = Path("~/_netrc").expanduser()
    return windows if (not unix.exists() and windows.exists()) else unix


def credential_hosts() -> list[str]:
    """The netrc machines whose entry wandb reads its API key from, as the installed wandb says: the host of
    WANDB_BASE_URL, else of wandb's own default server, then the host wandb falls back to when that one has no
    entry (from 0.31: api.wandb.ai behind a CoreWeave Forge address, which is where `wandb login` wrote keys
    before). Where this wandb does not say (another version, or none installed): WANDB_BASE_URL's host, else
    every host in KNOWN_BASE_URLS."""
    base = os.environ.get("WANDB_BASE_URL", "").strip()
    try:
        from wandb.sdk.lib import urls  # wandb >= 0.31; imported here only, so a run with W&B off never pays for it
    except Exception:  # noqa: BLE001 - not installed, broken, or a version without this module
        urls = None
    default = getattr(urls, "DEFAULT_BASE_URL", None)
    if not (base or default):
        return [urlsplit(url).netloc for url in KNOWN_BASE_URLS]
    url = base or default
    normalize = getattr(urls, "normalize_forge_base_url", None)  # a Forge proxy address -> its API host, as wandb does
    if normalize is not None:
        with contextlib.suppress(Exception):
            url = normalize(url)
    fallback = getattr(urls, "forge_upstream_url", None)
    candidates = [url]
    if fallback is not None:
        with contextlib.suppress(Exception):
            candidates.append(fallback(url))
    return list(dict.fromkeys(host for host in (urlsplit(u).netloc for u in candidates) if host))


def has_credentials() -> bool:
    """True if W&B credentials are configured locally. Reads env and netrc only; never the network."""
    if os.environ.get("WANDB_API_KEY", "").strip():
        return True
    if os.environ.get("WANDB_IDENTITY_TOKEN_FILE", "").strip():
        return True
    path = _netrc_path()
    if not path.is_file():
        return False
    try:
        entries = netrc.netrc(str(path))
    except (netrc.NetrcParseError, OSError):
        return False  # a broken netrc is no credential; wandb would not use it either
    for host in credential_hosts():  # wandb takes the first host with an entry, and its key (none if empty)
        entry = entries.authenticators(host)
        if entry:
            return bool(entry[2])
    return False


def choose_mode(enabled: bool) -> str:
    """The W&B mode a Tracker will use: "online", "offline" or "disabled".

    ``enabled=False`` wins over everything. Then an explicit ``WANDB_DISABLED`` / ``WANDB_MODE``
    from the user. Otherwise online exactly when credentials exist, since wandb would prompt
    for a login (or fail) without them, and we never want a run to wait on a prompt.
    """
    if not enabled:
        return "disabled"
    if os.environ.get("WANDB_DISABLED", "").strip().lower() in _TRUE:
        return "disabled"
    env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if "WANDB_MODE" in os.environ and not env_mode:
        _warn("WANDB_MODE is set but empty; ignoring it")
    if env_mode == "disabled":
        return "disabled"
    if env_mode in {"offline", "dryrun"}:
        return "offline"
    credentials = has_credentials()
    # "shared" is wandb's online mode for several processes writing one run; only our main
    # process logs, so plain online is what it amounts to here.
    if env_mode in {"online", "run", "shared"} and not credentials:
        _warn(f"WANDB_MODE={env_mode} but no W&B credentials were found; logging offline instead of prompting for a login")
        return "offline"
    if env_mode and env_mode not in {"online", "run", "shared"}:
        _warn(f"WANDB_MODE={env_mode!r} is not one of online/offline/disabled; ignoring it")
    return "online" if credentials else "offline"


@contextlib.contextmanager
def _wandb_mode_env_hidden_if_invalid():
    """Hide a WANDB_MODE that wandb would refuse while wandb reads its settings.

    wandb validates the variable itself and raises on an empty or unknown value, which would cost
    the run its tracking. `choose_mode` has already read (and warned about) it, and the chosen mode
    is passed to wandb.init explicitly, so wandb does not need it; the user's value is put back after.
    """
    value = os.environ.get("WANDB_MODE")
    if value is None or value in WANDB_MODES:
        yield
        return
    del os.environ["WANDB_MODE"]
    try:
        yield
    finally:
        os.environ["WANDB_MODE"] = value


# --------------------------------------------------------------------------------------------
# the tracker


class Tracker:
    """One W&B run for one stage. Every method is a no-op once the tracker is disabled."""

    def __init__(
        self,
        *,
        enabled: bool,
        project: str,
        job_type: str,
        config: dict,
        group: str | None = None,
        name: str | None = None,
        dir: str | os.PathLike | None = None,
        tags: list[str] | None = None,
    ) -> None:
        self.run: Any = None
        self.mode: str = choose_mode(enabled)
        self._finished = False
        self._wandb: Any = None
        if self.mode == "disabled":
            return  # no import, no files: --no_wandb means W&B is not touched at all

        try:
            import wandb  # imported here so a disabled tracker never pays for it
        except Exception as exc:  # not installed, or broken install
            self._fail("import wandb", exc)
            return
        self._wandb = wandb

        try:
            if dir is not None:
                Path(dir).mkdir(parents=True, exist_ok=True)  # wandb falls back to /tmp if it is missing
            kwargs = dict(
                project=project,
                job_type=job_type,
                config=_jsonable(config or {}),
                group=group,  # None: wandb reads WANDB_RUN_GROUP, so a driver can set it for subprocesses
                name=name,
                dir=None if dir is None else str(dir),
                tags=list(tags) if tags else None,
            )
        except Exception as exc:  # unwritable dir, a config json cannot represent (cycle)
            self._fail("init", exc)
            return
        modes = [self.mode] if self.mode == "offline" else ["online", "offline"]
        for mode in modes:
            try:
                with _wandb_mode_env_hidden_if_invalid():
                    if "WANDB_SILENT" not in os.environ:
                        # wandb configures its console printer once, at setup, from the setup
                        # settings; init's `silent` alone leaves messages such as "Adding directory
                        # to artifact" on stderr.
                        wandb.setup(settings=wandb.Settings(silent=True))
                    self.run = wandb.init(mode=mode, settings=self._settings(wandb), **kwargs)
                self.mode = mode
                break
            except Exception as exc:
                if mode == "online":
                    # A dead network or a revoked key must not lose the metrics: keep them locally.
                    _warn(f"W&B online init failed ({type(exc).__name__}: {exc}); trying offline")
                else:
                    self._fail("wandb.init", exc)
                    return

    @staticmethod
    def _settings(wandb: Any) -> Any:
        kwargs: dict[str, Any] = dict(
            # No console capture: it rewires stdout/stderr, which fights tqdm and HF logging.
            console="off",
            # "finish_previous" keeps wandb.run pointing at this run (the HF WandbCallback uses
            # it); the default would hand back a previous, unfinished run instead of a new one.
            reinit="finish_previous",
        )
        # Quiet by default, but a user who set WANDB_SILENT / WANDB_INIT_TIMEOUT gets their value.
        if "WANDB_SILENT" not in os.environ:
            kwargs["silent"] = True
        if "WANDB_INIT_TIMEOUT" not in os.environ:
            kwargs["init_timeout"] = INIT_TIMEOUT_S
        return wandb.Settings(**kwargs)

    # -- failure handling ----------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self.run is not None and not self._finished

    def _fail(self, what: str, exc: BaseException, close: bool = True) -> None:
        """Warn once, close the run as well as we can, and turn tracking off."""
        _warn(f"W&B {what} failed ({type(exc).__name__}: {exc}); W&B logging is off for the rest of this run")
        logger.debug("W&B failure in %s", what, exc_info=exc)
        run, self.run, self.mode = self.run, None, "disabled"
        if run is not None and close:
            try:
                run.finish(exit_code=1)  # mark it failed instead of leaving it "running"
            except Exception:
                pass  # already warned; a second message would only be noise

    def _call(self, what: str, fn) -> Any:
        if not self.active:
            return None
        try:
            return fn()
        except Exception as exc:
            # A failed finish() is not retried: it may be what hangs or breaks.
            self._fail(what, exc, close=what != "finish")
            return None

    # -- logging -------------------------------------------------------------------------------

    def log(self, metrics: dict, step: int | None = None) -> None:
        """Log metrics; nested dicts become ``a/b`` keys. Steps must not go backwards (wandb drops those)."""
        if self.active and metrics:
            self._call("log", lambda: self.run.log(flatten(metrics), step=step))

    def log_image(self, key: str, path: str | os.PathLike, step: int | None = None) -> None:
        """Log an image file (PNG) as a wandb.Image."""
        if not self.active:
            return
        if not Path(path).is_file():
            # The caller's problem, not W&B's: skip this image but keep tracking.
            _warn(f"W&B log_image: {path} is not a file; skipped")
            return
        self._call("log_image", lambda: self.run.log({key: self._wandb.Image(str(path))}, step=step))

    def log_table(self, key: str, frame, step: int | None = None) -> None:
        """Log a pandas DataFrame as a wandb.Table (wandb truncates past 10,000 rows)."""
        if not self.active:
            return
        # allow_mixed_types: a column holding e.g. ints and strings would otherwise raise.
        self._call(
            "log_table",
            lambda: self.run.log({key: self._wandb.Table(dataframe=frame, allow_mixed_types=True)}, step=step),
        )

    def log_summary(self, values: dict) -> None:
        """Set final values shown in the runs table; nested dicts stay nested (W&B shows a.b)."""
        if self.active and values:
            self._call("log_summary", lambda: self.run.summary.update(_jsonable(values)))

    # -- artifacts -----------------------------------------------------------------------------

    def _build_artifact(self, path: Path, name: str, type: str, metadata: dict | None) -> Any:
        artifact = self._wandb.Artifact(_artifact_name(name), type=type, metadata=_jsonable(metadata or {}))
        if path.is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path))
        return artifact

    def log_artifact(
        self,
        path: str | os.PathLike,
        name: str,
        type: str,
        metadata: dict | None = None,
        aliases: list[str] | None = None,
    ) -> None:
        """Record a file or folder as an output of this run (uploaded online, at `wandb sync` offline)."""
        if not self.active:
            return
        path = Path(path)
        if not path.exists():
            _warn(f"W&B log_artifact: {path} does not exist; skipped")
            return
        self._call(
            "log_artifact",
            lambda: self.run.log_artifact(self._build_artifact(path, name, type, metadata), aliases=aliases),
        )

    def use_artifact(self, path_or_name: str | os.PathLike, type: str, name: str | None = None) -> None:
        """Declare an input of this run, for lineage (e.g. DPO declares the SFT adapter folder).

        A local file or folder is turned into an artifact from its files: when the producing run
        logged the same files under the same ``name``, the digests match, so W&B links this run
        to that very version instead of storing a copy. A string that is not an existing path is
        taken as an artifact reference such as ``"sft-adapter:latest"``.

        wandb refuses `use_artifact` in offline mode, so offline the input is only recorded in
        the run config under ``inputs/<name>``; the lineage edge is lost, the information is not.
        """
        if not self.active:
            return
        local = Path(path_or_name)
        is_local = local.exists()
        if isinstance(path_or_name, os.PathLike) and not is_local:
            # A Path means a local input; a missing one is the caller's problem, not W&B's.
            _warn(f"W&B use_artifact: {path_or_name} does not exist; skipped")
            return
        art_name = _artifact_name(name or (local.name if is_local else str(path_or_name)))
        if self.mode == "offline":
            record = {"path": str(local.resolve()) if is_local else str(path_or_name), "type": type}
            self._call(
                "use_artifact",
                lambda: self.run.config.update({f"inputs/{art_name}": record}, allow_val_change=True),
            )
            return
        if is_local:
            self._call(
                "use_artifact",
                lambda: self.run.use_artifact(self._build_artifact(local, art_name, type, None)),
            )
        else:
            self._call("use_artifact", lambda: self.run.use_artifact(str(path_or_name), type=type))

    # -- ending --------------------------------------------------------------------------------

    def finish(self, exit_code: int = 0, interrupted: bool = False) -> None:
        """Close the run (idempotent). A non-zero exit code marks it failed in W&B."""
        if not self.active:
            self._finished = True
            return
        run = self.run
        if interrupted:
            # wandb's finish() has no "interrupted" state; a summary flag makes these findable.
            self._call("log_summary", lambda: run.summary.update({"interrupted": True}))
        if self.active:
            self._call("finish", lambda: run.finish(exit_code=exit_code))
        self._finished = True
        if self.mode == "offline" and run is not None:
            sync_dir = Path(getattr(run, "dir", "") or "").parent
            # Said out loud: without a login the run is offline by design, and nothing else says where it went.
            print(f"W&B: offline run saved in {sync_dir}; upload it with: wandb sync {sync_dir}", file=sys.stderr)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.finish(0)
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish(1, interrupted=True)
        elif issubclass(exc_type, SystemExit):
            code = exc.code if exc is not None else 0
            self.finish(code if isinstance(code, int) else (0 if code is None else 1))
        else:
            self.finish(1)
        return False  # never swallow the stage's own exception

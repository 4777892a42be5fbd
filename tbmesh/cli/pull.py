"""Get a model from the Hugging Face hub: all of it, or only what one pipeline stage reads.

A Mac that holds layers [start, end) needs config.json, the tokenizer and the safetensors
files holding its layers (and the embedding on the first stage, the final norm and head on
the last), not the whole model: the index's weight_map says which files those are. The
downloading is huggingface_hub's snapshot_download into the model directory: it skips files
already there from the same commit (a pull that was cut short goes on where it stopped, file
by file), copies files its own cache holds (~/.cache/huggingface) and honours HF_TOKEN
(private and gated models), HF_ENDPOINT (a mirror) and HF_HOME, these two read when
huggingface_hub is imported.
"""

from __future__ import annotations

import errno
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tbmesh.core.modelspec import ModelFormatError, count_layers, files_for_layers
from tbmesh.core.units import format_bytes
from tbmesh.node.state import StateDirInUse, lock_state_dir, unlock_state_dir
from tbmesh.weights.modeldir import INDEX_FILE, read_config, read_index

# What mlx-lm downloads besides the weights (its DEFAULT_ALLOW_PATTERNS): configs, tokenizer
# files, chat templates, custom tokenizer code. Not README.md, images or original/*.pth.
SMALL_FILES = ["*.json", "*.py", "tokenizer.model", "*.tiktoken", "tiktoken.model", "*.txt", "*.jsonl", "*.jinja"]
WEIGHTS = "model*.safetensors"  # the weights mlx-lm loads (not adapters or consolidated.safetensors)

Progress = Callable[[int, int], None]


class PullError(Exception):
    """A pull that cannot be done; the message is one line."""


def pull(repo: str, dest: Path, layers: tuple[int, int] | None = None, revision: str | None = None,
         on_progress: Progress | None = None) -> Path:  # fmt: skip
    """Download the model `repo` (OWNER/NAME on the hub) into `dest`; returns `dest`.

    Always its small files (config, tokenizer, chat template, index), then its weights: all of
    them, or with `layers` (start, end) only the files holding what a stage of layers
    [start, end) reads. `revision`: a branch, tag or commit (default: the main branch); both
    steps take the commit it names when the pull starts. `on_progress(done, total)`: bytes of
    the pulled files on disk and in all, called from download threads as the weights arrive.
    Raises PullError.
    """
    from huggingface_hub import HfApi

    dest = Path(dest).expanduser()
    with _one_line_errors(repo, revision, dest):
        info = HfApi().model_info(repo, revision=revision, files_metadata=True)
        sizes = {s.rfilename: s.size or 0 for s in info.siblings or ()}
        if "config.json" not in sizes:
            raise PullError(f"{repo} is not an mlx-lm model: it has no config.json")
        commit = info.sha  # a commit, not a branch that may move between the two steps
        with _only_pull(dest):
            _download(repo, commit, dest, SMALL_FILES)
            weights = _weight_files(dest, sorted(sizes), layers)
            missing = [name for name in weights if name not in sizes]
            if missing:
                raise PullError(f"{repo}: {INDEX_FILE} lists {missing[0]}, which the repository does not hold")
            files = {name: sizes[name] for name in _matching(sorted(sizes), SMALL_FILES) + weights}
            _check_space(dest, files)
            _download(repo, commit, dest, weights, _reporter(dest, files, on_progress))
    return dest


@contextmanager
def _only_pull(dest: Path) -> Iterator[None]:
    """Hold `dest` for this pull (a lock in dest/.cache; the kernel lets it go if we die) and
    drop the partial files a pull cut short left there: huggingface_hub gives each download a
    temporary file of its own and never takes one up again."""
    try:
        lock = lock_state_dir(dest / ".cache")
    except StateDirInUse as error:
        raise PullError(f"another pull into {dest} is running" + (f" (pid {error.pid})" if error.pid else "")) from None
    try:
        for partial in (dest / ".cache" / "huggingface" / "download").rglob("*.incomplete"):
            partial.unlink(missing_ok=True)
        yield
    finally:
        unlock_state_dir(lock)


def _download(repo: str, commit: str, dest: Path, patterns: list[str],
              report: Callable[[int], None] = lambda downloaded: None) -> None:  # fmt: skip
    from huggingface_hub import snapshot_download

    if patterns:  # no patterns would mean every file
        snapshot_download(repo, revision=commit, local_dir=dest, allow_patterns=patterns,
                          tqdm_class=_bar_class(report))  # fmt: skip


def _weight_files(dest: Path, repo_files: list[str], layers: tuple[int, int] | None) -> list[str]:
    """The weight files to pull, after the small files are in `dest`."""
    try:
        weight_map = read_index(dest)
        num_layers = count_layers(read_config(dest))
    except ModelFormatError as error:
        raise PullError(str(error)) from None
    if layers is not None and not _is_range(layers, num_layers):
        raise PullError(f"layers {layers[0]}-{layers[1] - 1} are not a range of the model's {num_layers} layers "
                        f"(0-{num_layers - 1})")  # fmt: skip
    if weight_map is None:  # one model.safetensors, as mlx-lm saves a small model
        return _matching(repo_files, [WEIGHTS])
    if layers is None:
        return sorted(set(weight_map.values()))
    return sorted(files_for_layers(weight_map, num_layers, *layers))


def _is_range(layers: tuple[int, int], num_layers: int) -> bool:
    start, end = layers
    return isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= num_layers


def _matching(names: list[str], patterns: list[str]) -> list[str]:
    from huggingface_hub.utils import filter_repo_objects

    return list(filter_repo_objects(names, allow_patterns=patterns))


def _check_space(dest: Path, sizes: dict[str, int]) -> None:
    """Fail before downloading what the disk cannot hold (huggingface_hub only warns)."""
    needed = sum(size for name, size in sizes.items() if not _complete(dest / name, size))
    existing = next(p for p in (dest, *dest.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise PullError(f"disk full: {dest} needs {format_bytes(needed)} more, {existing} has {format_bytes(free)} free")


def _complete(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size


def _reporter(dest: Path, sizes: dict[str, int], on_progress: Progress | None) -> Callable[[int], None]:
    """Bytes downloaded -> on_progress(bytes of the pulled files on disk, in all)."""
    if on_progress is None:
        return lambda downloaded: None
    total = sum(sizes.values())
    present = sum(size for name, size in sizes.items() if _complete(dest / name, size))
    on_progress(present, total)
    return lambda downloaded: on_progress(min(present + downloaded, total), total)


def _bar_class(report: Callable[[int], None]) -> type:
    """A tqdm for snapshot_download's progress bars that reports the bytes downloaded and
    draws nothing (the library's own bars write to stderr even when it is not a terminal).

    The library updates two byte bars, network and disk (the same bytes over plain HTTP, a
    dedup'd Xet download receives fewer), and one bar of files: the disk bar is the larger.
    """
    from tqdm import tqdm

    lock = threading.Lock()
    counts: dict[int, int] = {}
    reported = [0]

    class Bar(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._bytes = kwargs.get("unit") == "B"
            # drawn into nothing, not disabled: a disabled tqdm lacks the rate the library reads
            super().__init__(*args, **{**kwargs, "file": _Nowhere(), "disable": False})

        def update(self, n: float | None = 1) -> bool | None:
            if self._bytes and n:
                with lock:
                    counts[id(self)] = counts.get(id(self), 0) + int(n)
                    downloaded = max(counts.values())
                    if downloaded > reported[0]:  # once per byte count, not once per bar
                        reported[0] = downloaded
                        report(downloaded)
            return super().update(n)

    return Bar


class _Nowhere:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


@contextmanager
def _one_line_errors(repo: str, revision: str | None, dest: Path) -> Iterator[None]:
    """Turn huggingface_hub's and the disk's errors into one-line PullErrors."""
    try:
        yield
    except PullError:
        raise
    except Exception as error:
        message = _explain(error, repo, revision, dest)
        if message is None:
            raise
        raise PullError(message) from error


def _explain(error: Exception, repo: str, revision: str | None, dest: Path) -> str | None:
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hub = constants.ENDPOINT
    if isinstance(error, HFValidationError):
        return f"{repo!r} is not a model repository name (OWNER/NAME)"
    if isinstance(error, GatedRepoError):
        return f"{repo} is gated: accept its terms at {hub}/{repo} and set HF_TOKEN to a token of yours"
    if isinstance(error, RepositoryNotFoundError):
        return f"no model {repo} on {hub} (a private one needs HF_TOKEN)"
    if isinstance(error, RevisionNotFoundError):
        return f"{repo} has no revision {revision!r}"
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
        if status in (401, 403):
            return f"{repo}: {hub} refused access ({status}): set HF_TOKEN to a token that may read it"
        return f"{repo}: {hub} answered {status} {error.response.reason_phrase}"
    if isinstance(error, (httpx2.TransportError, LocalEntryNotFoundError)):
        return f"cannot reach the hub at {hub} (HF_ENDPOINT): {_one_line(error)}"
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return f"disk full while writing {dest}"
    if isinstance(error, OSError):
        return f"cannot write {dest}: {_one_line(error)}"
    return None


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:200] + "..."

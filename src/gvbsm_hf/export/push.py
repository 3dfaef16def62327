"""Push an exported folder (Hub dataset repo) or a saved teacher (Hub model repo) in one commit.

Offline, or when the Hub cannot be reached, nothing is touched and the
:class:`~gvbsm_hf.errors.OfflineError` names the ``hf upload`` command that retries the push.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

from huggingface_hub import HfApi

from .. import hub_utils
from ..errors import GVBSMError, OfflineError
from .layout import CARD_FILE

logger = logging.getLogger(__name__)  # used outside an Accelerator state (pushes run on the main process)


def retry_command(folder: str | Path, repo_id: str, repo_type: str, private: bool = False,
                  exclude: list[str] | None = None) -> str:
    """The ``hf upload`` command that pushes ``folder`` to ``repo_id`` (root of the repo)."""
    cmd = f"hf upload {shlex.quote(repo_id)} {shlex.quote(str(Path(folder).resolve()))} . --repo-type {repo_type}"
    cmd += " --private" if private else ""
    return cmd + (" --exclude " + " ".join(shlex.quote(p) for p in exclude) if exclude else "")


def _offline_error(folder: Path, repo_id: str, repo_type: str, private: bool, cause: str,
                   exclude: list[str] | None = None) -> OfflineError:
    return hub_utils.offline_error(
        f"Could not push to the Hub {repo_type} repo {repo_id!r}",
        cause,
        f"nothing was deleted: the local folder is intact at {folder.resolve()}. When the network is back "
        f"(and HF_HUB_OFFLINE is unset), retry with:\n    {retry_command(folder, repo_id, repo_type, private, exclude)}",
    )


TEACHER_IGNORE_PATTERNS = ["checkpoints/*", "*.pt", "*.pth", "*.pkl", "*.tmp", ".*", "**/.*"]
"""What a teacher push leaves out: squeeze's training checkpoints (optimizer state, RNG pickles) and
temporary or hidden files; the model files (weights, config, card, provenance) are uploaded."""


def _push_folder(
    folder: str | Path, repo_id: str, repo_type: str, *, token: str | None, private: bool,
    commit_message: str | None, ignore_patterns: list[str] | None = None,
) -> str:
    folder = Path(folder)
    if not folder.is_dir():
        raise GVBSMError(f"{folder} is not a folder: export it first (export_distilled_dataset / save_pretrained).")
    if not (folder / CARD_FILE).exists():
        raise GVBSMError(f"{folder} has no README.md card: export it with gvbsm-hf before pushing.")
    offline = hub_utils.offline_reason()
    if offline is not None:
        raise _offline_error(folder, repo_id, repo_type, private, offline, ignore_patterns)
    if not hub_utils.hub_reachable():  # quick TCP probe: fail in seconds, not after a minute of retries
        raise _offline_error(folder, repo_id, repo_type, private, f"{hub_utils.hub_endpoint()} is not reachable",
                             ignore_patterns)
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        # one commit: the card's `configs:` block and the data files it lists land together
        api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), repo_type=repo_type,
            commit_message=commit_message or f"Upload {folder.name} with gvbsm-hf", ignore_patterns=ignore_patterns,
        )
    except hub_utils.network_errors() as e:
        raise _offline_error(folder, repo_id, repo_type, private, f"{type(e).__name__}: {e}", ignore_patterns) from e
    logger.info("Pushed %s to %s", folder, url)
    return str(url)


def push_distilled_dataset(
    folder: str | Path, repo_id: str, *, token: str | None = None, private: bool = False,
    commit_message: str | None = None,
) -> str:
    """Push an exported folder to a Hub dataset repo in one commit; returns the repo URL.

    Raises :class:`~gvbsm_hf.errors.OfflineError` (folder untouched, ``hf upload`` retry command
    in the message) when offline or the Hub cannot be reached.
    """
    return _push_folder(folder, repo_id, "dataset", token=token, private=private, commit_message=commit_message)


def push_teacher(
    folder: str | Path, repo_id: str, *, token: str | None = None, private: bool = False,
    commit_message: str | None = None,
) -> str:
    """Push a saved teacher folder (``TeacherModel.save_pretrained``) to a Hub model repo: its model
    files only, never squeeze's ``checkpoints/`` (:data:`TEACHER_IGNORE_PATTERNS`); same offline
    behaviour as :func:`push_distilled_dataset`."""
    return _push_folder(folder, repo_id, "model", token=token, private=private, commit_message=commit_message,
                        ignore_patterns=TEACHER_IGNORE_PATTERNS)

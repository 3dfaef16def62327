"""The one place that decides whether the Hugging Face Hub can be used, and whether a string names
a Hub repo.

* Offline mode: ``huggingface_hub``'s own flag (``constants.is_offline_mode()``, read when it was
  imported) or the environment *now* (``HF_HUB_OFFLINE``, else ``TRANSFORMERS_OFFLINE``, as
  ``huggingface_hub`` reads them; ``HF_DATASETS_OFFLINE`` first for dataset downloads, as
  ``datasets`` reads it). Tests and notebooks change the variables after import; both count.
* Reachability: a TCP connect to the Hub endpoint (or another download host) with a short
  timeout, so that an unreachable network fails in seconds instead of after a minute of retries.
  Skipped (reachable) behind an HTTP(S) proxy, where a direct connection says nothing.
* :func:`offline_error` builds every :class:`~gvbsm_hf.errors.OfflineError` of the project (what
  needs the network, why it is not available, the fix); :func:`require_online` raises it.
* :func:`is_hub_repo_id`: ``huggingface_hub.utils.validate_repo_id`` and "not an existing local path";
  :func:`is_local_path` / :func:`public_name` keep paths of this machine out of published cards.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import constants, try_to_load_from_cache
from huggingface_hub.errors import OfflineModeIsEnabled
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .errors import OfflineError

PROBE_TIMEOUT_S = 3.0
OFFLINE_ENV_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = {"1", "ON", "YES", "TRUE"}
_PROXY_ENV_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
_DEFAULT_ENDPOINT = "https://huggingface.co"


# ------------------------------------------------------------------------------ offline mode


def _env_flag(name: str) -> bool | None:
    """``True``/``False`` for a set variable, ``None`` when unset or empty."""
    value = os.environ.get(name)
    if value is None or not value.strip():
        return None
    return value.strip().upper() in _TRUE


def offline_reason(*, datasets: bool = False) -> str | None:
    """Why Hub downloads are switched off (``None``: they are not).

    The environment now (``HF_HUB_OFFLINE``, or ``TRANSFORMERS_OFFLINE`` when that is unset, as
    ``huggingface_hub`` reads them), then the flag ``huggingface_hub`` read at import (what its
    HTTP session enforces). ``datasets=True`` (``datasets.load_dataset``): ``HF_DATASETS_OFFLINE``,
    when set, replaces the environment variables (as in ``datasets.config``), and the flag
    ``datasets`` read at import counts too.
    """
    ds_flag = _env_flag("HF_DATASETS_OFFLINE") if datasets else None
    if ds_flag:
        return "offline mode is enabled: HF_DATASETS_OFFLINE is set"
    if ds_flag is None:
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            flag = _env_flag(name)
            if flag is not None:
                if flag:
                    return f"offline mode is enabled: {name} is set"
                break
    if constants.is_offline_mode():
        return "offline mode is enabled: HF_HUB_OFFLINE was set when huggingface_hub was imported"
    if datasets:
        import datasets as hf_datasets  # heavy (~1 s); backbones/teacher import hub_utils without it

        if hf_datasets.config.HF_HUB_OFFLINE:
            return "offline mode is enabled: HF_DATASETS_OFFLINE was set when datasets was imported"
    return None


def is_offline(*, datasets: bool = False) -> bool:
    """True when offline mode is on (see :func:`offline_reason`)."""
    return offline_reason(datasets=datasets) is not None


# ------------------------------------------------------------------------------ reachability


def hub_endpoint() -> str:
    """The Hub endpoint ``huggingface_hub`` talks to (``HF_ENDPOINT``, default huggingface.co)."""
    return str(constants.ENDPOINT or _DEFAULT_ENDPOINT)


def hub_reachable(timeout: float = PROBE_TIMEOUT_S, *, url: str | None = None) -> bool:
    """Quick TCP probe of ``url`` (default: the Hub endpoint); True behind a proxy (not probed)."""
    if any(os.environ.get(k) for k in _PROXY_ENV_VARS):
        return True
    parsed = urlparse(url or hub_endpoint())
    if not parsed.hostname:
        return False
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def network_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the Hub cannot be reached" (not "the Hub said no")."""
    errors: list[type[BaseException]] = [OfflineModeIsEnabled, ConnectionError, TimeoutError, socket.gaierror]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests.exceptions", ("ConnectionError", "Timeout"))):
        try:  # optional: whichever HTTP client huggingface_hub / this environment has
            mod = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        errors.extend(getattr(mod, name) for name in names if hasattr(mod, name))
    return tuple(errors)


# ------------------------------------------------------------------------------ errors


def offline_error(what: str, cause: str, fix: str) -> OfflineError:
    """The project's :class:`OfflineError`: ``"<what> (<cause>). Fix: <fix>"``.

    ``what``: what needs the network (``"Dataset 'org/x' is not in the local cache"``); ``cause``:
    why it is not available (:func:`offline_reason`, an unreachable host, the library's error);
    ``fix``: what to do instead. Offline-mode causes also say which variable to unset.
    """
    fix = fix.strip()
    if fix.startswith("Fix:"):
        fix = fix[len("Fix:"):].strip()
    if "offline mode is enabled" in cause:
        cause += f"; if this machine does have network access, unset {' / '.join(OFFLINE_ENV_VARS)}"
    return OfflineError(f"{what} ({cause}). Fix: {fix}")


def require_online(
    what: str, fix: str, *, url: str | None = None, datasets: bool = False, timeout: float = PROBE_TIMEOUT_S
) -> None:
    """Raise :func:`offline_error` within ``timeout`` seconds when offline mode is on or ``url``
    (default: the Hub endpoint) cannot be reached; return otherwise."""
    reason = offline_reason(datasets=datasets)
    if reason is not None:
        raise offline_error(what, reason, fix)
    target = url or hub_endpoint()
    if not hub_reachable(timeout, url=target):
        host = urlparse(target).hostname or target
        raise offline_error(what, f"{host} is not reachable", fix)


# ------------------------------------------------------------------------------ names and caches


def is_hub_repo_id(name: str | os.PathLike, *, require_namespace: bool = True) -> bool:
    """True when ``name`` is a syntactically valid Hub repo id (``huggingface_hub.utils.
    validate_repo_id``: ``owner/name``, or a bare ``name`` with ``require_namespace=False``) and
    is not an existing local file or folder (a local path always wins, as in ``from_pretrained``).

    Prefixed names (``hf-hub:``, ``tv:``, ``timm:``), absolute or ``./`` paths and anything with
    more than one ``/`` are not repo ids.
    """
    if not isinstance(name, str) or not name:
        return False
    if require_namespace and name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not os.path.exists(name)


def is_local_path(value: str) -> bool:
    """True for a string that names a file or folder of this machine: absolute, ``~``, ``./``,
    backslashes, or a ``/`` with the string either existing here or not a Hub id. False for URLs,
    prefixed names (``hf-hub:``, ``tv:``), prose (whitespace) and Hub ids."""
    if not isinstance(value, str) or not value or "://" in value:
        return False
    if os.path.isabs(value) or value.startswith(("~", "./", "../", ".\\", "..\\")) or "\\" in value:
        return True
    if any(c.isspace() for c in value) or re.match(r"^[A-Za-z][\w+.-]*:", value):
        return False
    if "/" in value or os.sep in value:
        return os.path.exists(value) or not is_hub_repo_id(value)
    return False


def public_name(name: str | None) -> str | None:
    """``name`` fit for a published card: a local path reduced to its last component, anything
    else (Hub id, short name) unchanged."""
    if name and is_local_path(name):
        return Path(name.rstrip("/\\")).name or "folder"
    return name


def hub_file_cached(repo_id: str, filenames: Iterable[str], *, repo_type: str = "model") -> bool:
    """True if any of ``filenames`` of ``repo_id`` is in the local Hub cache."""
    for filename in filenames:
        try:
            path = try_to_load_from_cache(repo_id, filename, repo_type=repo_type)
        except Exception:  # noqa: BLE001 - invalid repo id etc.: treat as not cached
            return False
        if isinstance(path, str) and os.path.exists(path):
            return True
    return False


def dataset_cached(repo_id: str) -> bool:
    """True if a Hub dataset has been downloaded before (Hub cache or ``datasets`` cache)."""
    import datasets  # heavy (~1 s); backbones/teacher import hub_utils without it

    return (Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}").exists() or (
        Path(datasets.config.HF_DATASETS_CACHE) / repo_id.replace("/", "___")
    ).exists()

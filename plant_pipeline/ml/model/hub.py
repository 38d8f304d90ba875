"""Can a Hugging Face hub model be loaded here, and from where: decided in about a second, before from_pretrained.

When the hub cannot be reached, huggingface_hub retries every file it has not cached five times (1+2+4+8+8 s,
about 23 s a file), so a LLaVA's config, processor and tokenizer files cost some 2.5 minutes and 30 log lines
before one OSError. One HEAD of the model's config.json, without retries, tells whether the hub answers; the
local cache tells whether it needs to. ModelSpec (spec.py) turns the answer into a load or one error message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import quote

PROBE_FILE = "config.json"  # every transformers model has one
PROBE_TIMEOUT_S = 5.0  # unless HF_HUB_ETAG_TIMEOUT is set: then that (a slow link that needs longer)


@dataclass(frozen=True)
class HubAnswer:
    """What one probe of the hub found: ``reachable`` False means no answer at all (network, DNS, proxy)."""

    reachable: bool
    problem: str | None = None  # None: the hub serves the model; else one line on what went wrong


def offline_mode() -> bool:
    """HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1): huggingface_hub itself refuses every request."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def is_cached(repo_id: str, revision: str | None) -> bool:
    """Whether the cache holds the model's config.json at ``revision`` (files it lacks still fail at load)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, PROBE_FILE, cache_dir=cache_dir(), revision=revision), str)


def probe_timeout_s() -> float:
    explicit = os.environ.get("HF_HUB_ETAG_TIMEOUT", "")
    return float(explicit) if explicit.replace(".", "", 1).isdigit() else PROBE_TIMEOUT_S


def probe(repo_id: str, revision: str | None, timeout_s: float | None = None) -> HubAnswer:
    """One HEAD of ``repo_id``'s config.json at the hub, without huggingface_hub's retries."""
    from huggingface_hub import get_hf_file_metadata
    from huggingface_hub.errors import (
        EntryNotFoundError,
        FileMetadataError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # Built here rather than with hf_hub_url, whose template froze HF_ENDPOINT when huggingface_hub was imported.
    url = f"{endpoint()}/{repo_id}/resolve/{quote(revision or 'main', safe='')}/{PROBE_FILE}"
    try:
        get_hf_file_metadata(url, timeout=timeout_s or probe_timeout_s(), retry_on_errors=False)
    except GatedRepoError:
        return HubAnswer(True, f"{repo_id} is gated: accept its terms on the hub and log in (`hf auth login` or "
                               "HF_TOKEN)")
    except RepositoryNotFoundError:
        return HubAnswer(True, f"the hub has no model {repo_id} (or it is private: log in with `hf auth login` or "
                               "HF_TOKEN); check the spelling")
    except RevisionNotFoundError:
        return HubAnswer(True, f"{repo_id} has no revision {revision!r}")
    except EntryNotFoundError:
        return HubAnswer(True, f"{repo_id} has no {PROBE_FILE}, so it is not a transformers model")
    except FileMetadataError as exc:
        return HubAnswer(False, f"{endpoint()} does not answer like a Hugging Face hub ({exc})")
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        return HubAnswer(status not in (429, 500, 502, 503, 504), f"the hub answered HTTP {status} for {url}")
    except Exception as exc:  # noqa: BLE001 - whatever stopped an answer (DNS, refused, timeout, proxy, TLS)
        return HubAnswer(False, f"{type(exc).__name__}: {exc}".strip())
    return HubAnswer(True)


def offline_fixes(repo_id: str) -> str:
    """What a person can do to load ``repo_id`` without the hub: the end of every such error message."""
    return (
        f"To run without the hub: set PLANT_PIPELINE_MODEL to a local folder holding the model (on a machine with "
        f"internet: `hf download {repo_id} --local-dir DIR`, then copy DIR here); or fill the Hugging Face cache "
        f"there (`hf download {repo_id}`), copy it here and point HF_HOME at it (now: cache {cache_dir()}), then "
        "set HF_HUB_OFFLINE=1 (or the model resource's local_files_only) so nothing waits on the network. "
        "The demo's model needs no hub: PLANT_PIPELINE_MODEL=tiny-random-llava."
    )

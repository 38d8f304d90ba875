"""A hub model on a machine without the hub: one error in a second naming the fixes, or the cache, never minutes of
retries (huggingface_hub alone takes about 2.5 minutes and 30 log lines to give up on an uncached LLaVA)."""

from __future__ import annotations

import shutil
import time

import pytest
from huggingface_hub import constants

from plant_pipeline.ml.model import ModelConfigError, ModelSpec
from plant_pipeline_tests.http_server import LoopbackServer, free_port

REPO = "example-org/llava-not-here"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
FIXES = ("PLANT_PIPELINE_MODEL", "HF_HOME", "HF_HUB_OFFLINE", "local_files_only", f"hf download {REPO}")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache, online mode, and a hub endpoint where nothing listens (connection refused).

    huggingface_hub reads these once at import; the loading path reads them from its constants at call time."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    return tmp_path / "hf" / "hub"


def _fill_cache(cache, model_dir, files=None) -> None:
    """Lay ``model_dir``'s files out as `hf download REPO` would: refs/main -> snapshots/<commit>/."""
    repo = cache / f"models--{REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for path in model_dir.iterdir():
        if path.is_file() and (files is None or path.name in files):
            shutil.copy(path, snapshot / path.name)


def _load_fails_fast(spec: ModelSpec, load: str) -> str:
    start = time.monotonic()
    with pytest.raises(ModelConfigError) as info:
        getattr(spec, load)()
    assert time.monotonic() - start < 10
    return str(info.value)


@pytest.mark.parametrize("load", ["load_processor", "load_model"])
def test_unreachable_hub_and_no_cache_is_one_error_in_seconds_naming_the_fixes(hub, load):
    message = _load_fails_fast(ModelSpec(model_name=REPO, device="cpu"), load)
    assert f"model {REPO} cannot be loaded" in message
    assert f"{constants.ENDPOINT} cannot be reached" in message and "Connection refused" in message
    assert str(hub) in message
    assert all(fix in message for fix in FIXES), message


@pytest.mark.parametrize(("offline", "local_files_only", "why"), [
    (True, False, "HF_HUB_OFFLINE=1 is set"), (False, True, "local_files_only is set")])
def test_offline_without_the_model_cached_fails_at_once(hub, monkeypatch, offline, local_files_only, why):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    spec = ModelSpec(model_name=REPO, local_files_only=local_files_only, device="cpu")
    message = _load_fails_fast(spec, "load_processor")
    assert f"model {REPO} is not in the Hugging Face cache ({hub})" in message and why in message
    assert all(fix in message for fix in FIXES), message


@pytest.mark.parametrize("offline", [False, True])
def test_a_prefilled_cache_loads_without_the_hub(hub, monkeypatch, tiny_model_dir, caplog, offline):
    _fill_cache(hub, tiny_model_dir)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    spec = ModelSpec(model_name=REPO, device="cpu")
    start = time.monotonic()
    processor = spec.load_processor()
    model = spec.load_model()
    assert time.monotonic() - start < 10
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
    warned = [r.getMessage() for r in caplog.records if "cannot be reached" in r.getMessage()]
    # Online, the unreachable hub is said once per load; offline, nothing is tried, so nothing is said.
    assert len(warned) == (0 if offline else 2) and all("loading " + REPO + " from the cache" in w for w in warned)


def test_a_cache_holding_only_the_config_names_what_is_missing(hub, tiny_model_dir):
    _fill_cache(hub, tiny_model_dir, files={"config.json"})
    message = _load_fails_fast(ModelSpec(model_name=REPO, device="cpu"), "load_model")
    assert f"model {REPO} is only partly in the Hugging Face cache ({hub})" in message
    assert "PLANT_PIPELINE_MODEL" in message


@pytest.mark.parametrize("name", ["/nowhere/llava", "./models/llava", "models/llava/v1"])
def test_a_folder_that_does_not_exist_is_named_not_sent_to_the_hub(hub, name):
    message = _load_fails_fast(ModelSpec(model_name=name, device="cpu"), "load_processor")
    assert f"model {name!r} looks like a folder, but there is no such folder" in message


def test_pretrained_kwargs_carry_the_checked_local_files_only(hub, tiny_model_dir):
    """What callers that load by themselves (shard workers, the training skeleton) pass to from_pretrained."""
    with pytest.raises(ModelConfigError, match="cannot be reached"):
        ModelSpec(model_name=REPO).pretrained_kwargs()
    _fill_cache(hub, tiny_model_dir)
    assert ModelSpec(model_name=REPO, revision=None).pretrained_kwargs() == {"revision": None,
                                                                             "local_files_only": True}
    assert ModelSpec(model_name=str(tiny_model_dir)).pretrained_kwargs()["local_files_only"] is False


@pytest.mark.parametrize(("error_code", "expected"), [
    ("RepoNotFound", f"the hub has no model {REPO}"),
    ("GatedRepo", f"{REPO} is gated: accept its terms"),
    ("RevisionNotFound", f"{REPO} has no revision 'main'"),
])
def test_a_hub_that_answers_no_is_named_and_not_retried(hub, tmp_path, tiny_model_dir, error_code, expected):
    """Reachable but refusing: the hub's own reason, once, in a second, and no silent fallback to the cache."""
    _fill_cache(hub, tiny_model_dir)
    (tmp_path / "site").mkdir()
    with LoopbackServer(tmp_path / "site") as server:
        endpoint = constants.ENDPOINT = server.url.rstrip("/")  # the fixture's monkeypatch restores it
        server.fail_next(f"{REPO}/resolve/main/config.json", status=404, headers={"X-Error-Code": error_code})
        spec = ModelSpec(model_name=REPO, revision="main" if error_code == "RevisionNotFound" else None)
        message = _load_fails_fast(spec, "load_processor")
        assert len(server.requests) == 1
    assert f"cannot be loaded from {endpoint}: {expected}" in message

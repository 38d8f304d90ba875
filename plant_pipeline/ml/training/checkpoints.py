"""Checkpoints: when one was written to the end, the sha256 manifest written into each, and which one a run
resumes from (the newest whose files check out)."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import torch

from plant_pipeline.ml.errors import UsageError
from plant_pipeline.ml.files import atomic_write_json, atomic_write_text, sha256_file
from plant_pipeline.ml.training.config import RunIdentity, TrainConfigError

logger = logging.getLogger(__name__)

RUN_CONFIG = "run_config.json"  # in checkpoints_dir: the RunIdentity.checkpoint_key() the checkpoints were trained with
CHECKPOINT_MANIFEST = "checkpoint_sha256.json"  # in each checkpoint: size and sha256 of its files, written last
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "adapter_model.bin", "pytorch_model.bin")


class CheckpointError(UsageError):
    """No checkpoint can be resumed (its files are damaged), or a checkpoint's weights do not fit the model."""


def checkpoint_step(path: Path) -> int:
    """N of a ``checkpoint-N`` folder."""
    return int(CHECKPOINT_RE.match(path.name).group(1))


def incomplete_reason(path: Path) -> str | None:
    """Why ``checkpoint-N`` was not written to the end, or None.

    transformers 5.24's ``Trainer._save_checkpoint`` writes straight into checkpoint-N (no temporary folder,
    no rename): the weights (adapter or model), then optimizer.pt, scheduler.pt, the scaler and RNG states,
    then trainer_state.json, and only then rotates old checkpoints; CHECKPOINT_MANIFEST follows (on_save). So a
    checkpoint is complete when its trainer_state.json parses and names step N and the weights, optimizer and
    scheduler files are non-empty.
    """
    match = CHECKPOINT_RE.match(path.name)
    if not match or not path.is_dir():
        return f"{path} is not a checkpoint-N folder"
    state_file = path / "trainer_state.json"
    try:
        step = int(json.loads(state_file.read_text()).get("global_step", -1))
    except FileNotFoundError:
        return f"{state_file} is missing"
    except (OSError, ValueError, TypeError, AttributeError) as err:
        return f"{state_file} does not parse ({err})"
    if step != int(match.group(1)):
        return f"{state_file} is at step {step}, not {match.group(1)}"

    def present(name: str) -> bool:
        file = path / name
        return file.is_file() and file.stat().st_size > 0

    weights = any(present(name) for name in WEIGHT_FILES)
    index = path / "model.safetensors.index.json"
    if not weights and index.is_file():
        try:
            weights = all(present(name) for name in set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            return f"{index} does not parse ({err})"
    missing = [name for name, ok in (("weights", weights), ("optimizer.pt", present("optimizer.pt")),
                                     ("scheduler.pt", present("scheduler.pt"))) if not ok]
    return f"{path} has no {', '.join(missing)}" if missing else None


def checkpoint_is_complete(path: Path) -> bool:
    """Whether ``checkpoint-N`` was written to the end (see incomplete_reason); says nothing of its files' contents."""
    return incomplete_reason(path) is None


def _checkpoint_files(path: Path) -> list[Path]:
    return sorted(f for f in path.rglob("*") if f.is_file() and f.name != CHECKPOINT_MANIFEST
                  and not f.name.startswith("."))


def write_checkpoint_manifest(path: Path) -> Path:
    """Record size and sha256 of every file of a checkpoint the Trainer has just written (still in the page cache)."""
    files = {str(f.relative_to(path)): {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
             for f in _checkpoint_files(path)}
    return atomic_write_json(path / CHECKPOINT_MANIFEST, {"files": files})


def _safetensors_problem(file: Path) -> str | None:
    # The header (8-byte length + JSON) lists every tensor's byte range: the data must end where the file does.
    size = file.stat().st_size
    try:
        with file.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if not 0 < length <= size - 8:
                return f"{file}: header length {length} does not fit in {size} bytes (truncated or not safetensors)"
            header = json.loads(handle.read(length))
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        return f"{file}: the safetensors header does not parse ({err})"
    if 8 + length + end != size:
        return f"{file}: the header promises {8 + length + end} bytes, the file has {size} (truncated?)"
    return None


def _structure_problem(path: Path) -> str | None:
    """Checks that cost no full read, for checkpoints without a manifest (older ones, or cut off just before it)."""
    import zipfile

    for file in _checkpoint_files(path):
        if file.suffix == ".safetensors":
            problem = _safetensors_problem(file)
        elif file.suffix in (".pt", ".pth", ".bin"):
            try:  # torch.save writes a zip: its central directory, at the end, goes with a truncation
                with zipfile.ZipFile(file) as archive:
                    archive.infolist()
                problem = None
            except (OSError, zipfile.BadZipFile) as err:
                problem = f"{file} is not a readable torch file ({err})"
        elif file.suffix == ".json":
            try:
                json.loads(file.read_text())
                problem = None
            except (OSError, ValueError) as err:
                problem = f"{file} does not parse ({err})"
        else:
            problem = None
        if problem:
            return problem
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why a complete checkpoint cannot be resumed, naming the file; None when it can.

    With a manifest (every checkpoint this module's runs write): each file's size, then its sha256. Without one:
    the structure of each file (safetensors header and length, torch zip directory, JSON).
    """
    problem = incomplete_reason(path)
    if problem:
        return problem
    manifest = path / CHECKPOINT_MANIFEST
    if not manifest.is_file():
        return _structure_problem(path)
    try:
        listed = json.loads(manifest.read_text())["files"]
        files = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in listed.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{manifest} does not parse ({err})"
    for name, (size, _) in files.items():  # sizes first: a truncated file is found without reading anything
        file = path / name
        if not file.is_file():
            return f"{file} is missing (listed in {CHECKPOINT_MANIFEST})"
        if file.stat().st_size != size:
            return f"{file} has {file.stat().st_size} bytes, {size} when it was saved (truncated or overwritten)"
    for name, (_, digest) in files.items():
        actual = sha256_file(path / name)
        if actual != digest:
            return f"{path / name} has sha256 {actual[:16]}..., {digest[:16]}... when it was saved (corrupted)"
    return None


def find_resumable_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step whose files check out (checkpoint_problem), or None.

    A newer complete checkpoint that does not check out is named in a warning and the next older one is tried;
    when complete checkpoints exist but none checks out, CheckpointError names them all.
    """
    if not checkpoints_dir.is_dir():
        return None
    complete = sorted(((int(m.group(1)), path) for path in checkpoints_dir.iterdir()
                       if (m := CHECKPOINT_RE.match(path.name)) and checkpoint_is_complete(path)), reverse=True)
    problems = []
    for _, path in complete:
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("cannot resume from %s: %s; trying the next older checkpoint", path.name, problem)
        problems.append(problem)
    if problems:
        raise CheckpointError(
            f"no checkpoint in {checkpoints_dir} can be resumed: {'; '.join(problems)}. Move the damaged checkpoints "
            "away (to keep them) and train again, or set resume=False to start over (deletes them)")
    return None


def remove_incomplete_checkpoints(checkpoints_dir: Path) -> None:
    """Delete checkpoint-N folders that were not written to the end."""
    # A checkpoint cut off by a kill would otherwise count in the Trainer's save_total_limit rotation
    # (it sorts by name/mtime, not completeness) and could push a good one out. Damaged complete ones stay: they
    # are overwritten when the resumed run saves that step again.
    for path in checkpoints_dir.glob("checkpoint-*"):
        problem = incomplete_reason(path) if CHECKPOINT_RE.match(path.name) else None
        if problem:
            logger.warning("removing incomplete checkpoint %s (the run that wrote it was interrupted): %s",
                           path, problem)
            shutil.rmtree(path, ignore_errors=True)


def make_manifest_callback():
    """A TrainerCallback that writes CHECKPOINT_MANIFEST (built on call: transformers loads only when training)."""
    from transformers import TrainerCallback

    class ManifestCallback(TrainerCallback):
        """Writes CHECKPOINT_MANIFEST into each checkpoint once every rank has written its part of it."""

        def on_save(self, args, state, control, **kwargs):
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.barrier()  # per-rank files (RNG states, sharded weights) are all there
            if state.is_world_process_zero:
                write_checkpoint_manifest(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    return ManifestCallback()



def prepare_checkpoints_dir(checkpoints_dir: Path, identity: RunIdentity, *, resume: bool,
                            is_main: bool) -> Path | None:
    """The checkpoint to resume from (None: start fresh), after recording ``identity`` in the folder.

    resume=False deletes the old checkpoints. A resumable checkpoint written under another identity is refused
    (TrainConfigError naming what differs) rather than mixed into this run.
    """
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    run_file = checkpoints_dir / RUN_CONFIG
    key = identity.checkpoint_key()
    if not resume:
        if is_main:
            for path in checkpoints_dir.glob("checkpoint-*"):
                shutil.rmtree(path, ignore_errors=True)
        resume_from = None
    else:
        resume_from = find_resumable_checkpoint(checkpoints_dir)
        if resume_from is not None and run_file.is_file():
            recorded = json.loads(run_file.read_text())
            if recorded != key:
                raise TrainConfigError(
                    f"{checkpoints_dir} holds checkpoints from a run with other settings (differing: "
                    f"{', '.join(identity.changed_since(recorded))}); set resume=False to start over (deletes them), "
                    "restore those settings, or use another checkpoints_dir (RunIdentity.folder_name() names one "
                    "per identity)"
                )
        if is_main:
            remove_incomplete_checkpoints(checkpoints_dir)
    if is_main:
        atomic_write_text(run_file, json.dumps(key, indent=2, sort_keys=True))
    return resume_from

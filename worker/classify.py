"""Classify one stored instance: filter -> scope (header) -> decode -> the serving path's
preprocessing -> predict and pixel check -> one result row, or `out_of_scope` with the reason.
With a candidate version in the registry (`pneumo models candidate`), an image the served version
classified gets the candidate's result too (same decoded image; recorded, never sent): shadow mode.

A plain function over a session factory (worker.tasks registers it; tests call it directly).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from core import group_commit, registry, scope
from core.db import (
    TERMINAL_STATES,
    Instance,
    InstanceState,
    ModelVersionRow,
    Result,
    Study,
    audit,
    insert_ignoring_duplicates,
    utcnow,
)
from core.queue import MAX_WORKER_DEATHS
from serving.decode import DecodeError, grayscale_pixels
from serving.header import header_age, header_view
from serving.image import preprocess
from worker import filters, picture
from worker.inference import Classifier, Prediction
from worker.isolation import decode_in_child

log = logging.getLogger(__name__)


def _finish(session: Session, instance_id: int, state: InstanceState, reason: str | None) -> bool:
    """Make a non-terminal instance terminal and flag its study for a report; False if it
    already was terminal (another delivery of the same job got there first)."""
    study_id = session.scalar(
        update(Instance).where(Instance.id == instance_id, Instance.state.not_in(TERMINAL_STATES))
        .values(state=state, reason=reason, finished_at=utcnow()).returning(Instance.study_id)
    )
    if study_id is None:
        return False
    session.execute(update(Study).where(Study.id == study_id).values(
        report_pending=True, changes=Study.changes + 1))
    audit(session, "instance", instance_id, str(state), reason)
    return True


def classify_instance(
    sessions: sessionmaker[Session], instance_id: int, classifier: Callable[[], Classifier],
    pictures: bool = True,
) -> str:
    """Classify one instance; idempotent. Returns the terminal state it ends in.

    Two short transactions around the model: claim, then record. Both change the instance only
    while it is not terminal (a conditional UPDATE), so two deliveries of the same job, in two
    processes or two threads of one batching worker, record one outcome. The threads of one
    worker commit their transactions together (core.group_commit).
    """
    writer = group_commit.writer_for(sessions)
    claimed = writer.run(lambda session: _claim(session, instance_id))
    if isinstance(claimed, str):
        return claimed
    path, sop_uid, attempts = claimed
    if attempts > 1:
        # An attempt before this one never finished: this image may be what killed it, so it is
        # decoded apart (worker.isolation) and can take down nothing but its own child process.
        log.warning("instance %s: attempt %d after one that never finished; decoding it apart",
                    sop_uid, attempts)
    shadow: list[tuple[Classifier, dict]] = []
    state, reason, result, model = _classify_file(Path(path), classifier, attempts > 1, shadow, pictures)
    ended = writer.run(lambda session: _record(session, instance_id, state, reason, result, model, shadow))
    log.info("instance %s %s%s", sop_uid, ended, f": {reason}" if reason else "")
    return ended


def _claim(session: Session, instance_id: int) -> tuple[str, str, int] | str:
    """(path, SOP Instance UID, attempts) of a claimed instance, or the terminal state it is in
    already (then there is nothing to do)."""
    claimed = session.execute(
        update(Instance).where(Instance.id == instance_id, Instance.state.not_in(TERMINAL_STATES))
        .values(attempts=Instance.attempts + 1, state=InstanceState.PROCESSING)
        .returning(Instance.path, Instance.sop_instance_uid, Instance.attempts)
    ).one_or_none()
    if claimed is None:
        state = session.scalar(select(Instance.state).where(Instance.id == instance_id))
        if state is None:
            raise LookupError(f"instance {instance_id} does not exist")
        return state
    path, sop_uid, attempts = claimed
    if attempts > MAX_WORKER_DEATHS:
        # Redelivered this often: the job itself kills workers (memory, a decoder crash).
        _finish(session, instance_id, InstanceState.FAILED,
                f"gave up after {attempts - 1} attempts that never finished")
        return InstanceState.FAILED
    return path, sop_uid, attempts


def _record(session: Session, instance_id: int, state: InstanceState, reason: str | None,
            result: dict | None, model: Classifier | None, shadow: list[tuple[Classifier, dict]]) -> str:
    """The outcome's rows; the state the instance ends in (another delivery's, if it finished first)."""
    if not _finish(session, instance_id, state, reason):
        # Another delivery of the same job finished it first: keep what that one recorded.
        return session.scalar(select(Instance.state).where(Instance.id == instance_id))
    if model is not None:
        _record_model_version(session, model)
    if state == InstanceState.OUT_OF_SCOPE:
        session.execute(update(Instance).where(Instance.id == instance_id).values(**result))
    elif result is not None:
        session.execute(insert_ignoring_duplicates(session, Result).values(
            instance_id=instance_id, **result))
    for candidate, row in shadow:
        _record_model_version(session, candidate)
        session.execute(insert_ignoring_duplicates(session, Result).values(
            instance_id=instance_id, **row))
    return state


def _classify_file(path: Path, classifier: Callable[[], Classifier], isolated: bool = False,
                   shadow: list[tuple[Classifier, dict]] | None = None, pictures: bool = True):
    """(state, reason, result or refusal columns or None, the model used or None); never raises
    for bad input. A result carries a label only when the image is within the model's scope.
    Given `shadow`, a classified image's candidate result (its model, its row) is added to it.
    With `pictures` off (PNEUMO_PICTURES) nothing is kept for a picture."""
    started = time.perf_counter()
    try:
        # Values over 1 MB (pixel data, large private elements) are read only when used: the
        # filters refuse on the header alone, before any pixel data is loaded or decoded.
        dataset = dcmread(path, defer_size=1 << 20)
    except Exception as error:
        return InstanceState.FAILED, f"stored file unreadable: {type(error).__name__}", None, None
    reason = filters.ignore_reason(dataset)
    if reason:
        return InstanceState.IGNORED, reason, None, None
    reason = filters.failure_reason(dataset)
    if reason:
        return InstanceState.FAILED, reason, None, None
    # The header decides first: an image out of the version's intended use (an adult, a lateral)
    # is refused before a single pixel is decoded (issue 21: decoding is the costly part).
    model = classifier()
    reason = scope.header_reason(model.intended_use, header_age(dataset), header_view(dataset))
    if reason:
        return InstanceState.OUT_OF_SCOPE, f"{reason} ({model.version.label})", _refusal(model), model
    pixels = None  # decoded here, not in a child: kept small for the picture (worker.picture)
    try:
        if isolated:
            tensor = decode_in_child(path, model.resize)
        else:
            pixels = grayscale_pixels(dataset)
            tensor = preprocess(pixels, model.resize)
    except (DecodeError, ValueError) as error:
        return InstanceState.FAILED, str(error)[:500], None, None
    decode_ms = (time.perf_counter() - started) * 1000
    prediction = model.predict(tensor)
    # The picture's grey image and, in scope, its heat map: the picture never decodes it again.
    if pictures:
        picture.keep_map(path, model.name, model.version.version,
                         prediction.saliency if prediction.scope_score <= model.scope_threshold else None,
                         pixels)
    if prediction.scope_score > model.scope_threshold:
        reason = scope.pixel_reason(prediction.scope_score, model.scope_threshold, model.version.label)
        return InstanceState.OUT_OF_SCOPE, reason, _refusal(model, prediction.scope_score), model
    candidate = _candidate_of(model) if shadow is not None else None
    if candidate is not None and shadow is not None:
        row = _shadow_row(candidate, dataset, path, tensor if candidate.resize == model.resize
                          else None, isolated)
        if row is not None:
            shadow.append((candidate, {**row, "decode_ms": row["decode_ms"] or decode_ms}))
    return InstanceState.CLASSIFIED, None, _row(model, prediction, decode_ms), model


def _row(model: Classifier, prediction: Prediction, decode_ms: float) -> dict:
    return {
        "model_name": model.name,
        "model_version": model.version.version,
        "probability": prediction.probability,
        "threshold": model.threshold,
        "label": prediction.label,
        "decode_ms": decode_ms,
        "inference_ms": prediction.inference_ms,
        "scope_score": prediction.scope_score,
        "scope_threshold": model.scope_threshold,
    }


_candidates: dict[tuple[Path, str, str], Classifier | None] = {}
_candidates_lock = threading.Lock()


def _candidate_of(model: Classifier) -> Classifier | None:
    """The candidate of the served `model`'s name in its registry, loaded once; None if none.

    Read on each image (a small JSON file), as the served marker is, so setting or clearing a
    candidate takes effect without restarting workers. One that cannot load is logged, once,
    and skipped: a broken candidate never stops the served version's answer.
    """
    models_dir = model.version.path.parent.parent
    version = registry.candidate_versions(models_dir).get(model.name)
    if version is None:
        return None
    key = (models_dir, model.name, version)
    with _candidates_lock:
        if key not in _candidates:
            try:
                _candidates[key] = Classifier(f"{model.name}@{version}", models_dir,
                                              getattr(model, "batch_size", 1),
                                              getattr(model, "batch_wait_s", 0.01))
            except Exception as error:
                log.error("candidate %s@%s not run: %s", model.name, version, error)
                _candidates[key] = None
        return _candidates[key]


def _shadow_row(candidate: Classifier, dataset, path: Path, tensor, isolated: bool) -> dict | None:
    """The candidate's result row for an image the served version classified (`tensor`: the
    served version's input when the candidate's resize is the same); None where the candidate
    refuses the image (its own scope) or fails on it."""
    try:
        if scope.header_reason(candidate.intended_use, header_age(dataset), header_view(dataset)):
            return None
        started = time.perf_counter()
        decode_ms = 0.0  # the served version's decode, when its input is reused
        if tensor is None:
            tensor = (decode_in_child(path, candidate.resize) if isolated
                      else preprocess(grayscale_pixels(dataset), candidate.resize))
            decode_ms = (time.perf_counter() - started) * 1000
        prediction = candidate.predict(tensor)
    except Exception as error:
        log.warning("candidate %s failed on an image: %s", candidate.version.label, type(error).__name__)
        return None
    if prediction.scope_score > candidate.scope_threshold:
        return None
    return _row(candidate, prediction, decode_ms)


def _refusal(model: Classifier, score: float | None = None) -> dict:
    """The instance columns that name the version that refused an image, and its pixel score."""
    return {"scope_model_name": model.name, "scope_model_version": model.version.version,
            "scope_score": score}


def _record_model_version(session: Session, model: Classifier) -> None:
    """The served version's card in `model_versions` (one statement; a no-op once it is there)."""
    session.execute(insert_ignoring_duplicates(session, ModelVersionRow).values(model.version_row))

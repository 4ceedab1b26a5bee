"""`pneumo` commands of the model registry: train, ensemble, evaluate and compare versions, list
and serve them (`models`; silently, or a candidate in shadow, then promote it), and fit or refit
their pixel check (`scope`)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from core import registry
from core.card import SplitMetrics
from ops.commands.common import (
    DEFAULT_DATA,
    DEFAULT_WEIGHTS,
    MODELS_DIR_HELP,
    command_settings,
    errors,
    registry_dir,
    require_keras_backend,
    setup_logging,
)

commands = typer.Typer()  # merged into the top level by ops/cli.py
models_app = typer.Typer(help="The model registry in models/.", no_args_is_help=True)
scope_app = typer.Typer(help="Intended use and pixel check of a model version.", no_args_is_help=True)


@commands.command()
@errors()
def train(
    model: str = typer.Option(..., help="pneumonia-cnn or pneumonia-transfer"),
    data: Path = typer.Option(DEFAULT_DATA, help="Root of {train,val,test}/{NORMAL,PNEUMONIA}"),
    models_dir: Path = typer.Option(None, help=MODELS_DIR_HELP),
    backbone: str = typer.Option("mobilenet_v2", help="mobilenet_v2, mobilenet_v2_0.35, xception"),
    weights: str = typer.Option(
        str(DEFAULT_WEIGHTS), help="Backbone weights: a local .h5 file, or 'imagenet' to download"
    ),
    epochs: int = typer.Option(30, help="Phase 1 epochs (then early stopping ends a phase)"),
    fine_tune_epochs: int = typer.Option(6, help="Phase 2 epochs (transfer model only)"),
    fine_tune_layers: int = typer.Option(40, help="Top backbone layers unfrozen in phase 2"),
    batch_size: int = typer.Option(32),
    learning_rate: float = typer.Option(1e-3, help="Phase 1 learning rate"),
    fine_tune_learning_rate: float = typer.Option(1e-4, help="Phase 2 learning rate"),
    seed: int = typer.Option(1337, help="Seed of weights, augmentation and batch order"),
    split_seed: int = typer.Option(
        1337, help="Seed of the patient-level validation split (keep it for ensemble members)"
    ),
    early_stopping_monitor: str = typer.Option(
        "val_auc", help="val_auc or val_loss: the validation metric that stops a phase"
    ),
    augmentation: str = typer.Option(
        "standard", help="standard, or robust (adds gamma, blur, noise and an erased patch)"
    ),
    max_train_images: int = typer.Option(0, help="Cap on training images (smoke runs only)"),
    report_test: bool = typer.Option(
        False, help="Evaluate the test split once, after training, into the card (final report)"
    ),
) -> None:
    """Train a model, choose its threshold on validation and register a new version."""
    models_dir = registry_dir(models_dir)
    require_keras_backend()
    from training.train import TrainConfig
    from training.train import train as run_training

    setup_logging()
    config = TrainConfig(
        model_name=model, backbone=backbone, backbone_weights=weights, epochs=epochs,
        fine_tune_epochs=fine_tune_epochs, fine_tune_layers=fine_tune_layers,
        batch_size=batch_size, learning_rate=learning_rate,
        fine_tune_learning_rate=fine_tune_learning_rate, seed=seed, split_seed=split_seed,
        early_stopping_monitor=early_stopping_monitor, augmentation=augmentation,
        max_train_images=max_train_images or None,
    )
    import sys

    verbose = 1 if sys.stdout.isatty() else 2  # a progress bar on a terminal, a line per epoch in logs
    version = run_training(config, data, models_dir, report_test=report_test, verbose=verbose)
    typer.echo(f"registered {version.label} at {version.path}")


@commands.command()
@errors()
def ensemble(
    model: str = typer.Option(..., help="pneumonia-cnn or pneumonia-transfer"),
    members: list[str] = typer.Argument(..., help="Versions to average (same --split-seed)"),
    data: Path = typer.Option(DEFAULT_DATA, help="Root of {train,val,test}/{NORMAL,PNEUMONIA}"),
    models_dir: Path = typer.Option(None, help=MODELS_DIR_HELP),
    report_test: bool = typer.Option(
        False, help="Evaluate the test split once into the card (final report)"
    ),
) -> None:
    """Average registered versions into a new version; threshold chosen on validation."""
    models_dir = registry_dir(models_dir)
    require_keras_backend()
    from training.ensemble import build_ensemble

    setup_logging()
    version = build_ensemble(model, members, data, models_dir, report_test)
    typer.echo(f"registered {version.label} at {version.path}")


@commands.command()
@errors(FileNotFoundError, ValueError)  # a wrong --data layout, no images
def evaluate(
    model: str = typer.Option(..., help="name[@version]; the served version when none is given"),
    data: Path = typer.Option(DEFAULT_DATA, help="Root of {train,val,test}/{NORMAL,PNEUMONIA}"),
    split: str = typer.Option("test", help="train, val or test"),
    models_dir: Path = typer.Option(None, help=MODELS_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table"),
    plots: Path = typer.Option(None, help="Folder for the ROC and reliability PNGs"),
    record: bool = typer.Option(
        False, help="With --split test: record this as the version's one test report (once)"
    ),
) -> None:
    """Evaluate a registered model on a split at its card's threshold."""
    models_dir = registry_dir(models_dir)
    require_keras_backend()
    from training.data import read_split

    if record and split != "test":
        raise ValueError(f"--record is for the test split only, not {split!r}")
    read_split(data, split)  # the data's layout first: a wrong --data is one line before Keras
    from training.evaluate import evaluate as run_evaluation
    from training.evaluate import format_table, record_test

    if record:
        result = record_test(model, data, models_dir)
    else:
        result = run_evaluation(model, data, split, models_dir, plots)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        typer.echo(format_table(result))


@commands.command()
@errors()
def compare(
    model: str = typer.Option(..., help="pneumonia-cnn or pneumonia-transfer"),
    reference: str = typer.Argument(..., help="Version to compare against (e.g. the served one)"),
    candidate: str = typer.Argument(..., help="Version that would replace it"),
    data: Path = typer.Option(DEFAULT_DATA, help="Root of {train,val,test}/{NORMAL,PNEUMONIA}"),
    models_dir: Path = typer.Option(None, help=MODELS_DIR_HELP),
    resamples: int = typer.Option(2000, help="Paired bootstrap resamples"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table"),
) -> None:
    """Two versions' validation ROC AUC, the difference and its paired-bootstrap SE, and how firm
    each one's threshold is on the same resamples (no test)."""
    models_dir = registry_dir(models_dir)
    require_keras_backend()
    from training.compare import compare as run_compare

    result = run_compare(model, reference, candidate, data, models_dir, resamples)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    low, high = result["difference_ci95"]
    verdict = "non-inferior" if result["non_inferior"] else "worse by more than one SE"
    typer.echo(
        f"validation ({result['validation_images']} images) ROC AUC\n"
        f"  reference {result['reference']:<40} {result['reference_roc_auc']:.4f}\n"
        f"  candidate {result['candidate']:<40} {result['candidate_roc_auc']:.4f}\n"
        f"  difference {result['difference']:+.4f}, bootstrap SE {result['bootstrap_se']:.4f}, "
        f"95% CI {low:+.4f} to {high:+.4f}: candidate is {verdict}"
    )
    typer.echo("threshold (card; Youden on the same resamples, 5-95%)")
    for role in ("reference", "candidate"):
        low, high = result[f"{role}_threshold_range_90"]
        typer.echo(f"  {role} {result[f'{role}_threshold']:.3f} ({low:.3f}-{high:.3f})")


@models_app.command("list")
@errors()
def models_list(models_dir: Path = typer.Option(None, help=MODELS_DIR_HELP)) -> None:
    """Every registered version, its validation/test metrics and its role: served (*), served
    silent (*silent: nothing sent) or candidate (cand: run beside the served one, never sent)."""
    models_dir = registry_dir(models_dir)
    served = registry.served_versions(models_dir)
    silent, candidates = registry.silent_versions(models_dir), registry.candidate_versions(models_dir)
    rows = registry.list_versions(models_dir)
    if not rows:
        typer.echo(f"no models in {models_dir}")
        return
    typer.echo(f"{'model':<22} {'version':<18} {'served':<7} {'threshold':>9} "
               f"{'val AUC':>8} {'test acc':>8} {'test AUC':>8}  ensemble of")
    for row in rows:
        test = row.test_metrics or SplitMetrics()
        validation = row.card.metrics.validation or SplitMetrics()
        mark = {served.get(row.name): "*", silent.get(row.name): "*silent",
                candidates.get(row.name): "cand"}.get(row.version, "")
        members = " ".join(m.label.split("@")[1] for m in row.card.members or [])
        typer.echo(
            f"{row.name:<22} {row.version:<18} {mark:<7} {row.card.threshold:>9.4f} "
            f"{_figure(validation.roc_auc, missing='-')} "
            f"{_figure(test.accuracy)} {_figure(test.roc_auc)}"
            f"  {members}".rstrip()
        )


def _figure(value: float | None, missing: str = "not read") -> str:
    """A metric in an 8-wide column; a test split never read is said so, not printed as `nan`."""
    return f"{value:>8.4f}" if value is not None else f"{missing:>8}"


@models_app.command("serve")
@errors()
def models_serve(
    name: str, version: str, models_dir: Path = typer.Option(None, help=MODELS_DIR_HELP),
    silent: bool = typer.Option(False, help="Record and score its results but send nothing to the "
                                "PACS until `pneumo models accept-silent NAME`"),
) -> None:
    """Mark a version as the one the workers serve (and, without --silent, send)."""
    models_dir = registry_dir(models_dir)
    _serve(registry.resolve(f"{name}@{version}", models_dir), models_dir, silent)
    typer.echo(f"{name}@{version} is now served" + (" silently: nothing is sent" if silent else ""))


def _serve(version: registry.ModelVersion, models_dir: Path, silent: bool) -> None:
    registry.verify(version)
    if version.scope is None:
        raise registry.RegistryError(
            f"{version.label} has no intended use and pixel check, so the workers could "
            f"not tell what it was validated on; run `pneumo scope fit --model {version.label}`")
    registry.mark_served(version.name, version.version, models_dir, silent=silent)


@models_app.command("accept-silent")
@errors()
def models_accept_silent(name: str, models_dir: Path = typer.Option(None, help=MODELS_DIR_HELP)) -> None:
    """The site accepts NAME's silent served version: from now on its SRs are sent to the PACS."""
    version = registry.accept_silent(name, registry_dir(models_dir))
    typer.echo(f"{name}@{version} is served and sent from now on (earlier studies stay unsent)")


@models_app.command("candidate")
@errors()
def models_candidate(
    name: str, version: str, models_dir: Path = typer.Option(None, help=MODELS_DIR_HELP)
) -> None:
    """Run a version beside the served one on the same in-scope images (shadow): its results are
    recorded and compared (`pneumo models shadow`), never sent. One candidate per model."""
    candidate = registry.mark_candidate(name, version, registry_dir(models_dir))
    typer.echo(f"{candidate.label} runs in shadow beside the served version; nothing of it is sent")


@models_app.command("clear-candidate")
@errors()
def models_clear_candidate(name: str, models_dir: Path = typer.Option(None, help=MODELS_DIR_HELP)) -> None:
    """Stop running NAME's candidate (its recorded results stay)."""
    version = registry.clear_candidate(name, registry_dir(models_dir))
    typer.echo(f"{name}@{version} no longer runs in shadow" if version else f"{name} had no candidate")


@models_app.command("shadow")
@errors()
def models_shadow(
    models_dir: Path = typer.Option(None, help=MODELS_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text"),
) -> None:
    """Each candidate against the served version: agreement on the images both classified (% agree,
    Cohen's kappa) and, on the site's labelled studies, both versions' sensitivity and specificity
    with the paired check `promote` applies."""
    from ops import shadow
    from ops.status import open_database

    models_dir = registry_dir(models_dir)
    with open_database(command_settings())() as session:
        report = shadow.shadow_report(session, models_dir)
        checks = [shadow.promotion_check(session, registry.resolve(a.model_name, models_dir),
                                         registry.resolve(f"{a.model_name}@{a.candidate_version}",
                                                          models_dir)) for a in report]
    silent = registry.silent_versions(models_dir)
    if as_json:
        typer.echo(json.dumps({"candidates": [{**a.dump(), "labelled": c.dump()}
                                              for a, c in zip(report, checks, strict=True)],
                               "silent": silent}, indent=2))
        return
    for name, version in sorted(silent.items()):
        typer.echo(f"{name}@{version}: served silent (recorded, nothing sent)")
    if not report:
        typer.echo("no candidate in shadow; `pneumo models candidate NAME VERSION` starts one")
    for agreement, check in zip(report, checks, strict=True):
        typer.echo(shadow.describe(agreement, check))


@models_app.command("promote")
@errors()
def models_promote(
    spec: str = typer.Argument(..., help="NAME@VERSION: the candidate to serve"),
    force: bool = typer.Option(False, help="Promote even where the check refuses (recorded)"),
    by: str = typer.Option(None, help="Who promotes (recorded) [default: the login name]"),
    silent: bool = typer.Option(False, help="Serve it silent: nothing sent until accept-silent"),
    models_dir: Path = typer.Option(None, help=MODELS_DIR_HELP),
) -> None:
    """Serve a candidate in place of the served version. Refused (exit 2) when, on the labelled
    studies both classified, its sensitivity or specificity is worse beyond noise, or there are
    none of a class to judge it on; --force overrides. Who, what and the evidence are recorded in
    the audit table and models/promotions.jsonl."""
    import getpass

    from ops import shadow
    from ops.status import open_database

    models_dir = registry_dir(models_dir)
    if "@" not in spec:
        raise registry.RegistryError(f"name the version to promote: NAME@VERSION, not {spec!r}")
    candidate = registry.resolve(spec, models_dir)
    served = registry.resolve(candidate.name, models_dir)
    if served.version == candidate.version:
        raise registry.RegistryError(f"{candidate.label} is already the served version")
    sessions = open_database(command_settings())
    with sessions() as session:
        check = shadow.promotion_check(session, served, candidate)
        agreement = shadow.agreement(session, candidate.name, served.version, candidate.version)
        typer.echo(shadow.describe(agreement, check))
        record = shadow.promotion_record(served, candidate, by or getpass.getuser(), force, silent,
                                         check, agreement)
        shadow.audit_promotion(session, candidate, record)
        if check.refuse and not force:
            session.commit()  # the refusal is recorded too
            raise registry.RegistryError(f"promotion of {candidate.label} refused: {check.reason}; "
                                         f"--force to promote anyway (recorded)")
        _serve(candidate, models_dir, silent)  # before the commit: no audit row for a failed serve
        session.commit()
        shadow.record_promotion(models_dir, record)
    typer.echo(f"{candidate.label} is now served in place of {served.label}"
               + (" (forced)" if check.refuse else "") + (", silently" if silent else ""))


@scope_app.command("fit")
@errors()
def scope_fit(
    model: str = typer.Option(..., help="NAME@VERSION registered before pixel checks existed"),
    false_refusal_rate: float = typer.Option(
        0.01, help="Share of held-out in-scope (validation) images the check may refuse"),
    models_dir: Path = typer.Option(None, help=MODELS_DIR_HELP),
) -> None:
    """Fit a version's pixel check on its own training split, threshold on its validation split,
    and record it with its intended use in scope.json (once; the card is not changed)."""
    models_dir = registry_dir(models_dir)
    require_keras_backend()
    setup_logging()
    from training.scope import fit_existing

    version = fit_existing(model, models_dir, false_refusal_rate)
    check = version.scope.pixel_check
    typer.echo(f"{version.label}: pixel check threshold {check.threshold:.2f} "
               f"({check.held_out_refused_rate:.1%} of {check.held_out_images} held-out refused)")


@scope_app.command("refit")
@errors(FileNotFoundError, ValueError)
def scope_refit(
    model: str = typer.Option(..., help="NAME or NAME@VERSION whose weights the new version keeps"),
    fullres: Path = typer.Option(..., help="Full-resolution originals: <DIR>/train/{NORMAL,PNEUMONIA}"),
    adults: Path = typer.Option(..., help="Another population's labelled images (labels.csv): "
                                "half shown to the check as out of scope, half reported"),
    models_dir: Path = typer.Option(None, help=MODELS_DIR_HELP),
) -> None:
    """Register a new version with the same weights, the area resize and a pixel check fitted at
    full resolution; its card records the full-resolution validation. Serve it with `models serve`."""
    models_dir = registry_dir(models_dir)
    require_keras_backend()
    setup_logging()
    from training.fullres import refit

    version = refit(model, fullres, adults, models_dir)
    typer.echo(f"registered {version.label} (not served)")



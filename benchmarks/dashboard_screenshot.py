"""docs/dashboard.png: the dashboard in headless Chromium, over the served model versions of the
registry (`PNEUMO_MODELS_DIR`, default models/) and a demo database of the last 30 days.

Why a script: the picture in docs/operations.md went stale when the served versions changed; this
redraws it. The database is made up (it says so in the caption): `--studies` studies spread over
30 days, denser in the last 24 h, each image's probability drawn from the served model's
validation score histogram (its card), so drift shows "ok"; some images out of scope, failed or
ignored, some C-STOREs refused, SRs delivered 10-60 s after the first image, one dead-lettered.
The page is served over HTTP (uvicorn, the dashboard's own headers) with the broker on the
benchmark Redis database, and the browser's console must stay empty.

    .venv/bin/python benchmarks/dashboard_screenshot.py [--out docs/dashboard.png]
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from common import REPO, bench_redis_url, flush_bench_redis

from devtools.processes import served_in_thread


def populate(url: str, models_dir: Path, model_name: str, studies: int, seed: int = 7) -> None:
    from core import registry
    from core.db import (
        Delivery,
        DeliveryState,
        Instance,
        InstanceState,
        RefusedStore,
        Result,
        Series,
        Study,
        session_factory,
        utcnow,
    )

    rng = random.Random(seed)
    version = registry.served_versions(models_dir)[model_name]
    card = registry.resolve(f"{model_name}@{version}", models_dir).card
    histogram = card.validation_score_histogram or [1] * 20
    threshold = float(card.threshold)
    now = utcnow()
    reasons = {InstanceState.OUT_OF_SCOPE: "out of scope: pixel check: not like the training images",
               InstanceState.FAILED: "cannot decode pixel data: corrupt JPEG 2000 stream",
               InstanceState.IGNORED: "not a frontal chest image: ViewPosition LL"}
    sessions = session_factory(url)
    with sessions() as session, session.begin():
        for n in range(studies):
            hours = rng.uniform(0, 24) if rng.random() < 0.45 else rng.uniform(0, 30 * 24)
            first = now - timedelta(hours=hours, minutes=2)
            study = Study(study_instance_uid=f"1.2.826.0.1.3680043.10.543.{n}",
                          accession_number=f"DEMO{n:05d}", first_received_at=first, last_received_at=first)
            session.add(study)
            session.flush()
            series = Series(study_id=study.id, series_instance_uid=f"1.2.826.0.1.3680043.10.544.{n}",
                            modality="DX")
            session.add(series)
            session.flush()
            state = rng.choices([*reasons, InstanceState.CLASSIFIED], [6, 0.4, 3, 90])[0]
            finished = first + timedelta(seconds=rng.uniform(1, 6))
            instance = Instance(
                study_id=study.id, series_id=series.id, sop_instance_uid=f"1.2.826.0.1.3680043.10.545.{n}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
                path="/nonexistent", size_bytes=1, sha256="0" * 64, calling_ae_title="MODALITY1",
                state=state, reason=reasons.get(state), attempts=1, received_at=first, finished_at=finished)
            session.add(instance)
            session.flush()
            if state == InstanceState.IGNORED or state == InstanceState.FAILED:
                continue
            if state == InstanceState.CLASSIFIED:
                bin_index = rng.choices(range(len(histogram)), histogram)[0]
                probability = (bin_index + rng.random()) / len(histogram)
                session.add(Result(
                    instance_id=instance.id, model_name=model_name, model_version=version,
                    probability=probability, threshold=threshold,
                    label="PNEUMONIA" if probability >= threshold else "NORMAL", decode_ms=40.0,
                    inference_ms=46.0, created_at=finished))
            dead = n == 3
            session.add(Delivery(
                study_id=study.id, model_name=model_name, model_version=version,
                destination="PACS@10.0.0.5:104",
                sr_sop_instance_uid=f"1.2.826.0.1.3680043.10.546.{n}", attempts=6 if dead else 1,
                state=DeliveryState.DEAD if dead else DeliveryState.DELIVERED,
                last_error="association with PACS@10.0.0.5:104 failed: connection refused" if dead else None,
                delivered_at=None if dead else first + timedelta(seconds=rng.uniform(10, 60))))
            if rng.random() < 0.05:
                session.add(RefusedStore(at=first, calling_ae_title="MODALITY2", status=0xA700,
                                         reason="out of resources: free disk below the floor"))
    sessions.kw["bind"].dispose()


def screenshot(base_url: str, out: Path, width: int = 1400) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     f"--window-size={width},1000", "--hide-scrollbars"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"),
                              options=options)
    try:
        driver.get(base_url)
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(width, height + 140)  # the window's frame is not page
        driver.get(base_url)
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        if errors:
            raise SystemExit(f"the browser's console has errors: {errors}")
        out.parent.mkdir(parents=True, exist_ok=True)
        if not driver.save_screenshot(str(out)):
            raise SystemExit(f"no screenshot written to {out}")
    finally:
        driver.quit()
    from PIL import Image  # matplotlib's own dependency

    with Image.open(out) as image:  # 256 colours: a third of the bytes in the repository
        image.convert("RGB").quantize(256).save(out, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "dashboard.png")
    parser.add_argument("--studies", type=int, default=800)
    args = parser.parse_args()


    from core.migrate import upgrade
    from core.settings import Settings
    from ops.dashboard import create_app

    with tempfile.TemporaryDirectory() as home:
        url = f"sqlite:///{Path(home) / 'pneumo.db'}"
        upgrade(url)
        base = Settings()
        models_dir = base.models_dir if base.models_dir.is_absolute() else REPO / base.models_dir
        settings = Settings(home=Path(home), database_url=url, broker_url=bench_redis_url(),
                            models_dir=models_dir, model_name=base.model_name, dashboard_host="127.0.0.1")
        populate(url, models_dir, settings.model_name, args.studies)
        flush_bench_redis()
        with served_in_thread(create_app(settings)) as port:
            started = time.perf_counter()
            screenshot(f"http://127.0.0.1:{port}/", args.out)
    print(f"{args.out} written ({time.perf_counter() - started:.1f} s in the browser); "
          f"models from {models_dir}")


if __name__ == "__main__":
    main()

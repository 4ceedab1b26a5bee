"""SR delivery after a burst: N single-image studies sent at once, time from the end of the quiet
period to the last SR stored at the PACS (issue 21 item 2).

`pneumo run` on embedded defaults (SQLite + bundled Redis) with dcmtk storescp as the PACS. One
warm-up study first (model load), then all N files in one storescu association. Times come from
the database (Instance.received_at / finished_at, Delivery.created_at) and the SR files' mtimes at
the PACS, all this machine's clock. "Quiet period ends" is the last image's receipt plus
PNEUMO_QUIET_SECONDS; finalise cannot act before the last image is classified either, so that
moment is shown too.

    .venv/bin/python benchmarks/sr_burst.py --studies 500 --quiet 5

Old code for a before/after: run this same file from a worktree of the old commit
(`git worktree add /tmp/old <commit>`, copy this file into /tmp/old/benchmarks/, run it with
PYTHONPATH=/tmp/old): `pneumo run` is started from the tree the script lies in.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    REPO,
    embedded_env,
    free_port,
    load_average,
    print_table,
    start_storescp,
    stop,
    storescu,
    training_images,
    wait_for,
    write_payload,
)
from latency import epoch, start_pneumo_run


def sr_files(pacs: Path) -> list[Path]:
    return [path for path in pacs.iterdir() if path.name.startswith("SR")] if pacs.exists() else []


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=500)
    parser.add_argument("--quiet", type=float, default=5.0, help="PNEUMO_QUIET_SECONDS")
    parser.add_argument("--split", default="test", help="chest_xray split the JPEGs come from")
    parser.add_argument("--timeout", type=float, default=3600, help="give up waiting for the SRs after this")
    parser.add_argument("--fork", action="store_true",
                        help="storescp --fork: the PACS takes several associations at once (plain "
                        "storescp takes one at a time, the next waits for its release)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (home, logs, PACS)")
    parser.add_argument("--env", action="append", default=[], help="extra NAME=VALUE for pneumo run")
    args = parser.parse_args()

    from sqlalchemy import func, select

    from core.db import Instance, session_factory

    work = Path(tempfile.mkdtemp(prefix="pneumo-srburst-"))
    pacs_folder = work / "pacs"
    pacs = run = None
    try:
        pacs_port, node_port = free_port(), free_port()
        pacs = start_storescp(pacs_folder, pacs_port, fork=args.fork, ae_title="PACS")
        env = embedded_env(work / "home", node_port, pacs_port, args.quiet)
        env.update(item.split("=", 1) for item in args.env)
        files = write_payload("dx224", args.studies + 1, work / "files",
                              training_images(min(args.studies + 1, 600), args.split))
        run = start_pneumo_run(env, work / "pneumo-run.log")
        sessions = session_factory(f"sqlite:///{work / 'home' / 'pneumo.db'}")
        warm = storescu(node_port, files[:1])
        warm.communicate()
        wait_for(lambda: len(sr_files(pacs_folder)) >= 1, 300, "the warm-up SR", 0.2)
        time.sleep(2)
        load_before = load_average()
        sent_at = time.time()
        sender = storescu(node_port, files[1:])
        _, stderr = sender.communicate()
        if sender.returncode != 0:
            raise RuntimeError(stderr.decode(errors="replace")[-500:])
        sent_done = time.time()
        total = args.studies + 1
        progress = time.monotonic()
        while len(sr_files(pacs_folder)) < total:
            if time.time() - sent_at > args.timeout:
                raise TimeoutError(f"{len(sr_files(pacs_folder))} of {total} SRs after {args.timeout} s")
            if time.monotonic() - progress > 30:
                progress = time.monotonic()
                print(f"  {len(sr_files(pacs_folder)) - 1} SRs at the PACS after "
                      f"{time.time() - sent_at:.0f} s (load {load_average()})", flush=True)
            time.sleep(0.5)
        time.sleep(1)
        mtimes = sorted(path.stat().st_mtime for path in sr_files(pacs_folder))[1:]
        with sessions() as session:
            last_received = epoch(session.scalar(select(func.max(Instance.received_at))))
            last_classified = epoch(session.scalar(select(func.max(Instance.finished_at))))
        quiet_end = last_received + args.quiet
        ready = max(quiet_end, last_classified)
        rows = [
            ("burst sent (storescu, one association)", f"{sent_done - sent_at:.1f}"),
            ("last image received -> last classified", f"{last_classified - last_received:.1f}"),
            ("quiet period end -> first SR at the PACS", f"{mtimes[0] - quiet_end:.1f}"),
            ("quiet period end -> last SR at the PACS", f"{mtimes[-1] - quiet_end:.1f}"),
            ("max(quiet end, last classified) -> last SR at the PACS", f"{mtimes[-1] - ready:.1f}"),
            ("SRs per second, first to last SR",
             f"{(len(mtimes) - 1) / max(1e-9, mtimes[-1] - mtimes[0]):.1f}"),
        ]
        print(f"\n{args.studies} single-image dx224 studies in one burst, PNEUMO_QUIET_SECONDS={args.quiet}, "
              f"storescp{' --fork' if args.fork else ''}, {' '.join(args.env) or 'default settings'}, "
              f"code from {REPO}; load before {load_before}, after {load_average()}")
        print_table(["stage", "seconds"], rows)
    finally:
        stop(run, 2)
        stop(pacs)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

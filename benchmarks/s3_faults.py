#!/usr/bin/env python
"""Object-storage faults during ``medssl ingest``, against moto's real S3 server behind a proxy that goes
down (``tests/helpers.FaultProxy``): an outage while reading inputs, while writing the dataset, each shorter
and longer than the retry budget, and two writers into one dataset at once (local and S3).

Per scenario: crashed runs (a traceback, an exit status other than 0, 1 or 2), hung runs (the time limit),
input files the final dataset does not account for (manifest rows against the inputs), and good files
lost to a transient fault (a rejection, or a file whose samples differ from those of an uninterrupted
ingest). After a run that ends unfinished or refused, the same command is rerun once the store is back.

  .venv/bin/python benchmarks/s3_faults.py --out /tmp/s3-faults            # about 6 minutes on 2 cores
  .venv/bin/python benchmarks/s3_faults.py --out /tmp/s3-faults --outage-s 5 --trials 2   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the fault injector is shared with the tests

from helpers import FaultProxy  # noqa: E402
from medssl.machine import machine_facts  # noqa: E402


def _moto() -> tuple[object, int]:
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, port


def _env(port: int, retry_s: float | None) -> dict:
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    if retry_s is not None:
        env["MEDSSL_STORAGE_RETRY_S"] = str(retry_s)
    return env


def _ingest(src: str, out: str, env: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "medssl.cli", "ingest", src, "--out", out, "--workers", "1", "--quiet",
           "--set", "files_per_chunk=8"]
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"code": None, "hung": True, "seconds": timeout, "stderr": ""}
    return {"code": proc.returncode, "hung": False, "seconds": round(time.monotonic() - started, 1),
            "stderr_lines": len(proc.stderr.strip().splitlines()), "stderr": proc.stderr.strip()[-400:],
            "crashed": "Traceback" in proc.stderr or proc.returncode not in (0, 1, 2)}


def _dataset(out: str, env: dict) -> tuple[list[dict], dict]:
    """(manifest rows, key -> source sha256) of a finished dataset, local or on S3."""
    os.environ.update({k: env[k] for k in env if k.startswith("AWS_")})
    import s3fs

    from medssl import storage
    from medssl.ingest.report import read_manifest

    s3fs.S3FileSystem.clear_instance_cache()
    rows = list(read_manifest(storage.location(out)))
    return rows, {k: r["sha256"] for r in rows for k in r.get("samples", [])}


def _judge(name: str, runs: list[dict], out: str, env: dict, straight: dict, n_files: int) -> dict:
    rows, samples = _dataset(out, env)
    lost = [r["path"] for r in rows if r["status"] == "rejected"
            and r["reason"].split(":")[0] in ("unreadable_file", "unfinished", "timeout")]
    return {"scenario": name, "runs": [{k: v for k, v in r.items() if k != "stderr"} for r in runs],
            "first_stderr": runs[0].get("stderr", ""),
            "crashed_runs": sum(bool(r.get("crashed")) for r in runs), "hung_runs": sum(r["hung"] for r in runs),
            "unaccounted_files": n_files - len({r["path"] for r in rows}),
            "good_files_lost": len(lost) + (samples != straight),
            "same_samples_as_uninterrupted": samples == straight}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--outage-s", type=float, default=40.0, help="length of each outage (default 40 s)")
    p.add_argument("--trials", type=int, default=6, help="two-writer trials per kind of storage (default 6)")
    p.add_argument("--timeout", type=float, default=600.0, help="limit of one ingest run (default 600 s)")
    opts = p.parse_args(argv)
    opts.out.mkdir(parents=True, exist_ok=False)
    os.environ.setdefault("MEDSSL_SALT_FILE", str(opts.out / "salt"))
    os.environ["MEDSSL_CACHE"] = str(opts.out / "cache")

    from medssl.demo import generate_demo_archive

    archive = generate_demo_archive(opts.out / "demo", n_patients=6, size=32).archive
    n_files = sum(1 for p in archive.rglob("*") if p.is_file())
    server, port = _moto()
    env = _env(port, None)
    os.environ.update({k: env[k] for k in env if k.startswith("AWS_")})
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("bench")
    fs.put(str(archive) + "/", "bench/archive/", recursive=True)
    src = "s3://bench/archive"
    straight_out = str(opts.out / "straight")
    assert _ingest(str(archive), straight_out, env, opts.timeout)["code"] == 0
    _, straight = _dataset(straight_out, env)
    results = []
    scenarios = [  # name, input, output, trigger, retry budget (None: the default, 60 s)
        ("outage while reading, shorter than the retries", src, "local", r"(GET|HEAD) /bench/archive/[^?\s]+ HTTP",
         None),
        ("outage while reading, longer than the retries", src, "local", r"(GET|HEAD) /bench/archive/[^?\s]+ HTTP",
         opts.outage_s / 4),
        ("outage while writing, shorter than the retries", str(archive), "s3", r"PUT /bench/ds-\d+/shards/", None),
        ("outage while writing, longer than the retries", str(archive), "s3", r"PUT /bench/ds-\d+/shards/",
         opts.outage_s / 4),
    ]
    for i, (name, inputs, where, trigger, retry_s) in enumerate(scenarios):
        proxy = FaultProxy(port, trigger=trigger, outage_s=opts.outage_s)
        out = str(opts.out / f"ds-{i}") if where == "local" else f"s3://bench/ds-{i}"
        penv = _env(proxy.port, retry_s)
        runs = [_ingest(inputs, out, penv, opts.timeout)]
        while runs[-1]["code"] not in (0, None) and len(runs) < 4:  # rerun once the store is back
            time.sleep(max(0.0, opts.outage_s - runs[-1]["seconds"]) + 1)
            runs.append(_ingest(inputs, out, penv, opts.timeout))
        result = _judge(name, runs, out, penv, straight, n_files)
        result["outages"] = proxy.outages
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "runs"}), flush=True)

    for where in ("local", "s3"):
        for trial in range(opts.trials):
            out = str(opts.out / f"two-{trial}") if where == "local" else f"s3://bench/two-{trial}"
            cmd = [sys.executable, "-m", "medssl.cli", "ingest", str(archive), "--out", out, "--workers", "1",
                   "--quiet", "--set", "files_per_chunk=8"]
            procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                     for _ in range(2)]
            runs = []
            for proc in procs:
                _, err = proc.communicate(timeout=opts.timeout)
                runs.append({"code": proc.returncode, "hung": False, "stderr": err.strip()[-400:],
                             "stderr_lines": len(err.strip().splitlines()),
                             "crashed": "Traceback" in err or proc.returncode not in (0, 1, 2)})
            if all(r["code"] != 0 for r in runs):
                runs.append(_ingest(str(archive), out, env, opts.timeout))
            result = _judge(f"two writers at once ({where}, trial {trial})", runs, out, env, straight, n_files)
            result["refused"] = sum(r["code"] == 2 and "being written by another ingest" in r["stderr"] for r in runs)
            results.append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "runs"}), flush=True)
    server.stop()
    totals = {k: sum(r[k] for r in results) for k in ("crashed_runs", "hung_runs", "unaccounted_files",
                                                       "good_files_lost")}
    summary = {"machine": machine_facts(), "files": n_files, "outage_s": opts.outage_s, "totals": totals,
               "results": results}
    (opts.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(totals))
    return 1 if any(totals.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

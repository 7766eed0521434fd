"""image_downloader vs img2dataset on the simulator's CDN: 5,000 photos of about 70 KB, 50 ms latency each.

    venv/bin/python bench/download.py [--images 5000] [--latency-ms 50] [--kb 70] [--no-tune]

The CDN is the project's simulator in its own process (so neither client shares its interpreter). Its
photo renderer costs ~35 ms of CPU per image, which would swamp the clients on 2 cores, so the bench
swaps in a bank of 64 rendered photos (JPEG quality chosen for the target size) served by image index.

img2dataset runs from its own venv, kept out of ours (it brings albumentations, opencv, pyarrow, wandb):
bench/out/img2dataset-venv, created on first use with `python -m venv` + `pip install img2dataset==1.47.0`,
with the same URL list, output_format files, resize_mode no, and its fastest setting that keeps the
photo bytes as they are (disable_all_reencoding, like image_downloader); its process x thread count is
tuned for these 2 cores on a short grid first. image_downloader runs as the real stage: claims, atomic
fsync'ed writes, flags in the database (checked: flags == files). Both run as whole processes, timed
from spawn to exit; CPU time is the children's user+sys (the CDN's is not counted).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imageselector import db  # noqa: E402
from imageselector.cdn import build_image_url  # noqa: E402
from imageselector.etsy.simulator.catalogue import Catalogue  # noqa: E402
from tests.helpers.download_setup import catalogue_rows  # noqa: E402

OUT = ROOT / "bench" / "out" / "download"
I2D_VENV = ROOT / "bench" / "out" / "img2dataset-venv"
I2D_VERSION = "1.47.0"
SEED = 1
BANK = 64


def ensure_i2d() -> bool:
    """img2dataset in its own venv under bench/out (made once); False, with the reason, if that fails."""
    exe = I2D_VENV / "bin" / "img2dataset"
    if exe.exists():
        return True
    print(f"installing img2dataset=={I2D_VERSION} into {I2D_VENV} (once; a minute or two)", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(I2D_VENV)], check=True)
        pip = [str(I2D_VENV / "bin" / "pip"), "install", "-q", f"img2dataset=={I2D_VERSION}"]
        subprocess.run(pip, check=True, stdout=subprocess.DEVNULL)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"  img2dataset could not be installed: {exc}")
        return False
    return exe.exists()


def listings_for(n_images: int) -> int:
    n = max(10, n_images // 3)
    while len(Catalogue(n, SEED).image_ids) < n_images:
        n = int(n * 1.1) + 10
    return n


# --------------------------------------------------------------------------------------------------
# The CDN process
# --------------------------------------------------------------------------------------------------


class PhotoBank:
    """Stands in for the simulator's JpegCache: image j gets photo j % BANK, encoded near the target size."""

    def __init__(self, cat: Catalogue, kb: float) -> None:
        from imageselector.etsy.simulator.images import render

        frames = [render(cat, j, "570xN") for j in range(BANK)]
        best: tuple[float, list[bytes]] | None = None
        for q in range(80, 99):
            photos = []
            for im in frames:
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=q)
                photos.append(buf.getvalue())
            avg = sum(map(len, photos)) / len(photos) / 1000
            if best is None or abs(avg - kb) < abs(best[0] - kb):
                best = (avg, photos)
        self.avg_kb, self.photos = best  # type: ignore[misc]

    def get(self, j: int, size: str) -> bytes:
        return self.photos[j % BANK]


def serve(args: argparse.Namespace) -> int:
    from imageselector.etsy.simulator import Simulator

    sim = Simulator(listings=listings_for(args.images), seed=SEED, qps=0, qpd=0, cdn_latency_ms=args.latency_ms)
    bank = PhotoBank(sim.catalogue, args.kb)
    sim.jpegs = bank  # type: ignore[assignment]
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # server threads inherit the mask
    sim.start()
    print(f"READY cdn_base={sim.cdn_base} avg_kb={bank.avg_kb:.1f}", flush=True)
    signal.sigwait({signal.SIGTERM})
    print(json.dumps({k: v for k, v in sim.stats.items() if k.startswith("cdn")}), flush=True)
    sim.stop()
    return 0


# --------------------------------------------------------------------------------------------------
# Timed runs
# --------------------------------------------------------------------------------------------------


CDN_PID = 0
LAST_CDN_CPU = 0.0


def proc_cpu(pid: int) -> float:
    """User+system CPU seconds of a running process (Linux /proc), 0 where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def timed(cmd: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> tuple[float, float, int]:
    """(wall seconds, child CPU seconds, exit code) of one whole process; notes the CDN's CPU meanwhile."""
    global LAST_CDN_CPU
    cdn0 = proc_cpu(CDN_PID)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log or os.devnull, "w") as fh:
        rc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    LAST_CDN_CPU = proc_cpu(CDN_PID) - cdn0
    return wall, cpu, rc


def run_ours(cdn_base: str, rows: list[dict], engine: str, conc: int, procs: int, tag: str) -> dict:
    home = OUT / f"home_{tag}"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    conn = db.connect(home / "etsy_data.db")
    db.upsert_images(conn, rows)
    env = {**os.environ, "IMAGESELECTOR_HOME": str(home), "ETSY_CDN_BASE": cdn_base}
    cmd = [sys.executable, str(ROOT / "scripts" / "image_downloader.py"), "--engine", engine]
    cmd += ["--concurrency", str(conc), "--per-host", str(conc), "--processes", str(procs)]
    cmd += ["--progress-interval", "600", "--no-reconcile"]
    wall, cpu, rc = timed(cmd, env, OUT / f"{tag}.log")
    done = conn.execute("SELECT COUNT(*) FROM image_status WHERE download_done=1").fetchone()[0]
    t0, t1 = conn.execute("SELECT MIN(ts), MAX(ts) FROM progress WHERE stage='download'").fetchone()
    files = sum(1 for p in (home / "images").rglob("*.jpg"))
    nbytes = sum(p.stat().st_size for p in (home / "images").rglob("*.jpg"))
    conn.close()
    ok = rc == 0 and done == files == len(rows)
    window = (t1 - t0) if t0 is not None else 0.0
    name = f"image_downloader {engine} {procs}p x {conc}"
    return dict(name=name, ok=ok, n=done, wall=wall, cpu=cpu, mb=nbytes / 1e6, rc=rc, window=window, cdn=LAST_CDN_CPU)


def run_i2d(urls_file: Path, n: int, procs: int, threads: int, tag: str, reencode: bool = False) -> dict:
    out = OUT / f"i2d_{tag}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(I2D_VENV / "bin" / "img2dataset"), "--url_list", str(urls_file), "--input_format", "txt"]
    cmd += ["--output_folder", str(out), "--output_format", "files", "--resize_mode", "no"]
    cmd += ["--processes_count", str(procs), "--thread_count", str(threads)]
    cmd += ["--number_sample_per_shard", str(max(100, n // 10)), "--timeout", "10", "--retries", "0"]
    cmd += ["--enable_wandb", "False", "--disable_all_reencoding", str(not reencode)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "NO_ALBUMENTATIONS_UPDATE": "1"}  # no update check online
    wall, cpu, rc = timed(cmd, env, OUT / f"i2d_{tag}.log")
    ok_n, starts, ends = 0, [], []
    for st in out.glob("*_stats.json"):
        stats = json.loads(st.read_text())
        ok_n += stats.get("successes", 0)
        starts.append(stats["start_time"])
        ends.append(stats["end_time"])
    window = max(ends) - min(starts) if starts else 0.0
    files = sum(1 for _ in out.rglob("*.jpg"))
    name = f"img2dataset {procs}p x {threads}t{' (re-encode)' if reencode else ''}"
    ok = rc == 0 and ok_n == n == files
    return dict(name=name, ok=ok, n=ok_n, wall=wall, cpu=cpu, rc=rc, window=window, cdn=LAST_CDN_CPU)


def line(r: dict) -> str:
    rate = r["n"] / r["wall"] if r["wall"] else 0.0
    flag = "" if r["ok"] else f"  !! incomplete (rc={r['rc']}, {r['n']} ok)"
    steady = r["n"] / r["window"] if r.get("window") else 0.0
    return (
        f"  {r['name']:<40} {r['n']:>5} imgs {r['wall']:6.2f} s {rate:7.1f} img/s"
        f" (downloading: {steady:6.1f} img/s)  CPU {r['cpu']:6.2f} s (CDN {r['cdn']:5.2f} s){flag}"
    )


def rate(r: dict) -> float:
    return r["n"] / r["wall"] if r["ok"] and r["wall"] else 0.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--latency-ms", type=float, default=50.0)
    p.add_argument("--kb", type=float, default=70.0, help="target average photo size")
    p.add_argument("--tune-images", type=int, default=1500, help="images per run of the tuning grid")
    p.add_argument("--no-tune", action="store_true", help="skip the grids; use the settings found before")
    p.add_argument("--conc", type=int, default=0, help="with --no-tune: image_downloader's concurrency (default 64)")
    p.add_argument("--i2d", default="2,64", help="with --no-tune: img2dataset processes,threads (default 2,64)")
    p.add_argument("--skip-i2d", action="store_true", help="run image_downloader only")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        return serve(args)

    OUT.mkdir(parents=True, exist_ok=True)
    have_i2d = not args.skip_i2d and ensure_i2d()
    cdn = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--images", str(args.images), "--latency-ms", str(args.latency_ms)]
        + ["--kb", str(args.kb)],
        stdout=subprocess.PIPE,
        text=True,
    )
    global CDN_PID
    CDN_PID = cdn.pid
    try:
        ready = cdn.stdout.readline().split()  # type: ignore[union-attr]
        cdn_base, avg_kb = ready[1].split("=", 1)[1], ready[2].split("=", 1)[1]
        cat = Catalogue(listings_for(args.images), SEED)
        rows = catalogue_rows(cat, args.images)
        urls = [build_image_url(cdn_base, r["shop_id"], r["hex"], r["image_id"], r["suffix"]) for r in rows]
        cpus = len(os.sched_getaffinity(0))
        print(
            f"{args.images} images from the simulator CDN ({cdn_base}), {args.latency_ms:.0f} ms latency,"
            f" {avg_kb} KB average; {cpus} CPUs"
        )
        results: list[dict] = []

        def subset(k: int) -> tuple[list[dict], Path]:
            f = OUT / f"urls_{k}.txt"
            f.write_text("\n".join(urls[:k]) + "\n")
            return rows[:k], f

        ours_grid = [("threads", 32, 1), ("threads", 64, 1), ("async", 32, 1), ("async", 64, 1), ("async", 128, 1)]
        ours_grid += [("async", 64, 2)]
        i2d_grid = [(pr, t) for pr in (1, 2) for t in (32, 64, 128)]
        conc = args.conc or 64
        best_ours = {"threads": ("threads", conc, 1), "async": ("async", conc, 1), "multi": ("async", conc, 2)}
        best_i2d = tuple(int(x) for x in args.i2d.split(","))
        if not args.no_tune:
            k = min(args.tune_images, args.images)
            trows, tfile = subset(k)
            print(f"tuning on {k} images:")
            tuned: list[dict] = []
            for key in ours_grid:
                r = run_ours(cdn_base, trows, *key, "tune_{}_{}_{}".format(*key))
                r["key"] = key
                tuned.append(r)
                print(line(r), flush=True)
            for e in ("threads", "async"):
                best_ours[e] = max((r for r in tuned if r["key"][0] == e and r["key"][2] == 1), key=rate)["key"]
            best_ours["multi"] = max(tuned, key=rate)["key"]
            if have_i2d:
                tuned_i2d = []
                for pr, t in i2d_grid:
                    r = run_i2d(tfile, k, pr, t, f"tune_{pr}_{t}")
                    r["key"] = (pr, t)
                    tuned_i2d.append(r)
                    print(line(r), flush=True)
                best_i2d = max(tuned_i2d, key=rate)["key"]

        rows_all, urls_file = subset(args.images)
        print(f"full runs, {args.images} images each:")
        for key in dict.fromkeys(best_ours.values()):  # the best threads, the best asyncio, the best overall
            r = run_ours(cdn_base, rows_all, *key, "full_{}_{}_{}".format(*key))
            results.append(r)
            print(line(r), flush=True)
        single = [r for r in results if " 1p " in r["name"]]
        if single:
            print(f"faster design in one process: {max(single, key=rate)['name']}")
        i2d = None
        if have_i2d:
            i2d = run_i2d(urls_file, args.images, *best_i2d, "full")
            print(line(i2d), flush=True)
            extra = run_i2d(urls_file, args.images, *best_i2d, "full_reencode", reencode=True)
            print(line(extra), flush=True)
        else:
            print("  img2dataset: skipped or not installed (see the module docstring); no comparison")
        best = max(results, key=rate)
        print(f"fastest image_downloader setting: {best['name']}")
        stop_cdn(cdn)
        if i2d is not None and rate(i2d):
            steady = (
                (best["n"] / best["window"]) / (i2d["n"] / i2d["window"]) if best["window"] and i2d["window"] else 0
            )
            print(
                f"CPU per image {best['cpu'] / best['n'] * 1000:.2f} ms vs {i2d['cpu'] / i2d['n'] * 1000:.2f} ms;"
                f" download phase alone (start-up excluded): {steady:.2f}x"
            )
            print(f"ratio image_downloader/img2dataset: {rate(best) / rate(i2d):.2f}x images/s, whole processes")
        return 0 if all(r["ok"] for r in results) else 1
    finally:
        stop_cdn(cdn)


def stop_cdn(cdn: subprocess.Popen) -> None:
    """Stop the CDN process (once) and print its request counters."""
    if cdn.poll() is not None:
        return
    cdn.send_signal(signal.SIGTERM)
    try:
        stats = cdn.communicate(timeout=10)[0].strip()
        if stats:
            print(f"CDN counters: {stats}")
    except subprocess.TimeoutExpired:
        cdn.kill()


if __name__ == "__main__":
    sys.exit(main())

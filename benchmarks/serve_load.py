"""Load and fuzz test of ``breastfusion serve``: uvicorn on loopback, a real HTTP client.

    python benchmarks/serve_load.py [--bundle BUNDLE] [--requests 1000] [--concurrency 8,16] \\
        [--fuzz-examples 40] [--out runs/serve/bench.json]

1. Starts the service in a subprocess (``uvicorn --factory breastfusion.serve.app:app_from_env``, one worker)
   and samples its resident memory (``/proc/PID/status``) every 0.5 s for the whole run.
2. Load: for each concurrency level, ``--requests`` POST /predict (multipart: an image + the bundle's clinical
   fields, filled with valid random values) from that many concurrent clients (httpx, asyncio). Records every
   status (zero errors expected), p50/p90/p99 latency, throughput, and the server's RSS before and after.
3. Fuzz: schemathesis against /openapi.json when it is installed (else a hand-written fuzzer over the
   schema), plus hand-made malformed uploads (truncated PNG, a header claiming huge dimensions, random bytes,
   an empty file, an oversized body, EPS, deep JSON...). Counts 5xx (must be 0) and lists the status codes.

The bundle: ``--bundle``, else the newest of ``runs/demo_run/bundles/*``, ``runs/busi/bundles/fusion``, else a
small random-weight SYNTHETIC bundle built here. Images: BUSI images under ../shared/data when present (no
mask is sent, so lesion radiomics are not computed; ``--with-mask`` sends the masks), else synthetic PNGs.
The machine's load average is recorded: on a shared machine the figures move with the other work.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_description

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BREASTFUSION_SHARED_DATA", REPO.parent / "shared" / "data"))


# ------------------------------------------------------------------------------------------------- set-up


def pick_bundle(arg: str | None, tmp: Path) -> tuple[Path, str]:
    if arg:
        return Path(arg), "given"
    demo = sorted((REPO / "runs" / "demo_run" / "bundles").glob("*/bundle.json"), key=lambda p: p.stat().st_mtime)
    if demo:
        return demo[-1].parent, "runs/demo_run"
    busi = REPO / "runs" / "busi" / "bundles" / "fusion"
    if (busi / "bundle.json").exists():
        return busi, "runs/busi"
    return build_small_bundle(tmp / "bundle"), "built here (random weights, SYNTHETIC)"


def build_small_bundle(path: Path) -> Path:
    import pandas as pd
    import timm
    import torch

    from breastfusion.features.tabular import TabularPreprocessor
    from breastfusion.bundles.bundle import save_bundle
    from breastfusion.models.fusion import FusionClassifier

    rng = np.random.default_rng(0)
    table = pd.DataFrame({"age": rng.uniform(30, 80, 40).round(), "density": rng.choice(list("ABCD"), 40),
                          "family_history": rng.choice(["yes", "no"], 40)})
    pre = TabularPreprocessor().fit(table)
    torch.manual_seed(0)
    dims = dict(image_dim=32, tabular_dim=16, tabular_hidden=32, fusion_hidden=32, dropout=0.1)
    model = FusionClassifier(3, variant="fusion", backbone=timm.create_model("test_efficientnet", num_classes=0),
                             n_tabular=pre.n_features_out_, **dims)
    return save_bundle(path, model, classes=["benign", "malignant", "normal"],
                       model_meta={"variant": "fusion", "backbone": "test_efficientnet",
                                   "n_tabular": pre.n_features_out_, **dims},
                       image_meta={"size": 96, "mean": [0.5] * 3, "std": [0.5] * 3}, tabular=pre,
                       feature_meta={"clinical_columns": list(table.columns), "radiomics": None},
                       config_yaml="", synthetic=True)


def pick_images(n: int, with_mask: bool) -> tuple[list[tuple[bytes, bytes | None]], str]:
    root = SHARED / "busi" / "Dataset_BUSI_with_GT"
    files = sorted(p for p in root.glob("*/*.png") if "_mask" not in p.stem) if root.is_dir() else []
    if files:
        random.Random(0).shuffle(files)
        out = []
        for p in files[:n]:
            mask = p.with_name(p.stem + "_mask.png")
            out.append((p.read_bytes(), mask.read_bytes() if with_mask and mask.exists() else None))
        sizes = [len(b) for b, _ in out]
        return out, f"{len(out)} BUSI images ({min(sizes) // 1024}-{max(sizes) // 1024} KiB)" + (
            " with masks" if with_mask else ", no mask")
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (450, 560), dtype=np.uint8)).save(buf, format="PNG")
        out.append((buf.getvalue(), None))
    return out, f"{n} synthetic 560x450 noise PNGs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.every, self.samples, self.t0 = pid, every, [], time.monotonic()
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            v = rss_mb(self.pid)
            if v is not None:
                self.samples.append((round(time.monotonic() - self.t0, 2), round(v, 1)))
            self.stop.wait(self.every)

    def now(self) -> float:
        return rss_mb(self.pid) or float("nan")


def start_server(bundle: Path, port: int, options: dict, arena_max: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "BREASTFUSION_SERVE_BUNDLE": str(bundle.resolve()),
           "BREASTFUSION_SERVE_OPTIONS": json.dumps(options)}
    if arena_max:
        env["MALLOC_ARENA_MAX"] = str(arena_max)
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "breastfusion.serve.app:app_from_env", "--host", "127.0.0.1",
           "--port", str(port), "--no-access-log", "--log-level", "warning"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 180) -> dict:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        try:
            r = httpx.get(base + "/health", timeout=2)
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError("server did not become ready")


# --------------------------------------------------------------------------------------------------- load


def valid_form(fields: list[dict], rng: random.Random) -> dict[str, str]:
    form = {}
    for f in fields:
        if rng.random() < 0.15:
            continue  # sometimes unknown: the service imputes it
        if f["kind"] == "categorical" and f["categories"]:
            form[f["name"]] = rng.choice(f["categories"])
        elif f["kind"] == "bool":
            form[f["name"]] = rng.choice(["true", "false", "yes", "no"])
        else:
            mean, sd = f.get("mean") or 0.0, f.get("sd") or 1.0
            form[f["name"]] = f"{rng.gauss(mean, sd):.3f}"
    return form


async def load_phase(base: str, images, fields, n: int, concurrency: int, seed: int) -> dict:
    import httpx

    rng = random.Random(seed)
    jobs = [(images[i % len(images)], valid_form(fields, rng)) for i in range(n)]
    lat, statuses, errors = [], {}, []
    next_i = 0

    async def worker(client):
        nonlocal next_i
        while True:
            i = next_i
            if i >= n:
                return
            next_i += 1
            (img, mask), form = jobs[i]
            files = {"image": ("case.png", img, "image/png")}
            if mask is not None:
                files["mask"] = ("mask.png", mask, "image/png")
            t0 = time.perf_counter()
            try:
                r = await client.post(base + "/predict", files=files, data=form)
                code = r.status_code
                if code != 200:
                    errors.append({"status": code, "detail": r.text[:300]})
            except httpx.HTTPError as exc:
                code = type(exc).__name__
                errors.append({"status": code, "detail": str(exc)[:300]})
            lat.append(time.perf_counter() - t0)
            statuses[str(code)] = statuses.get(str(code), 0) + 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ms = sorted(1000 * x for x in lat)

    def q(p):
        return round(ms[min(len(ms) - 1, int(round(p / 100 * (len(ms) - 1))))], 1)

    return {"concurrency": concurrency, "requests": n, "wall_s": round(wall, 2), "throughput_rps": round(n / wall, 2),
            "p50_ms": q(50), "p90_ms": q(90), "p99_ms": q(99), "max_ms": round(ms[-1], 1),
            "mean_ms": round(statistics.fmean(ms), 1), "statuses": statuses, "errors": len(errors),
            "error_examples": errors[:5]}


# --------------------------------------------------------------------------------------------------- fuzz


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def malformed_cases(good_png: bytes, fields: list[dict], max_upload_mb: float) -> list[tuple[str, dict]]:
    """(name, request kwargs for httpx) of hand-made bad requests."""
    from PIL import Image

    def png_header(w, h, bit_depth=8, colour=0):
        return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, colour, 0, 0, 0))

    bomb = png_header(60000, 60000) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 60001 * 64)) + _png_chunk(b"IEND", b"")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(buf, format="JPEG")
    jpeg = buf.getvalue()
    # a little-endian TIFF whose single IFD claims 2^31 - 1 columns x 2 rows of 8-bit grey, with 16 bytes of data
    tags = [(256, 4, 1, 2 ** 31 - 1), (257, 4, 1, 2), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
            (273, 4, 1, 8 + 2 + 12 * 8 + 4), (278, 4, 1, 2), (279, 4, 1, 16)]
    tiff_huge = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHII", *t) for t in tags) + struct.pack("<I", 0) + b"\x80" * 16
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 4), np.uint8), "RGBA").save(buf, format="PNG")
    rgba = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(buf, format="PNG")
    png16 = buf.getvalue()
    rng = np.random.default_rng(0)
    name = fields[0]["name"] if fields else "age"

    def img(payload, **extra):
        return {"files": {"image": ("x.png", payload, "image/png")}, **extra}

    cases = [
        ("empty file", img(b"")),
        ("random bytes 64 KiB", img(rng.bytes(64 << 10))),
        ("truncated PNG (half)", img(good_png[: len(good_png) // 2])),
        ("truncated PNG (header only)", img(good_png[:40])),
        ("PNG header claiming 60000x60000", img(bomb)),
        ("PNG header claiming 1x1 with 2 MB IDAT", img(png_header(1, 1) + _png_chunk(b"IDAT", zlib.compress(b"\0" * (2 << 20))) + _png_chunk(b"IEND", b""))),
        ("PNG with bad CRC", img(good_png[:30] + bytes([good_png[30] ^ 0xFF]) + good_png[31:])),
        ("truncated JPEG", img(jpeg[: len(jpeg) // 2])),
        ("JPEG header only", img(jpeg[:20])),
        ("TIFF claiming 2^31 columns", img(tiff_huge)),
        ("EPS (never decoded: Ghostscript)", img(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100000 100000\nshowpage\n")),
        ("SVG", img(b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'></svg>")),
        ("GIF header only", img(b"GIF89a\x10\x00\x10\x00")),
        ("RGBA 8x8 PNG (valid)", img(rgba)),
        ("16-bit PNG (valid)", img(png16)),
        ("zip bytes", img(b"PK\x03\x04" + rng.bytes(1000))),
        ("upload over the size limit", img(rng.bytes(int((max_upload_mb + 0.5) * (1 << 20))))),
        ("body over the body limit", img(rng.bytes(int((2 * max_upload_mb + 2) * (1 << 20))))),
        ("no image field", {"data": {name: "1"}}),
        ("image sent as text", {"data": {"image": "hello"}}),
        ("two images", {"files": [("image", ("a.png", good_png, "image/png")), ("image", ("b.png", good_png, "image/png"))]}),
        ("JSON body", {"json": {"image": "x"}}),
        ("urlencoded body", {"data": {"a": "b"}, "headers": {"content-type": "application/x-www-form-urlencoded"}}),
        ("multipart without boundary", {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}}),
        ("garbage multipart", {"content": rng.bytes(5000), "headers": {"content-type": "multipart/form-data; boundary=zz"}}),
        ("unknown field", img(good_png, data={"no_such_field": "1"})),
        ("unicode field name", img(good_png, data={"ñ\u202e🙂": "1"})),
        ("numeric field = NaN", img(good_png, data={name: "nan"})),
        ("numeric field = 1e308", img(good_png, data={name: "1e308"})),
        ("numeric field = 10 kB string", img(good_png, data={name: "9" * 10000})),
        ("clinical = deeply nested JSON", img(good_png, data={"clinical": "[" * 100000 + "]" * 100000})),
        ("clinical = JSON array", img(good_png, data={"clinical": "[1,2,3]"})),
        ("clinical = 5000-digit integer", img(good_png, data={"clinical": '{"a": ' + "9" * 5000 + "}"})),
        ("clinical = NaN / Infinity literals", img(good_png, data={"clinical": '{"a": NaN, "b": Infinity}'})),
        ("clinical = JSON with null byte key", img(good_png, data={"clinical": json.dumps({"\u0000": 1})})),
        ("clinical = 900 kB JSON", img(good_png, data={"clinical": json.dumps({"k" * 900000: 1})})),
        ("explain = maybe", img(good_png, data={"explain": "maybe"})),
        ("path traversal filename", {"files": {"image": ("../../etc/passwd", good_png, "image/png")}}),
        ("explain=true (valid)", img(good_png, params={"explain": "true"})),
    ]
    return cases


def run_malformed(base: str, cases) -> list[dict]:
    import httpx

    out = []
    with httpx.Client(timeout=120) as client:
        for name, kw in cases:
            try:
                r = client.post(base + "/predict", **kw)
                out.append({"case": name, "status": r.status_code,
                            "detail": (r.json().get("detail") if r.headers.get("content-type", "").startswith(
                                "application/json") and r.status_code != 200 else None)})
            except httpx.HTTPError as exc:
                out.append({"case": name, "status": f"client error: {type(exc).__name__}", "detail": str(exc)[:200]})
    for row in out:
        if isinstance(row["detail"], str):
            row["detail"] = row["detail"][:160]
        elif row["detail"] is not None:
            row["detail"] = json.dumps(row["detail"])[:160]
    return out


def run_schemathesis(base: str, examples: int, tmp: Path, max_time: int) -> dict | None:
    """schemathesis CLI against /openapi.json; status codes read back from its HAR report. None when absent."""
    import shutil

    exe = shutil.which("schemathesis") or shutil.which("st")
    if exe is None:
        try:
            import schemathesis
        except ImportError:
            return None
        cmd = [sys.executable, "-m", "schemathesis.cli"]
    else:
        cmd = [exe]
    har = tmp / "schemathesis.har"
    checks = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
    cmd += ["run", base + "/openapi.json", "--checks", checks, "--max-examples", str(examples), "--seed", "0",
            "--workers", "1", "--continue-on-failure", "--max-time", str(max_time), "--request-timeout", "60",
            "--report", "har", "--report-har-path", str(har), "--warnings", "off"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=max_time + 300, cwd=tmp, check=False)  # its cache stays in tmp
    wall = time.perf_counter() - t0
    statuses: dict[str, int] = {}
    per_op: dict[str, dict[str, int]] = {}
    if har.exists():
        for e in json.loads(har.read_text()).get("log", {}).get("entries", []):
            code = str(e.get("response", {}).get("status"))
            statuses[code] = statuses.get(code, 0) + 1
            req = e.get("request", {})
            path = req.get("url", "").split("?")[0].replace(base, "") or "/"
            op = f"{req.get('method')} {path}"
            per_op.setdefault(op, {})
            per_op[op][code] = per_op[op].get(code, 0) + 1
    import schemathesis

    tail = "\n".join(line for line in p.stdout.splitlines()[-25:] if line.strip())
    return {"tool": f"schemathesis {schemathesis.__version__}", "command": " ".join(cmd[1:]).replace(str(tmp), "TMP"),
            "exit_code": p.returncode, "wall_s": round(wall, 1), "requests": sum(statuses.values()),
            "statuses": dict(sorted(statuses.items())),
            "per_operation": {k: dict(sorted(v.items())) for k, v in sorted(per_op.items())},
            "server_errors": sum(v for k, v in statuses.items() if k.startswith("5")), "summary_tail": tail[-3000:]}


def run_schema_fuzzer(base: str, fields: list[dict], images, n: int, seed: int) -> dict:
    """A small fuzzer over /schema/fields when schemathesis is absent: valid, edge and invalid values."""
    import httpx

    rng = random.Random(seed)
    weird = ["", " ", "nan", "-inf", "1e309", "0x10", "１２", "true", "null", "[]", "{}", "\u0000", "é" * 300,
             "A" * 5000, "-0", "1_000", "DROP TABLE", "../../etc/passwd", "😀"]
    statuses: dict[str, int] = {}
    with httpx.Client(timeout=120) as client:
        for i in range(n):
            form = valid_form(fields, rng)
            for f in fields:
                if rng.random() < 0.3:
                    form[f["name"]] = rng.choice(weird)
            if rng.random() < 0.2:
                form[rng.choice(["x", "Age", "rad_mask_available", "clinical"])] = rng.choice(weird + ["{}", '{"a":1}'])
            img = images[i % len(images)][0]
            if rng.random() < 0.3:
                cut = rng.randrange(0, len(img))
                img = img[:cut]
            r = client.post(base + "/predict", files={"image": ("f", img, "application/octet-stream")}, data=form)
            statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1
    return {"tool": "hand-written fuzzer over /schema/fields", "requests": n, "statuses": statuses,
            "server_errors": sum(v for k, v in statuses.items() if k.startswith("5"))}


def run_soak(base: str, fields: list[dict], images, sampler, args) -> dict:
    """Repeat the same mix of bad and good requests and read the server's RSS after each round.

    Memory that an allocator keeps after the first rounds is a plateau; a leak grows every round. The slope
    (least squares, MB per round) is fitted over the second half of the rounds, after any warm-up growth."""
    mal = malformed_cases(images[0][0], fields, args.max_upload_mb)
    rss = [round(sampler.now(), 1)]
    errors, statuses = 0, {}
    t0 = time.perf_counter()
    for k in range(args.soak_rounds):
        f = run_schema_fuzzer(base, fields, images, args.soak_requests, seed=1000 + k)
        m = run_malformed(base, mal)
        errors += f["server_errors"] + sum(1 for r in m if isinstance(r["status"], int) and r["status"] >= 500)
        for code, n in f["statuses"].items():
            statuses[code] = statuses.get(code, 0) + n
        for r in m:
            statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
        time.sleep(1.0)  # let the sampler and the server settle
        rss.append(round(sampler.now(), 1))
        print(f"soak round {k + 1}/{args.soak_rounds}: RSS {rss[-1]} MB", file=sys.stderr)
    half = rss[len(rss) // 2:]
    slope = float(np.polyfit(np.arange(len(half)), half, 1)[0]) if len(half) >= 2 else float("nan")
    per_round = args.soak_requests + len(mal)
    return {"rounds": args.soak_rounds, "requests_per_round": per_round, "requests": per_round * args.soak_rounds,
            "wall_s": round(time.perf_counter() - t0, 1), "rss_mb_after_each_round": rss,
            "slope_second_half_mb_per_round": round(slope, 2),
            "slope_second_half_mb_per_1000_requests": round(1000 * slope / per_round, 2),
            "statuses": dict(sorted(statuses.items())), "server_errors": errors,
            "malloc_arena_max": args.malloc_arena_max}


# --------------------------------------------------------------------------------------------------- main


def markdown(res: dict) -> str:
    lines = [f"## breastfusion serve: load and fuzz ({res['date']})", "",
             f"Machine: {res['machine']}  ", f"Bundle: `{res['bundle']}` ({res['bundle_source']}; model "
             f"{res['model']}, {res['image_size']} px)  ", f"Images: {res['images']}  ",
             f"Server: 1 uvicorn worker, max_concurrency {res['server_options']['max_concurrency']}, "
             f"torch threads {res['server_options'].get('threads') or 'all cores'}  ",
             f"Load average (1/5/15 min) before: {res['loadavg_before']}, after: {res['loadavg_after']}", "",
             "| clients | requests | errors | throughput (req/s) | p50 ms | p90 ms | p99 ms | max ms | RSS before → after MB "
             "| load avg after |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in res["load"]:
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {r['throughput_rps']} | {r['p50_ms']} | "
                     f"{r['p90_ms']} | {r['p99_ms']} | {r['max_ms']} | {r['rss_before_mb']} → {r['rss_after_mb']} | "
                     f"{r['loadavg_after']} |")
    m = res["memory"]
    lines += ["", f"Server RSS: after warm-up {m['after_warmup_mb']} MB, end of the load phases {m['end_load_mb']} MB "
                  f"(growth {m['growth_during_load_mb']} MB, {m['growth_per_1000_requests_mb']} MB / 1000 requests: "
                  f"{'flat' if m['flat'] else 'NOT flat'}); peak over the whole run, fuzzing included, {m['peak_mb']} MB, "
                  f"end {m['end_mb']} MB.", ""]
    for fz in res["fuzz"]:
        extra = f" per operation {fz['per_operation']}" if "per_operation" in fz else ""
        lines.append(f"Fuzz ({fz['tool']}): {fz['requests']} requests, statuses {fz['statuses']}, "
                     f"**5xx: {fz['server_errors']}**.{extra}  ")
    lines += ["", "| malformed request | status |", "|---|---|"]
    for row in res["malformed"]:
        lines.append(f"| {row['case']} | {row['status']} |")
    sk = res.get("soak")
    if sk:
        lines += ["", f"Soak: {sk['rounds']} rounds of {sk['requests_per_round']} fuzz + malformed requests "
                      f"({sk['wall_s']} s, MALLOC_ARENA_MAX {sk['malloc_arena_max'] or 'unset'}), statuses "
                      f"{sk['statuses']}, **5xx: {sk['server_errors']}**. RSS after each round (MB): "
                      f"{sk['rss_mb_after_each_round']}; slope over the second half "
                      f"{sk['slope_second_half_mb_per_round']} MB/round "
                      f"({sk['slope_second_half_mb_per_1000_requests']} MB per 1000 requests)."]
    lines += ["", f"Total 5xx over fuzzing and malformed requests: **{res['total_5xx']}**; load errors: "
                  f"**{sum(r['errors'] for r in res['load'])}**."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle")
    ap.add_argument("--requests", type=int, default=1000, help="requests per concurrency level (default 1000)")
    ap.add_argument("--concurrency", default="8,16", help="comma list of concurrent clients (default 8,16)")
    ap.add_argument("--images", type=int, default=48, help="distinct images cycled through (default 48)")
    ap.add_argument("--with-mask", action="store_true", help="send the lesion masks (radiomics per request)")
    ap.add_argument("--max-concurrency", type=int, default=4, help="server: predictions computed at once")
    ap.add_argument("--threads", type=int, help="server: torch threads (default every core)")
    ap.add_argument("--max-upload-mb", type=float, default=10)
    ap.add_argument("--fuzz-examples", type=int, default=40, help="schemathesis --max-examples (default 40)")
    ap.add_argument("--fuzz-max-time", type=int, default=300, help="schemathesis time budget in s (default 300)")
    ap.add_argument("--fuzz-requests", type=int, default=300, help="hand-written fuzzer requests (default 300)")
    ap.add_argument("--soak-rounds", type=int, default=0,
                    help="after the fuzz: rounds of (fuzzer requests + every malformed case), RSS after each (default 0)")
    ap.add_argument("--soak-requests", type=int, default=200, help="fuzzer requests per soak round (default 200)")
    ap.add_argument("--only-soak", action="store_true", help="skip the load and fuzz phases (warm-up, then the soak)")
    ap.add_argument("--malloc-arena-max", type=int,
                    help="server: set MALLOC_ARENA_MAX (glibc arenas; fewer arenas hold less freed memory)")
    ap.add_argument("--out", default="runs/serve/bench.json")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bf_serve_bench_"))
    bundle, source = pick_bundle(args.bundle, tmp)
    images, images_desc = pick_images(args.images, args.with_mask)
    options = {"max_upload_mb": args.max_upload_mb, "max_concurrency": args.max_concurrency, "threads": args.threads,
               "timeout_s": 60}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    t_start = time.perf_counter()
    proc = start_server(bundle, port, options, args.malloc_arena_max)
    sampler = None
    try:
        health = wait_ready(base, proc)
        startup_s = time.perf_counter() - t_start
        sampler = RssSampler(proc.pid)
        sampler.start()
        import httpx

        fields = httpx.get(base + "/schema/fields").json()["fields"]
        loadavg_before = [round(x, 2) for x in os.getloadavg()]
        asyncio.run(load_phase(base, images, fields, 20, 4, seed=99))  # warm-up
        after_warmup = sampler.now()
        load = []
        levels = [] if args.only_soak else [int(x) for x in args.concurrency.split(",") if x.strip()]
        for k, c in enumerate(levels):
            before = sampler.now()
            r = asyncio.run(load_phase(base, images, fields, args.requests, c, seed=k))
            r["rss_before_mb"], r["rss_after_mb"] = round(before, 1), round(sampler.now(), 1)
            r["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
            load.append(r)
            print(f"load: {c} clients: {r['throughput_rps']} req/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
                  f"errors {r['errors']}", file=sys.stderr)
        end_load = sampler.now()
        total_load = sum(r["requests"] for r in load)
        fuzz = []
        if not args.only_soak:
            st = run_schemathesis(base, args.fuzz_examples, tmp, args.fuzz_max_time)
            if st is None:
                print("schemathesis is not installed: only the hand-written fuzzer runs", file=sys.stderr)
            else:
                fuzz.append(st)
            fuzz.append(run_schema_fuzzer(base, fields, images, args.fuzz_requests, seed=0))
        for f in fuzz:
            print(f"fuzz ({f['tool']}): {f['requests']} requests, statuses {f['statuses']}", file=sys.stderr)
        malformed = run_malformed(base, malformed_cases(images[0][0], fields, args.max_upload_mb))
        soak = run_soak(base, fields, images, sampler, args) if args.soak_rounds else None
        alive = httpx.get(base + "/health").status_code == 200
        loadavg_after = [round(x, 2) for x in os.getloadavg()]
    finally:
        if sampler is not None:
            sampler.stop.set()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    samples = sampler.samples
    peak = max(v for _, v in samples)
    growth = end_load - after_warmup
    mal_5xx = sum(1 for r in malformed if isinstance(r["status"], int) and r["status"] >= 500)
    res = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_description(),
        "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "bundle": str(bundle.relative_to(REPO)) if bundle.is_relative_to(REPO) else bundle.name,
        "bundle_source": source, "model": health["model"], "image_size": health["image_size"],
        "synthetic_model": health["synthetic"], "images": images_desc, "server_options": options,
        "server_startup_s": round(startup_s, 1), "loadavg_before": loadavg_before, "loadavg_after": loadavg_after,
        "load": load,
        "memory": {"after_warmup_mb": round(after_warmup, 1), "end_load_mb": round(end_load, 1), "peak_mb": peak,
                   "end_mb": samples[-1][1] if samples else None, "growth_during_load_mb": round(growth, 1),
                   "growth_per_1000_requests_mb": round(1000 * growth / total_load, 2) if total_load else None,
                   "flat": bool(growth < max(50.0, 0.1 * after_warmup)),
                   "samples_t_s_rss_mb": samples[:: max(1, len(samples) // 400)]},
        "fuzz": fuzz, "malformed": malformed, "soak": soak, "server_alive_after": alive,
        "total_5xx": sum(f["server_errors"] for f in fuzz) + mal_5xx + (soak["server_errors"] if soak else 0),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(markdown(res))
    print(f"\n→ {out}", file=sys.stderr)
    ok = res["total_5xx"] == 0 and all(r["errors"] == 0 for r in load) and alive
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

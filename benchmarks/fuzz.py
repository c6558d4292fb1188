"""Coverage-guided fuzzing of graft's readers with atheris (libFuzzer): the three annotation
readers (COCO JSON, YOLO label files, Pascal VOC XML, each read the way training reads them, by
``scan_detection``) and the image loader (``load_image``).

    .venv/bin/python benchmarks/fuzz.py [--seconds 60] [--targets coco yolo voc image] [--keep]

Each target runs in a process of its own for ``--seconds``: libFuzzer mutates a seed corpus (the
suite's small datasets as ``tests/box_data.py`` writes them, entity bombs, small images of every
format graft reads and the images installed packages ship), guided by coverage of graft, Pillow's
Python plugins, defusedxml and PyYAML (instrumented on import). Every case must end in a result
(whose kept boxes are finite, inside their image and of a known class) or in a GraftError that
names the file; anything else (another exception, a message that names no file) is recorded with
the input that raised it, and fuzzing goes on. Per case, libFuzzer's ``-timeout`` (10 s) and
``-rss_limit_mb`` (2048 MB) stop a hang or a memory blow-up and save the input.

The case counts go to benchmarks/results/fuzz.txt (``--results``). The work folder (a temporary
folder of its own) is deleted at the end unless ``--keep``. Needs the ``fuzz`` extra (atheris).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import sysconfig
import time
import traceback
from collections import Counter
from pathlib import Path

import work_folder  # benchmarks/work_folder.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "fuzz.txt"
TARGETS = ("coco", "yolo", "voc", "image")
TIMEOUT_S, RSS_LIMIT_MB, MAX_LEN = 10, 2048, 65536
DUMP_EVERY = 500  # cases between two writes of the running counts (read if a process is stopped)

# Crashes known and not yet fixed: (exception, file, a piece of the line that raised) -> the strict
# xfail in tests/tasks/detect/test_fuzz_annotations.py that holds the input.
KNOWN: dict[tuple[str, str, str], str] = {}  # none now: the 21 found first are fixed, their inputs kept as regression tests there


def known(signature: str) -> str | None:
    return next((f"known: xfail {test}" for (kind, file, line), test in KNOWN.items() if signature.startswith(f"{kind} at {file}:") and line in signature), None)


DICTIONARIES = {  # tokens libFuzzer splices into inputs (-dict)
    "coco": [b'"images"', b'"annotations"', b'"categories"', b'"id"', b'"image_id"', b'"category_id"', b'"bbox"', b'"file_name"', b'"width"',
             b'"height"', b'"iscrowd"', b'"name"', b"NaN", b"Infinity", b"-Infinity", b"1e400", b"null", b"true", b"[]", b"{}", b'"../"', b'"/"',
             b"\\u0000", b"\\ud800", b"9" * 40],
    "yolo": [b"nan", b"inf", b"-inf", b"1e400", b"0.5", b"1", b"-1", b" ", b"\t", b"\n", b"\r", b"1_0", b"0x1", b"\xe3\x80\x80"],
    "voc": [b"<annotation>", b"</annotation>", b"<object>", b"</object>", b"<name>", b"</name>", b"<bndbox>", b"</bndbox>", b"<xmin>",
            b"</xmin>", b"<ymax>", b"</ymax>", b"<filename>", b"</filename>", b"<size>", b"<width>", b"</width>", b"<difficult>",
            b"<!DOCTYPE a [", b'<!ENTITY e "x">', b"&e;", b"&#0;", b"]>", b"<![CDATA[", b"]]>", b"inf", b"nan", b"../"],
    "image": [b"IHDR", b"IDAT", b"IEND", b"PLTE", b"tRNS", b"\xff\xd8", b"\xff\xc0", b"\xff\xda", b"\xff\xe1", b"Exif", b"GIF89a", b"BM",
              b"II*\x00", b"MM\x00*", b"RIFF", b"WEBPVP8 ", b"VP8L", b"P6", b"255", b"\xff\xff\xff\x7f", b"\x00\x00\x00\x00"],
}


def dictionary(tokens: list[bytes]) -> str:
    """libFuzzer's dictionary format: one quoted token a line, quotes, backslashes and bytes
    outside printable ASCII written as hexadecimal escapes."""

    def quoted(token: bytes) -> str:
        return "".join(chr(b) if 32 <= b < 127 and b not in b'"\\' else f"\\x{b:02x}" for b in token)

    return "".join(f'"{quoted(t)}"\n' for t in tokens)


# ------------------------------------------------------------------------------------------ one target


class Target:
    """One fuzz target in its own process: a dataset (or file) to rewrite per case, and the check
    of each case's outcome."""

    def __init__(self, name: str, work: Path, seconds: float) -> None:
        self.name, self.work, self.seconds = name, work, seconds
        self.counts: Counter[str] = Counter()
        self.bugs: dict[str, dict] = {}
        self.started = time.monotonic()

    # --- setting up

    def prepare(self) -> Path:
        """The dataset to fuzz and the seed corpus; returns the corpus folder."""
        from box_data import make_scenes, voc_xml, write_coco, write_voc, write_yolo

        corpus = self.work / "corpus"
        corpus.mkdir(parents=True)
        scenes = make_scenes(2, negatives=0)
        seeds: list[bytes] = []
        if self.name == "coco":
            self.root = write_coco(self.work / "data", {"train": scenes})
            self.file = self.root / "annotations" / "instances_train.json"
            doc = json.loads(self.file.read_text())
            seeds.append(self.file.read_bytes())
            odd = json.loads(json.dumps(doc))
            odd["images"][0]["id"], odd["annotations"][0]["image_id"] = "a", "a"
            odd["annotations"][0]["bbox"][0], odd["annotations"][-1]["iscrowd"] = float("nan"), 1
            odd["categories"][0]["name"] = "ñame ☃"
            seeds.append(json.dumps(odd).encode())
        elif self.name == "yolo":
            self.root = write_yolo(self.work / "data", {"train": scenes})
            self.file = self.root / "labels" / "train" / "img_000.txt"
            seeds += [self.file.read_bytes(), b"0 0.5 0.5 0.2 0.2 0.3 0.1 0.4 0.6\n", b"1 0.1 0.1 0.05 0.05\n\n0 0.9 0.9 0.1 0.1\r\n"]
        elif self.name == "voc":
            self.root = write_voc(self.work / "data", {"train": scenes})
            self.file = self.root / "Annotations" / "img_000.xml"
            seeds += [self.file.read_bytes(), voc_xml("img_000", 64, 48, []).encode()]
            seeds.append(b'<?xml version="1.0"?><!DOCTYPE annotation [<!ENTITY a "x"><!ENTITY b "&a;&a;">]><annotation><filename>&b;</filename></annotation>')
            seeds.append(b'<annotation><filename>img_000.png</filename><object><name>disc</name><difficult>1</difficult>'
                         b'<bndbox><xmin>1</xmin><ymin>2</ymin><xmax>30.5</xmax><ymax>40</ymax></bndbox></object></annotation>')
        else:
            self.root = self.work / "data"
            self.root.mkdir()
            self.file = self.root / "image"
            seeds += small_images()
        for i, seed in enumerate(seeds):
            (corpus / f"seed-{i:03d}").write_bytes(seed)
        (self.work / "dictionary").write_text(dictionary(DICTIONARIES[self.name]), encoding="ascii")
        return corpus

    # --- one case

    def run_case(self, data: bytes) -> None:
        from graft.errors import GraftError

        self.file.write_bytes(data)
        try:
            outcome = self.read()
        except GraftError as e:
            named = str(self.root) in str(e)
            self.counts["named error" if named else "error naming no file"] += 1
            if not named:
                self.record(f"GraftError naming no file: {str(e)[:120]}", data)
        except Exception as e:  # noqa: BLE001 - anything else escaping is a bug in graft
            self.counts["other exception"] += 1
            where = next((f for f in reversed(traceback.extract_tb(e.__traceback__)) if "/graft/" in f.filename), traceback.extract_tb(e.__traceback__)[-1])
            self.record(f"{type(e).__name__} at {Path(where.filename).name}:{where.lineno} ({where.line}): {str(e)[:100]}", data)
        else:
            broken = self.broken(outcome)
            self.counts["read" if not broken else "read, but " + broken] += 1
            if broken:
                self.record(broken, data)
        self.counts["cases"] += 1
        elapsed = time.monotonic() - self.started
        if elapsed >= self.seconds:
            self.dump(elapsed, done=True)
            os._exit(0)
        if self.counts["cases"] % DUMP_EVERY == 0:
            self.dump(elapsed)

    def read(self):
        if self.name == "image":
            from graft.data.images import load_image

            return load_image(self.file)
        from graft.tasks.detect.data import scan_detection

        return scan_detection(self.root, val_fraction=0, workers=1)

    def broken(self, outcome) -> str | None:
        """What is wrong with a result, if anything."""
        import numpy as np

        if self.name == "image":
            w, h = outcome.size
            return None if outcome.mode == "RGB" and np.asarray(outcome).shape == (h, w, 3) else f"an image of mode {outcome.mode}"
        for s in outcome.train + outcome.val + outcome.test:
            b = s.boxes
            if not (np.isfinite(b).all() and ((b[:, 0] >= 0) & (b[:, 2] <= s.width) & (b[:, 0] < b[:, 2]) & (b[:, 1] >= 0) & (b[:, 3] <= s.height) & (b[:, 1] < b[:, 3])).all()):
                return "a kept box that is not finite or not inside its image"
            if not ((s.labels >= 0) & (s.labels < len(outcome.classes))).all():
                return "a label outside the classes"
        names = {"coco": (str(self.file), "annotation id"), "yolo": (str(self.root / "labels"), "img_000.txt", "img_001.txt"),
                 "voc": (str(self.root / "Annotations"), "Annotations/", str(self.root / "ImageSets"))}[self.name]
        if not all(any(n in p for n in names) for p in outcome.problems) or not all(s.reason for s in outcome.skipped):
            return "a problem line that names no file or entry"
        return None

    def record(self, signature: str, data: bytes) -> None:
        bug = self.bugs.setdefault(signature, {"count": 0, "example": data[:400].decode("latin-1")})
        bug["count"] += 1
        if bug["count"] == 1:
            (self.work / f"bug-{len(self.bugs):03d}.bin").write_bytes(data)
            self.dump(time.monotonic() - self.started)

    def dump(self, elapsed: float, done: bool = False) -> None:
        stats = {"target": self.name, "seconds": round(elapsed, 1), "done": done, "counts": dict(self.counts), "bugs": self.bugs}
        tmp = self.work / "stats.json.tmp"
        tmp.write_text(json.dumps(stats), encoding="utf-8")
        os.replace(tmp, self.work / "stats.json")


def small_images() -> list[bytes]:
    """A small file of each format and mode graft reads, and the small images installed packages ship."""
    import numpy as np
    from PIL import Image

    im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8))
    out = []
    for image, fmt, options in [(im, "PNG", {}), (im.convert("P"), "PNG", {}), (im.convert("LA"), "PNG", {}), (im, "JPEG", {"quality": 90}),
                                (im, "JPEG", {"progressive": True}), (im.convert("P"), "GIF", {}), (im, "BMP", {}), (im, "TIFF", {}),
                                (im, "TIFF", {"compression": "tiff_lzw"}), (im.convert("I;16"), "TIFF", {}), (im, "WEBP", {}), (im, "WEBP", {"lossless": True}),
                                (im, "PPM", {}), (im.convert("L"), "PPM", {})]:
        buffer = io.BytesIO()
        image.save(buffer, fmt, **options)
        out.append(buffer.getvalue())
    shipped = Path(sysconfig.get_paths()["purelib"])
    for ext in (".png", ".jpg", ".gif", ".bmp", ".tif", ".webp"):
        out += [p.read_bytes() for p in sorted(shipped.glob(f"*/**/*{ext}")) if p.is_file() and p.stat().st_size <= 16_000]
    return out


def run_target(name: str, work: Path, seconds: float) -> None:
    """The child process: instrument, prepare, fuzz until ``seconds`` have passed."""
    import atheris

    sys.path.insert(0, str(ROOT / "tests"))  # box_data, the suite's dataset writers
    with atheris.instrument_imports(include=["graft", "PIL", "defusedxml", "yaml"]):
        import PIL.Image

        import graft.data.images
        import graft.tasks.detect.data  # noqa: F401

        PIL.Image.init()  # every format plugin, imported (and instrumented) now
    target = Target(name, work, seconds)
    corpus = target.prepare()
    target.started = time.monotonic()
    target.dump(0.0)
    flags = [f"-timeout={TIMEOUT_S}", f"-rss_limit_mb={RSS_LIMIT_MB}", f"-max_len={MAX_LEN}", f"-max_total_time={int(seconds) + 120}",
             f"-dict={work / 'dictionary'}", f"-artifact_prefix={work}/", "-close_fd_mask=3", "-seed=1"]
    atheris.Setup([sys.argv[0], *flags, str(corpus)], target.run_case)
    atheris.Fuzz()


# ------------------------------------------------------------------------------------------ the harness


def fuzz(name: str, work: Path, seconds: float) -> dict:
    """Run one target in a process of its own; its counts, and how the process ended."""
    folder = work / name
    folder.mkdir()
    log = folder / "libfuzzer.log"
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.run([sys.executable, __file__, "--run-target", name, "--work", str(folder), "--seconds", str(seconds)],
                              stdout=out, stderr=subprocess.STDOUT, timeout=seconds + 300, cwd=folder, check=False)
    stats_file = folder / "stats.json"
    stats = json.loads(stats_file.read_text()) if stats_file.exists() else {"target": name, "counts": {}, "bugs": {}, "done": False}
    stats["wall_seconds"] = round(time.monotonic() - started, 1)
    stats["returncode"] = proc.returncode
    stats["artifacts"] = sorted(p.name for p in folder.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-", "leak-", "slow-unit-")))
    lines = log.read_text(errors="replace").splitlines()
    coverage = [line.split("cov: ")[1].split()[0] for line in lines if "cov: " in line]
    stats["coverage"] = int(coverage[-1]) if coverage else None
    if not stats["done"]:
        stats["stopped"] = [line for line in lines if any(k in line for k in ("ALARM", "out-of-memory", "ERROR", "Uncaught", "deadly signal", "Traceback"))][-5:] or lines[-5:]
    return stats


def summarise(results: list[dict], args: argparse.Namespace, seconds: float) -> str:
    from importlib.metadata import version

    import PIL

    lines = [
        "# benchmarks/fuzz.py: atheris (libFuzzer) over graft's annotation readers and image loader",
        f"# command: python benchmarks/fuzz.py {' '.join(args.argv)}".rstrip(),
        (f"# {args.seconds:g} s per target; wall time {seconds:.0f} s; {os.cpu_count()} CPUs; Python {platform.python_version()}, "
         f"atheris {version('atheris')}, Pillow {PIL.__version__}, PyYAML {version('pyyaml')}, defusedxml {version('defusedxml')}"),
        f"# per case: -timeout={TIMEOUT_S} s, -rss_limit_mb={RSS_LIMIT_MB}, -max_len={MAX_LEN} bytes",
        "",
        "| target | reader | cases | seconds | cases/s | read | named error | anything else | coverage (libFuzzer edges) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    readers = {"coco": "scan_detection: COCO JSON", "yolo": "scan_detection: YOLO label file", "voc": "scan_detection: VOC XML", "image": "load_image"}
    for r in results:
        c = r["counts"]
        other = c.get("cases", 0) - c.get("read", 0) - c.get("named error", 0)
        secs = r.get("seconds", 0) or 1
        lines.append(f"| {r['target']} | {readers[r['target']]} | {c.get('cases', 0)} | {r.get('seconds', 0):g} | {c.get('cases', 0) / secs:.0f} | "
                     f"{c.get('read', 0)} | {c.get('named error', 0)} | {other} | {r.get('coverage')} |")
    for r in results:
        if r["bugs"] or not r["done"] or r["artifacts"]:
            lines += ["", f"## {r['target']}: " + ("stopped early (process exit status " + str(r["returncode"]) + ")" if not r["done"] else "cases that ended otherwise")]
            lines += [f"- {sig} (x{b['count']}{'; ' + known(sig) if known(sig) else ''}); first input: {b['example'][:200]!r}" for sig, b in r["bugs"].items()]
            lines += [f"- libFuzzer saved {a}" for a in r["artifacts"]]
            lines += [f"- log: {line}" for line in r.get("stopped", [])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60, help="fuzzing time per target (default 60)")
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    parser.add_argument("--keep", action="store_true", help="keep the work folder (corpora, the inputs that raised, libFuzzer's logs)")
    parser.add_argument("--work", type=Path, default=None, help="make the work folder in this folder (default: the system's temporary folder)")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"write the counts here (default {RESULTS.relative_to(ROOT)})")
    parser.add_argument("--run-target", choices=TARGETS, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    args.argv = argv
    if args.run_target:
        run_target(args.run_target, args.work, args.seconds)
        return 0
    work = work_folder.make("graft-fuzz-", args.work)  # a folder of its own, removed at the end (unless --keep)
    started = time.monotonic()
    try:
        results = []
        for name in args.targets:
            print(f"fuzzing {name} for {args.seconds:g} s ...", flush=True)
            results.append(fuzz(name, work, args.seconds))
            c = results[-1]["counts"]
            print(f"  {c.get('cases', 0)} cases: {c.get('read', 0)} read, {c.get('named error', 0)} named errors, "
                  f"{len(results[-1]['bugs'])} kinds of anything else", flush=True)
        text = summarise(results, args, time.monotonic() - started)
        print(text)
        if args.results:
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(text, encoding="utf-8")
        return 0 if all(r["done"] and not r["bugs"] for r in results) else 1
    finally:
        work_folder.release(work, args.keep)


if __name__ == "__main__":
    raise SystemExit(main())

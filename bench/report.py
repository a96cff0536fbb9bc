#!/usr/bin/env python3
"""Write docs/BENCHMARKS.md from the raw timings of bench/run.

Usage: bench/report.py BENCH_DIR OUTPUT.md

Also draws each case it reports as a chart, OUTPUT's directory/bench/CASE.svg (the throughput
of every contender: median bar, min–max whisker, cutoverfs highlighted), linked from the case's
section; a run of only some cases redraws only theirs.

Reads BENCH_DIR/results.csv (case,contender,round,seconds; seconds is "failed" for a run that
failed), BENCH_DIR/meta.tsv (what each case measured, its targets, why runs failed, uploaded the
wrong objects or served the wrong content, odd things that did not fail a run, and cases that
could not run, written by bench/run) and BENCH_DIR/load.csv (load average before each
timed command). Every figure and every met/not met comes from those files; nothing here knows
the results in advance. Standard library only.
"""

import csv
import math
import os
import platform
import statistics
import subprocess
import sys
from collections import OrderedDict, defaultdict
from xml.sax.saxutils import escape


def read_meta(path):
    """info, cases, targets, problems: {case: [(kind, contender, round, text)]} where kind is
    "failure" (the command failed), "invalid" (its upload did not match the source), "wrong" (a
    mount served content other than the plain directory's, or a write case's run left other
    files or manifest rows than it should) or "note" (something odd that did not fail the run),
    skipped: OrderedDict(case: (title, reason)) for cases that could not run, and pairs:
    {case: {row: subject row}}, rows whose ratio is taken against another row than the case's
    subject (the write cases' "+ syncfs" rows against "cutoverfs mount + syncfs")."""
    info, cases, targets, problems = {}, OrderedDict(), defaultdict(list), defaultdict(list)
    skipped = OrderedDict()
    pairs = defaultdict(dict)
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            f = line.rstrip("\n").split("\t")
            if f[0] == "info":
                info[f[1]] = f[2] if len(f) > 2 else ""
            elif f[0] == "case":
                name, title, files, dirs, nbytes, subject, peers, columns, note = f[1:10]
                cases[name] = {
                    "title": title,
                    "files": int(files),
                    "dirs": int(dirs),
                    "bytes": int(nbytes),
                    "subject": subject,
                    "peers": [p for p in peers.split(";") if p],
                    "columns": [c for c in columns.split(";") if c],
                    "note": note,
                }
            elif f[0] == "target":
                case, kind, subject, peer, minimum, label = f[1:7]
                targets[case].append(
                    {"kind": kind, "subject": subject, "peer": peer, "min": float(minimum), "label": label}
                )
            elif f[0] in ("failure", "invalid", "wrong", "note") and len(f) >= 5:
                problems[f[1]].append((f[0], f[2], f[3], f[4]))
            elif f[0] == "skipped" and len(f) >= 4:
                skipped[f[1]] = (f[2], f[3])
            elif f[0] == "pair" and len(f) >= 4:
                pairs[f[1]][f[2]] = f[3]
    return info, cases, targets, problems, skipped, pairs


def read_results(path):
    """{case: OrderedDict(contender: [(round, seconds), ...])} in first-seen order."""
    out = OrderedDict()
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.reader(fh):
            if not row or row[0] == "case":
                continue
            case, contender, rnd, seconds = row
            try:
                value = float(seconds)
            except ValueError:
                value = math.nan
            out.setdefault(case, OrderedDict()).setdefault(contender, []).append((int(rnd), value))
    return out


def read_load(path):
    loads = defaultdict(list)
    if os.path.exists(path):
        with open(path, newline="", encoding="utf-8") as fh:
            for row in csv.reader(fh):
                if row and row[0] != "case":
                    try:
                        loads[row[0]].append(float(row[3]))
                    except (IndexError, ValueError):
                        pass
    return loads


def run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def machine(bench_dir):
    nproc = run(["nproc"]) or str(os.cpu_count())
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            kib = int(fh.readline().split()[1])
            mem = f"{kib / 1024 / 1024:.1f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    fs, options = "", ""
    df = run(["df", "-T", bench_dir]).splitlines()
    if len(df) >= 2:
        parts = df[-1].split()
        device, fstype, mountpoint = parts[0], parts[1], parts[-1]
        fs = f"{fstype} on {device} mounted at {mountpoint}"
        try:
            with open("/proc/mounts", encoding="utf-8") as fh:
                for line in fh:
                    m = line.split()
                    if len(m) >= 4 and m[0] == device and m[1] == mountpoint:
                        options = m[3]
                        break
        except OSError:
            pass
    return {
        "nproc": nproc,
        "cpu": cpu,
        "mem": mem,
        "kernel": f"{platform.system()} {platform.release()}",
        "fs": fs,
        "options": options,
    }


def fmt_s(x):
    if math.isnan(x):
        return "n/a"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def fmt_rate(x):
    if math.isnan(x) or math.isinf(x):
        return "n/a"
    if x >= 1000:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def fmt_ratio(x):
    return "n/a" if math.isnan(x) or math.isinf(x) else f"{x:.2f}×"


def fmt_wait(text):
    """'12.3' or 'busy after 60.1' (from bench/run) as prose."""
    busy = text.startswith("busy after ")
    try:
        seconds = float(text[len("busy after "):] if busy else text)
    except ValueError:
        return text
    return f"{seconds:.0f} s (gave up: the disk was still busy)" if busy else f"{seconds:.0f} s"


def median(values):
    vals = [v for v in values if not math.isnan(v)]
    return statistics.median(vals) if vals else math.nan


# What each contender does, shown for the contenders present in the results. A new contender
# (an S3 or FUSE case, say) should get a line here.
CONTENDER_NOTES = {
    "cutoverfs sweep": "scans the source into a new SQLite manifest (on the same disk), copies every file "
    "while computing its SHA-256 in the same pass, makes each copy and its directory entry durable before "
    "recording it verified in the manifest. On a local dest durability comes from a group commit: one "
    "`syncfs` of the dest file system covers all the files in flight (per-file `fsync` of the file and its "
    "directory where a subdirectory is another file system); like `sync`, `syncfs` also flushes anything "
    "else dirty on that file system. The time includes process start and creating the manifest.",
    "cp -a": "copies data and attributes; no hash, no `fsync`. When it returns much of the data may "
    "still be only in the page cache, so its time is a floor no durable copy can reach.",
    "cp -a + sync": "`cp -a` followed by one `sync`: the data is on disk at the end, as with cutoverfs, but "
    "flushed once at the very end, whereas cutoverfs waits for each file to be durable before recording "
    "it (`sync` also flushes whatever else is dirty on the machine). The fairer peer for durability.",
    "rsync -a": "copies data and attributes and checks each transferred file with its own fast whole-file "
    "checksum (not SHA-256); no `fsync`.",
    "rsync -a --fsync": "as `rsync -a`, plus an `fsync` of every file it writes, one after the other (not "
    "of directories): durable per file, like cutoverfs, but without group commit.",
    "cutoverfs sweep: scan phase": "the scan phase of a real first sweep into a new manifest: walk the tree, "
    "`lstat` every entry and write a manifest row for it. Its time is computed from the sweep's own "
    "`Scanned N files (...) and M directories in X (R entries/s)` line as (N + M) / R; process start, "
    "manifest creation and the copy phase are not in it.",
    "cutoverfs sweep: whole run": "the wall time of that same first sweep, including copying, hashing and "
    "making durable every file (information).",
    "cutoverfs re-sweep: scan phase": "the scan phase of a second sweep of the unchanged tree against the same "
    "manifest, which then has nothing to copy (information: what every later sweep costs).",
    "cutoverfs re-sweep: whole run": "the wall time of that second sweep (information).",
    "find -printf (stat walk)": "`find SRC -printf '%s %T@ %m %U %G\\n' > /dev/null`: a single-threaded "
    "walk that `lstat`s every entry and formats what the manifest records; the native floor for a scan.",
    # S3 cases. EP is the Garage endpoint (http://127.0.0.1:PORT), PREFIX a new key prefix per run;
    # every client gets the key in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_REGION=garage and
    # a private, empty AWS config (path-style addressing) and rclone config.
    "cutoverfs sweep → S3": "`cutoverfs sweep --source SRC --dest 's3://media/PREFIX?endpoint=EP&region=garage&path_style=true' "
    "--manifest sqlite:///RUN/m.db --no-progress`: scans the source into a new SQLite manifest, uploads every "
    "file while computing its SHA-256, and records each object verified in the manifest. The time includes "
    "process start and creating the manifest.",
    "s5cmd cp": "`s5cmd --endpoint-url EP cp 'SRC/*' s3://media/PREFIX/` (defaults: 256 workers; multipart "
    "in 50 MiB parts, 5 at a time per file). It sends path-style requests to a custom endpoint without being "
    "told to. Keeps no record of what it uploaded.",
    "rclone copy": "`env -u AWS_CA_BUNDLE rclone copy SRC :s3:media/PREFIX --s3-provider Other --s3-endpoint EP "
    "--s3-region garage --s3-force-path-style --s3-access-key-id … --s3-secret-access-key …` with rclone's "
    "defaults: 4 transfers, 8 checkers; files over 200 MiB go multipart in 5 MiB chunks, 4 at a time, after "
    "rclone computes the file's MD5 to store as metadata. Lists the (empty) destination first. "
    "(`env -u AWS_CA_BUNDLE`: rclone refuses to start when that variable is set.)",
    "rclone copy --transfers 32 --checkers 32": "the same rclone command with 8× the default transfers and 4× "
    "the default checkers: what a user tuning rclone for many small files would do (information beyond the "
    "defaults, not one of the targets).",
    "aws s3 sync": "`aws --endpoint-url EP s3 sync SRC s3://media/PREFIX/ --no-progress` (AWS CLI v1 defaults: "
    "10 concurrent requests; files over 8 MiB go multipart in 8 MiB parts; `s3.addressing_style = path` in "
    "the private config). Lists the (empty) destination first.",
    # Mount cases: the case's read command (in its section) on DIR itself, on DIR under a
    # cutoverfs mount, or on MNT (a new directory) for the peers.
    "native (plain directory)": "the case's read command (given in its section) on DIR, the case's tree, "
    "itself, or in the write cases (`mountwrite…`) its writes into a new empty directory: no FUSE, the floor "
    "every mount is held to.",
    "cutoverfs mount": "`cutoverfs mount DIR --dest file:///RUN/dest --manifest sqlite:///RUN/m.db --no-sweep` "
    "(a new, empty dest and a new manifest for every run; defaults otherwise: `--attr-timeout 1s --fuse-threads 4`), "
    "which mounts over DIR itself (how the daemon is started: see \"Starting the daemon\" below); then, untimed, "
    "a wait until the daemon logs `scan done` (its scan of DIR into the manifest) and a `sync`; then the read command on DIR "
    "(now the mount); then `kill -TERM` of the daemon (found with `pgrep -f 'cutoverfs mount DIR --dest'`), "
    "which unmounts and exits. Nothing is migrated, so every file is served from the local copy (FUSE "
    "passthrough where the kernel offers it) and every first open of a file queues it for copy-on-read. In "
    "`mounts3` the dest is `s3://media/mounts3?endpoint=EP&region=garage&path_style=true` with the manifest of "
    "the untimed sweep that migrated the file, so the file is read from S3 (ranged GETs with a prefetcher, "
    "256 MiB of read-ahead memory by default). In the write cases (`mountwrite…`) DIR is a new empty "
    "directory for every run, mounted the same way (so `--no-sweep`: the figures are the write path alone, "
    "no copy to the dest runs during or after the writes), and the writes go to DIR; after the unmount the "
    "manifest must hold every file written, `pending`, with its size.",
    "fuse-overlayfs": "`fuse-overlayfs -o lowerdir=DIR MNT` (Debian package, defaults; one lower layer "
    "and no upper layer, so read-only), the read command on MNT, then `umount MNT`. A new mount for every run.",
    "bindfs -r": "`bindfs -r DIR MNT` (Debian package, defaults: read-only), the read command on MNT, then "
    "`umount MNT`. A new mount for every run.",
    # Write cases: the case's writes (its section) into a new empty directory per run.
    "fuse-overlayfs (upper dir)": "`fuse-overlayfs -o lowerdir=RUN/lower,upperdir=RUN/tree,workdir=RUN/work RUN/mnt` "
    "(Debian package, defaults; an empty lower layer, so every file is new in the upper directory RUN/tree, "
    "on the same file system), the writes into RUN/mnt, then `umount`. A new mount for every run.",
    "bindfs (read-write)": "`bindfs RUN/tree RUN/mnt` (Debian package, defaults, read-write), the writes into "
    "RUN/mnt, then `umount`. A new mount for every run.",
    "native (plain directory) with fsync per file": "the writes of `native (plain directory)` with an `fsync` of "
    "every file before it is closed; its ratio is taken against `cutoverfs mount with fsync per file`.",
    "cutoverfs mount with fsync per file": "the writes of `cutoverfs mount` with an `fsync` of every file before "
    "it is closed (a FUSE_FSYNC request per file, answered by the daemon's `fsync` of the backing file).",
    "curl GET (one request)": "`curl -sS --fail -o /dev/null -w '%{size_download}' -H 'x-amz-content-sha256: "
    "UNSIGNED-PAYLOAD' --aws-sigv4 aws:amz:garage:s3 --user KEY:SECRET EP/media/mounts3/big.bin`: the object "
    "in one plain signed GET over one TCP connection (the byte count must be the file's size; Garage "
    "refuses a request without that header, which curl does not add by itself).",
    "s5cmd cat": "`s5cmd --endpoint-url EP cat s3://media/mounts3/big.bin > /dev/null` (defaults: 50 MiB ranged "
    "GETs, 5 at a time, written out in order).",
    "aws s3 cp - (to stdout)": "`aws --endpoint-url EP s3 cp s3://media/mounts3/big.bin - > /dev/null` "
    "(AWS CLI v1 defaults: ranged GETs of 8 MiB, 10 at a time, written out in order).",
}

# Rows derived from another row's runs, by the end of their label.
SUFFIX_NOTES = {
    " + syncfs": "`… + syncfs` (write cases): the same timed run as the row without the suffix, up to the end "
    "of one `syncfs(2)` of the work dir's file system after the last close, called on the run's own "
    "directory outside every mount: every FUSE contender's backing files are on that file system, so the "
    "data written is on disk at the end for every row alike (a `syncfs` also flushes anything else dirty "
    "on that file system, including cutoverfs' manifest). Its ratio is taken against `cutoverfs mount + syncfs`.",
}

COLUMN_TITLES = {
    "files_per_s": "files/s",
    "entries_per_s": "entries/s",
    "mb_per_s": "MB/s",
}


def column_value(column, case, seconds):
    if not seconds or math.isnan(seconds):
        return math.nan
    if column == "files_per_s":
        return case["files"] / seconds
    if column == "entries_per_s":
        return (case["files"] + case["dirs"]) / seconds
    if column == "mb_per_s":
        return case["bytes"] / seconds / 1e6
    return math.nan


def evaluate(target, case, medians):
    """(measured text, met?) for one target, from the medians."""
    subject = medians.get(target["subject"], math.nan)
    if math.isnan(subject) and target["kind"] in ("ratio", "ratio_best", "files_per_s", "time_at_most"):
        return f"n/a (no successful run of {target['subject']})", None
    if target["kind"] == "ratio_best":
        # SUBJECT's throughput >= MIN x the fastest of the peers (";"-separated).
        peers = [(medians[p], p) for p in target["peer"].split(";") if not math.isnan(medians.get(p, math.nan))]
        if not peers:
            return "n/a (no successful peer run)", None
        best_time, best = min(peers)
        ratio = best_time / subject
        return f"{fmt_ratio(ratio)} (best: {best})", ratio >= target["min"]
    if target["kind"] == "ratio":
        peer = medians.get(target["peer"], math.nan)
        ratio = peer / subject if subject and not math.isnan(subject) else math.nan
        return fmt_ratio(ratio), None if math.isnan(ratio) else ratio >= target["min"]
    if target["kind"] == "time_at_most":
        # SUBJECT's median time <= MIN (here a maximum) x PEER's.
        peer = medians.get(target["peer"], math.nan)
        if math.isnan(peer) or not peer:
            return f"n/a (no successful run of {target['peer']})", None
        ratio = subject / peer
        return f"{fmt_ratio(ratio)} {target['peer']}'s time", ratio <= target["min"]
    if target["kind"] == "files_per_s":
        rate = column_value("files_per_s", case, subject)
        return f"{fmt_rate(rate)} files/s", (not math.isnan(rate)) and rate >= target["min"]
    return "unknown target kind", False


def evaluate_checked(target, case, medians, problems):
    """evaluate(), but a target is not met while its subject uploaded or served the wrong data."""
    measured, met = evaluate(target, case, medians)
    if any(kind == "invalid" and contender == target["subject"] for kind, contender, _, _ in problems):
        return f"{measured}, but {target['subject']} uploaded the wrong objects", False
    if any(kind == "wrong" and contender in (target["subject"], target["subject"].removesuffix(" + syncfs"))
           for kind, contender, _, _ in problems):
        return f"{measured}, but {target['subject']} gave the wrong content", False
    return measured, met


def ordered(case, rows):
    """Peers in their listed order, then the subject, then information rows."""
    if case is None:
        return rows
    first = [c for c in case["peers"] + [case["subject"]] if c in rows]
    return OrderedDict((c, rows[c]) for c in first + [c for c in rows if c not in first])


def verdict(met):
    """met: True, False, or None when there was nothing to compare."""
    return "**not measured**" if met is None else "**met**" if met else "**not met**"


# Charts. One SVG per case, written by hand (no plotting library, so bench/run needs nothing
# more): a horizontal bar per contender at its median throughput in the case's first column
# (files/s, MB/s...), a whisker from its slowest to its fastest round, the figure at the end;
# the subject rows (bold in the table) in a strong colour, other cutoverfs rows in a light one,
# the other tools in grey. Same input, same bytes: no dates in the file.

CHART_SUBJECT = "#d9480f"
CHART_CUTOVERFS = "#ffa94d"
CHART_PEER = "#adb5bd"
CHART_FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"


def is_cutoverfs(contender):
    """Rows that time cutoverfs: named after it, or the sweeps of case nodes ("2 sweeps (...)")."""
    return "cutoverfs" in contender or any(word.startswith("sweep") for word in contender.split())


def nice_step(top, ticks=5):
    """A round tick step (1, 2, 2.5 or 5 times a power of ten) for an axis from 0 to top."""
    raw = top / ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * magnitude:
            return m * magnitude
    return 10 * magnitude


def fmt_tick(x):
    if x >= 1000:
        return f"{x:,.0f}"
    return f"{x:.0f}" if x == int(x) else f"{x:g}"


def text_width(text, px):
    """A generous estimate of the width of text in the chart's font at size px."""
    return len(text) * px * 0.6


def chart_svg(name, case, rows, subjects):
    """The SVG text of case name's chart, or None when the case has no throughput column.
    rows: OrderedDict(contender: [(round, seconds)]); subjects: the rows shown in bold."""
    if not case["columns"]:
        return None
    column = case["columns"][0]
    unit = COLUMN_TITLES.get(column, column)
    bars = []
    for contender, r in rows.items():
        vals = [s for _, s in r if not math.isnan(s)]
        if vals:
            med = column_value(column, case, median(vals))
            lo, hi = column_value(column, case, max(vals)), column_value(column, case, min(vals))
        else:
            med = lo = hi = math.nan
        colour = CHART_SUBJECT if contender in subjects else CHART_CUTOVERFS if is_cutoverfs(contender) else CHART_PEER
        bars.append((contender, med, lo, hi, colour, len(r), len(vals)))
    finite = [x for b in bars for x in b[1:4] if not math.isnan(x) and not math.isinf(x)]
    if not finite:
        return None
    top = max(finite)
    step = nice_step(top) if top > 0 else 1
    axis_max = math.ceil(top / step) * step if top > 0 else 1

    labels = [c if len(c) <= 48 else c[:47] + "…" for c, *_ in bars]
    label_w = max(120, min(400, max(text_width(t, 12) for t in labels) + 12))
    plot_w, value_w, row_h, bar_h = 440, 80, 24, 14
    left = 10 + label_w
    title = f"Case {name}: {case['title']}"
    rounds = max(b[5] for b in bars)
    subtitle = (f"{unit}, higher is better: bar = median of {rounds} round{'s' if rounds != 1 else ''}, "
                "whisker = slowest to fastest round")
    width = int(max(left + plot_w + value_w + 10, text_width(title, 14) + 20, text_width(subtitle, 12) + 20))
    plot_top = 56
    plot_bottom = plot_top + row_h * len(bars)
    legend_y = plot_bottom + 44
    height = legend_y + 16

    def x_of(value):
        return left + plot_w * value / axis_max

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" font-family="{CHART_FONT}" font-size="12">',
        f"<title>{escape(title)}: {escape(unit)} of each contender</title>",
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="10" y="20" font-size="14" font-weight="bold" fill="#212529">{escape(title)}</text>',
        f'<text x="10" y="38" fill="#495057">{escape(subtitle)}</text>',
    ]
    tick = 0.0
    while tick <= axis_max + step / 1000:
        x = x_of(tick)
        out.append(f'<line x1="{x:.1f}" y1="{plot_top - 4}" x2="{x:.1f}" y2="{plot_bottom}" stroke="#e9ecef"/>')
        out.append(f'<text x="{x:.1f}" y="{plot_bottom + 16}" text-anchor="middle" fill="#495057">'
                   f"{escape(fmt_tick(tick))}</text>")
        tick += step
    out.append(f'<line x1="{left}" y1="{plot_bottom}" x2="{left + plot_w}" y2="{plot_bottom}" stroke="#495057"/>')
    out.append(f'<text x="{left + plot_w / 2:.1f}" y="{plot_bottom + 32}" text-anchor="middle" '
               f'fill="#212529">{escape(unit)}</text>')
    for i, ((contender, med, lo, hi, colour, total, ok), label) in enumerate(zip(bars, labels)):
        y = plot_top + i * row_h
        mid = y + row_h / 2
        weight = ' font-weight="bold"' if contender in subjects else ""
        out.append(f'<text x="{left - 8}" y="{mid + 4:.1f}" text-anchor="end" fill="#212529"{weight}>'
                   f"{escape(label)}</text>")
        if math.isnan(med):
            out.append(f'<text x="{left + 4}" y="{mid + 4:.1f}" fill="#c92a2a">failed</text>')
            continue
        out.append(f'<rect x="{left}" y="{mid - bar_h / 2:.1f}" width="{max(x_of(med) - left, 1):.1f}" '
                   f'height="{bar_h}" fill="{colour}"><title>{escape(contender)}: {escape(fmt_rate(med))} '
                   f"{escape(unit)} (median), {escape(fmt_rate(lo))}–{escape(fmt_rate(hi))}</title></rect>")
        if hi > lo:
            x1, x2 = x_of(lo), x_of(hi)
            out.append(f'<line x1="{x1:.1f}" y1="{mid:.1f}" x2="{x2:.1f}" y2="{mid:.1f}" stroke="#212529"/>')
            for x in (x1, x2):
                out.append(f'<line x1="{x:.1f}" y1="{mid - 5:.1f}" x2="{x:.1f}" y2="{mid + 5:.1f}" stroke="#212529"/>')
        note = f" ({total - ok} of {total} failed)" if ok < total else ""
        out.append(f'<text x="{max(x_of(hi), x_of(med)) + 6:.1f}" y="{mid + 4:.1f}" fill="#212529">'
                   f"{escape(fmt_rate(med) + note)}</text>")
    x = 10
    for colour, text in ((CHART_SUBJECT, "cutoverfs, the case's subject"), (CHART_CUTOVERFS, "cutoverfs, other rows"),
                         (CHART_PEER, "other tools")):
        if any(b[4] == colour for b in bars):
            out.append(f'<rect x="{x}" y="{legend_y - 10}" width="12" height="12" fill="{colour}"/>')
            out.append(f'<text x="{x + 18}" y="{legend_y}" fill="#495057">{escape(text)}</text>')
            x += 18 + text_width(text, 12) + 20
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_chart(output, name, case, rows, subjects):
    """Writes case name's chart beside the report (OUTPUT's directory/bench/NAME.svg); returns the
    Markdown line that shows it, or None when there is nothing to draw."""
    svg = chart_svg(name, case, rows, subjects)
    if svg is None:
        return None
    write_text(os.path.join(os.path.dirname(os.path.abspath(output)), "bench", f"{name}.svg"), svg)
    unit = COLUMN_TITLES.get(case["columns"][0], case["columns"][0])
    return f"![{unit} of each contender in case {name}: median bar, min–max whisker](bench/{name}.svg)"


GENERATED = ("Generated by `bench/run` (which calls `bench/report.py`); do not edit by hand. "
             "Re-run to refresh every figure below. A run of only some cases (`BENCH_CASES`) rewrites only "
             "their sections and rows, and each such section names the run it comes from.")


# Partial runs. A run of only some of the cases (info "cases" differs from info "all_cases") does
# not replace the whole report: its sections are merged into the existing one. Each of its case
# sections replaces the section of the same case (or is added after the last case), starting
# with a line naming its run; its rows of the targets table and its raw timings replace that
# case's; contender notes and paragraphs of "What is compared" the old report lacks are added;
# the header keeps describing the run that wrote it, plus a line listing the cases that come
# from later runs. Without an earlier report (or one this code cannot parse) the full report of
# the partial run is written.

def split_sections(text):
    """(preamble lines, [(heading line, body lines)]) split at "## " headings."""
    pre, sections = [], []
    for line in text.split("\n"):
        if line.startswith("## "):
            sections.append((line, []))
        elif sections:
            sections[-1][1].append(line)
        else:
            pre.append(line)
    return pre, sections


def case_of(heading):
    """The case name of a "## Case `NAME`: ..." heading, else None."""
    if heading.startswith("## Case `"):
        return heading[len("## Case `"):].split("`", 1)[0]
    return None


def paragraphs(lines):
    """Blocks of non-blank lines."""
    out, cur = [], []
    for line in lines:
        if line.strip():
            cur.append(line)
        elif cur:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


def join_paragraphs(paras):
    lines = []
    for p in paras:
        lines += p + [""]
    return lines


def bullet_key(line):
    """The contender label of a "- `LABEL`: ..." line, or the whole line for other bullets."""
    if line.startswith("- `"):
        return line[3:].split("`", 1)[0]
    return line


def merge_reports(old_text, new_text, run_cases, run_line):
    old_pre, old_secs = split_sections(old_text)
    new_pre, new_secs = split_sections(new_text)
    old_titles = [h for h, _ in old_secs]
    if "## Raw timings" not in old_titles or "## What is compared" not in old_titles:
        return None
    new_by_title = dict(new_secs)

    # Header: the generator's line, and the list of cases that come from later runs.
    later_tag = "- Cases from later runs of only some cases (their sections name the run): "
    pre, later = [], []
    for line in old_pre:
        if line.startswith("Generated by `bench/run`"):
            line = GENERATED
        if line.startswith(later_tag):
            later = [c.strip("`, ") for c in line[len(later_tag):].split(", ")]
            continue
        pre.append(line)
    later += [c for c in run_cases if c not in later]
    while pre and not pre[-1].strip():
        pre.pop()
    pre += [later_tag + ", ".join(f"`{c}`" for c in later), ""]

    def stamped(body):
        return ["", run_line] + (body if body and not body[0].strip() else [""] + body)

    new_cases = OrderedDict((case_of(h), (h, stamped(b))) for h, b in new_secs if case_of(h) in run_cases)
    out_secs, last_case_at = [], None
    for heading, body in old_secs:
        name = case_of(heading)
        if name is not None and name in new_cases:
            out_secs.append(new_cases.pop(name))  # the run's section where the old one was
            last_case_at = len(out_secs)
            continue
        if heading == "## What is compared" and heading in new_by_title:
            body = merge_compared(body, new_by_title[heading])
        elif heading == "## Targets" and heading in new_by_title:
            body = merge_targets(body, new_by_title[heading], run_cases)
        elif heading == "## Raw timings" and heading in new_by_title:
            body = merge_timings(body, new_by_title[heading], run_cases)
        out_secs.append((heading, body))
        if name is not None:
            last_case_at = len(out_secs)
    at = last_case_at if last_case_at is not None else len(out_secs) - 1  # before "Raw timings"
    out_secs[at:at] = list(new_cases.values())

    lines = list(pre)
    for heading, body in out_secs:
        lines.append(heading)
        lines += body
    return "\n".join(lines)


def merge_compared(old_body, new_body):
    """What is compared: the run's contender notes replace the old notes of the same contenders
    (they may have grown) or are added; paragraphs the old report lacks are added."""
    old_paras = paragraphs(old_body)
    bullets = [p for p in old_paras if p[0].startswith("- ")]
    have = {bullet_key(line) for p in bullets for line in p}
    have_text = {"\n".join(p) for p in old_paras}
    newer, add_bullets, add_paras = {}, [], []
    for p in paragraphs(new_body):
        if p[0].startswith("- "):
            for line in p:
                if bullet_key(line) in have:
                    newer[bullet_key(line)] = line
                else:
                    add_bullets.append(line)
        elif not any(t[:40] == "\n".join(p)[:40] for t in have_text):
            # (a paragraph that starts as an old one does is the same text with this run's
            # settings, e.g. its settle times: the run line of each section gives its command)
            add_paras.append(p)
    old_paras = [[newer.get(bullet_key(line), line) if p[0].startswith("- ") else line for line in p]
                 for p in old_paras]
    bullets = [p for p in old_paras if p[0].startswith("- ")]
    last = bullets[-1] if bullets else None
    paras = [p + add_bullets if p is last else p for p in old_paras]
    if last is None and add_bullets:
        paras.append(add_bullets)
    return [""] + join_paragraphs(paras + add_paras)


def merge_targets(old_body, new_body, run_cases):
    """Targets table: the run's rows replace its cases' rows (or follow the last row)."""
    def is_row(line):
        cells = line.split(" | ")
        return line.startswith("| ") and len(cells) >= 4 and cells[1] in run_cases
    new_rows = [line for line in new_body if is_row(line)]
    kept, at = [], None
    for line in old_body:
        if is_row(line):
            at = len(kept) if at is None else at
            continue
        kept.append(line)
    if at is None:
        at = max((i + 1 for i, line in enumerate(kept) if line.startswith("|")), default=len(kept))
    return kept[:at] + new_rows + kept[at:]


def merge_timings(old_body, new_body, run_cases):
    """Raw timings: the run's "- `case`" blocks replace the old ones or are added after them."""
    def blocks(body):
        head, items, tail = [], [], []
        for line in body:
            if line.startswith("- `"):
                items.append([line])
            elif line.startswith("  - ") and items:
                items[-1].append(line)
            elif items:
                tail.append(line)
            else:
                head.append(line)
        return head, items, tail
    head, items, tail = blocks(old_body)
    _, new_items, _ = blocks(new_body)
    replacement = {it[0][3:].split("`", 1)[0]: it for it in new_items}
    out, done = [], set()
    for it in items:
        name = it[0][3:].split("`", 1)[0]
        if name in replacement:
            out.append(replacement[name])
            done.add(name)
        elif name not in run_cases:
            out.append(it)
    out += [it for name, it in replacement.items() if name not in done]
    return head + [line for it in out for line in it] + tail


# Sections other tools write into the report (bench/throttle's "## Throttles", bench/scale's
# "## Scale", bench/uring-probe's section): a run of bench/run keeps them as they are, before
# "## Raw timings".
KEPT_SECTIONS = ("## Throttles", "## FUSE over io_uring", "## Scale")


def keep_hand_sections(old_text, new_text):
    _, old_secs = split_sections(old_text)
    kept = [(h, b) for h, b in old_secs if h.startswith(KEPT_SECTIONS)]
    pre, secs = split_sections(new_text)
    present = {h for h, _ in secs}
    kept = [(h, b) for h, b in kept if h not in present]
    if not kept:
        return new_text
    at = next((i for i, (h, _) in enumerate(secs) if h == "## Raw timings"), len(secs))
    secs[at:at] = kept
    lines = list(pre)
    for heading, body in secs:
        lines.append(heading)
        lines += body
    return "\n".join(lines)


def write_text(output, text):
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, output)


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: report.py BENCH_DIR OUTPUT.md")
    bench_dir, output = sys.argv[1], sys.argv[2]
    info, cases, targets, problems, skipped, pairs = read_meta(os.path.join(bench_dir, "meta.tsv"))
    results = read_results(os.path.join(bench_dir, "results.csv"))
    loads = read_load(os.path.join(bench_dir, "load.csv"))
    box = machine(bench_dir)
    rounds = info.get("rounds", "?")

    out = []
    w = out.append
    w("# Benchmarks")
    w("")
    w(GENERATED)
    w("")
    w(f"- Command: `{info.get('command', 'bench/run')}` ({rounds} round(s) per case)")
    w(f"- Date: {info.get('started', '?')} to {info.get('finished', '?')}")
    w(f"- Machine: {box['nproc']} CPUs ({box['cpu'] or 'unknown CPU'}), {box['mem']}, {box['kernel']}")
    fs = box["fs"] or "unknown"
    if box["options"]:
        fs += f" (`{box['options']}`)"
    w(f"- Filesystem of `{info.get('bench_dir', bench_dir)}` (`df -T`): {fs}")
    w(f"- Load average (1/5/15 min): {info.get('load_start', '?')} at the start, "
      f"{info.get('load_end', '?')} at the end; the machine is shared, so other people's work is in these figures")
    probes = [(k[len("create_us_"):], v) for k, v in info.items() if k.startswith("create_us_")]
    if probes:
        w("- Kernel cost of creating one empty file in the work dir (1000 files timed; a machine-state probe, "
          "since per-file cost dominates the small-files case): "
          + ", ".join(f"{v} µs {'at the end' if k == 'end' else f'before `{k}`'}" for k, v in probes))
    w(f"- Project: commit {info.get('commit', '?')}, {info.get('cutoverfs', '')}; "
      f"{info.get('cp', '')}; {info.get('rsync', '')}; {info.get('find', '')}")
    fuse_tools = [info[k] for k in ("fuse_overlayfs", "bindfs") if k in info]
    if fuse_tools:
        w(f"- FUSE peers: {'; '.join(fuse_tools)}")
    s3_tools = [info[k] for k in ("s5cmd", "rclone", "aws", "curl", "garage") if k in info]
    if s3_tools:
        w(f"- S3 tools: {'; '.join(s3_tools)}")
    if "s3_server" in info:
        w(f"- S3 server: {info['s3_server']}")
    w("")

    w("## What is compared")
    w("")
    w("`cutoverfs sweep` does more work than the tools it is compared with, on purpose; the plain copy "
      "tools are the floor, not like-for-like rivals. What each contender does:")
    w("")
    present = OrderedDict()
    for rows in results.values():
        for contender in rows:
            present.setdefault(contender, None)
    for contender, note in CONTENDER_NOTES.items():
        if contender in present:
            w(f"- `{contender}`: {note}")
    for suffix, note in SUFFIX_NOTES.items():
        if any(c.endswith(suffix) for c in present):
            w(f"- {note}")
    w("")
    w("Method: the sources are created once and read once before the timed rounds, so every contender "
      "reads from the page cache (the cold mount cases below drop it instead). In each round every contender runs once, each round starting one "
      "contender further along the list, so slow periods of the shared machine are spread over all of "
      "them. Every run writes to a new destination (and cutoverfs to a new manifest); the destinations "
      "of a case are deleted only after all its rounds (then `sync`). A case starts at least "
      f"{info.get('settle', '?')} s after the last deletion of {int(info.get('settle_files', '0') or 0):,} or more "
      "entries, and only once the disk has been busy less than 10% of the time for 2 s in a row (at most "
      f"{info.get('quiet_max', '?')} s): deleting many files on a `discard` mount keeps the disk busy after "
      "the command returns, and slows the next file creations (see below). An untimed `sync` precedes each timed command, so no contender pays for the "
      "previous one's writeback. Times are wall-clock seconds; throughput and ratios use the median. "
      "A ratio is cutoverfs' throughput divided by the peer's (the peer's median time over cutoverfs' "
      "median time): 1.00× means as fast, below 1 slower.")
    w("")
    if any(name.startswith("mount") for name in list(cases) + list(skipped)):
        w("The mount cases (`mount…`) time reads, not copies: the same read command on the plain directory, "
          "through a cutoverfs mount over that directory and through two peer FUSE file systems. There the "
          "subject is `cutoverfs mount`, a ratio is its throughput over the other row's, and every FUSE "
          "contender gets a new mount for every timed run, made and removed outside the timing, so no run "
          "starts with FUSE caches an earlier run filled. Each case says whether it is cold (the page cache "
          "dropped with `sync; echo 3 > /proc/sys/vm/drop_caches` right before every timed read, for every "
          "contender, after the mount is made) or warm (the source read once before the rounds; the FUSE "
          "mounts are new). After the rounds every mount is made once more and must serve the same names, "
          "sizes, modes and bytes as the plain directory. With 3 rounds on a shared 2-CPU machine, where "
          "other people's builds may run at the same time, a median can move by tens of percent between "
          "runs: read the min–max spread next to it.")
        w("")
        if "mount_start" in info:
            w(f"Starting the daemon: {info['mount_start']}")
            w("")
    if any(name.startswith("mountwrite") for name in list(cases) + list(skipped)):
        w("The write cases (`mountwrite…`) time writes instead: the same Python process creates and writes the "
          "same files into a new empty directory for every run, on the plain file system, through a cutoverfs "
          "mount over that directory (`--no-sweep`, a new empty `file://` dest and a new manifest) and through two "
          "peer FUSE file systems that can write (fuse-overlayfs with that directory as its upper layer, bindfs "
          "read-write), each FUSE contender on a new mount made and removed outside the timing. The time is taken "
          "inside the process and includes making the new directories. Each run gives two rows: up to the last "
          "`close` (what an application waits for; much of the data may still be in the page cache) and, from the "
          "same run, up to the end of one `syncfs` of the work dir's file system (the data on disk). Nothing is "
          "deleted inside a case, and a case starts only after the pause that follows a mass deletion (below). "
          "After the rounds every run's tree must hold exactly the names, sizes and bytes written, and after "
          "each cutoverfs run its manifest must hold every file, pending, with its size.")
        w("")
    if info.get("journal") == "ext4 without a journal":
        w("This file system is ext4 without a journal. In that mode ext4 does not reuse an inode freed less "
          "than 60 s ago (more while its inode table block is still dirty) and checks each such inode one by "
          "one when it allocates, so creating files near a mass deletion is much slower for about a minute. "
          "That is the reason for the pause after deletions, and for the creation-cost probe reported above "
          "and with each case. The probe also moves with other people's work on the machine.")
        w("")

    # Summary of the targets first.
    summary = []
    for name, case in cases.items():
        medians = {c: median([s for _, s in rows]) for c, rows in results.get(name, {}).items()}
        for t in targets.get(name, []):
            measured, met = evaluate_checked(t, case, medians, problems.get(name, []))
            summary.append((t["label"], name, measured, met))
    for name, (title, why) in skipped.items():
        if name not in cases:
            summary.append(("(see the case)", name, f"not run: {why}", None))
    if summary:
        w("## Targets")
        w("")
        w("| target | case | measured (medians) | status |")
        w("|---|---|---|---|")
        for label, name, measured, met in summary:
            w(f"| {label} | {name} | {measured} | {verdict(met)} |")
        w("")

    for name, case in cases.items():
        rows = ordered(case, results.get(name, OrderedDict()))
        medians = {c: median([s for _, s in r]) for c, r in rows.items()}
        subject = case["subject"]
        w(f"## Case `{name}`: {case['title']}")
        w("")
        w(case["note"])
        w("")
        columns = case["columns"]
        header = ["contender", "median s", "min–max s"] + [COLUMN_TITLES.get(c, c) for c in columns]
        header.append("cutoverfs ÷ this (throughput)")
        w("| " + " | ".join(header) + " |")
        w("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        pair_of = {row: base for row, base in pairs.get(name, {}).items() if row in rows and base in rows}
        pair_subjects = set(pair_of.values())
        failures = defaultdict(int)
        invalid = set()
        wrong = set()
        for kind, contender, _, _ in problems.get(name, []):
            if kind == "failure":
                failures[contender] += 1
            elif kind == "invalid":
                invalid.add(contender)
            elif kind == "wrong":
                wrong.add(contender)
        for contender, r in rows.items():
            vals = [s for _, s in r if not math.isnan(s)]
            med = medians[contender]
            spread = f"{fmt_s(min(vals))}–{fmt_s(max(vals))}" if vals else "n/a"
            label = f"**{contender}**" if contender == subject or contender in pair_subjects else contender
            if failures[contender]:
                label += f" (failed {failures[contender]} of {len(r)} rounds)"
            if contender in invalid:
                label += " (wrong upload, see below)"
            if contender in wrong:
                label += " (wrong content, see below)"
            cells = [label, fmt_s(med) if vals else "failed", spread]
            cells += [fmt_rate(column_value(c, case, med)) for c in columns]
            if contender == subject or contender in pair_subjects:
                cells.append("(subject)")
            elif contender in pair_of:
                base = pair_of[contender]
                cells.append(f"{fmt_ratio(med / medians[base])} against `{base}`")
            elif contender in case["peers"]:
                cells.append(fmt_ratio(med / medians[subject]) if subject in medians else "n/a")
            else:
                cells.append("(information)")
            w("| " + " | ".join(cells) + " |")
        w("")
        chart = write_chart(output, name, case, rows, {subject} | pair_subjects)
        if chart:
            w(chart)
            w("")
        for t in targets.get(name, []):
            measured, met = evaluate_checked(t, case, medians, problems.get(name, []))
            w(f"Target {t['label']}: measured {measured}: {verdict(met)}.")
            if t["kind"] == "ratio" and t["peer"] == "cp -a" and "cp -a + sync" in medians and subject in medians:
                r = medians["cp -a + sync"] / medians[subject]
                w(f"Against `cp -a + sync` (data on disk at the end for both) the ratio is {fmt_ratio(r)}.")
            w("")
        seen = set()
        for kind, contender, rnd, text in problems.get(name, []):
            what = {"failure": "failed", "invalid": "uploaded the wrong objects",
                    "wrong": "wrote the wrong files or manifest rows" if name.startswith("mountwrite")
                    else "served the wrong content", "note": "noted"}[kind]
            if (kind, contender, text) in seen:
                continue
            same = [p[2] for p in problems[name] if p[0] == kind and p[1] == contender and p[3] == text]
            seen.add((kind, contender, text))
            where = "in the content check" if same == ["check"] else \
                f"in round{'s' if len(same) > 1 else ''} {', '.join(same)}"
            if kind == "note":
                w(f"Note on `{contender}` {where} (not counted as a failure): `{text}`")
            else:
                w(f"`{contender}` {what} {where}: `{text}`")
            w("")
        if f"mount_stats_{name}" in info:
            mode = info.get(f"passthrough_{name}")
            w(f"What the cutoverfs daemon counted in its last timed run (logged at unmount): "
              f"`{info[f'mount_stats_{name}']}`" + (f"; FUSE passthrough: {mode}." if mode else "."))
            w("")
        if f"mount_requests_{name}" in info:
            w(f"FUSE requests the cutoverfs daemon answered in that run, as `op=count/mean time in the "
              f"daemon` (the kernel's own part of each round trip is not in it): "
              f"`{info[f'mount_requests_{name}']}`.")
            w("")
        load = loads.get(name)
        notes = []
        if load:
            notes.append(f"Load average before the timed commands of this case: {min(load):.2f} to "
                         f"{max(load):.2f} (median {statistics.median(load):.2f}; includes the benchmark itself).")
        if f"settle_{name}" in info:
            notes.append(f"Waited {info[f'settle_{name}']} s after the previous mass deletion.")
        if f"quiet_{name}" in info:
            notes.append(f"Waited {fmt_wait(info[f'quiet_{name}'])} for a quiet disk before the first round.")
        if f"create_us_{name}" in info:
            notes.append(f"Creating an empty file in the work dir cost {info[f'create_us_{name}']} µs just before "
                         "the first round (machine-state probe).")
        if f"cleanup_{name}" in info:
            parts = info[f"cleanup_{name}"].split()
            if len(parts) == 2:
                notes.append(f"Deleting its destinations afterwards ({int(parts[0]):,} entries; `rm -rf` + `sync`) "
                             f"took {fmt_s(float(parts[1]))} s.")
        if notes:
            w(" ".join(notes))
            w("")

    for name, (title, why) in skipped.items():
        if name in cases:
            continue
        w(f"## Case `{name}`: {title}")
        w("")
        w(f"Not run: {why}.")
        w("")

    w("## Raw timings")
    w("")
    w(f"Seconds per round, in round order; all rows are in `{os.path.join(info.get('bench_dir', bench_dir), 'results.csv')}` "
      "(`case,contender,round,seconds`) and the output of every timed command in `logs/` next to it.")
    w("")
    for name, rows in results.items():
        w(f"- `{name}`")
        for contender, r in ordered(cases.get(name), rows).items():
            w(f"  - {contender}: " + ", ".join("failed" if math.isnan(s) else fmt_s(s) for _, s in sorted(r)))
    w("")

    text = "\n".join(out)
    run_cases = info.get("cases", "").split()
    partial = run_cases and "all_cases" in info and set(run_cases) != set(info["all_cases"].split())
    if partial and os.path.exists(output):
        with open(output, encoding="utf-8") as fh:
            old = fh.read()
        run_line = (f"From a run of only some cases: `{info.get('command', 'bench/run')}` ({rounds} round(s)), "
                    f"{info.get('started', '?')} to {info.get('finished', '?')}, commit {info.get('commit', '?')}, "
                    f"{info.get('cutoverfs', '')}; load average {info.get('load_start', '?')} at its start, "
                    f"{info.get('load_end', '?')} at its end. The header above describes another run.")
        merged = merge_reports(old, text, run_cases, run_line)
        if merged is not None:
            text = merged
        else:
            print(f"report.py: cannot merge into {output} (not a report of bench/run?); writing this run's report",
                  file=sys.stderr)
    if os.path.exists(output):
        with open(output, encoding="utf-8") as fh:
            text = keep_hand_sections(fh.read(), text)
    write_text(output, text)


if __name__ == "__main__":
    main()

"""Where a decode step's GPU time goes: sums `ncu`'s per-kernel durations by kernel.

    python3 kernel_profile.py NCU_CSV

NCU_CSV is what `ncu --csv --metrics gpu__time_duration.sum ...` printed for a window of launches
of an eager decode loop (gpu-proof.sh's `profile` step). Steps are counted by `argmax_rows`, which
runs once a greedy decode step; each kernel's launches and time are given per step, largest first,
with the step's total kernel time (the replayed graph's step time, less this, is the time between
kernels).
"""
import collections
import csv
import io
import re
import sys

UNITS = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6}

text = open(sys.argv[1], errors="replace").read()
# ncu prints its own lines ("==PROF==", the program's output) around the CSV: keep the CSV rows.
lines = [l for l in text.splitlines() if l.startswith('"')]
rows = list(csv.DictReader(io.StringIO("\n".join(lines))))
if not rows or "Kernel Name" not in rows[0]:
    print("no ncu CSV rows found; the file starts:")
    print(text[:3000])
    sys.exit(1)

time_us = collections.Counter()
launches = collections.Counter()
for r in rows:
    if r.get("Metric Name") != "gpu__time_duration.sum":
        continue
    name = r["Kernel Name"]
    # Template and argument lists say little here: keep the function's name.
    name = re.sub(r"\(.*", "", name)
    name = re.sub(r"<.*", "", name).strip() or r["Kernel Name"][:60]
    value = float(r["Metric Value"].replace(",", ""))
    time_us[name] += value * UNITS.get(r.get("Metric Unit", "nsecond"), 1e-3)
    launches[name] += 1

steps = launches.get("argmax_rows_f32", 0)
total = sum(time_us.values())
per = max(steps, 1)
print(f"{sum(launches.values())} kernel launches profiled, {steps} decode steps (argmax_rows launches)")
print(f"kernel time per step: {total / per:.1f} us over {sum(launches.values()) / per:.0f} launches\n")
print(f"| kernel | launches / step | us / step | share |")
print(f"| --- | --- | --- | --- |")
for name, t in time_us.most_common():
    print(f"| {name[:70]} | {launches[name] / per:.1f} | {t / per:.1f} | {t / total:.1%} |")

#!/usr/bin/env python3
"""Run lockbridge's built test binaries, a few at a time, for tests/run.sh.

Usage: run_suites.py BUILD_JSON LOG_DIR JOBS [--only NAME...] [--except NAME...]

BUILD_JSON is the output of `cargo test --no-run --message-format=json`: every test
executable in it is run with `--test-threads` left to libtest, from the repository root, as
`cargo test` would run it, but JOBS of them at once (the suites spend most of their time
waiting on real processes, so the machine's cores would otherwise idle). Each suite's output
goes to LOG_DIR/NAME.txt; a line per suite says how it ended and how long it took; a failing
suite's output is printed whole. Exits non-zero when any suite failed, after all have run.
The longest suites start first, so that the run ends as early as it can.
"""

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

# Suites that take longest, from measured runs: started first.
LONG_FIRST = ["dtls_faults", "soak", "tedee_provider", "session_props", "coap_hostile", "mqtt_e2e", "safety", "ble_e2e",
              "dtls_hostile", "coap_e2e", "daemon_e2e", "ptls_properties", "mqtt_hostile"]


def suites(build_json):
    found = {}
    with open(build_json, encoding="utf-8") as f:
        for line in f:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
                continue
            if not msg.get("profile", {}).get("test"):
                continue
            target = msg["target"]
            kind = target["kind"][0]
            if kind == "bench":
                continue  # built (and linted) with the rest; benches/report runs them
            name = target["name"] if kind == "test" else f"{kind}:{target['name']}"
            found[name] = msg["executable"]
    return found


def order(names):
    rank = {n: i for i, n in enumerate(LONG_FIRST)}
    return sorted(names, key=lambda n: (rank.get(n, len(LONG_FIRST)), n))


def run(name, exe, log_dir):
    log = os.path.join(log_dir, name.replace(":", "-") + ".txt")
    started = time.monotonic()
    with open(log, "w", encoding="utf-8") as out:
        code = subprocess.call([exe], stdout=out, stderr=subprocess.STDOUT)
    took = time.monotonic() - started
    with open(log, encoding="utf-8", errors="replace") as f:
        text = f.read()
    passed = sum(int(n) for n in re.findall(r"test result: \w+\. (\d+) passed", text))
    failed = sum(int(n) for n in re.findall(r"(\d+) failed", text))
    ok = code == 0 and "test result: FAILED" not in text
    return name, ok, passed, failed, took, text


def main():
    args = sys.argv[1:]
    if len(args) < 3:
        sys.exit(__doc__)
    build_json, log_dir, jobs = args[0], args[1], int(args[2])
    only, skip, mode = [], [], None
    for a in args[3:]:
        if a in ("--only", "--except"):
            mode = a
        elif mode == "--only":
            only.append(a)
        elif mode == "--except":
            skip.append(a)
        else:
            sys.exit(f"run_suites.py: unexpected argument {a}")
    os.makedirs(log_dir, exist_ok=True)
    found = suites(build_json)
    missing = [n for n in only + skip if n not in found]
    if missing:
        sys.exit(f"run_suites.py: no test suite named {', '.join(missing)}")
    names = order(n for n in found if (not only or n in only) and n not in skip)
    total_passed = total_failed = 0
    failures = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run, n, found[n], log_dir) for n in names]
        for future in as_completed(futures):
            name, ok, passed, failed, took, text = future.result()
            total_passed += passed
            total_failed += failed
            status = "ok" if ok else "FAILED"
            print(f"suite {name}: {status}, {passed} passed, {failed} failed ({took:.0f} s)",
                  flush=True)
            if not ok:
                failures.append(name)
                print(text, flush=True)
    print(f"tests: {total_passed} passed, {total_failed} failed in {len(names)} suites")
    with open(os.path.join(log_dir, "totals"), "w", encoding="utf-8") as f:
        f.write(f"{total_passed} {total_failed}\n")
    if failures:
        print(f"failed suites: {' '.join(failures)}")
        sys.exit(1)


if __name__ == "__main__":
    main()

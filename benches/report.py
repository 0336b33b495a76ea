#!/usr/bin/env python3
"""Write docs/benchmarks.md and its plots from the figures of one `benches/report` run.

Usage: report.py RESULTS_DIR DOCS_DIR

RESULTS_DIR holds one JSON document per benchmark (ptls, gateway, ble, coap, mqtt: the `json:`
line each prints) and meta.json (machine, commit, date). Every figure in the page comes from
those files; nothing is typed in by hand.
"""

import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BENCHES = ["ptls", "gateway", "ble", "coap", "mqtt"]


def load(results: Path) -> dict:
    data = {}
    for name in BENCHES + ["meta"]:
        path = results / f"{name}.json"
        if not path.exists():
            sys.exit(f"report.py: {path} is missing: run benches/report, which writes it")
        data[name] = json.loads(path.read_text())
    return data


def pct(values, q):
    s = sorted(values)
    return s[round((len(s) - 1) * q)]


def fmt(v, digits=1):
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def verdict(ok):
    return "met" if ok else "**not met**"


def rows(d: dict) -> list:
    """(area, figure, lockbridge, peer, target, verdict) for the table."""
    p, g, b, c, m = (d[n] for n in BENCHES)
    out = []

    def row(area, figure, value, peer="", target="", ok=None):
        out.append((area, figure, value, peer, target, "" if ok is None else verdict(ok)))

    row("PTLS", "client handshake CPU", f"{fmt(p['client_handshake_us'])} µs")
    row("PTLS", "lock handshake CPU", f"{fmt(p['lock_handshake_us'])} µs")
    row("PTLS", "client handshake / its 4 P-256 operations", f"{p['client_ratio']:.3f}×",
        target="≤ 1.5×", ok=p["client_ratio"] <= 1.5)
    row("PTLS", "lock handshake / its 5 P-256 operations", f"{p['lock_ratio']:.3f}×",
        target="≤ 1.5×", ok=p["lock_ratio"] <= 1.5)
    row("PTLS", "seal one command record (AES-128-GCM)", f"{p['seal_record_us']:.3f} µs",
        target="< 5 µs", ok=p["seal_record_us"] < 5)
    row("gateway", "warm read, zero-delay link, p50", f"{g['zero_delay_read_p50_ms']:.3f} ms")
    row("gateway", "warm read, zero-delay link, p99", f"{g['zero_delay_read_p99_ms']:.3f} ms",
        target="≤ 1 ms", ok=g["zero_delay_read_p99_ms"] <= 1)
    row("gateway", f"warm read, BLE {g['ble_interval_ms']} ms interval, mean",
        f"{g['warm_mean_intervals']:.2f} intervals", target="≤ 1.2 × model (1.5)",
        ok=g["warm_ratio"] <= 1.2)
    row("gateway", f"cold read, link up (handshake + command), BLE {g['ble_interval_ms']} ms, mean",
        f"{g['cold_mean_intervals']:.2f} intervals", target="≤ 1.2 × model (8)",
        ok=g["cold_ratio"] <= 1.2)
    row("gateway", f"on-demand unlock from idle (no link), BLE {g['ble_interval_ms']} ms, p50 / p99",
        f"{g['idle_unlock_p50_ms']:.0f} / {g['idle_unlock_p99_ms']:.0f} ms",
        target=f"≤ 1.2 × model ({g['idle_model_p50_ms']:.0f} / {g['idle_model_p99_ms']:.0f} ms)",
        ok=g["idle_p50_ratio"] <= 1.2 and g["idle_p99_ratio"] <= 1.2)
    for level in g["loss"]:
        reads, failed = level["read_ms"], level["not_successful"]
        row("gateway", f"warm read, BLE, {level['loss'] * 100:.0f} % loss each way: p50 / p90 / max",
            f"{pct(reads, 0.5):.1f} / {pct(reads, 0.9):.1f} / {max(reads):,.0f} ms; "
            f"{len(failed)} of {len(reads) + len(failed)} failed")
    row("gateway", "daemon RSS, 32 locks in persistent sessions",
        f"{g['rss_32_locks_kib'] / 1024:.1f} MiB", target="≤ 20 MiB",
        ok=g["rss_32_locks_kib"] <= 20 * 1024)
    row("BlueZ", "daemon start → first lock session (BlueZoo)", f"{fmt(b['first_session_ms'], 0)} ms")
    row("BlueZ", "warm command through D-Bus and BlueZoo, p50 / p99",
        f"{b['warm_command_p50_ms']:.2f} / {b['warm_command_p99_ms']:.2f} ms")
    row("BlueZ", "on-demand unlock from idle through D-Bus and BlueZoo, p50 / max",
        f"{b['idle_unlock_p50_ms']:.1f} / {b['idle_unlock_max_ms']:.1f} ms")
    calls = b["idle_dbus_calls_by_member"]
    row("BlueZ", "D-Bus method calls for it (lockbridge side)",
        f"{b['idle_dbus_calls']}: " + ", ".join(f"{k.split('.')[-1]} ×{n}" for k, n in calls.items()))
    peer = lambda key, label: (f"{label} {fmt(c[key], 0)}" if key in c else "not installed")
    row("CoAP/DTLS", "PSK handshakes/s, 16 at a time", fmt(c["psk_handshakes_per_s"], 0),
        peer("coap_server_openssl_handshakes_per_s", "coap-server-openssl"))
    row("CoAP/DTLS", "PSK handshakes/s, one at a time", fmt(c["psk_handshakes_per_s_serial"], 0),
        peer("openssl_s_server_handshakes_per_s_serial", "openssl s_server"))
    row("CoAP/DTLS", "ECDHE-ECDSA + client certificate handshakes/s", fmt(c["ecdsa_handshakes_per_s"], 0))
    row("CoAP/DTLS", "GET /gateway per second over 1,000 sessions", fmt(c["get_per_s_1000_sessions"], 0),
        peer("coap_server_openssl_get_per_s", "coap-server-openssl GET /"), "≥ 15,000",
        c["get_per_s_1000_sessions"] >= 15000)
    row("CoAP/DTLS", "RSS per idle DTLS peer (1,000 peers)", f"{c['kib_per_peer']:.1f} KiB",
        target="≤ 32 KiB", ok=c["kib_per_peer"] <= 32)
    row("CoAP/DTLS", f"real client under {fmt(c['flood_hellos_per_s'], 0)} forged ClientHello/s",
        f"{c['flood_real_client_ok']}/10, max {c['flood_real_client_max_ms'] / 1000:.3f} s",
        target="≤ 2 s", ok=c["flood_real_client_ok"] == 10 and c["flood_real_client_max_ms"] <= 2000)
    row("MQTT", "lock state change → state message at a subscriber, p50 / p99",
        f"{m['state_publish_p50_ms']:.2f} / {m['state_publish_p99_ms']:.2f} ms", target="p99 ≤ 5 ms",
        ok=m["state_publish_p99_ms"] <= 5)
    row("MQTT", "command received → `sent`, p50 / p99",
        f"{m['received_to_sent_p50_ms']:.2f} / {m['received_to_sent_p99_ms']:.2f} ms",
        target="p99 ≤ 2 ms", ok=m["received_to_sent_p99_ms"] <= 2)
    row("MQTT", "command published → `sent` (broker hop), p50 / p99",
        f"{m['published_to_sent_p50_ms']:.2f} / {m['published_to_sent_p99_ms']:.2f} ms")
    return out


def failures(g: dict) -> str:
    parts = []
    for level in g["loss"]:
        failed = level["not_successful"]
        if failed:
            kinds = sorted({f"{f['outcome']['status']}: {f['outcome'].get('reason', '')}".rstrip(": ")
                            for f in failed})
            after = ", ".join(f"{f['ms'] / 1000:.1f} s" for f in failed)
            parts.append(f"{len(failed)} at {level['loss'] * 100:.0f} % ({'; '.join(kinds)}, after {after})")
    return "; ".join(parts) if parts else "none"


def save(fig, path: Path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_warm_cold(g: dict, path: Path):
    interval = g["ble_interval_ms"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    curves = [
        ("warm read", "warm_read_ms", "tab:blue"),
        ("cold read, link up", "cold_read_ms", "tab:red"),
        ("unlock from idle", "idle_unlock_ms", "tab:purple"),
    ]
    for name, key, colour in curves:
        xs = sorted(g[key])
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        left.step(xs, ys, where="post", label=f"{name} ({len(xs)})", color=colour)
    left.axvline(1.5 * interval, color="tab:blue", linestyle=":", label="warm model, 1.5 intervals")
    left.axvline(8 * interval, color="tab:red", linestyle=":", label="cold model, 8 intervals")
    # From idle the model is a spread: the advertising wait is uniform.
    adv, events = g["advertising_interval_ms"], g["idle_model_events"]
    left.plot([events * interval, events * interval + adv], [0, 1], color="tab:purple",
              linestyle=":", label=f"from-idle model, {events:g} intervals + advertising")
    left.set_xlabel("submit → answer (reads) or → the lock acting (unlock), ms")
    left.set_ylabel("fraction of commands")
    left.set_title(f"BLE model, {interval} ms connection interval")
    left.legend(fontsize=8, loc="center")
    xs = sorted(g["zero_delay_read_ms"])
    right.hist(xs, bins=60, color="tab:green")
    right.set_xlabel("read latency, ms")
    right.set_ylabel("reads")
    right.set_title(f"zero-delay link: the gateway itself ({len(xs)} warm reads)")
    save(fig, path)


def plot_loss(g: dict, path: Path):
    fig, ax = plt.subplots(figsize=(7, 3.8))
    levels = g["loss"]
    ax.boxplot([lv["read_ms"] for lv in levels], whis=(0, 100), showfliers=False)
    for i, lv in enumerate(levels, 1):
        reads = lv["read_ms"]
        # Every read as a dot, spread sideways (deterministically) so that none hides another.
        spread = [i + ((k * 37) % 100 - 50) / 250 for k in range(len(reads))]
        ax.scatter(spread, reads, s=6, alpha=0.5, color="tab:blue", zorder=3)
    ax.set_xticks(range(1, len(levels) + 1))
    ax.set_xticklabels([f"{lv['loss'] * 100:.0f} %" for lv in levels])
    ax.set_yscale("log")
    ax.set_xlabel("values lost on the BLE link, each way")
    ax.set_ylabel("warm read latency, ms (log)")
    ax.set_title(f"latency under loss, BLE model {g['ble_interval_ms']} ms (each dot a read)")
    save(fig, path)


def plot_handshakes(c: dict, path: Path):
    bars = [
        ("lockbridge\nPSK, 16 at a time", c["psk_handshakes_per_s"], "tab:blue"),
        ("coap-server-openssl\nPSK, 16 at a time", c.get("coap_server_openssl_handshakes_per_s"), "tab:gray"),
        ("lockbridge\nPSK, one at a time", c["psk_handshakes_per_s_serial"], "tab:blue"),
        ("openssl s_server\nPSK, one at a time", c.get("openssl_s_server_handshakes_per_s_serial"), "tab:gray"),
        ("lockbridge\nECDHE-ECDSA + cert", c["ecdsa_handshakes_per_s"], "tab:blue"),
    ]
    bars = [b for b in bars if b[1] is not None]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    ax.bar([b[0] for b in bars], [b[1] for b in bars], color=[b[2] for b in bars])
    for i, b in enumerate(bars):
        ax.text(i, b[1], f"{b[1]:,.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("DTLS handshakes per second")
    ax.set_title("DTLS 1.2 handshakes/s, same load generator, same run")
    ax.tick_params(axis="x", labelsize=8)
    save(fig, path)


def limits(d: dict) -> str:
    p, g, c = d["ptls"], d["gateway"], d["coap"]
    adv, idle, idle_uncached = (g[k] for k in ["advertising_interval_ms", "idle_model_events",
                                                "idle_model_events_uncached"])
    disc = round((idle_uncached - idle) / 2)
    keygen, ecdh, sign, verify = (p[k] for k in ["p256_keygen_us", "p256_ecdh_us", "p256_sign_us", "p256_verify_us"])
    client_ops = keygen + ecdh + verify + sign
    lock_ops = keygen + ecdh + sign + 2 * verify
    lines = [
        "## Physical limits",
        "",
        "**The BLE link.** A value crosses the link only at a connection event. A warm command",
        "needs the next event for the request and one more for the response: 1.5 intervals on",
        "average at a random phase, 2 at most. A cold one (link up, no session) needs eight events:",
        "hello, server hello, challenge, server verify, client verify, INITIALIZED, command,",
        "response.",
        "",
        "An on-demand lock starts with no link at all. Before the hello the hub must hear the",
        "lock's advertisement and open the link; each step's minimum, in connection events:",
        "",
        "| step | events |",
        "|---|---:|",
        f"| hear the advertisement | 0 to one advertising interval ({adv:g} ms in the model) |",
        "| connection set-up (to the first connection event) | 1 |",
        "| ATT MTU exchange (the request in that first event, the response in the next) | 1 |",
        f"| GATT discovery, skipped with cached handles | {2 * disc} |",
        "| three CCCD writes, one request at a time (ATT) | 6 |",
        "| hello … command at the lock | 7 |",
        "",
        f"So {idle:g} events with cached handles ({idle_uncached:g} without) plus the advertising",
        "wait, to the moment the lock takes the command. What that means for the intervals a",
        "lock may ask for:",
        "",
        "| connection interval | warm command (1.5 events) | cold command, link up (8 events) "
        f"| from idle, cached handles ({idle:g} events + advertising, mean) |",
        "|---:|---:|---:|---:|",
    ]
    for interval in [7.5, 15, 30, 50, 100]:
        lines.append(f"| {interval:g} ms | {1.5 * interval:.1f} ms | {8 * interval:.0f} ms "
                     f"| {idle * interval + adv / 2:,.0f} ms |")
    lines += [
        "",
        f"Measured here on the {g['ble_interval_ms']} ms model: warm",
        f"{g['warm_mean_intervals']:.2f} intervals ({g['warm_ratio']:.2f}× the model), cold",
        f"{g['cold_mean_intervals']:.2f} intervals ({g['cold_ratio']:.2f}× the model), unlock from",
        f"idle {g['idle_unlock_p50_ms']:.0f} / {g['idle_unlock_p99_ms']:.0f} ms p50 / p99",
        f"({g['idle_p50_ratio']:.2f}× / {g['idle_p99_ratio']:.2f}× the model). On the",
        f"zero-delay link the whole round trip is {g['zero_delay_read_p50_ms']:.3f} ms (p50), so",
        "the connection interval, not lockbridge, sets the latency a person sees.",
        "",
        "**P-256.** One operation on this machine (RustCrypto `p256`, one core):",
        "",
        "| operation | µs |",
        "|---|---:|",
        f"| key generation | {keygen:.1f} |",
        f"| ECDH | {ecdh:.1f} |",
        f"| ECDSA sign | {sign:.1f} |",
        f"| ECDSA verify | {verify:.1f} |",
        "",
        f"A PTLS handshake costs the gateway 4 operations ({client_ops:.0f} µs; measured",
        f"{p['client_handshake_us']:.0f} µs in all) and the lock 5 ({lock_ops:.0f} µs; measured",
        f"{p['lock_handshake_us']:.0f} µs). One core could do at most {1e6 / client_ops:,.0f}",
        "gateway-side PTLS handshakes per second, while one BLE link carries a handshake in six",
        "connection events. A lock's microcontroller is much slower at P-256 than this machine;",
        "its own time adds to the cold figure on real hardware and is not measured here.",
        "",
        "The DTLS endpoint's handshakes are not bounded by these figures: webrtc-dtls signs and",
        "verifies with ring (hand-written assembly) and only its key exchange uses `p256`. An",
        f"ECDHE-ECDSA handshake with a client certificate measured {c['ecdsa_handshakes_per_s']:,.0f}/s",
        "with the load generator, which does the client's half, on the same two cores.",
        "",
    ]
    return "\n".join(lines)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    results, docs = Path(sys.argv[1]), Path(sys.argv[2])
    d = load(results)
    meta = d["meta"]
    plots = docs / "benchmarks"
    plots.mkdir(parents=True, exist_ok=True)
    plot_warm_cold(d["gateway"], plots / "latency-warm-cold.png")
    plot_loss(d["gateway"], plots / "latency-under-loss.png")
    plot_handshakes(d["coap"], plots / "dtls-handshakes.png")

    table = rows(d)
    missed = [r for r in table if r[5] == verdict(False)]
    out = [
        "# Benchmarks",
        "",
        "Written by `benches/report` (every benchmark in one run; do not edit by hand). How each",
        "figure is measured, and what changed it over time: [performance notes](performance.md).",
        "",
        f"- commit `{meta['commit']}`, {meta['date']}",
        f"- machine: {meta['cpu']}, {meta['cores']} cores, {meta['memory_gib']} GiB, {meta['os']}, "
        f"kernel {meta['kernel']}",
        f"- toolchain: {meta['rustc']}; peers: {meta['peers']}",
        f"- targets: {len([r for r in table if r[5]]) - len(missed)} of "
        f"{len([r for r in table if r[5]])} met",
        "",
        "| area | figure | lockbridge | peer, same run | target | |",
        "|---|---|---|---|---|---|",
    ]
    out += [f"| {' | '.join(r)} |" for r in table]
    g = d["gateway"]
    out += [
        "",
        "## Command latency, warm and cold",
        "",
        "![Warm and cold read latency on the BLE model, and the gateway alone on a zero-delay link]"
        "(benchmarks/latency-warm-cold.png)",
        "",
        f"Warm: a session is up; {len(g['warm_read_ms'])} reads at a random phase against the "
        "connection events. Cold, link up: the link is up, the session is not; a handshake comes "
        f"first. Unlock from idle: an on-demand lock with no link; {len(g['idle_unlock_ms'])} "
        "unlocks and locks, measured to the lock's own record of the actuation (its event log, "
        "1 ms resolution). Dotted lines: the model's floor. Right: the same warm read with no link delay — the "
        "gateway, the PTLS session, the sim socket and the simulated lock, nothing else.",
        "",
        "## Latency under loss",
        "",
        "![Warm read latency with values lost on the BLE link](benchmarks/latency-under-loss.png)",
        "",
        "Each level: 60 warm reads at a random phase, values dropped at random in both directions. "
        "A read whose request or answer is lost waits for the response timeout (5 s by default) and "
        "is asked once more on a new session (a handshake, about 8 intervals); a second silence "
        f"fails it. Failed here: {failures(g)}. Real BLE retransmits at the link layer, so loss "
        "reaches lockbridge as delay or a dropped link; these levels are the worst case.",
        "",
        "## DTLS handshakes per second",
        "",
        "![DTLS handshakes per second, lockbridge and peers](benchmarks/dtls-handshakes.png)",
        "",
        limits(d),
    ]
    (docs / "benchmarks.md").write_text("\n".join(out))
    print(f"wrote {docs / 'benchmarks.md'} and 3 plots in {plots}; "
          f"{len(missed)} target(s) not met" + ("" if not missed else ": " + "; ".join(r[1] for r in missed)))


if __name__ == "__main__":
    main()

//! The benchmark report: `benches/report.py` renders the recorded run in
//! `docs/benchmarks/results/` to exactly the committed `docs/benchmarks.md`, with its three
//! plots as real PNG images — so the page says what the measurements say, and nothing typed in
//! by hand.

#![allow(clippy::unwrap_used)] // test code

use std::path::{Path, PathBuf};
use std::process::Command;

fn python() -> PathBuf {
    std::env::var_os("LOCKBRIDGE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python3"))
}

/// Width and height from a PNG's IHDR chunk.
fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    assert_eq!(&bytes[12..16], b"IHDR");
    let be = |b: &[u8]| u32::from_be_bytes(b.try_into().unwrap());
    (be(&bytes[16..20]), be(&bytes[20..24]))
}

#[test]
fn the_committed_page_is_what_the_recorded_figures_render_to() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(python())
        .arg(root.join("benches/report.py"))
        .arg(root.join("docs/benchmarks/results"))
        .arg(out.path())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run tests/run.sh (it makes .venv with matplotlib)",
                python().display()
            )
        });
    assert!(
        run.status.success(),
        "report.py: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let rendered = std::fs::read_to_string(out.path().join("benchmarks.md")).unwrap();
    let committed = std::fs::read_to_string(root.join("docs/benchmarks.md")).unwrap();
    assert!(
        rendered == committed,
        "docs/benchmarks.md differs from what docs/benchmarks/results renders to; run benches/report"
    );
    for plot in [
        "latency-warm-cold.png",
        "latency-under-loss.png",
        "dtls-handshakes.png",
    ] {
        assert!(
            committed.contains(&format!("(benchmarks/{plot})")),
            "{plot} not shown"
        );
        let (w, h) = png_size(&std::fs::read(out.path().join("benchmarks").join(plot)).unwrap());
        assert!(w >= 600 && h >= 300, "{plot}: {w}×{h}");
        png_size(&std::fs::read(root.join("docs/benchmarks").join(plot)).unwrap());
    }
    // Every benchmark is in the table, each target with its verdict.
    for area in [
        "| PTLS |",
        "| gateway |",
        "| BlueZ |",
        "| CoAP/DTLS |",
        "| MQTT |",
    ] {
        assert!(committed.contains(area), "{area} missing");
    }
    assert!(committed.contains("## Physical limits"));
}

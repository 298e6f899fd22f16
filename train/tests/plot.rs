//! `steper_train::plot`: charts from a train_log.jsonl written by the test.

use anyhow::Result;
use steper_train::plot::{plot_log, read_log, PlotOptions};

/// Reads a PNG's width and height from its IHDR chunk and checks the signature.
fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    assert_eq!(&bytes[12..16], b"IHDR");
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    (w, h)
}

/// Decodes the PNG and counts pixels close to `rgb`.
fn count_color(bytes: &[u8], rgb: [u8; 3]) -> usize {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf[..info.buffer_size()]
        .chunks(3)
        .filter(|p| p.iter().zip(rgb).all(|(&a, b)| a.abs_diff(b) < 8))
        .count()
}

fn log_line(step: u64, eval: bool) -> String {
    let x = step as f64;
    let mut v = serde_json::json!({
        "step": step, "lr": 1e-3, "L_init": 3.0 / (1.0 + x / 10.0), "L_exp": 2.5 / (1.0 + x / 20.0),
        "L_agg": if step.is_multiple_of(3) { serde_json::Value::Null } else { serde_json::json!(2.0 / (1.0 + x / 5.0)) },
        "total": 5.0, "sigma_init": 1.0 + x / 100.0, "sigma_exp": 1.0, "sigma_agg": 1.0 - x / 200.0,
        "grad_norm": 0.5, "tokens_per_sec": 1000.0
    });
    if eval {
        v["eval"] = serde_json::json!({"L_init": 2.0, "L_exp": 1.5, "L_agg": null});
    }
    v.to_string()
}

#[test]
fn writes_both_charts_with_the_three_stage_series() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let log = tmp.path().join("train_log.jsonl");
    let text: Vec<String> = (1..=60)
        .map(|s| log_line(s, s.is_multiple_of(20)))
        .collect();
    std::fs::write(&log, text.join("\n") + "\n")?;
    let out = tmp.path().join("plots");
    let opts = PlotOptions {
        size: (640, 400),
        smooth: 5,
        title: Some("test".into()),
    };
    let report = plot_log(&log, &out, &opts)?;
    assert_eq!(report.steps, 60);
    assert!(
        (report.final_sigma[0] - 1.6).abs() < 1e-9 && (report.final_sigma[2] - 0.7).abs() < 1e-9
    );
    assert!(report.final_losses.iter().all(Option::is_some));
    for png in [&report.losses_png, &report.sigma_png] {
        let bytes = std::fs::read(png)?;
        assert_eq!(png_size(&bytes), (640, 400));
        // Each stage's colour (init blue, expand orange, aggregate green) is drawn.
        for rgb in [[31, 119, 180], [255, 127, 14], [44, 160, 44]] {
            assert!(
                count_color(&bytes, rgb) > 50,
                "{} lacks colour {rgb:?}",
                png.display()
            );
        }
    }
    // Nothing but the two charts (no temporary files left behind).
    let mut names: Vec<String> = std::fs::read_dir(&out)?
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["losses.png", "sigma.png"]);
    Ok(())
}

#[test]
fn bad_logs_are_clear_errors() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let log = tmp.path().join("train_log.jsonl");
    std::fs::write(&log, format!("{}\n{{\"step\": 2}}\n", log_line(1, false)))?;
    let err = read_log(&log).unwrap_err().to_string();
    assert!(err.contains("train_log.jsonl:2"), "{err}");
    std::fs::write(&log, "\n")?;
    let err = plot_log(&log, &tmp.path().join("p"), &PlotOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("no log lines"), "{err}");
    let err = read_log(&tmp.path().join("missing.jsonl"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.jsonl"), "{err}");
    std::fs::write(&log, log_line(1, false))?;
    let opts = PlotOptions {
        size: (10, 10),
        ..Default::default()
    };
    let err = plot_log(&log, &tmp.path().join("p"), &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("too small"), "{err}");
    Ok(())
}

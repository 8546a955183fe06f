//! Each component on plain values: the status file (atomic under a concurrent reader, rate
//! limited, schema), statistics, alerts, charts and the report, the bundle from start to stop.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use proptest::prelude::*;
use train_monitor::{
    AlertConfig, AlertInputs, AlertKind, EvalRecord, History, LossWindow, MonitoringBundle,
    MonitoringConfig, RunEnd, RunStart, SCHEMA_VERSION, Status, StatusWriter, StepRecord,
    TrainingStatus, evaluate_alerts,
};

fn step(step: usize, loss: f64, tps: f64) -> StepRecord {
    StepRecord {
        step,
        epoch: step as f64 / 10.0,
        loss,
        learning_rate: 1e-4,
        grad_norm: 1.5,
        tokens: 100,
        label_tokens: 50,
        tokens_per_sec: tps,
        metrics: Default::default(),
    }
}

#[test]
fn a_concurrent_reader_never_sees_a_partial_status_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = StatusWriter::new(dir.path(), Duration::ZERO);
    w.write(&TrainingStatus::default(), true).unwrap();
    let path = w.path().to_path_buf();
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (done, path) = (done.clone(), path.clone());
        std::thread::spawn(move || {
            let mut reads = 0usize;
            while !done.load(Ordering::Relaxed) {
                let bytes = std::fs::read(&path).unwrap();
                let v: serde_json::Value = serde_json::from_slice(&bytes)
                    .unwrap_or_else(|e| panic!("partial file after {reads} reads: {e}"));
                assert_eq!(v["schema_version"], SCHEMA_VERSION);
                reads += 1;
            }
            reads
        })
    };
    // Large statuses (many alerts) make a torn write likely if writes were not atomic.
    for i in 0..300 {
        let mut s = TrainingStatus {
            step: i,
            error: Some("x".repeat(20_000 + i)),
            ..TrainingStatus::default()
        };
        s.loss = Some(i as f64);
        w.write(&s, true).unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let reads = reader.join().unwrap();
    assert!(reads > 0);
    assert_eq!(w.writes(), 301);
    // No temporary file is left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["training_status.json"]);
}

#[test]
fn writes_are_rate_limited_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = StatusWriter::new(dir.path(), Duration::from_secs(3600));
    assert!(w.write(&TrainingStatus::default(), false).unwrap());
    assert!(!w.write(&TrainingStatus::default(), false).unwrap());
    assert!(w.write(&TrainingStatus::default(), true).unwrap());
    assert_eq!(w.writes(), 2);
}

#[test]
fn the_schema_has_the_contract_fields() {
    let v = serde_json::to_value(TrainingStatus::default()).unwrap();
    for k in [
        "schema_version",
        "status",
        "step",
        "total_steps",
        "epoch",
        "loss",
        "learning_rate",
        "tokens_per_sec",
        "eval_loss",
        "alerts",
        "error",
        "eval_train_gap",
        "loss_variance",
        "loss_trend",
        "memory",
    ] {
        assert!(v.get(k).is_some(), "missing {k}");
    }
    for (s, name) in [
        (Status::Idle, "idle"),
        (Status::Training, "training"),
        (Status::Paused, "paused"),
        (Status::Stopped, "stopped"),
        (Status::Crashed, "crashed"),
        (Status::Completed, "completed"),
    ] {
        assert_eq!(serde_json::to_value(s).unwrap(), name);
    }
}

proptest! {
    #[test]
    fn a_straight_loss_line_has_its_slope_and_no_variance(a in -5.0f64..5.0, slope in -0.1f64..0.1, n in 3usize..30) {
        let mut w = LossWindow::new(50);
        for s in 0..n {
            w.push(s, a + slope * s as f64);
        }
        prop_assert!((w.trend().unwrap() - slope).abs() < 1e-9);
        prop_assert!(w.variance().unwrap() < 1e-12);
    }
}

#[test]
fn loss_window_keeps_the_last_values() {
    let mut w = LossWindow::new(3);
    for (s, l) in [(1, 10.0), (2, 1.0), (3, 3.0), (4, 1.0), (5, f64::NAN)] {
        w.push(s, l);
    }
    assert_eq!(w.len(), 3);
    assert!((w.mean().unwrap() - 5.0 / 3.0).abs() < 1e-12);
    // 1, 3, 1 around a flat trend: residuals -2/3, 4/3, -2/3 → ss = 8/3, n - 2 = 1.
    assert!((w.variance().unwrap() - 8.0 / 3.0).abs() < 1e-9);
}

#[test]
fn alerts_fire_on_their_thresholds_only() {
    let c = AlertConfig::default();
    let calm = AlertInputs {
        step: 7,
        loss: 2.0,
        tokens_per_sec: Some(700.0),
        baseline_tokens_per_sec: Some(1000.0),
        eval_gap: Some(0.29),
        loss_variance: Some(0.9),
        available_bytes: Some(1 << 30),
    };
    assert!(evaluate_alerts(&c, &calm).is_empty());
    let bad = AlertInputs {
        loss: f64::NAN,
        tokens_per_sec: Some(590.0),
        eval_gap: Some(0.31),
        loss_variance: Some(1.1),
        available_bytes: Some(100 << 20),
        ..calm
    };
    let kinds: Vec<AlertKind> = evaluate_alerts(&c, &bad).iter().map(|a| a.kind).collect();
    assert_eq!(
        kinds,
        [
            AlertKind::NanLoss,
            AlertKind::LowThroughput,
            AlertKind::EvalGap,
            AlertKind::LossVariance,
            AlertKind::LowMemory
        ]
    );
    let strict = AlertConfig {
        max_eval_gap: 0.1,
        ..c
    };
    assert_eq!(evaluate_alerts(&strict, &calm)[0].kind, AlertKind::EvalGap);
}

#[test]
fn the_bundle_tracks_a_run_raises_alerts_once_and_writes_the_report() {
    let dir = tempfile::tempdir().unwrap();
    let mut config =
        MonitoringConfig::new(dir.path().join("status"), Some(dir.path().to_path_buf()));
    config.status_interval = Duration::from_secs(3600);
    let mut m = MonitoringBundle::new(config);
    m.start(RunStart {
        total_steps: 20,
        start_step: 0,
        output_dir: dir.path().into(),
        history: History::default(),
    })
    .unwrap();
    let read = |m: &MonitoringBundle| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(m.status_path()).unwrap()).unwrap()
    };
    assert_eq!(read(&m)["status"], "training");
    let mut raised = Vec::new();
    for s in 1..=12 {
        // Throughput collapses after step 8.
        let tps = if s <= 8 { 1000.0 } else { 100.0 };
        raised.extend(m.step(&step(s, 3.0 - 0.1 * s as f64, tps)).unwrap());
    }
    // Raised once, while it lasts; and the forced write shows it.
    assert_eq!(
        raised
            .iter()
            .filter(|a| a.kind == AlertKind::LowThroughput)
            .count(),
        1
    );
    let v = read(&m);
    assert_eq!(v["alerts"][0]["kind"], "low_throughput");
    assert!(v["loss_trend"].as_f64().unwrap() < 0.0);
    m.eval(&EvalRecord {
        step: 12,
        epoch: 1.2,
        eval_loss: 2.9,
        eval_tokens: 40,
        metrics: Default::default(),
    })
    .unwrap();
    let v = read(&m);
    assert_eq!(v["eval_loss"], 2.9);
    assert!(v["eval_train_gap"].as_f64().unwrap() > 0.3);
    m.stop(&RunEnd {
        status: Status::Crashed,
        step: 12,
        error: Some("loss is NaN <at step 13>".into()),
    })
    .unwrap();
    let v = read(&m);
    assert_eq!(v["status"], "crashed");
    assert_eq!(v["step"], 12);
    let html = std::fs::read_to_string(dir.path().join("report.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("&lt;at step 13&gt;"));
    for chart in ["loss", "learning_rate", "grad_norm", "tokens_per_sec"] {
        let svg = std::fs::read_to_string(dir.path().join(format!("plots/{chart}.svg"))).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("<polyline"),
            "{chart}"
        );
    }
    assert!(m.time_spent() > Duration::ZERO);
}

/// `MetricsLog` writes tagged rows that the history reads back (the monitor never guesses a
/// row's kind from its fields), and a resumed run appends.
#[test]
fn metrics_log_rows_are_tagged_and_read_back() {
    use train_monitor::{MetricsLog, MetricsRow};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run").join(MetricsLog::FILE);
    let eval = EvalRecord {
        step: 1,
        epoch: 0.1,
        eval_loss: 2.5,
        eval_tokens: 7,
        metrics: Default::default(),
    };
    let mut log = MetricsLog::open(&path, false).unwrap();
    log.write(&MetricsRow::Step(step(1, 3.0, 9.0))).unwrap();
    log.write(&MetricsRow::Eval(eval.clone())).unwrap();
    drop(log);
    let mut log = MetricsLog::open(&path, true).unwrap();
    log.write(&MetricsRow::Step(step(2, 2.0, 9.0))).unwrap();
    drop(log);
    let text = std::fs::read_to_string(&path).unwrap();
    let kinds: Vec<String> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["kind"].to_string())
        .collect();
    assert_eq!(kinds, [r#""step""#, r#""eval""#, r#""step""#]);
    let h = History::from_metrics(&text, 2);
    assert_eq!(h.steps, [step(1, 3.0, 9.0), step(2, 2.0, 9.0)]);
    assert_eq!(h.evals, [eval]);
    // A fresh run truncates.
    drop(MetricsLog::open(&path, false).unwrap());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
    assert_eq!(MetricsRow::parse(r#"{"kind":"other","step":1}"#), None);
}

#[test]
fn history_of_a_resumed_run_comes_from_metrics_jsonl() {
    let text = [
        r#"{"step":1,"epoch":0.1,"loss":3.0,"learning_rate":0.1,"grad_norm":1.0,"tokens":5,"label_tokens":3,"tokens_per_sec":9.0}"#,
        r#"{"step":2,"epoch":0.2,"loss":2.9,"learning_rate":0.1,"grad_norm":1.0,"tokens":5,"label_tokens":3,"tokens_per_sec":9.0}"#,
        r#"{"step":2,"epoch":0.2,"eval_loss":2.95,"eval_tokens":10}"#,
        r#"{"step":3,"epoch":0.3,"loss":2.7,"learning_rate":0.1,"grad_norm":1.0,"tokens":5,"label_tokens":3,"tokens_per_sec":9.0}"#,
        r#"{"step":2,"epoch":0.2,"loss":2.8,"learning_rate":0.1,"grad_norm":1.0,"tokens":5,"label_tokens":3,"tokens_per_sec":9.0}"#,
        "not json",
    ]
    .join("\n");
    let h = History::from_metrics(&text, 2);
    assert_eq!(
        h.steps.iter().map(|s| (s.step, s.loss)).collect::<Vec<_>>(),
        [(1, 3.0), (2, 2.8)]
    );
    assert_eq!(
        h.evals,
        [EvalRecord {
            step: 2,
            epoch: 0.2,
            eval_loss: 2.95,
            eval_tokens: 10,
            metrics: Default::default(),
        }]
    );
}

#[test]
fn layer_monitor_tracks_norm_changes() {
    let mut l = train_monitor::LayerMonitor::new();
    let first = l.record(0, &[10.0, 4.0]);
    assert_eq!(
        (
            first[0].change,
            first[0].relative_change,
            first[0].std_change
        ),
        (0.0, 0.0, 0.0)
    );
    l.record(10, &[11.0, 4.0]);
    let third = l.record(20, &[13.0, 2.0]);
    assert_eq!(third[0].change, 2.0);
    assert!((third[0].relative_change - 2.0 / 11.0).abs() < 1e-12);
    assert_eq!(third[0].mean_change, 1.5);
    assert_eq!(third[0].std_change, 0.5);
    assert_eq!((third[1].change, third[1].relative_change), (-2.0, -0.5));
    // Only the last 10 changes count.
    for s in 0..20 {
        l.record(
            30 + s,
            &[13.0 + f64::from(u32::try_from(s).unwrap() + 1), 2.0],
        );
    }
    let last = l.record(100, &[34.0, 2.0]);
    assert_eq!(last[0].mean_change, 1.0);
}

#[test]
fn previews_and_evolution_follow_the_origin_schedules() {
    let due: Vec<usize> = (0..=3000)
        .filter(|&s| train_monitor::evolution_due(s))
        .collect();
    assert_eq!(due, [0, 10, 25, 50, 100, 250, 500, 1000, 2500]);
    assert_eq!(train_monitor::preview_interval(50), 10);
    assert_eq!(train_monitor::preview_interval(500), 50);
    let s = train_monitor::Sample::new(3, 0, "q".into(), " Paris ".into(), "Paris".into());
    assert!(s.exact_match);
}

#[test]
fn the_bundle_logs_layers_previews_and_evolution() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = MonitoringBundle::new(MonitoringConfig::new(
        dir.path().join("status"),
        Some(dir.path().to_path_buf()),
    ));
    m.start(RunStart {
        total_steps: 10,
        start_step: 0,
        output_dir: dir.path().into(),
        history: History::default(),
    })
    .unwrap();
    m.layers(0, &[1.0, 2.0]).unwrap();
    m.layers(10, &[1.5, 2.0]).unwrap();
    let samples: Vec<train_monitor::Sample> = (0..6)
        .map(|i| {
            train_monitor::Sample::new(
                10,
                i,
                format!("q{i}"),
                "a <b>".into(),
                if i == 0 { "a <b>".into() } else { "x".into() },
            )
        })
        .collect();
    m.previews(&samples).unwrap();
    m.evolution(&samples[..2]).unwrap();
    m.step(&step(10, 1.0, 100.0)).unwrap();
    m.eval(&EvalRecord {
        step: 10,
        epoch: 1.0,
        eval_loss: 1.0,
        eval_tokens: 40,
        metrics: Default::default(),
    })
    .unwrap();
    let lines = |name: &str| {
        std::fs::read_to_string(dir.path().join(name))
            .unwrap()
            .lines()
            .count()
    };
    assert_eq!(
        (
            lines("layer_history.jsonl"),
            lines("previews.jsonl"),
            lines("evolution.jsonl")
        ),
        (4, 6, 2)
    );
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(m.status_path()).unwrap()).unwrap();
    assert_eq!(status["previews"].as_array().unwrap().len(), 4);
    assert_eq!(status["previews"][0]["index"], 2);
    let html = std::fs::read_to_string(dir.path().join("report.html")).unwrap();
    assert!(html.contains("Latest previews") && html.contains("a &lt;b&gt;"));
}

#[test]
fn objective_metrics_are_logged_read_back_and_charted() {
    let dir = tempfile::tempdir().unwrap();
    let mut log =
        train_monitor::MetricsLog::open(&dir.path().join("metrics.jsonl"), false).unwrap();
    let mut steps = Vec::new();
    for i in 1..=4 {
        let mut s = step(i, 0.7 - 0.05 * i as f64, 100.0);
        s.metrics.insert("rewards/margins".into(), 0.1 * i as f64);
        s.metrics
            .insert("rewards/accuracies".into(), 0.25 * i as f64);
        log.write(&train_monitor::MetricsRow::Step(s.clone()))
            .unwrap();
        steps.push(s);
    }
    let mut eval = EvalRecord {
        step: 4,
        epoch: 0.4,
        eval_loss: 0.6,
        eval_tokens: 12,
        metrics: Default::default(),
    };
    eval.metrics.insert("eval_rewards/margins".into(), 0.3);
    log.write(&train_monitor::MetricsRow::Eval(eval.clone()))
        .unwrap();
    drop(log);
    let text = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    // TRL's names, as keys of the row itself.
    assert_eq!(first["rewards/margins"], 0.1);
    assert_eq!(first["kind"], "step");
    let h = History::from_metrics(&text, usize::MAX);
    assert_eq!(h.steps, steps);
    assert_eq!(h.evals, [eval]);
    let charts = train_monitor::charts(&h).unwrap();
    let stems: Vec<&str> = charts.iter().map(|(s, _)| s.as_str()).collect();
    assert!(
        stems.contains(&"rewards_margins") && stems.contains(&"rewards_accuracies"),
        "{stems:?}"
    );
    // Supervised rows carry no such key.
    let plain = serde_json::to_value(train_monitor::MetricsRow::Step(step(1, 1.0, 1.0))).unwrap();
    assert!(plain.get("rewards/margins").is_none());
}

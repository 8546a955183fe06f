//! The run's history and the self-contained `report.html` (charts inline) with `plots/*.svg`.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::Result;
use crate::metrics::{EvalRecord, MetricsRow, StepRecord};
use crate::plots::{Series, line_chart};
use crate::status::TrainingStatus;
use crate::write_atomic;

/// Every step and evaluation of a run, in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    /// Steps.
    pub steps: Vec<StepRecord>,
    /// Evaluations.
    pub evals: Vec<EvalRecord>,
}

impl History {
    /// The rows of a `metrics.jsonl` up to `until_step` (a resumed run's past); for a step
    /// logged twice the last row counts. Unreadable lines are skipped.
    pub fn from_metrics(text: &str, until_step: usize) -> Self {
        let mut steps = BTreeMap::new();
        let mut evals = BTreeMap::new();
        for line in text.lines() {
            match MetricsRow::parse(line) {
                Some(MetricsRow::Step(r)) if r.step <= until_step => {
                    steps.insert(r.step, r);
                }
                Some(MetricsRow::Eval(r)) if r.step <= until_step => {
                    evals.insert(r.step, r);
                }
                _ => {}
            }
        }
        Self {
            steps: steps.into_values().collect(),
            evals: evals.into_values().collect(),
        }
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.filter(|x| x.is_finite())
        .map_or_else(|| "–".to_string(), |x| format!("{x:.digits$}"))
}

/// Most charts drawn for an objective's own metrics (one per metric name).
pub const MAX_METRIC_CHARTS: usize = 16;

/// The charts of a history: `(file stem, svg)`. Besides loss, learning rate, gradient norm and
/// throughput, one chart per objective metric (DPO's `rewards/margins`, `rewards/accuracies`,
/// …: train and eval series; stem `rewards_margins`), at most [`MAX_METRIC_CHARTS`].
pub fn charts(h: &History) -> Result<Vec<(String, String)>> {
    let pts = |f: fn(&StepRecord) -> f64| -> Vec<(f64, f64)> {
        h.steps.iter().map(|s| (s.step as f64, f(s))).collect()
    };
    let loss = pts(|s| s.loss);
    let eval: Vec<(f64, f64)> = h
        .evals
        .iter()
        .map(|e| (e.step as f64, e.eval_loss))
        .collect();
    let lr = pts(|s| s.learning_rate);
    let grad = pts(|s| s.grad_norm);
    let tps = pts(|s| s.tokens_per_sec);
    let specs: [(&'static str, &str, &str, Vec<Series<'_>>); 4] = [
        (
            "loss",
            "Loss",
            "cross-entropy",
            vec![
                Series {
                    name: "train",
                    points: &loss,
                    markers: false,
                },
                Series {
                    name: "eval",
                    points: &eval,
                    markers: true,
                },
            ],
        ),
        (
            "learning_rate",
            "Learning rate",
            "learning rate",
            vec![Series {
                name: "lr",
                points: &lr,
                markers: false,
            }],
        ),
        (
            "grad_norm",
            "Gradient norm (before clipping)",
            "norm",
            vec![Series {
                name: "grad norm",
                points: &grad,
                markers: false,
            }],
        ),
        (
            "tokens_per_sec",
            "Throughput",
            "tokens / s",
            vec![Series {
                name: "tokens/s",
                points: &tps,
                markers: false,
            }],
        ),
    ];
    let mut out = Vec::new();
    for (stem, title, y, series) in specs {
        if let Some(svg) = line_chart(title, y, &series)? {
            out.push((stem.to_string(), svg));
        }
    }
    let names: std::collections::BTreeSet<&str> = h
        .steps
        .iter()
        .flat_map(|s| s.metrics.keys().map(String::as_str))
        .collect();
    for name in names.into_iter().take(MAX_METRIC_CHARTS) {
        let train: Vec<(f64, f64)> = h
            .steps
            .iter()
            .filter_map(|s| s.metrics.get(name).map(|v| (s.step as f64, *v)))
            .collect();
        let key = format!("eval_{name}");
        let eval: Vec<(f64, f64)> = h
            .evals
            .iter()
            .filter_map(|e| e.metrics.get(&key).map(|v| (e.step as f64, *v)))
            .collect();
        let series = [
            Series {
                name: "train",
                points: &train,
                markers: false,
            },
            Series {
                name: "eval",
                points: &eval,
                markers: true,
            },
        ];
        if let Some(svg) = line_chart(name, name, &series)? {
            let stem: String = name
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            out.push((stem, svg));
        }
    }
    Ok(out)
}

/// The HTML report: a summary table and the charts, inline (no external file or script).
pub fn render_html(
    status: &TrainingStatus,
    charts: &[(String, String)],
    settings: &[(String, String)],
) -> String {
    // The report is written while the run goes on and at its end: its wall time so far.
    let wall =
        (status.started_at > 0.0).then(|| (crate::status::unix_now() - status.started_at).max(0.0));
    let rows = [
        ("status", format!("{:?}", status.status).to_lowercase()),
        ("step", format!("{} / {}", status.step, status.total_steps)),
        ("epoch", format!("{:.2}", status.epoch)),
        ("loss", opt(status.loss, 4)),
        ("eval loss", opt(status.eval_loss, 4)),
        ("eval − train gap", opt(status.eval_train_gap, 4)),
        (
            "learning rate",
            status
                .learning_rate
                .map_or_else(|| "–".into(), crate::plots::readable),
        ),
        ("tokens / s (smoothed)", opt(status.tokens_per_sec, 0)),
        ("wall time", wall.map_or_else(|| "–".into(), wall_time)),
        ("loss trend (per step)", opt(status.loss_trend, 5)),
        ("loss variance", opt(status.loss_variance, 4)),
    ];
    let mut html = String::from(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Training report</title>\n\
         <style>body{font-family:sans-serif;margin:2em;max-width:800px}table{border-collapse:collapse}\
         td,th{border:1px solid #ccc;padding:4px 10px;text-align:left}.alert{color:#b00}\
         figure{margin:1.5em 0}.text td{white-space:pre-wrap;vertical-align:top;font-family:monospace}\
         </style></head><body>\n<h1>Training report</h1>\n",
    );
    if let Some(dir) = &status.output_dir {
        html.push_str(&format!(
            "<p>Output: <code>{}</code></p>\n",
            escape(&dir.display().to_string())
        ));
    }
    html.push_str("<table>\n");
    for (k, v) in rows {
        html.push_str(&format!("<tr><th>{k}</th><td>{}</td></tr>\n", escape(&v)));
    }
    html.push_str("</table>\n");
    if !settings.is_empty() {
        html.push_str("<h2>Settings</h2>\n<table>\n");
        for (k, v) in settings {
            html.push_str(&format!(
                "<tr><th>{}</th><td>{}</td></tr>\n",
                escape(k),
                escape(v)
            ));
        }
        html.push_str("</table>\n");
    }
    if let Some(e) = &status.error {
        html.push_str(&format!("<p class=\"alert\">Error: {}</p>\n", escape(e)));
    }
    if !status.alerts.is_empty() {
        html.push_str("<h2>Alerts</h2>\n<ul>\n");
        for a in &status.alerts {
            html.push_str(&format!(
                "<li class=\"alert\">step {}: {}</li>\n",
                a.step,
                escape(&a.message)
            ));
        }
        html.push_str("</ul>\n");
    }
    if !status.previews.is_empty() {
        html.push_str("<h2>Latest previews</h2>\n<table class=\"text\">\n<tr><th>prompt</th><th>golden</th><th>generated</th><th>match</th></tr>\n");
        for p in &status.previews {
            html.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
                escape(&p.prompt),
                escape(&p.golden),
                escape(&p.generated),
                if p.exact_match { "yes" } else { "no" }
            ));
        }
        html.push_str("</table>\n");
    }
    for (stem, svg) in charts {
        html.push_str(&format!("<figure id=\"{stem}\">\n{svg}\n</figure>\n"));
    }
    html.push_str("</body></html>\n");
    html
}

/// `3725.2` seconds as `1 h 02 min 05 s`.
fn wall_time(secs: f64) -> String {
    let s = secs.round() as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, sec) => format!("{sec} s"),
        (0, m, sec) => format!("{m} min {sec:02} s"),
        (h, m, sec) => format!("{h} h {m:02} min {sec:02} s"),
    }
}

/// Writes `dir/plots/<chart>.svg` and `dir/report.html` (each replaced atomically), with the
/// run's `settings` (name, value) in a table.
pub fn write_report(
    dir: &Path,
    status: &TrainingStatus,
    history: &History,
    settings: &[(String, String)],
) -> Result<()> {
    let charts = charts(history)?;
    for (stem, svg) in &charts {
        write_atomic(
            &dir.join("plots").join(format!("{stem}.svg")),
            svg.as_bytes(),
        )?;
    }
    write_atomic(
        &dir.join("report.html"),
        render_html(status, &charts, settings).as_bytes(),
    )
}

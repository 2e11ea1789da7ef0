//! `GET /dashboard`: one self-contained HTML page (no scripts, no external assets) with credits
//! per day per client and per action as stacked bar charts, what the gateway saved, and the
//! budgets left today.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::ledger::UsageRow;

pub struct BudgetLine {
    pub client: String,
    pub budget: Option<u64>,
    pub spent: u64,
    pub reserved: u64,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const COLOURS: [&str; 10] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac",
];

/// A stacked bar chart of credits per day, one colour per series (client or action).
fn chart(
    title: &str,
    days: &[String],
    rows: &[UsageRow],
    series_of: fn(&UsageRow) -> String,
) -> String {
    let mut per: BTreeMap<String, BTreeMap<&str, u64>> = BTreeMap::new();
    // Series that cost nothing in the range would only clutter the legend.
    for r in rows.iter().filter(|r| r.credits > 0) {
        let day = r.day.as_deref().unwrap_or("");
        *per.entry(series_of(r)).or_default().entry(day).or_default() += r.credits;
    }
    let series: Vec<&String> = per.keys().collect();
    let totals: Vec<u64> = days
        .iter()
        .map(|d| {
            per.values()
                .map(|m| m.get(d.as_str()).copied().unwrap_or(0))
                .sum()
        })
        .collect();
    let max = totals.iter().copied().max().unwrap_or(0).max(1);
    let (w, h, left, bottom) = (760.0f64, 220.0f64, 50.0f64, 40.0f64);
    let bar_w = (w - left) / days.len().max(1) as f64;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg viewBox="0 0 {w} {}" width="100%" role="img" aria-label="{}">"#,
        h + bottom,
        esc(title)
    );
    let _ = write!(
        svg,
        r##"<text x="0" y="12" font-size="11" fill="#555">{max}</text><text x="0" y="{h}" font-size="11" fill="#555">0</text><line x1="{left}" y1="{h}" x2="{w}" y2="{h}" stroke="#999"/>"##
    );
    for (i, day) in days.iter().enumerate() {
        let x = left + i as f64 * bar_w;
        let mut y = h;
        for (si, s) in series.iter().enumerate() {
            let v = per[*s].get(day.as_str()).copied().unwrap_or(0);
            if v == 0 {
                continue;
            }
            let bh = (v as f64 / max as f64) * (h - 16.0);
            y -= bh;
            let _ = write!(
                svg,
                r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{bh:.1}" fill="{}"><title>{} {}: {v} credits</title></rect>"#,
                (bar_w - 2.0).max(1.0),
                COLOURS[si % COLOURS.len()],
                esc(day),
                esc(s)
            );
        }
        if days.len() <= 16 || i % (days.len() / 8).max(1) == 0 {
            let _ = write!(
                svg,
                r##"<text x="{:.1}" y="{}" font-size="10" fill="#555" transform="rotate(45 {:.1} {})">{}</text>"##,
                x + 2.0,
                h + 12.0,
                x + 2.0,
                h + 12.0,
                esc(day.get(5..).unwrap_or(day))
            );
        }
    }
    svg.push_str("</svg>");
    let mut legend = String::new();
    for (si, s) in series.iter().enumerate() {
        let _ = write!(
            legend,
            r#"<span class="key"><i style="background:{}"></i>{}</span>"#,
            COLOURS[si % COLOURS.len()],
            esc(s)
        );
    }
    if series.is_empty() {
        legend.push_str("<span class=\"muted\">no credits recorded in this range</span>");
    }
    format!(
        "<section><h2>{}</h2>{svg}<div class=\"legend\">{legend}</div></section>",
        esc(title)
    )
}

pub fn render(
    days: &[String],
    by_client_day: &[UsageRow],
    by_action_day: &[UsageRow],
    by_outcome: &[UsageRow],
    budgets: &[BudgetLine],
) -> String {
    let mut body = String::new();
    body.push_str(&chart(
        "Credits per day, by client",
        days,
        by_client_day,
        |r| r.client.clone().unwrap_or_default(),
    ));
    body.push_str(&chart(
        "Credits per day, by action",
        days,
        by_action_day,
        |r| r.action.clone().unwrap_or_else(|| "unknown".into()),
    ));

    body.push_str("<section><h2>Budgets today (UTC)</h2><table><tr><th>client</th><th>budget</th><th>spent</th><th>reserved</th><th>left</th></tr>");
    for b in budgets {
        let (budget, left) = match b.budget {
            Some(v) => (
                v.to_string(),
                v.saturating_sub(b.spent + b.reserved).to_string(),
            ),
            None => ("none".into(), "∞".into()),
        };
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{budget}</td><td>{}</td><td>{}</td><td>{left}</td></tr>",
            esc(&b.client),
            b.spent,
            b.reserved
        );
    }
    body.push_str("</table></section>");

    body.push_str("<section><h2>Answers by outcome</h2><table><tr><th>outcome</th><th>requests</th><th>credits</th></tr>");
    for r in by_outcome {
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(r.outcome.as_deref().unwrap_or("")),
            r.requests,
            r.credits
        );
    }
    body.push_str("</table><p class=\"muted\">cached, coalesced and replayed answers cost nothing: each is a call the gateway saved.</p></section>");

    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>linkup-gateway — credits</title>
<style>body{{font:14px system-ui,sans-serif;margin:24px;max-width:900px;color:#222}}h1{{font-size:20px}}h2{{font-size:16px;margin-top:28px}}
table{{border-collapse:collapse}}td,th{{border-bottom:1px solid #ddd;padding:4px 12px;text-align:right}}td:first-child,th:first-child{{text-align:left}}
.legend{{margin-top:6px}}.key{{margin-right:14px;white-space:nowrap}}.key i{{display:inline-block;width:10px;height:10px;margin-right:4px}}.muted{{color:#777}}</style></head>
<body><h1>linkup-gateway — credits</h1><p class="muted">{} to {} (UTC) · from the ledger · <a href="/usage?by=client,day&amp;from={}&amp;to={}">JSON</a></p>{body}</body></html>"#,
        days.first().map(|d| esc(d)).unwrap_or_default(),
        days.last().map(|d| esc(d)).unwrap_or_default(),
        days.first().map(|d| esc(d)).unwrap_or_default(),
        days.last().map(|d| esc(d)).unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_bars_budgets_and_escapes_names() {
        let days = vec!["2026-11-24".to_string(), "2026-11-25".to_string()];
        let rows = vec![UsageRow {
            client: Some("<crm>".into()),
            account: None,
            action: None,
            day: Some("2026-11-25".into()),
            outcome: None,
            requests: 2,
            credits: 3,
        }];
        let html = render(
            &days,
            &rows,
            &[],
            &[],
            &[BudgetLine {
                client: "<crm>".into(),
                budget: Some(10),
                spent: 3,
                reserved: 1,
            }],
        );
        assert!(html.contains("<rect"));
        assert!(html.contains("&lt;crm&gt;"));
        assert!(!html.contains("<crm>"));
        assert!(html.contains("<td>6</td>"), "10 - 3 - 1 left");
    }
}

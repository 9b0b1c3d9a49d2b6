//! The status page: server-rendered HTML, whose `<main>` a few lines of script replace with
//! `/status` every second. No framework, nothing fetched from elsewhere.

use super::metrics::behind;
use super::Admin;
use crate::types::{human_bytes, human_duration, Policy, StreamInfo, Tick};
use std::fmt::Write;
use std::time::Duration;

/// Rows shown per table; the rest are counted.
const MAX_ROWS: usize = 500;

/// The whole page.
pub fn page(admin: &Admin) -> String {
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tapeline {version}</title>
<meta name="viewport" content="width=device-width">
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }}
h1 {{ font-size: 1.3em; margin: 0 0 .2em; }} h2 {{ font-size: 1.05em; margin: 1.4em 0 .4em; }}
table {{ border-collapse: collapse; }} th, td {{ padding: .25em .8em .25em 0; text-align: left; vertical-align: top; }}
th {{ border-bottom: 1px solid #999; font-weight: 600; }} td.n {{ text-align: right; font-variant-numeric: tabular-nums; }}
.dim {{ color: #777; }} .bad {{ color: #b00; font-weight: 600; }} .ok {{ color: #070; }}
</style></head>
<body data-refreshes="0">
<main>{main}</main>
<script>
// Live: the server renders the page's body again every second.
setInterval(async () => {{
  try {{
    const r = await fetch("status", {{ cache: "no-store" }});
    if (!r.ok) return;
    document.querySelector("main").innerHTML = await r.text();
    document.body.dataset.refreshes = Number(document.body.dataset.refreshes) + 1;
  }} catch (e) {{ /* the broker is away: keep what is shown */ }}
}}, 1000);
</script>
</body></html>
"#,
        version = env!("CARGO_PKG_VERSION"),
        main = fragment(admin),
    )
}

/// The page's live part: the server, its streams, subscriptions and relay links.
pub fn fragment(admin: &Admin) -> String {
    let broker = &admin.broker;
    let now = Tick::now();
    let tail = broker.tail();
    let mut out = String::new();
    let protection = match (admin.tls, admin.authenticated) {
        (true, true) => "TLS, authenticated",
        (true, false) => "TLS",
        (false, true) => "authenticated",
        (false, false) => "plaintext, open",
    };
    let disk = match admin.disk_budget {
        Some(budget) => format!("{} of {}", human_bytes(broker.log().disk_bytes()), human_bytes(budget)),
        None => human_bytes(broker.log().disk_bytes()),
    };
    let _ = write!(
        out,
        "<h1>tapeline {version}</h1>\n<p>server <code id=server-id>{id}</code> · listening on <code>{listen}</code> ({protection}) · up {up} · tail {tail} · disk {disk} · connections <span id=connections>{connections}</span></p>\n",
        version = env!("CARGO_PKG_VERSION"),
        id = escape(broker.log().server_id()),
        listen = admin.listen,
        up = human_duration(admin.started.elapsed()),
        tail = when(tail, now),
        connections = admin.connections.open(),
    );
    if let Some(cause) = broker.log().failure() {
        let _ = writeln!(
            out,
            "<p class=bad>the log takes no writes: {} (a restart recovers)</p>",
            escape(&cause)
        );
    }

    let links = broker.link_statuses();
    if !links.is_empty() {
        let _ =
            writeln!(out, "<h2>Relay links</h2>\n<table id=links><tr><th>upstream<th>state<th>lag<th>detail");
        for link in &links {
            let state =
                if link.connected { "<span class=ok>up</span>" } else { "<span class=bad>down</span>" };
            let _ = writeln!(
                out,
                "<tr><td>{}<td>{state}<td class=n>{}<td>{}",
                escape(&link.upstream),
                human_duration(link.lag),
                escape(&link.detail)
            );
        }
        out.push_str("</table>\n");
    }

    let mut streams = broker.all_streams();
    streams.sort_by(|a, b| a.name.cmp(&b.name));
    let _ = writeln!(
        out,
        "<h2>Streams ({})</h2>\n<table id=streams><tr><th>stream<th>records<th>size<th>rate<th>first<th>last<th>retention<th>upstream",
        streams.len()
    );
    for s in streams.iter().take(MAX_ROWS) {
        stream_row(&mut out, admin, s, now);
    }
    out.push_str("</table>\n");
    more(&mut out, streams.len());

    let subscriptions = broker.subscriptions();
    let _ = writeln!(
        out,
        "<h2>Subscriptions ({})</h2>\n<table id=subscriptions><tr><th>#<th>peer<th>principal<th>selection<th>state<th>lag<th>policy<th>sent<th>since",
        subscriptions.len()
    );
    for p in subscriptions.iter().take(MAX_ROWS) {
        let seen = p.seen();
        let (state, lag) = if seen.live {
            ("live", human_duration(behind(tail, seen.last_sent)))
        } else {
            ("replaying", "–".to_string())
        };
        let since = p.started.elapsed().map(human_duration).unwrap_or_default();
        let _ = writeln!(
            out,
            "<tr><td class=n>{}<td>{}<td>{}<td>{}<td>{state}<td class=n>{lag}<td>{:?}<td class=n>{} records, {}<td>{since}",
            p.id,
            escape(&p.client.peer),
            escape(&p.client.principal),
            escape(&p.selection_text()),
            p.slow,
            seen.records,
            human_bytes(seen.bytes),
        );
    }
    out.push_str("</table>\n");
    more(&mut out, subscriptions.len());
    out
}

fn stream_row(out: &mut String, admin: &Admin, s: &StreamInfo, now: Tick) {
    let (rate, _) = s.recent.at(now);
    let upstream = admin.broker.upstream_of(&s.name).map(|u| u.upstream).unwrap_or_default();
    let importing = if s.meta.importing { " <span class=dim>(importing)</span>" } else { "" };
    let _ = writeln!(
        out,
        "<tr><td>{}{importing}<td class=n>{}<td class=n>{}<td class=n>{:.1}/s<td>{}<td>{}<td>{}<td>{}",
        escape(&s.name),
        s.records,
        human_bytes(s.bytes),
        rate,
        s.first_tick.map(|t| when(t, now)).unwrap_or_default(),
        s.last_tick.map(|t| when(t, now)).unwrap_or_default(),
        retention(&admin.broker.retention_of(s)),
        escape(&upstream),
    );
}

fn more(out: &mut String, count: usize) {
    if count > MAX_ROWS {
        let _ = writeln!(out, "<p class=dim>… and {} more</p>", count - MAX_ROWS);
    }
}

/// A tick as its UTC time and how long ago it was: `2026-12-06 21:04:05 UTC (3.2 s ago)`.
fn when(tick: Tick, now: Tick) -> String {
    if tick.0 == 0 {
        return "–".into();
    }
    let time = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_nanos(tick.0));
    let time = time.to_string().replace('T', " ").replace('Z', " UTC");
    format!(
        "<span title=\"tick {}\">{time}</span> <span class=dim>({} ago)</span>",
        tick.0,
        human_duration(behind(now, tick))
    )
}

fn retention(policy: &Policy) -> String {
    if policy.keeps_everything() {
        return "everything".into();
    }
    let mut parts = Vec::new();
    if let Some(age) = policy.max_age {
        parts.push(human_duration(age));
    }
    if let Some(bytes) = policy.max_bytes {
        parts.push(human_bytes(bytes));
    }
    if let Some(records) = policy.max_records {
        parts.push(format!("{records} records"));
    }
    parts.join(", ")
}

/// Text safe inside HTML elements and attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_from_clients_cannot_become_markup() {
        assert_eq!(escape("<b a=\"x\">'&'</b>"), "&lt;b a=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/b&gt;");
    }
}

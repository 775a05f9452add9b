//! The agent's console: when stderr is a terminal, a status screen redrawn in place once a second
//! (the tunnel, its URLs, the inspector, requests per minute, in flight, errors, the gateway's
//! round trip) with the last log lines under it, instead of the log scrolling by.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::status::{Phase, Snapshot, Status};

/// Log lines kept for the screen.
const LOG_LINES: usize = 8;
/// Longest log line shown (the rest is cut, so a line never wraps and shifts the screen).
const LOG_WIDTH: usize = 110;

/// The last log lines, written by the logger and read by the screen.
#[derive(Debug, Clone, Default)]
pub struct LogLines(Arc<Mutex<LogBuffer>>);

#[derive(Debug, Default)]
struct LogBuffer {
    lines: VecDeque<String>,
    partial: Vec<u8>,
}

impl LogLines {
    fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).lines.iter().cloned().collect()
    }
}

impl Write for LogLines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut log = self.0.lock().unwrap_or_else(|e| e.into_inner());
        log.partial.extend_from_slice(buf);
        while let Some(end) = log.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = log.partial.drain(..=end).collect();
            let line = short_time(&String::from_utf8_lossy(&line[..end]));
            if log.lines.len() == LOG_LINES {
                log.lines.pop_front();
            }
            log.lines.push_back(line);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogLines {
    type Writer = Self;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// `2026-12-05T18:33:38.959177Z  INFO …` as `18:33:38 INFO …`: the date and fraction take room
/// the screen needs.
fn short_time(line: &str) -> String {
    let bytes = line.as_bytes();
    match line.find("Z ") {
        Some(z)
            if z > 19
                && bytes.get(10) == Some(&b'T')
                && line.is_char_boundary(11)
                && line.is_char_boundary(19) =>
        {
            format!("{} {}", &line[11..19], line[z + 2..].trim_start())
        }
        _ => line.to_owned(),
    }
}

/// Draws the screen on stderr every second until `stop`, then once more.
pub async fn run(status: Arc<Status>, log: LogLines, tunnel: String, stop: CancellationToken) {
    let mut rates = Rates::default();
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    loop {
        let stopping = tokio::select! {
            () = stop.cancelled() => true,
            _ = ticks.tick() => false,
        };
        let snapshot = status.snapshot();
        rates.sample(snapshot.requests);
        let screen = render(&snapshot, &tunnel, rates.per_minute(), &log.lines(), stopping);
        let mut stderr = std::io::stderr().lock();
        // Home, clear to the end, the screen.
        let _ = write!(stderr, "\x1b[H\x1b[J{screen}");
        let _ = stderr.flush();
        if stopping {
            return;
        }
    }
}

/// Requests counted at each of the last 60 seconds' ticks.
#[derive(Debug, Default)]
struct Rates(VecDeque<u64>);

impl Rates {
    fn sample(&mut self, total: u64) {
        if self.0.len() == 61 {
            self.0.pop_front();
        }
        self.0.push_back(total);
    }

    /// Requests over the last minute (or as much of it as has been seen).
    fn per_minute(&self) -> u64 {
        match (self.0.front(), self.0.back()) {
            (Some(first), Some(last)) => last - first,
            _ => 0,
        }
    }
}

fn render(s: &Snapshot, tunnel: &str, per_minute: u64, log: &[String], stopping: bool) -> String {
    let mut out = String::new();
    let line = |out: &mut String, label: &str, value: &str| {
        out.push_str(&format!("{label:<14}{value}\n"));
    };
    out.push_str(&format!(
        "ferry agent · {tunnel}{}\n\n",
        if stopping { " · stopping" } else { " · Ctrl-C to stop" }
    ));
    let state = match s.phase {
        Phase::Connecting => format!("connecting ({})", since(s.for_)),
        Phase::Up if s.sessions > 1 => format!("up, {} sessions ({})", s.sessions, since(s.for_)),
        Phase::Up => format!("up ({})", since(s.for_)),
        Phase::Reconnecting => format!("reconnecting ({})", since(s.for_)),
    };
    let state = match (&s.last_error, s.phase) {
        (Some(err), Phase::Connecting | Phase::Reconnecting) => format!("{state}: {}", cut(err, 80)),
        _ => state,
    };
    line(&mut out, "Tunnel", &state);
    for (i, url) in s.public_urls.iter().enumerate() {
        line(&mut out, if i == 0 { "Public URL" } else { "" }, url);
    }
    if s.public_urls.is_empty() {
        line(&mut out, "Public URL", "(once the tunnel is up)");
    }
    line(&mut out, "Inspector", s.inspector.as_deref().unwrap_or("off"));
    line(
        &mut out,
        "Requests",
        &format!(
            "{per_minute}/min · {} in flight · {} errors · {} in all",
            s.in_flight, s.errors, s.requests
        ),
    );
    let rtt = s.rtt.map_or_else(|| "-".to_owned(), |rtt| format!("{:.1} ms", rtt.as_secs_f64() * 1000.0));
    line(&mut out, "Gateway RTT", &rtt);
    out.push_str("\nLog\n");
    for entry in log {
        out.push_str("  ");
        out.push_str(&cut(entry, LOG_WIDTH));
        out.push('\n');
    }
    out
}

fn since(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m {}s", secs / 60, secs % 60),
        _ => format!("{}h {}m", secs / 3600, secs % 3600 / 60),
    }
}

fn cut(text: &str, width: usize) -> String {
    match text.char_indices().nth(width) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_screen_says_where_the_tunnel_is() {
        let status = Status::default();
        status.set_inspector("http://127.0.0.1:4040".into());
        let screen = render(&status.snapshot(), "agent_x_web", 0, &[], false);
        assert!(screen.contains("Tunnel        connecting (0s)"), "{screen}");
        assert!(screen.contains("Inspector     http://127.0.0.1:4040"), "{screen}");
        status.session_up(&["http://gw.example/t/agent_x_web/".to_owned()]);
        status.request_started();
        status.request_started();
        status.request_ended(true);
        let screen = render(&status.snapshot(), "agent_x_web", 2, &["a log line".into()], false);
        assert!(screen.contains("Tunnel        up (0s)"), "{screen}");
        assert!(screen.contains("Public URL    http://gw.example/t/agent_x_web/"), "{screen}");
        assert!(screen.contains("2/min · 1 in flight · 1 errors · 2 in all"), "{screen}");
        assert!(screen.contains("  a log line"), "{screen}");
        status.session_down(Some("connection reset".into()));
        let screen = render(&status.snapshot(), "agent_x_web", 2, &[], true);
        assert!(screen.contains("reconnecting (0s): connection reset"), "{screen}");
        assert!(screen.contains("stopping"), "{screen}");
    }

    #[test]
    fn log_lines_are_kept_whole_and_the_last_few_only() {
        let mut log = LogLines::default();
        write!(log, "first li").unwrap();
        writeln!(log, "ne").unwrap();
        for n in 0..20 {
            writeln!(log, "line {n}").unwrap();
        }
        let lines = log.lines();
        assert_eq!(lines.len(), LOG_LINES);
        assert_eq!(lines.last().unwrap(), "line 19");
        assert_eq!(cut("abcdef", 3), "abc…");
        assert_eq!(
            short_time("2026-12-05T18:33:38.959177Z  INFO ferry_agent: up"),
            "18:33:38 INFO ferry_agent: up"
        );
        assert_eq!(short_time("not a log line"), "not a log line");
        let mut rates = Rates::default();
        for total in [0, 5, 9] {
            rates.sample(total);
        }
        assert_eq!(rates.per_minute(), 9);
    }
}

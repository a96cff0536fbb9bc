//! What `status --watch` shows, and how: the readings put into one `Picture`, drawn either as a
//! full-terminal ratatui frame or as plain text lines, so both say the same things.
//!
//! Owns: wording and layout. It may not read the manifest, probe the dest or touch the
//! terminal's modes: it only turns readings into a frame or lines.

use std::time::{Duration, Instant, SystemTime};

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style, Stylize};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Gauge, Paragraph, Row, Table, Wrap};
use ratatui::Frame;

use super::dest::DestHealth;
use super::sample::{Basis, Latest, Sample};
use crate::manifest::State;
use crate::util::{human_bytes, human_duration};

/// Where the migration is, as the manifest records it.
#[derive(Debug, Clone)]
pub struct Place {
    pub manifest: String,
    pub source: Option<String>,
    pub dest: Option<String>,
}

/// How a value reads: plain, good news or bad news.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tone {
    Plain,
    Good,
    Bad,
}

/// One labelled line of the summary.
#[derive(Debug, Clone)]
pub struct Fact {
    pub label: &'static str,
    pub value: String,
    pub tone: Tone,
}

/// Everything one redraw shows.
#[derive(Debug, Clone)]
pub struct Picture {
    pub when: String,
    pub place: Place,
    /// Files and bytes per state; empty until the first reading.
    pub states: Vec<(State, u64, u64)>,
    /// Verified files of all, and the line that says so.
    pub progress: Option<(f64, String)>,
    pub facts: Vec<Fact>,
    /// State, path, attempts and reason of the most recent problems.
    pub problems: Vec<(State, String, i64, String)>,
}

impl Picture {
    pub fn of(latest: &Latest, health: &DestHealth, place: &Place, now: Instant) -> Picture {
        let sample = latest.sample.as_deref();
        let mut facts = Vec::new();
        if let Some(sample) = sample {
            facts.extend(rate_facts(sample));
            facts.push(Fact {
                label: "Copy-on-read",
                value: format!(
                    "{} opened before their copy, queued first",
                    count(sample.copy_on_read)
                ),
                tone: Tone::Plain,
            });
        }
        facts.push(dest_fact(health, now));
        if let Some(sample) = sample {
            facts.extend(running_facts(sample));
        }
        facts.push(manifest_fact(latest, now));
        Picture {
            when: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            place: place.clone(),
            states: sample.map(|s| s.by_state.clone()).unwrap_or_default(),
            progress: sample.map(progress),
            facts,
            problems: sample
                .map(|s| {
                    s.recent_problems
                        .iter()
                        .map(|p| {
                            let reason = p.reason.clone().unwrap_or_default();
                            (p.state, p.path.clone(), p.attempts, reason)
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// The picture as plain lines (no escape codes), for a stdout that is not a terminal.
    /// `with_place`: also the manifest, source and dest lines (the first block only).
    pub fn plain_lines(&self, with_place: bool) -> Vec<String> {
        let mut lines = vec![format!("== cutoverfs status --watch · {} ==", self.when)];
        if with_place {
            lines.extend(self.place_lines());
        }
        if self.states.is_empty() {
            lines.push("(reading the manifest)".into());
        } else {
            lines.push(format!("{:<12} {:>10} {:>12}", "state", "files", "bytes"));
            for (state, files, bytes) in &self.states {
                lines.push(format!(
                    "{:<12} {:>10} {:>12}",
                    state.as_str(),
                    files,
                    human_bytes(*bytes)
                ));
            }
        }
        if let Some((_, said)) = &self.progress {
            lines.push(format!("{:<14}{said}", "Progress:"));
        }
        for fact in &self.facts {
            lines.push(format!("{:<14}{}", format!("{}:", fact.label), fact.value));
        }
        if !self.problems.is_empty() {
            lines.push("Recent failures:".into());
            for (state, path, attempts, reason) in &self.problems {
                lines.push(format!(
                    "  {:<11} {path}  ({}) {reason}",
                    state.as_str(),
                    plural(*attempts as u64, "attempt")
                ));
            }
        }
        lines
    }

    fn place_lines(&self) -> Vec<String> {
        let mut lines = vec![format!("{:<14}{}", "Manifest:", self.place.manifest)];
        if let Some(source) = &self.place.source {
            lines.push(format!("{:<14}{source}", "Source:"));
        }
        if let Some(dest) = &self.place.dest {
            lines.push(format!("{:<14}{dest}", "Destination:"));
        }
        lines
    }

    /// Draws the picture on the whole terminal.
    pub fn render(&self, frame: &mut Frame) {
        let outer = Block::bordered().title(Line::from(format!(
            " cutoverfs status --watch · {} · q to quit ",
            self.when
        )));
        let inner = outer.inner(frame.area());
        frame.render_widget(outer, frame.area());
        let place = self.place_lines();
        let [place_area, middle, gauge, problems] = Layout::vertical([
            Constraint::Length(place.len() as u16 + 1),
            Constraint::Length(State::ALL.len() as u16 + 2),
            Constraint::Length(2),
            Constraint::Min(0),
        ])
        .areas(inner);
        frame.render_widget(
            Paragraph::new(place.into_iter().map(Line::from).collect::<Vec<_>>()),
            place_area,
        );
        let [table, _, facts] = Layout::horizontal([
            Constraint::Length(36),
            Constraint::Length(2),
            Constraint::Min(0),
        ])
        .areas(middle);
        self.render_states(frame, table);
        self.render_facts(frame, facts);
        self.render_progress(frame, gauge);
        self.render_problems(frame, problems);
    }

    fn render_states(&self, frame: &mut Frame, area: Rect) {
        if self.states.is_empty() {
            frame.render_widget(Paragraph::new("(reading the manifest)"), area);
            return;
        }
        let right = |text: String| Cell::from(Line::from(text).right_aligned());
        let rows = self.states.iter().map(|(state, files, bytes)| {
            Row::new([
                Cell::from(state.as_str()),
                right(files.to_string()),
                right(human_bytes(*bytes)),
            ])
            .style(state_style(*state, *files))
        });
        let header = Row::new([
            Cell::from("state"),
            right("files".into()),
            right("bytes".into()),
        ])
        .style(Style::new().add_modifier(Modifier::BOLD));
        let widths = [
            Constraint::Length(12),
            Constraint::Length(10),
            Constraint::Length(12),
        ];
        frame.render_widget(Table::new(rows, widths).header(header), area);
    }

    fn render_facts(&self, frame: &mut Frame, area: Rect) {
        let lines: Vec<Line> = self
            .facts
            .iter()
            .map(|fact| {
                Line::from(vec![
                    Span::from(format!("{:<14}", format!("{}:", fact.label))).bold(),
                    Span::from(fact.value.clone()).style(tone_style(fact.tone)),
                ])
            })
            .collect();
        frame.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }), area);
    }

    fn render_progress(&self, frame: &mut Frame, area: Rect) {
        let Some((ratio, said)) = &self.progress else {
            return;
        };
        let [bar, _] = Layout::vertical([Constraint::Length(1), Constraint::Min(0)]).areas(area);
        let gauge = Gauge::default()
            .ratio(ratio.clamp(0.0, 1.0))
            .label(said.clone())
            .gauge_style(Style::new().green());
        frame.render_widget(gauge, bar);
    }

    fn render_problems(&self, frame: &mut Frame, area: Rect) {
        let mut lines = vec![Line::from("Recent failures").bold()];
        if self.problems.is_empty() {
            lines.push(Line::from("  none"));
        }
        for (state, path, attempts, reason) in &self.problems {
            lines.push(Line::from(vec![
                Span::from(format!("  {:<11} ", state.as_str())).style(state_style(*state, 1)),
                Span::from(path.clone()),
                Span::from(format!("  ({})", plural(*attempts as u64, "attempt"))),
            ]));
            if !reason.is_empty() {
                lines.push(Line::from(format!("      {reason}")));
            }
        }
        frame.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }), area);
    }
}

fn tone_style(tone: Tone) -> Style {
    match tone {
        Tone::Plain => Style::new(),
        Tone::Good => Style::new().green(),
        Tone::Bad => Style::new().red().bold(),
    }
}

/// Problem states stand out once they hold a file.
fn state_style(state: State, files: u64) -> Style {
    match state {
        State::Verified if files > 0 => Style::new().green(),
        State::Failed | State::Conflict | State::Missing if files > 0 => Style::new().red(),
        _ => Style::new(),
    }
}

fn progress(sample: &Sample) -> (f64, String) {
    let (done, done_bytes) = sample.count(State::Verified);
    let (all, all_bytes) = sample.total();
    let ratio = if all == 0 {
        0.0
    } else {
        done as f64 / all as f64
    };
    let said = format!(
        "verified {done} of {all} files ({:.1}%), {} of {}",
        ratio * 100.0,
        human_bytes(done_bytes),
        human_bytes(all_bytes)
    );
    (ratio, said)
}

fn rate_facts(sample: &Sample) -> Vec<Fact> {
    let left = sample.queued();
    let failed = sample.count(State::Failed).0;
    let Some(rate) = sample.rate else {
        return vec![
            Fact {
                label: "Copy rate",
                value: "not measured yet (no copy seen, no batch finished)".into(),
                tone: Tone::Plain,
            },
            eta_fact(None, left, failed),
        ];
    };
    let basis = match rate.basis {
        Basis::LastMinute => "last minute".to_string(),
        Basis::FinishedBatches => "finished batches, until a minute is watched".into(),
        Basis::Watched(span) => format!("last {}", human_duration(span)),
    };
    vec![
        Fact {
            label: "Copy rate",
            value: format!(
                "{:.1} files/s, {}/s ({basis})",
                rate.files_per_second,
                human_bytes(rate.bytes_per_second as u64)
            ),
            tone: Tone::Plain,
        },
        eta_fact(rate.eta(left), left, failed),
    ]
}

fn eta_fact(eta: Option<Duration>, queued: (u64, u64), failed: u64) -> Fact {
    let (files, bytes) = (queued.0, human_bytes(queued.1));
    let mut value = match (files, eta) {
        (0, _) => "nothing queued".to_string(),
        (_, Some(eta)) => format!(
            "{} for {} ({bytes}) queued",
            human_duration(eta),
            count(files)
        ),
        (_, None) => format!(
            "unknown, no progress measured: {} ({bytes}) queued",
            count(files)
        ),
    };
    if failed > 0 {
        value.push_str(&format!(
            "; {} failed, waiting for a retry or the next sweep",
            count(failed)
        ));
    }
    Fact {
        label: "ETA",
        value,
        tone: Tone::Plain,
    }
}

/// "1 file", "2 files".
fn count(files: u64) -> String {
    plural(files, "file")
}

/// "1 attempt", "3 attempts".
fn plural(n: u64, what: &str) -> String {
    match n {
        1 => format!("1 {what}"),
        n => format!("{n} {what}s"),
    }
}

/// Milliseconds below a second (a query's time), else as `human_duration`.
fn short(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        human_duration(d)
    }
}

fn dest_fact(health: &DestHealth, now: Instant) -> Fact {
    let ago = |checked: &Instant| human_duration(now.saturating_duration_since(*checked));
    let (value, tone) = match health {
        DestHealth::Unknown(why) => (format!("unknown ({why})"), Tone::Plain),
        DestHealth::Reachable { checked } => (
            format!("reachable (checked {} ago)", ago(checked)),
            Tone::Good,
        ),
        DestHealth::Unreachable { reason, checked } => (
            format!("UNREACHABLE: {reason} (checked {} ago)", ago(checked)),
            Tone::Bad,
        ),
    };
    Fact {
        label: "Dest",
        value,
        tone,
    }
}

fn running_facts(sample: &Sample) -> Vec<Fact> {
    if sample.running.is_empty() {
        return vec![Fact {
            label: "Running",
            value: "no sweep or sweeper batch running".into(),
            tone: Tone::Plain,
        }];
    }
    let now_ms = crate::manifest::now_ms();
    sample
        .running
        .iter()
        .map(|batch| {
            let for_ms = now_ms.saturating_sub(batch.started_at).max(0) as u64;
            Fact {
                label: "Running",
                value: format!(
                    "batch {}: {} on {} for {}, {} done",
                    batch.id,
                    batch.command,
                    batch.node,
                    human_duration(Duration::from_millis(for_ms)),
                    count(batch.tally.files)
                ),
                tone: Tone::Plain,
            }
        })
        .collect()
}

fn manifest_fact(latest: &Latest, now: Instant) -> Fact {
    let read = latest.sample.as_deref().map(|s| {
        format!(
            "read {} ago in {}",
            human_duration(now.saturating_duration_since(s.taken)),
            short(s.took)
        )
    });
    let (value, tone) = match (&latest.error, read) {
        (Some(error), Some(read)) => (format!("CANNOT READ: {error} (last {read})"), Tone::Bad),
        (Some(error), None) => (format!("CANNOT READ: {error}"), Tone::Bad),
        (None, Some(read)) => (read, Tone::Plain),
        (None, None) => ("reading".into(), Tone::Plain),
    };
    Fact {
        label: "Manifest",
        value,
        tone,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;
    use std::sync::Arc;

    fn sample() -> Sample {
        Sample {
            taken: Instant::now(),
            took: Duration::from_millis(3),
            by_state: State::ALL
                .iter()
                .map(|s| match s {
                    State::Verified => (*s, 7, 7000),
                    State::Pending => (*s, 3, 3000),
                    State::Failed => (*s, 1, 10),
                    _ => (*s, 0, 0),
                })
                .collect(),
            copy_on_read: 2,
            running: vec![],
            recent_problems: vec![crate::manifest::Problem {
                path: "a/b.txt".into(),
                state: State::Failed,
                attempts: 1,
                reason: Some("mkdir: Not a directory".into()),
            }],
            rate: None,
        }
    }

    fn picture() -> Picture {
        let latest = Latest {
            sample: Some(Arc::new(sample())),
            error: None,
        };
        let place = Place {
            manifest: "sqlite:///m.db".into(),
            source: Some("/src".into()),
            dest: Some("file:///dest".into()),
        };
        let health = DestHealth::Reachable {
            checked: Instant::now(),
        };
        Picture::of(&latest, &health, &place, Instant::now())
    }

    #[test]
    fn plain_lines_and_the_frame_say_the_same_counts() {
        let picture = picture();
        let plain = picture.plain_lines(true).join("\n");
        assert!(plain.contains("verified              7"), "{plain}");
        assert!(plain.contains("a/b.txt  (1 attempt) mkdir"), "{plain}");
        assert!(!plain.contains('\x1b'), "{plain}");

        let mut terminal = Terminal::new(TestBackend::new(120, 40)).unwrap();
        terminal.draw(|frame| picture.render(frame)).unwrap();
        let screen: String = terminal
            .backend()
            .buffer()
            .content()
            .chunks(120)
            .map(|row| row.iter().map(|c| c.symbol()).collect::<String>() + "\n")
            .collect();
        let row = |state: &str| {
            screen.lines().find_map(|line| {
                let words: Vec<&str> = line.trim_start_matches('│').split_whitespace().collect();
                (words.first() == Some(&state)).then(|| words[1].to_string())
            })
        };
        assert_eq!(row("verified").as_deref(), Some("7"), "{screen}");
        assert_eq!(row("failed").as_deref(), Some("1"), "{screen}");
        for expected in [
            "verified 7 of 11 files",
            "reachable",
            "a/b.txt",
            "mkdir: Not a directory",
            "2 files opened before their copy",
        ] {
            assert!(screen.contains(expected), "{expected:?} not on\n{screen}");
        }
    }

    #[test]
    fn a_tiny_terminal_does_not_panic() {
        let picture = picture();
        let mut terminal = Terminal::new(TestBackend::new(10, 3)).unwrap();
        terminal.draw(|frame| picture.render(frame)).unwrap();
    }
}

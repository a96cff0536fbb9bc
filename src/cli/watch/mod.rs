//! `cutoverfs status --watch`: a live view of the migration, redrawn in place on a terminal
//! until `q` or Ctrl-C, or printed as plain text blocks when stdout is not a terminal.
//!
//! Owns: the terminal while it runs (raw mode, the alternate screen, keys) and the loop that
//! redraws. The readings come from tasks of their own (`sample`: the manifest, `dest`: the dest),
//! so a slow manifest or a dest that hangs never holds up a redraw or the `q` key; the view
//! shows the latest reading and its age. It may not change anything: no manifest write, no
//! dest write, nothing but what `status` reads.

mod dest;
mod held_stderr;
mod sample;
mod view;

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::crossterm::{cursor, execute, terminal};
use ratatui::Terminal;
use tokio::sync::{mpsc, watch};

use super::exit;
use super::report::StatusArgs;
use crate::manifest::Manifest;
use dest::DestHealth;
use sample::Latest;
use view::{Picture, Place};

/// The shortest `--interval`: each reading counts the whole manifest.
const LEAST_INTERVAL: Duration = Duration::from_millis(100);

/// Recent problem files read each interval, at most (the view shows what fits).
const MOST_PROBLEMS: usize = 20;

/// `--interval`: a duration such as 500ms or 2s, at least `LEAST_INTERVAL`.
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let interval = humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration (e.g. 2s, 500ms): {e}"))?;
    if interval < LEAST_INTERVAL {
        return Err(format!(
            "{text:?} is too short: the interval must be at least {}",
            humantime::format_duration(LEAST_INTERVAL)
        ));
    }
    Ok(interval)
}

/// Runs the watch on an open manifest until `q`, Ctrl-C or SIGTERM; exits 0 then.
pub async fn run(manifest: &Manifest, args: &StatusArgs) -> Result<u8> {
    let pair = manifest.pair().await?;
    let place = Place {
        manifest: manifest.location().to_string(),
        source: pair.as_ref().map(|p| p.source.clone()),
        dest: pair.as_ref().map(|p| p.dest.clone()),
    };
    let stop = super::stop_on_signals_saying(b"");
    let (samples, sampler) = sample::start(
        manifest.clone(),
        args.interval,
        args.limit.min(MOST_PROBLEMS),
    );
    let (health, prober) = dest::start(
        args.target.dest.clone().or(place.dest.clone()),
        args.target.s3.flags(),
        args.interval,
    );
    // The readers end with the watch, before the caller closes the manifest.
    let _readers = AbortOnDrop(vec![sampler, prober]);
    let readings = Readings {
        samples,
        health,
        stop,
    };
    if std::io::stdout().is_terminal() {
        full_screen(readings, &place).await?;
    } else {
        plain(readings, &place).await;
    }
    Ok(exit::OK)
}

/// The channels the watch waits on.
struct Readings {
    samples: watch::Receiver<Latest>,
    health: watch::Receiver<DestHealth>,
    stop: watch::Receiver<bool>,
}

impl Readings {
    fn picture(&self, place: &Place) -> Picture {
        Picture::of(
            &self.samples.borrow(),
            &self.health.borrow(),
            place,
            Instant::now(),
        )
    }
}

struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Prints a plain block per reading of the manifest until SIGINT or SIGTERM.
async fn plain(mut readings: Readings, place: &Place) {
    let mut first = true;
    loop {
        tokio::select! {
            Ok(()) = readings.samples.changed() => {}
            Ok(_) = readings.stop.wait_for(|stop| *stop) => return,
        }
        let block = readings.picture(place).plain_lines(first).join("\n");
        println!("{block}\n");
        first = false;
    }
}

/// What the keyboard asks of the view.
enum Input {
    Quit,
    Redraw,
    /// The terminal cannot be read.
    Failed(std::io::Error),
}

/// Draws on the whole terminal until `q`, Esc, Ctrl-C, SIGINT or SIGTERM. Redraws on each new
/// reading, each key or resize, and every second (the ages it shows move on).
async fn full_screen(mut readings: Readings, place: &Place) -> Result<()> {
    let mut screen = FullScreen::enter()?;
    let mut keys = read_keys();
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    loop {
        let picture = readings.picture(place);
        screen
            .terminal
            .draw(|frame| picture.render(frame))
            .context("cannot draw on the terminal")?;
        tokio::select! {
            // No reader thread (it could not start): signals still stop the watch.
            Some(input) = keys.recv() => match input {
                Input::Redraw => {}
                Input::Quit => return Ok(()),
                Input::Failed(e) => return Err(e).context("cannot read the keyboard"),
            },
            Ok(()) = readings.samples.changed() => {}
            Ok(()) = readings.health.changed() => {}
            _ = ticks.tick() => {}
            Ok(_) = readings.stop.wait_for(|stop| *stop) => return Ok(()),
        }
    }
}

/// The terminal in raw mode on the alternate screen; dropping it (an error, a return, a panic
/// unwinding) gives the terminal back as it was.
struct FullScreen {
    terminal: Terminal<CrosstermBackend<std::io::Stdout>>,
    /// Log lines held while the view is up (dropped after `leave`: written below the shell's
    /// prompt line, not on the view).
    _held: Option<held_stderr::HeldStderr>,
}

impl FullScreen {
    fn enter() -> Result<FullScreen> {
        let held = match std::io::stderr().is_terminal() {
            true => Some(held_stderr::HeldStderr::hold().context("cannot hold stderr")?),
            false => None,
        };
        terminal::enable_raw_mode().context("cannot put the terminal in raw mode")?;
        restore_on_panic();
        // From here on a failure restores the terminal: `leave` undoes whatever was done.
        let entered = (|| {
            execute!(
                std::io::stdout(),
                terminal::EnterAlternateScreen,
                cursor::Hide
            )?;
            Terminal::new(CrosstermBackend::new(std::io::stdout()))
        })();
        match entered {
            Ok(terminal) => Ok(FullScreen {
                terminal,
                _held: held,
            }),
            Err(e) => {
                leave();
                Err(e).context("cannot draw on the terminal")
            }
        }
    }
}

impl Drop for FullScreen {
    fn drop(&mut self) {
        leave();
    }
}

/// Raw mode off, the cursor shown, the alternate screen left. Safe to call twice.
fn leave() {
    let _ = terminal::disable_raw_mode();
    let _ = execute!(
        std::io::stdout(),
        cursor::Show,
        terminal::LeaveAlternateScreen
    );
}

/// A panic message printed on the alternate screen would vanish with it: the terminal is
/// given back first.
fn restore_on_panic() {
    let earlier = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        leave();
        earlier(info);
    }));
}

/// Keys and resizes from a thread of its own (crossterm's reads block), until the view stops
/// listening.
fn read_keys() -> mpsc::UnboundedReceiver<Input> {
    let (tx, rx) = mpsc::unbounded_channel();
    let reader = move || {
        while !tx.is_closed() {
            // A bounded wait, so the thread notices when the view is gone.
            let input = match event::poll(Duration::from_millis(200)) {
                Ok(false) => continue,
                Ok(true) => match event::read() {
                    Ok(event) => input_of(&event),
                    Err(e) => Some(Input::Failed(e)),
                },
                Err(e) => Some(Input::Failed(e)),
            };
            let failed = matches!(input, Some(Input::Failed(_)));
            if let Some(input) = input {
                if tx.send(input).is_err() || failed {
                    return;
                }
            }
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("watch-keys".into())
        .spawn(reader)
    {
        tracing::warn!(error = %e, "cannot read the keyboard: only Ctrl-C and SIGTERM stop the watch");
    }
    rx
}

/// `q`, Esc and Ctrl-C quit (raw mode turns Ctrl-C into a key, not a signal).
fn input_of(event: &Event) -> Option<Input> {
    match event {
        Event::Key(key) if key.kind == KeyEventKind::Press => match key.code {
            KeyCode::Char('q' | 'Q') | KeyCode::Esc => Some(Input::Quit),
            KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => {
                Some(Input::Quit)
            }
            _ => None,
        },
        Event::Resize(..) => Some(Input::Redraw),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_below_the_least_or_not_durations_are_refused() {
        assert_eq!(parse_interval("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_interval("100ms"), Ok(LEAST_INTERVAL));
        for bad in ["0", "0s", "99ms", "nonsense", "", "-1s"] {
            assert!(parse_interval(bad).is_err(), "{bad:?} accepted");
        }
    }
}

//! Output when the reader may be gone. A closed stdout (`journaled status | head -1`) or a
//! closed stderr (a worker whose log collector went away) ends the process quietly with the
//! status of a Unix tool ended by SIGPIPE, 141 — never a panic (101). A worker whose stderr
//! closes stops as on SIGTERM: deliveries in flight finish, unfinished jobs are given back.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

/// The exit status after a closed pipe: 128 + SIGPIPE.
pub const PIPE_CLOSED_STATUS: u8 = 141;

static PIPE_CLOSED: AtomicBool = AtomicBool::new(false);
static CLOSED: Notify = Notify::const_new();

/// A write to stdout or stderr failed because the reader is gone.
#[derive(Debug)]
pub struct PipeClosed;

fn mark_closed() {
    if !PIPE_CLOSED.swap(true, Ordering::SeqCst) {
        CLOSED.notify_one();
    }
}

/// Whether stdout or stderr was found closed.
pub fn pipe_closed() -> bool {
    PIPE_CLOSED.load(Ordering::SeqCst)
}

/// Completes once stdout or stderr is found closed.
pub async fn closed() {
    if !pipe_closed() {
        CLOSED.notified().await;
    }
}

/// Writes one line to stdout.
pub fn line(text: impl std::fmt::Display) -> Result<(), PipeClosed> {
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{text}").and_then(|()| stdout.flush()) {
        Ok(()) => Ok(()),
        Err(_) => {
            mark_closed();
            Err(PipeClosed)
        }
    }
}

/// Writes one line to stderr; a closed stderr is noted, not reported.
pub fn error_line(text: impl std::fmt::Display) {
    if writeln!(std::io::stderr(), "{text}").is_err() {
        mark_closed();
    }
}

/// The log writer: stderr, noting (and swallowing) a closed pipe instead of panicking.
#[derive(Debug, Clone, Copy)]
pub struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if pipe_closed() {
            return Ok(buf.len());
        }
        match std::io::stderr().write(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                mark_closed();
                Ok(buf.len())
            }
            other => other,
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match std::io::stderr().flush() {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                mark_closed();
                Ok(())
            }
            other => other,
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Stderr {
    type Writer = Stderr;

    fn make_writer(&'a self) -> Self::Writer {
        Stderr
    }
}

//! A command's output on standard output. `println!` panics when the reader has gone away (`|
//! head`, a pager quit early); [`outln!`](crate::outln) and [`out!`](crate::out) end the command
//! quietly instead, with status 0, as the reader asked for no more. Any other failure to write
//! is still a panic: the output would be incomplete without a word. Also the exit statuses
//! every command shares.

use std::fmt;
use std::io::{self, Write as _};

/// Exit status of a command that failed itself (bad configuration, a service out of reach).
pub const EXIT_ERROR: u8 = 3;
/// Exit status of a command whose arguments are not what it takes.
pub const EXIT_USAGE: u8 = 64;

/// An error and its causes as a command shows them, one after another as `{:#}` does, less each
/// cause whose text the one before already ends with: many errors repeat their source's text in
/// their own.
pub fn error_text(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if text.ends_with(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

/// Writes `args` to standard output, and a newline if `newline`.
pub fn write(args: fmt::Arguments<'_>, newline: bool) {
    let mut stdout = io::stdout().lock();
    let written = if newline {
        writeln!(stdout, "{args}")
    } else {
        write!(stdout, "{args}")
    };
    match written.and_then(|()| stdout.flush()) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => panic!("failed printing to stdout: {e}"),
    }
}

/// `println!` for a command's output (see [`crate::output`]).
#[macro_export]
macro_rules! outln {
    () => {
        $crate::output::write(format_args!(""), true)
    };
    ($($arg:tt)*) => {
        $crate::output::write(format_args!($($arg)*), true)
    };
}

/// `print!` for a command's output (see [`crate::output`]).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::write(format_args!($($arg)*), false)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("reading the table: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn a_cause_is_shown_once_even_where_its_error_repeats_it() {
        let io = std::io::Error::other("no such table: accounts");
        let error = anyhow::Error::new(Repeats(io)).context("listing accounts");
        assert_eq!(
            error_text(&error),
            "listing accounts: reading the table: no such table: accounts"
        );
        let plain = anyhow::anyhow!("the broker went away").context("publishing");
        assert_eq!(error_text(&plain), format!("{plain:#}"));
    }
}

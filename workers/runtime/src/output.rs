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

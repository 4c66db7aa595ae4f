//! Running commands: print each one as `$ program args`, then run it.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;

use crate::Result;

/// `cargo`, run from the workspace root.
pub fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(crate::root());
    cmd
}

/// The command as a shell line, for printing.
pub fn display(cmd: &Command) -> String {
    let mut line = quote(&cmd.get_program().to_string_lossy());
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&quote(&arg.to_string_lossy()));
    }
    line
}

fn quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@+%".contains(c));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Print `$ command` before running it.
pub fn announce(cmd: &Command) {
    println!("$ {}", display(cmd));
    let _ = std::io::stdout().flush();
}

/// Print and run; any exit status but 0 is an error.
pub fn run(cmd: &mut Command) -> Result {
    let status = status(cmd)?;
    check(cmd, status)
}

/// Print and run; return the exit status, whatever it is.
pub fn status(cmd: &mut Command) -> Result<ExitStatus> {
    announce(cmd);
    cmd.status()
        .map_err(|e| format!("cannot run `{}`: {e}", display(cmd)))
}

/// Turn a non-zero exit status into an error naming the command.
pub fn check(cmd: &Command, status: ExitStatus) -> Result {
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{}` failed ({status})", display(cmd)))
    }
}

/// Run without printing anything, for checks: true when it exits with 0.
pub fn quietly_succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Run without printing it and return its standard output, for queries.
pub fn output(cmd: &mut Command) -> Result<(ExitStatus, String)> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `{}`: {e}", display(cmd)))?;
    Ok((
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

/// Which stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Print and run, passing every line of its output through to ours (in the
/// order the lines arrive) and to `on_line`.
pub fn run_streaming(cmd: &mut Command, mut on_line: impl FnMut(Stream, &str)) -> Result {
    announce(cmd);
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run `{}`: {e}", display(cmd)))?;
    let (tx, rx) = mpsc::channel();
    let readers = [
        forward(child.stdout.take(), Stream::Stdout, tx.clone()),
        forward(child.stderr.take(), Stream::Stderr, tx),
    ];
    for (stream, line) in rx {
        match stream {
            Stream::Stdout => println!("{line}"),
            Stream::Stderr => eprintln!("{line}"),
        }
        on_line(stream, &line);
    }
    for reader in readers {
        let _ = reader.join();
    }
    let status = child
        .wait()
        .map_err(|e| format!("cannot wait for `{}`: {e}", display(cmd)))?;
    check(cmd, status)
}

fn forward(
    pipe: Option<impl Read + Send + 'static>,
    stream: Stream,
    tx: mpsc::Sender<(Stream, String)>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let Some(pipe) = pipe else { return };
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf);
                    let line = line.trim_end_matches(['\n', '\r']).to_string();
                    if tx.send((stream, line)).is_err() {
                        return;
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_only_what_needs_it() {
        let mut cmd = Command::new("cargo");
        cmd.args(["fmt", "--all", "--", "--check", "a b", "it's", ""]);
        assert_eq!(
            display(&cmd),
            r"cargo fmt --all -- --check 'a b' 'it'\''s' ''"
        );
    }

    #[test]
    fn streaming_passes_lines_and_reports_failure() {
        let mut seen = Vec::new();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo err >&2; exit 3"]);
        let result = run_streaming(&mut cmd, |s, l| seen.push((s, l.to_string())));
        assert!(result.unwrap_err().contains("failed"));
        seen.sort_by_key(|(s, _)| *s == Stream::Stderr);
        assert_eq!(
            seen,
            vec![
                (Stream::Stdout, "out".to_string()),
                (Stream::Stderr, "err".to_string())
            ]
        );
    }
}

//! Running commands: print each one as `$ program args`, then run it.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, ExitStatus, Stdio};

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

/// Print and run with its stdout and stderr joined in one pipe, so that lines
/// keep the order they were written in (cargo's `Running ...` on stderr, then
/// the test binary's results on stdout). Every line goes to our stdout and to
/// `on_line`.
pub fn run_streaming(cmd: &mut Command, mut on_line: impl FnMut(&str)) -> Result {
    announce(cmd);
    let (reader, writer) = std::io::pipe().map_err(|e| format!("cannot create a pipe: {e}"))?;
    let writer2 = writer
        .try_clone()
        .map_err(|e| format!("cannot duplicate a pipe: {e}"))?;
    let spawned = cmd.stdout(writer).stderr(writer2).spawn();
    // Drop the command's copies of the write end, or the read below never ends.
    cmd.stdout(Stdio::inherit()).stderr(Stdio::inherit());
    let mut child = spawned.map_err(|e| format!("cannot run `{}`: {e}", display(cmd)))?;
    let mut reader = BufReader::new(reader);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) => break,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf);
                let line = line.trim_end_matches(['\n', '\r']);
                println!("{line}");
                on_line(line);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("cannot read the output of `{}`: {e}", display(cmd)));
            }
        }
    }
    let status = child
        .wait()
        .map_err(|e| format!("cannot wait for `{}`: {e}", display(cmd)))?;
    check(cmd, status)
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
    fn streaming_keeps_the_order_of_both_streams_and_reports_failure() {
        let mut seen = Vec::new();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo one; echo two >&2; echo three; exit 3"]);
        let result = run_streaming(&mut cmd, |l| seen.push(l.to_string()));
        assert!(result.unwrap_err().contains("failed"));
        assert_eq!(seen, ["one", "two", "three"]);
    }
}

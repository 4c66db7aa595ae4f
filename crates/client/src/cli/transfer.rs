//! `kvm-agent-ctl cp` for local files: chunked, pipelined, sha256-verified
//! transfers ([`kvm_agent_client::files`]) with a progress bar on a terminal
//! (bytes, rate, ETA) and one plain line otherwise.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kvm_agent_client::files::{self, TransferError, TransferOptions, Transferred};
use kvm_agent_client::Client;

use super::{file_name, print_json, CpArgs, Failure, Outcome, EXIT_OK};

/// Draws the progress bar on standard error, at most 10 times a second.
struct Bar {
    label: String,
    start: Instant,
    last: Option<Instant>,
    tty: bool,
}

fn human(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

impl Bar {
    fn new(label: String) -> Self {
        Self {
            label,
            start: Instant::now(),
            last: None,
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn update(&mut self, done: u64, total: u64) {
        if !self.tty {
            return;
        }
        let now = Instant::now();
        if self
            .last
            .is_some_and(|l| now - l < Duration::from_millis(100) && done < total)
        {
            return;
        }
        self.last = Some(now);
        let secs = (now - self.start).as_secs_f64().max(1e-3);
        let rate = done as f64 / secs;
        let frac = if total == 0 {
            1.0
        } else {
            done as f64 / total as f64
        };
        let width = 30;
        let filled = ((frac * width as f64) as usize).min(width);
        let eta = if rate > 0.0 && total > done {
            let s = ((total - done) as f64 / rate) as u64;
            format!("{}:{:02}", s / 60, s % 60)
        } else {
            "0:00".into()
        };
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r{} [{}{}] {:>3.0}% {} / {} {}/s ETA {}\x1b[K",
            self.label,
            "#".repeat(filled),
            "-".repeat(width - filled),
            frac * 100.0,
            human(done as f64),
            human(total as f64),
            human(rate),
            eta
        );
        let _ = err.flush();
    }

    fn finish(&self) {
        if self.tty {
            let _ = writeln!(std::io::stderr());
        }
    }
}

fn options(args: &CpArgs) -> TransferOptions {
    TransferOptions {
        overwrite: args.overwrite,
        mode: args.mode,
        create_parents: args.parents,
        resume: args.resume,
        ..TransferOptions::default()
    }
}

fn failure(e: TransferError) -> Failure {
    match e {
        TransferError::Client(e) => Failure::Client(e),
        TransferError::Mismatch(m) => Failure::Protocol(m),
        e @ (TransferError::Local { .. } | TransferError::Exists(_)) => {
            Failure::Usage(e.to_string())
        }
    }
}

fn report(json: bool, from: &str, to: &str, t: &Transferred, secs: f64) {
    if json {
        print_json(&serde_json::json!({
            "from": from, "to": to, "size": t.size, "sha256": t.sha256,
            "resumed_from": t.resumed_from,
        }));
    } else {
        let resumed = if t.resumed_from > 0 {
            format!(" (resumed at {} bytes)", t.resumed_from)
        } else {
            String::new()
        };
        println!(
            "{from} -> {to}: {} bytes, sha256 {} verified, {}/s{resumed}",
            t.size,
            t.sha256,
            human((t.size - t.resumed_from) as f64 / secs.max(1e-3))
        );
    }
}

/// `cp LOCAL guest:/PATH`.
pub(super) async fn upload(client: &Client, args: &CpArgs, guest: &str, json: bool) -> Outcome {
    let mut bar = Bar::new(format!("{} -> guest:{guest}", args.src));
    let start = Instant::now();
    let r = files::upload(
        client,
        std::path::Path::new(&args.src),
        guest,
        &options(args),
        &mut |d, t| bar.update(d, t),
    )
    .await;
    bar.finish();
    let t = r.map_err(failure)?;
    report(
        json,
        &args.src,
        &format!("guest:{guest}"),
        &t,
        start.elapsed().as_secs_f64(),
    );
    Ok(EXIT_OK)
}

/// `cp guest:/PATH LOCAL`.
pub(super) async fn download(client: &Client, args: &CpArgs, guest: &str, json: bool) -> Outcome {
    let mut dest = PathBuf::from(&args.dst);
    if dest.is_dir() || args.dst.ends_with('/') {
        let name = file_name(guest)
            .ok_or_else(|| Failure::Usage(format!("guest:{guest} names no file to copy")))?;
        dest = dest.join(name);
    }
    let mut bar = Bar::new(format!("guest:{guest} -> {}", dest.display()));
    let start = Instant::now();
    let r = files::download(client, guest, &dest, &options(args), &mut |d, t| {
        bar.update(d, t)
    })
    .await;
    bar.finish();
    let t = r.map_err(failure)?;
    report(
        json,
        &format!("guest:{guest}"),
        &dest.display().to_string(),
        &t,
        start.elapsed().as_secs_f64(),
    );
    Ok(EXIT_OK)
}

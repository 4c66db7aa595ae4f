//! Inside a guest: both agents in the same busybox guest under QEMU, each on
//! its own virtio-serial port, driven from this machine through QEMU's
//! chardev sockets: round trips and a file both ways.

use std::process::Command;
use std::time::{Duration, Instant};

use kvm_agent_vmtest::{accel, GuestConfig, Vm};

use crate::agents::QGA_BLOCKED;
use crate::files::{make_file, ours_both_ways, qga_both_ways, size_text};
use crate::report::{percentiles, Better, Fig, Report};
use crate::wire::{Kva, Qga};
use crate::Plan;

type Res<T = ()> = Result<T, String>;

/// QEMU guests the machine may run at once, everyone's together.
const MACHINE_GUESTS: usize = 2;

fn qemu_running() -> usize {
    Command::new("pgrep")
        .args(["-c", "qemu-system"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(0)
}

/// Wait until fewer than [`MACHINE_GUESTS`] QEMU processes run (other
/// people's included).
fn wait_for_a_guest_slot() {
    let mut said = false;
    while qemu_running() >= MACHINE_GUESTS {
        if !said {
            println!("bench: {MACHINE_GUESTS} QEMU guests already run on this machine; waiting for one to end");
            said = true;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// Chunk sizes for the guest's transfers: ours (bytes, in flight), qemu-ga's
/// (bytes, in flight).
#[derive(Debug, Clone, Copy)]
pub struct GuestChunks {
    pub ours: (usize, usize),
    pub qga: (usize, usize),
}

pub fn guest(
    plan: &Plan,
    mut chunks: GuestChunks,
    local_dir: &std::path::Path,
    report: &mut Report,
) -> Res {
    // Over virtio-serial, qemu-ga 10.0 stopped answering with two
    // guest-file-write calls in flight (64 KiB and 1 MiB chunks alike; no
    // answer in 300 s), where on a unix socket it handles them: one call at
    // a time in the guest. KVA_BENCH_GUEST_QGA=CHUNK_KIB,DEPTH overrides
    // this, for experiments.
    chunks.qga.1 = 1;
    if let Ok(v) = std::env::var("KVA_BENCH_GUEST_QGA") {
        if let Some((c, d)) = v.split_once(',') {
            if let (Ok(c), Ok(d)) = (c.parse::<usize>(), d.parse()) {
                chunks.qga = (c * 1024, d);
            }
        }
    }
    wait_for_a_guest_slot();
    let started = Instant::now();
    let vm = Vm::boot(
        "bench",
        GuestConfig {
            // xtask/src/bench/guest-agent.toml: files in /tmp, audit to a file.
            agent_config: "bench",
            // virtio_console at boot: qemu-ga looks for its port right away.
            late: "",
            memory_mib: 1024,
            tmp_mib: 200,
            log_level: "warn",
            qemu_ga: Some(QGA_BLOCKED),
            ..GuestConfig::default()
        },
    );
    vm.wait_port_open();
    vm.wait_qga_port_open();
    let boot = started.elapsed();

    let n = plan.guest_pings;
    let mut kva = Kva::connect(&vm.serial_socket()).map_err(|e| format!("guest agent: {e}"))?;
    let mut so = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let t = Instant::now();
        kva.call_raw("ping", None)
            .map_err(|e| format!("guest ping: {e}"))?;
        if i >= n / 10 {
            so.push(t.elapsed());
        }
    }
    drop(kva);
    let mut q = Qga::connect(&vm.qga_socket()).map_err(|e| format!("guest qemu-ga: {e}"))?;
    let mut sq = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let t = Instant::now();
        q.call_raw("guest-ping", None)
            .map_err(|e| format!("guest guest-ping: {e}"))?;
        if i >= n / 10 {
            sq.push(t.elapsed());
        }
    }
    drop(q);
    let (o50, o99) = percentiles(&mut so);
    let (q50, q99) = percentiles(&mut sq);
    let a = accel().to_uppercase();
    report.row(
        format!("in a {a} guest, virtio-serial: ping round trip p50 ({n} sequential)"),
        Fig::time(o50),
        Fig::time(q50),
        Better::Lower,
    );
    report.row(
        format!("in a {a} guest: ping round trip p99"),
        Fig::time(o99),
        Fig::time(q99),
        Better::Lower,
    );

    let bytes = plan.guest_mib << 20;
    let local = local_dir.join("guest-source.bin");
    let back = local_dir.join("guest-back.bin");
    let sha = make_file(&local, bytes).map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let (ou, od) = ours_both_ways(
        &rt,
        vm.serial_target(),
        None,
        &local,
        "/tmp/ours.bin",
        &back,
        &sha,
        chunks.ours.0 as u32,
        chunks.ours.1,
    )
    .map_err(|e| format!("guest, ours: {e}"))?;
    let (qu, qd) = qga_both_ways(
        &vm.qga_socket(),
        None,
        &local,
        "/tmp/qga.bin",
        None,
        &back,
        &sha,
        chunks.qga.0,
        chunks.qga.1,
    )
    .map_err(|e| format!("guest, qemu-ga: {e}"))?;
    let _ = std::fs::remove_file(&local);
    let _ = std::fs::remove_file(&back);
    let label = |(c, d): (usize, usize)| format!("{} chunks, {d} in flight", size_text(c));
    for (what, o, q) in [("write", ou, qu), ("read", od, qd)] {
        report.row(
            format!(
                "in a {a} guest: file {what}, {} MiB, sha256 verified (ours {}; qemu-ga {})",
                plan.guest_mib,
                label(chunks.ours),
                label(chunks.qga)
            ),
            Fig::rate(o.mib_per_s(bytes as u64), "MiB/s"),
            Fig::rate(q.mib_per_s(bytes as u64), "MiB/s"),
            Better::Higher,
        );
    }
    report.detail(
        "Inside a guest",
        format!(
            "One busybox guest (Debian's kernel, 1 vCPU, 1 GiB, QEMU with -accel {}) runs both \
             agents at once: ours on the port `org.kvmmanager.agent.0`, qemu-ga (the same \
             binary and libraries as above, copied into the initramfs) on \
             `org.qemu.guest_agent.0`, each on its own QEMU chardev socket. The guest booted \
             and opened both ports in {:.1} s. Files go to the guest's tmpfs /tmp; the \
             upload's sha256 is checked by our agent at close, and both agents' files are \
             read back and checked on this side. qemu-ga gets one call at a time here: with \
             two guest-file-write calls in flight over virtio-serial it stopped answering \
             (no answer within 300 s, at 64 KiB and 1 MiB chunks), while on a unix socket \
             it takes them. Under TCG the guest's CPU is emulated (the default qemu64 model, without SHA-NI or AVX2 for \
             base64), so these rates say more about the emulation than about the agents.\n",
            accel(),
            boot.as_secs_f64()
        ),
    );
    Ok(())
}

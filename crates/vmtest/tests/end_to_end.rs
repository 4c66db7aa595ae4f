//! exec with an allowlist and a 64 MiB file both ways, through the real
//! client, in a busybox guest whose agent runs with the `e2e` configuration
//! (xtask/src/vm/configs/e2e.toml: exec on, `uname` and `sha256sum` allowed,
//! `ls` only as `ls -l /tmp`, file transfers confined to /tmp). See the
//! crate's doc for how to run it.

use std::time::Instant;

use kvm_agent_client::files::{download, upload, TransferOptions};
use kvm_agent_client::protocol::codec::sha256_hex;
use kvm_agent_client::protocol::methods::exec::ExecParams;
use kvm_agent_client::Client;
use kvm_agent_vmtest::{check_agent, runtime, GuestConfig, Vm};

/// The file's size: 64 MiB.
const FILE_BYTES: usize = 64 << 20;

/// Pseudo-random bytes (xorshift64*): incompressible, reproducible.
fn test_data(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn exec(command: &str, args: &[&str]) -> ExecParams {
    ExecParams {
        command: command.into(),
        args: args.iter().map(|a| (*a).to_string()).collect(),
        ..ExecParams::default()
    }
}

#[test]
fn exec_allowlist_and_a_64_mib_file_both_ways() {
    let vm = Vm::boot(
        "end_to_end",
        GuestConfig {
            agent_config: "e2e",
            late: "",
            // The file lives in the guest's RAM, on a tmpfs /tmp; the agent
            // holds a few 1 MiB chunks besides.
            memory_mib: 512,
            tmp_mib: 200,
            log_level: "info",
            ..GuestConfig::default()
        },
    );
    vm.wait_port_open();
    let work = std::env::temp_dir().join(format!("kva-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let local = work.join("big.bin");
    let back = work.join("back.bin");
    let data = test_data(FILE_BYTES);
    let sha = sha256_hex(&data);
    std::fs::write(&local, &data).unwrap();
    drop(data);

    runtime().block_on(async {
        let client = Client::connect(vm.serial_target(), Vm::client_options())
            .await
            .expect("connect");
        check_agent(&client).await;
        let caps = client.get_capabilities().await.expect("caps");
        for m in ["exec", "file_open", "file_write", "file_read", "file_close"] {
            assert!(caps.methods.iter().any(|x| x == m), "{m} not offered");
        }

        // Allowed: a bare name from the fixed search path.
        let uname = client
            .exec(&exec("uname", &["-r"]))
            .await
            .expect("exec uname -r");
        assert_eq!(uname.exit_code, Some(0), "{uname:?}");
        assert!(
            uname.stdout.data.trim().ends_with("-amd64"),
            "uname -r in the guest: {uname:?}"
        );
        vm.log(&format!("exec uname -r: {}", uname.stdout.data.trim()));
        // Allowed with exactly these arguments, and refused with others.
        let ls = client
            .exec(&exec("ls", &["-l", "/tmp"]))
            .await
            .expect("exec ls -l /tmp");
        assert_eq!(ls.exit_code, Some(0), "{ls:?}");
        let ls_other = client
            .exec(&exec("ls", &["-l", "/etc"]))
            .await
            .expect_err("ls -l /etc is not allowed");
        assert_eq!(ls_other.code(), Some(-32000), "{ls_other}");
        // Not on the allowlist at all.
        for (cmd, args) in [
            ("/bin/sh", &["-c", "id"][..]),
            ("cat", &["/etc/kva-modules"]),
        ] {
            let refused = client
                .exec(&exec(cmd, args))
                .await
                .expect_err("not on the allowlist");
            assert_eq!(refused.code(), Some(-32000), "{cmd}: {refused}");
        }
        vm.log(
            "exec: uname and `ls -l /tmp` allowed; `ls -l /etc`, /bin/sh and cat refused (-32000)",
        );

        // 64 MiB to the guest, with the library's chunked file_open /
        // file_write / file_close (sha256 checked by the agent at close).
        let opts = TransferOptions::default();
        let started = Instant::now();
        let up = upload(&client, &local, "/tmp/big.bin", &opts, &mut |_, _| {})
            .await
            .expect("upload 64 MiB");
        let up_secs = started.elapsed().as_secs_f64();
        assert_eq!(up.size, FILE_BYTES as u64);
        assert_eq!(up.sha256, sha);
        // The guest's own sha256sum of what landed.
        let sum = client
            .exec(&exec("sha256sum", &["/tmp/big.bin"]))
            .await
            .expect("exec sha256sum in the guest");
        assert_eq!(sum.exit_code, Some(0), "{sum:?}");
        assert_eq!(
            sum.stdout.data.split_whitespace().next(),
            Some(sha.as_str()),
            "the guest's sha256sum of the uploaded file"
        );

        // And back, with file_read.
        let started = Instant::now();
        let down = download(&client, "/tmp/big.bin", &back, &opts, &mut |_, _| {})
            .await
            .expect("download 64 MiB");
        let down_secs = started.elapsed().as_secs_f64();
        assert_eq!(down.size, FILE_BYTES as u64);
        assert_eq!(down.sha256, sha);
        vm.log(&format!(
            "64 MiB to the guest in {up_secs:.1} s ({:.1} MiB/s), back in {down_secs:.1} s \
             ({:.1} MiB/s); sha256 {sha} on the host, in the guest (sha256sum) and after the \
             round trip",
            64.0 / up_secs,
            64.0 / down_secs
        ));
    });
    let returned = std::fs::read(&back).expect("the downloaded file");
    assert_eq!(returned.len(), FILE_BYTES);
    assert_eq!(sha256_hex(&returned), sha, "the file came back changed");
    let _ = std::fs::remove_dir_all(&work);
}

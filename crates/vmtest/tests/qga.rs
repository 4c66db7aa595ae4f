//! The qemu-guest-agent front end in a real guest: the agent serves
//! qemu-ga's protocol on the virtio-serial port `org.qemu.guest_agent.0`
//! (its configuration `qga`, xtask/src/vm/configs/qga.toml) beside its own
//! port, and the host talks to it through QEMU's chardev socket the way
//! libvirt does (0xFF, guest-sync-delimited, then one command at a time).
//! See the crate's doc for how to run this.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use kvm_agent_client::protocol::codec::base64_decode;
use kvm_agent_client::Client;
use kvm_agent_vmtest::{check_agent, runtime, GuestConfig, Vm, TIMEOUT};
use serde_json::{json, Value};

/// A host end of qemu-ga's port.
struct Qga {
    s: UnixStream,
    buf: Vec<u8>,
}

impl Qga {
    fn line(&mut self) -> Vec<u8> {
        loop {
            if let Some(at) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=at).collect();
                return line[..line.len() - 1].to_vec();
            }
            let mut chunk = [0u8; 65536];
            let n = self.s.read(&mut chunk).expect("a reply from the guest");
            assert!(n > 0, "QEMU closed the chardev");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn reply(&mut self) -> (bool, Value) {
        let line = self.line();
        let delimited = line.first() == Some(&0xFF);
        let text: Vec<u8> = line.into_iter().filter(|b| *b != 0xFF).collect();
        (delimited, serde_json::from_slice(&text).expect("JSON"))
    }

    fn call(&mut self, request: &str) -> Value {
        self.s.write_all(request.as_bytes()).unwrap();
        self.reply().1
    }
}

#[test]
fn qga_front_end_on_qemu_gas_port() {
    let mut vm = Vm::boot(
        "qga_front_end_on_qemu_gas_port",
        GuestConfig {
            agent_config: "qga",
            qga_port: true,
            ..GuestConfig::default()
        },
    );
    vm.wait_qga_port_open();
    let s = UnixStream::connect(vm.qga_socket()).expect("connect to the QGA chardev");
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut q = Qga { s, buf: Vec::new() };
    // As libvirt and qemu-ga's documentation ask: 0xFF, then a delimited
    // sync, ignoring everything before its answer.
    q.s.write_all(b"\xff{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":1234}}")
        .unwrap();
    loop {
        let (delimited, v) = q.reply();
        if delimited && v["return"] == 1234 {
            break;
        }
    }
    assert_eq!(
        q.call(r#"{"execute":"guest-ping","id":1}"#),
        json!({"return": {}, "id": 1})
    );
    let info = q.call(r#"{"execute":"guest-info"}"#);
    let enabled = |name: &str| {
        info["return"]["supported_commands"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("{name} not in {info}"))["enabled"]
            .clone()
    };
    assert_eq!(enabled("guest-exec"), json!(true));
    assert_eq!(enabled("guest-fsfreeze-freeze"), json!(false));
    let os = q.call(r#"{"execute":"guest-get-osinfo"}"#);
    let release = os["return"]["kernel-release"]
        .as_str()
        .unwrap_or_else(|| panic!("{os}"))
        .to_owned();
    let ifs = q.call(r#"{"execute":"guest-network-get-interfaces"}"#);
    assert!(
        ifs["return"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"] == "lo"),
        "{ifs}"
    );
    let cpus = q.call(r#"{"execute":"guest-get-vcpus"}"#);
    assert_eq!(cpus["return"].as_array().unwrap().len(), 1, "{cpus}");
    for c in [
        "guest-get-host-name",
        "guest-get-timezone",
        "guest-get-time",
        "guest-get-load",
        "guest-get-users",
        "guest-get-fsinfo",
    ] {
        let r = q.call(&format!(r#"{{"execute":"{c}"}}"#));
        assert!(r.get("return").is_some(), "{c}: {r}");
    }
    // guest-exec of an allowed command, output after exit.
    let started = q.call(r#"{"execute":"guest-exec","arguments":{"path":"uname","arg":["-r"],"capture-output":true}}"#);
    let pid = started["return"]["pid"]
        .as_i64()
        .unwrap_or_else(|| panic!("{started}"));
    let status = loop {
        let s = q.call(&format!(
            r#"{{"execute":"guest-exec-status","arguments":{{"pid":{pid}}}}}"#
        ));
        if s["return"]["exited"] == true {
            break s["return"].clone();
        }
    };
    assert_eq!(status["exitcode"], 0, "{status}");
    let out = base64_decode(status["out-data"].as_str().unwrap().as_bytes()).unwrap();
    assert_eq!(String::from_utf8(out).unwrap().trim(), release);
    let refused = q.call(r#"{"execute":"guest-exec","arguments":{"path":"ls"}}"#);
    assert_eq!(refused["error"]["class"], "GenericError", "{refused}");
    // The native protocol is served on its own port at the same time.
    vm.wait_port_open();
    runtime().block_on(async {
        let client = Client::connect(vm.serial_target(), Vm::client_options())
            .await
            .expect("connect");
        check_agent(&client).await;
    });
    // guest-shutdown: no reply; the guest powers off through its init.
    q.s.write_all(br#"{"execute":"guest-shutdown"}"#).unwrap();
    let status = vm.wait_qemu_exit();
    vm.log(&format!("QEMU exited ({status}) after guest-shutdown"));
    let console = vm.console().lines_since(0).join("\n");
    assert!(
        console.contains("KVA-INIT poweroff requested"),
        "guest-shutdown did not go through busybox poweroff and init"
    );
}

//! qemu-guest-agent's wire types: the request envelope, errors, and the
//! arguments and results of the commands served, with the member names and
//! types of QEMU's `qga/qapi-schema.json` (optional members are left out
//! when absent, as QEMU does).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// QEMU's error classes (`qapi/error.json`). qemu-ga uses these two.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ErrorClass {
    /// Everything but an unknown or disabled command.
    GenericError,
    /// No such command, or the command is disabled.
    CommandNotFound,
}

/// An error reply: `{"error": {"class", "desc"}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct QgaError {
    /// The class hosts act on.
    pub class: ErrorClass,
    /// For people.
    pub desc: String,
}

impl QgaError {
    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    /// An unknown command, worded as QEMU words it.
    pub fn not_found(name: &str) -> Self {
        Self {
            class: ErrorClass::CommandNotFound,
            desc: format!("The command {name} has not been found"),
        }
    }

    /// A disabled command, worded as qemu-ga words one blocked with
    /// `--block-rpcs` (hosts treat it as unsupported).
    pub fn disabled(name: &str) -> Self {
        Self {
            class: ErrorClass::CommandNotFound,
            desc: format!("Command {name} has been disabled: the command is not allowed"),
        }
    }
}

/// A request that passed the envelope checks.
#[derive(Debug)]
pub struct Envelope {
    /// `execute`.
    pub execute: String,
    /// `arguments` (an object; absent: empty).
    pub arguments: Map<String, Value>,
    /// `id`, echoed in the reply when present (any JSON value).
    pub id: Option<Value>,
}

/// Check a message as QEMU's dispatcher does, in its order. On failure, the
/// error and the id when one could be read (QEMU echoes it).
pub fn envelope(message: &[u8]) -> Result<Envelope, (QgaError, Option<Value>)> {
    let value: Value = serde_json::from_slice(message).map_err(|e| {
        let mut detail = e.to_string();
        if let Some(at) = detail.rfind(" at line ") {
            detail.truncate(at);
        }
        (
            QgaError::generic(format!("JSON parse error, {detail}")),
            None,
        )
    })?;
    let Value::Object(mut obj) = value else {
        return Err((QgaError::generic("QMP input must be a JSON object"), None));
    };
    let id = obj.remove("id");
    let fail = |desc: String| (QgaError::generic(desc), id.clone());
    let mut execute = None;
    let mut arguments = Map::new();
    for (key, value) in obj {
        match key.as_str() {
            "execute" => match value {
                Value::String(s) => execute = Some(s),
                _ => return Err(fail("QMP input member 'execute' must be a string".into())),
            },
            "arguments" => match value {
                Value::Object(m) => arguments = m,
                _ => {
                    return Err(fail(
                        "QMP input member 'arguments' must be an object".into(),
                    ))
                }
            },
            other => return Err(fail(format!("QMP input member '{other}' is unexpected"))),
        }
    }
    let Some(execute) = execute else {
        return Err(fail("QMP input lacks member 'execute'".into()));
    };
    Ok(Envelope {
        execute,
        arguments,
        id,
    })
}

/// Decode `arguments` into `T` (which denies unknown members), with
/// QEMU's wording for the usual mistakes.
pub fn arguments<T: serde::de::DeserializeOwned>(args: Map<String, Value>) -> Result<T, QgaError> {
    serde_json::from_value(Value::Object(args)).map_err(|e| {
        let text = e.to_string();
        let quoted = |prefix: &str| {
            text.strip_prefix(prefix)
                .and_then(|r| r.split('`').next())
                .map(str::to_owned)
        };
        if let Some(field) = quoted("missing field `") {
            QgaError::generic(format!("Parameter '{field}' is missing"))
        } else if let Some(field) = quoted("unknown field `") {
            QgaError::generic(format!("Parameter '{field}' is unexpected"))
        } else {
            QgaError::generic(format!("Invalid parameter: {text}"))
        }
    })
}

/// Commands without arguments.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}

/// `guest-sync`, `guest-sync-delimited`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncArgs {
    /// Echoed back.
    pub id: i64,
}

/// `guest-shutdown`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownArgs {
    /// `halt`, `powerdown` (default) or `reboot`.
    pub mode: Option<String>,
}

/// `GuestAgentInfo`.
#[derive(Debug, Serialize)]
pub struct AgentInfo {
    /// Agent version.
    pub version: String,
    /// Every command, with whether it is enabled.
    pub supported_commands: Vec<CommandInfo>,
}

/// `GuestAgentCommandInfo`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CommandInfo {
    /// Command name.
    pub name: &'static str,
    /// Whether it may be called.
    pub enabled: bool,
    /// Whether it replies on success (false for guest-shutdown).
    pub success_response: bool,
}

/// `GuestOSInfo`.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct OsInfo {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_release: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pretty_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version_id: Option<String>,
}

/// `GuestHostName`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct HostName {
    pub host_name: String,
}

/// `GuestUser`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct User {
    pub user: String,
    /// Seconds since the epoch, with a fraction.
    pub login_time: f64,
}

/// `GuestTimezone`.
#[derive(Debug, Serialize)]
pub struct Timezone {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Seconds east of UTC.
    pub offset: i64,
}

/// `GuestNetworkInterface`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct NetworkInterface {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hardware_address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_addresses: Option<Vec<IpAddress>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub statistics: Option<NetworkStats>,
}

/// `GuestIpAddress`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct IpAddress {
    pub ip_address: String,
    /// `ipv4` or `ipv6`.
    pub ip_address_type: &'static str,
    pub prefix: i64,
}

/// `GuestNetworkInterfaceStat`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct NetworkStats {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_errs: u64,
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_errs: u64,
    pub tx_dropped: u64,
}

/// `GuestLoadAverage`.
#[derive(Debug, Serialize)]
pub struct Load {
    pub load1m: f64,
    pub load5m: f64,
    pub load15m: f64,
}

/// `GuestLogicalProcessor`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LogicalProcessor {
    pub logical_id: i64,
    pub online: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub can_offline: Option<bool>,
}

/// `GuestCpuStats` of type `linux` (times in milliseconds).
#[derive(Debug, Default, PartialEq, Eq, Serialize)]
pub struct CpuStats {
    /// Always `linux`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub cpu: i64,
    pub user: u64,
    pub nice: u64,
    pub system: u64,
    pub idle: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iowait: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub irq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub softirq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steal: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guestnice: Option<u64>,
}

/// `GuestDiskStatsInfo`.
#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct DiskStatsInfo {
    pub name: String,
    pub major: u64,
    pub minor: u64,
    pub stats: DiskStats,
}

/// `GuestDiskStats` (every member optional in the schema; Linux has them
/// all, the discard and flush ones on kernels since 4.18 and 5.5).
#[derive(Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DiskStats {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_ios: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_merges: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_sectors: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_ticks: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_ios: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_merges: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_sectors: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_ticks: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ios_pgr: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_ticks: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_ticks: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discard_ios: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discard_merges: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discard_sectors: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discard_ticks: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flush_ios: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flush_ticks: Option<u64>,
}

/// `GuestPCIAddress`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PciAddress {
    pub domain: i64,
    pub bus: i64,
    pub slot: i64,
    pub function: i64,
}

/// `GuestDiskAddress`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DiskAddress {
    pub pci_controller: PciAddress,
    /// A `GuestDiskBusType`: `virtio`, `scsi`, `ide`, `sata`, `nvme`,
    /// `usb`, `unknown`...
    pub bus_type: &'static str,
    pub bus: i64,
    pub target: i64,
    pub unit: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dev: Option<String>,
}

/// `GuestFilesystemInfo`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct FilesystemInfo {
    pub name: String,
    pub mountpoint: String,
    #[serde(rename = "type")]
    pub fs_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_bytes_privileged: Option<u64>,
    pub disk: Vec<DiskAddress>,
}

/// `GuestDiskInfo`.
#[derive(Debug, Serialize)]
pub struct DiskInfo {
    pub name: String,
    pub partition: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dependencies: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<DiskAddress>,
}

/// `guest-exec`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ExecArgs {
    pub path: String,
    #[serde(default)]
    pub arg: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    pub input_data: Option<String>,
    /// `GuestExecCaptureOutput`: a bool, or `none`, `stdout`, `stderr`,
    /// `separated`, `merged`.
    pub capture_output: Option<Value>,
}

/// `GuestExec`.
#[derive(Debug, Serialize)]
pub struct ExecStarted {
    pub pid: i64,
}

/// `guest-exec-status`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecStatusArgs {
    pub pid: i64,
}

/// `GuestExecStatus`.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ExecStatus {
    pub exited: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exitcode: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub out_data: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub err_data: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub out_truncated: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub err_truncated: Option<bool>,
}

/// `guest-file-open`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileOpenArgs {
    pub path: String,
    pub mode: Option<String>,
}

/// `guest-file-close`, `guest-file-flush`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandleArgs {
    pub handle: i64,
}

/// `guest-file-read`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileReadArgs {
    pub handle: i64,
    pub count: Option<i64>,
}

/// `GuestFileRead`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct FileRead {
    pub count: u64,
    pub buf_b64: String,
    pub eof: bool,
}

/// `guest-file-write`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileWriteArgs {
    pub handle: i64,
    pub buf_b64: String,
    pub count: Option<i64>,
}

/// `GuestFileWrite`.
#[derive(Debug, Serialize)]
pub struct FileWrite {
    pub count: u64,
    pub eof: bool,
}

/// `guest-file-seek`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSeekArgs {
    pub handle: i64,
    pub offset: i64,
    /// `GuestFileWhence`: 0, 1, 2 or `set`, `cur`, `end`.
    pub whence: Value,
}

/// `GuestFileSeek`.
#[derive(Debug, Serialize)]
pub struct FileSeek {
    pub position: u64,
    pub eof: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn envelope_checks_in_qemus_order() {
        let e = |m: &str| envelope(m.as_bytes()).unwrap_err();
        assert_eq!(e("[1]").0.desc, "QMP input must be a JSON object");
        assert_eq!(e("{").0.class, ErrorClass::GenericError);
        let (err, id) = e(r#"{"execute":5,"id":3}"#);
        assert_eq!(err.desc, "QMP input member 'execute' must be a string");
        assert_eq!(id, Some(json!(3)));
        assert_eq!(
            e(r#"{"exec-oob":"guest-ping"}"#).0.desc,
            "QMP input member 'exec-oob' is unexpected"
        );
        assert_eq!(
            e(r#"{"arguments":{}}"#).0.desc,
            "QMP input lacks member 'execute'"
        );
        assert_eq!(
            e(r#"{"execute":"x","arguments":[]}"#).0.desc,
            "QMP input member 'arguments' must be an object"
        );
        let ok = envelope(br#"{"execute":"guest-ping","id":{"a":[1]}}"#).unwrap();
        assert_eq!(ok.execute, "guest-ping");
        assert_eq!(ok.id, Some(json!({"a":[1]})));
    }

    #[test]
    fn argument_errors_are_worded_as_qemu_words_them() {
        let m = |v: Value| match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        let e = arguments::<SyncArgs>(m(json!({}))).unwrap_err();
        assert_eq!(e.desc, "Parameter 'id' is missing");
        let e = arguments::<NoArgs>(m(json!({"x": 1}))).unwrap_err();
        assert_eq!(e.desc, "Parameter 'x' is unexpected");
        let e = arguments::<SyncArgs>(m(json!({"id": "x"}))).unwrap_err();
        assert_eq!(e.class, ErrorClass::GenericError);
        assert_eq!(arguments::<SyncArgs>(m(json!({"id": -4}))).unwrap().id, -4);
    }

    #[test]
    fn results_use_the_schema_names() {
        let v = serde_json::to_value(CpuStats {
            kind: "linux",
            iowait: Some(1),
            ..CpuStats::default()
        })
        .unwrap();
        assert_eq!(v["type"], "linux");
        assert!(v.get("steal").is_none());
        let v = serde_json::to_value(FileRead {
            count: 1,
            buf_b64: "AA==".into(),
            eof: true,
        })
        .unwrap();
        assert_eq!(v, json!({"count":1,"buf-b64":"AA==","eof":true}));
    }
}

//! The Windows service: `kvm-manager-agent.exe --service`, started by the
//! Service Control Manager (SCM).
//!
//! The binary calls [`dispatch`] with the body of the agent (load the
//! configuration, run the server). [`dispatch`] hands the process's main
//! thread to the SCM (`StartServiceCtrlDispatcherW`), which calls
//! `service_main` on a thread of its own; that registers the control
//! handler, reports START_PENDING, and runs the body with a [`Control`]:
//! the body calls [`Control::running`] once the transports are up and
//! awaits [`Control::stop_requested`], which resolves on STOP, SHUTDOWN or
//! PRESHUTDOWN. While the agent drains, the SCM sees STOP_PENDING with a
//! wait hint and a rising checkpoint; at the end STOPPED, with the body's
//! exit code as the service-specific exit code when it is not 0.
//!
//! At start the service also sets its recovery actions
//! ([`set_recovery_actions`]): restart after 5 s, 10 s, then 60 s, the
//! failure count reset after a day, and a stop with a non-zero exit code
//! counts as a failure. The MSI cannot set them (wixl has no
//! `util:ServiceConfig`), so the service does it each time it starts.

use std::ffi::c_void;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::Notify;
use windows_sys::Win32::Foundation::{
    ERROR_CALL_NOT_IMPLEMENTED, ERROR_FAILED_SERVICE_CONTROLLER_CONNECT, ERROR_INSUFFICIENT_BUFFER,
    ERROR_INVALID_LEVEL, ERROR_SERVICE_SPECIFIC_ERROR, NO_ERROR,
};
use windows_sys::Win32::System::Services::{
    ChangeServiceConfig2W, CloseServiceHandle, OpenSCManagerW, OpenServiceW, QueryServiceConfig2W,
    RegisterServiceCtrlHandlerExW, SetServiceStatus, StartServiceCtrlDispatcherW, SC_ACTION,
    SC_ACTION_RESTART, SC_HANDLE, SC_MANAGER_CONNECT, SERVICE_ACCEPT_PRESHUTDOWN,
    SERVICE_ACCEPT_SHUTDOWN, SERVICE_ACCEPT_STOP, SERVICE_CHANGE_CONFIG,
    SERVICE_CONFIG_FAILURE_ACTIONS, SERVICE_CONFIG_FAILURE_ACTIONS_FLAG,
    SERVICE_CONTROL_INTERROGATE, SERVICE_CONTROL_PRESHUTDOWN, SERVICE_CONTROL_SHUTDOWN,
    SERVICE_CONTROL_STOP, SERVICE_FAILURE_ACTIONSW, SERVICE_FAILURE_ACTIONS_FLAG,
    SERVICE_QUERY_CONFIG, SERVICE_RUNNING, SERVICE_START, SERVICE_START_PENDING, SERVICE_STATUS,
    SERVICE_STATUS_HANDLE, SERVICE_STOPPED, SERVICE_STOP_PENDING, SERVICE_TABLE_ENTRYW,
    SERVICE_WIN32_OWN_PROCESS,
};

/// The service name (the MSI's `ServiceInstall Name`, `sc query` name).
pub const SERVICE_NAME: &str = "kvm-manager-agent";

/// The wait hint while stopping: the drain's grace period, the flush of
/// the last answers, and a margin.
const STOP_WAIT_HINT: Duration = Duration::from_secs(crate::server::GRACE_PERIOD.as_secs() + 2 + 3);

/// The wait hint while starting (loading the configuration, binding).
const START_WAIT_HINT: Duration = Duration::from_secs(30);

/// How often the checkpoint rises while stopping.
const STOP_TICK: Duration = Duration::from_secs(1);

/// The recovery actions the service sets: restart after each delay (the
/// third applies to every later failure).
pub const RESTART_DELAYS: [Duration; 3] = [
    Duration::from_secs(5),
    Duration::from_secs(10),
    Duration::from_secs(60),
];

/// After this long without a failure the SCM resets the failure count.
pub const RESET_PERIOD: Duration = Duration::from_secs(24 * 60 * 60);

/// Why the service could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// `--service` outside the SCM (from a console, say).
    #[error("--service: not started by the Service Control Manager (start it with `sc start {SERVICE_NAME}`, or run without --service in a console)")]
    NotUnderScm,
    /// The SCM dispatcher failed.
    #[error("cannot connect to the Service Control Manager: {0}")]
    Dispatcher(io::Error),
    /// This SCM cannot report the recovery actions (Wine's answers
    /// ERROR_INVALID_LEVEL to `QueryServiceConfig2W` for them).
    #[error("this Service Control Manager cannot report recovery actions")]
    QueryUnsupported,
    /// Opening the SCM or the service, or changing its configuration.
    #[error("{what}: {source}")]
    Config {
        /// The call that failed.
        what: &'static str,
        /// What Windows said.
        source: io::Error,
    },
}

/// What the service body gets: the way to report RUNNING, and the stop
/// request.
#[derive(Debug)]
pub struct Control {
    _private: (),
}

/// What the body returns: 0 for a clean stop, else the exit code (it
/// becomes the service-specific exit code, and triggers recovery).
pub type ExitCode = u8;

type Body = Box<dyn FnOnce(&Control) -> ExitCode + Send>;

/// The state shared by the dispatcher thread, the service thread and the
/// control handler (the SCM calls them; they take no Rust context).
struct State {
    /// The body, taken once by `service_main`.
    body: Mutex<Option<Body>>,
    /// The status handle, as an address (set by `service_main`).
    handle: Mutex<usize>,
    /// The last status reported.
    status: Mutex<SERVICE_STATUS>,
    /// Why the service stops: the control's name; set once.
    stop_cause: OnceLock<&'static str>,
    /// Woken on stop.
    stop: Notify,
    /// Set once STOPPED is reported: the checkpoint thread ends.
    stopped: AtomicBool,
    /// The body's exit code, read by [`dispatch`] after the dispatcher
    /// returns.
    exit: AtomicU32,
}

fn shared() -> &'static State {
    static STATE: OnceLock<State> = OnceLock::new();
    STATE.get_or_init(|| State {
        body: Mutex::new(None),
        handle: Mutex::new(0),
        status: Mutex::new(SERVICE_STATUS {
            dwServiceType: SERVICE_WIN32_OWN_PROCESS,
            dwCurrentState: SERVICE_START_PENDING,
            ..Default::default()
        }),
        stop_cause: OnceLock::new(),
        stop: Notify::new(),
        stopped: AtomicBool::new(false),
        exit: AtomicU32::new(0),
    })
}

impl Control {
    /// Tell the SCM the service is running (the transports are up) and
    /// accepts STOP, SHUTDOWN and PRESHUTDOWN.
    pub fn running(&self) {
        report(SERVICE_RUNNING, Duration::ZERO, 0);
    }

    /// Resolves when the SCM asks the service to stop, with the cause
    /// ("service stop", "system shutdown"), for the log. The signature is
    /// the one [`crate::server::run_until`] takes.
    pub async fn stop_requested(&self) -> io::Result<&'static str> {
        let state = shared();
        loop {
            if let Some(cause) = state.stop_cause.get() {
                return Ok(cause);
            }
            state.stop.notified().await;
        }
    }
}

/// Run `body` as the service `kvm-manager-agent`: returns once the SCM has
/// seen it stop, with the body's exit code.
pub fn dispatch<F>(body: F) -> Result<ExitCode, ServiceError>
where
    F: FnOnce(&Control) -> ExitCode + Send + 'static,
{
    let state = shared();
    *lock(&state.body) = Some(Box::new(body));
    let mut name = wide(SERVICE_NAME);
    let table = [
        SERVICE_TABLE_ENTRYW {
            lpServiceName: name.as_mut_ptr(),
            lpServiceProc: Some(service_main),
        },
        SERVICE_TABLE_ENTRYW::default(),
    ];
    // SAFETY: `table` ends with the all-null entry the call requires;
    // `name` outlives the call, which returns only once the service
    // has stopped.
    let ok = unsafe { StartServiceCtrlDispatcherW(table.as_ptr()) };
    if ok == 0 {
        let e = io::Error::last_os_error();
        return Err(
            if e.raw_os_error() == Some(ERROR_FAILED_SERVICE_CONTROLLER_CONNECT as i32) {
                ServiceError::NotUnderScm
            } else {
                ServiceError::Dispatcher(e)
            },
        );
    }
    Ok(u8::try_from(state.exit.load(Ordering::SeqCst)).unwrap_or(u8::MAX))
}

/// The service's entry point, called by the SCM on a thread of its own.
unsafe extern "system" fn service_main(_argc: u32, _argv: *mut *mut u16) {
    let state = shared();
    let name = wide(SERVICE_NAME);
    // SAFETY: `name` is a NUL-terminated UTF-16 string that outlives the
    // call; `handler` has the signature the SCM expects and takes no
    // context.
    let handle =
        unsafe { RegisterServiceCtrlHandlerExW(name.as_ptr(), Some(handler), std::ptr::null()) };
    if handle.is_null() {
        log::error!(
            "cannot register the service control handler: {}",
            io::Error::last_os_error()
        );
        return;
    }
    *lock(&state.handle) = handle as usize;
    report(SERVICE_START_PENDING, START_WAIT_HINT, 0);
    match set_recovery_actions(SERVICE_NAME) {
        Ok(true) => {}
        Ok(false) => log::warn!(
            "recovery actions set, but this Service Control Manager cannot apply them \
             to a stop with an error exit code (only to crashes)"
        ),
        // The service runs anyway; only automatic restarts are missing.
        Err(e) => log::warn!("cannot set the recovery actions (restart on failure): {e}"),
    }
    let body = lock(&state.body).take();
    let code = match body {
        Some(body) => body(&Control { _private: () }),
        None => 1,
    };
    state.exit.store(u32::from(code), Ordering::SeqCst);
    state.stopped.store(true, Ordering::SeqCst);
    report(SERVICE_STOPPED, Duration::ZERO, u32::from(code));
}

/// The control handler: the SCM calls it on its dispatcher thread.
unsafe extern "system" fn handler(
    control: u32,
    _event_type: u32,
    _event_data: *mut c_void,
    _context: *mut c_void,
) -> u32 {
    let cause = match control {
        SERVICE_CONTROL_STOP => "service stop",
        SERVICE_CONTROL_SHUTDOWN | SERVICE_CONTROL_PRESHUTDOWN => "system shutdown",
        SERVICE_CONTROL_INTERROGATE => return NO_ERROR,
        _ => return ERROR_CALL_NOT_IMPLEMENTED,
    };
    let state = shared();
    if state.stop_cause.set(cause).is_ok() {
        report(SERVICE_STOP_PENDING, STOP_WAIT_HINT, 0);
        // The checkpoint rises while the agent drains, so that the SCM
        // sees progress; the thread ends at STOPPED.
        let spawned = std::thread::Builder::new()
            .name("service-stop-pending".into())
            .spawn(|| {
                let state = shared();
                loop {
                    std::thread::sleep(STOP_TICK);
                    if state.stopped.load(Ordering::SeqCst) {
                        return;
                    }
                    report(SERVICE_STOP_PENDING, STOP_WAIT_HINT, 0);
                }
            });
        if let Err(e) = spawned {
            log::warn!("cannot start the stop-pending thread: {e}");
        }
        state.stop.notify_one();
    }
    NO_ERROR
}

/// The status for `state`: what it accepts, its checkpoint (rising while
/// pending, else 0) and exit code.
fn next_status(previous: &SERVICE_STATUS, state: u32, wait: Duration, code: u32) -> SERVICE_STATUS {
    let pending = state == SERVICE_START_PENDING || state == SERVICE_STOP_PENDING;
    SERVICE_STATUS {
        dwServiceType: SERVICE_WIN32_OWN_PROCESS,
        dwCurrentState: state,
        dwControlsAccepted: if state == SERVICE_RUNNING {
            SERVICE_ACCEPT_STOP | SERVICE_ACCEPT_SHUTDOWN | SERVICE_ACCEPT_PRESHUTDOWN
        } else {
            0
        },
        dwWin32ExitCode: if code == 0 {
            NO_ERROR
        } else {
            ERROR_SERVICE_SPECIFIC_ERROR
        },
        dwServiceSpecificExitCode: code,
        dwCheckPoint: if pending && previous.dwCurrentState == state {
            previous.dwCheckPoint.saturating_add(1)
        } else if pending {
            1
        } else {
            0
        },
        dwWaitHint: u32::try_from(wait.as_millis()).unwrap_or(u32::MAX),
    }
}

fn report(current: u32, wait: Duration, code: u32) {
    let state = shared();
    let handle = *lock(&state.handle) as SERVICE_STATUS_HANDLE;
    if handle.is_null() {
        return;
    }
    let mut status = lock(&state.status);
    // A late checkpoint tick never overwrites STOPPED.
    if status.dwCurrentState == SERVICE_STOPPED {
        return;
    }
    *status = next_status(&status, current, wait, code);
    // SAFETY: `handle` came from RegisterServiceCtrlHandlerExW (it needs no
    // closing); `status` is a valid SERVICE_STATUS for the call.
    if unsafe { SetServiceStatus(handle, &*status) } == 0 {
        log::warn!("SetServiceStatus: {}", io::Error::last_os_error());
    }
}

/// The recovery actions of a service, as the SCM holds them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryActions {
    /// Seconds without failure after which the failure count resets.
    pub reset_period_secs: u32,
    /// Each action's type (`SC_ACTION_*`) and delay in milliseconds.
    pub actions: Vec<(i32, u32)>,
}

impl RecoveryActions {
    /// The actions this service sets.
    pub fn wanted() -> Self {
        Self {
            reset_period_secs: u32::try_from(RESET_PERIOD.as_secs()).unwrap_or(u32::MAX),
            actions: RESTART_DELAYS
                .iter()
                .map(|d| {
                    (
                        SC_ACTION_RESTART,
                        u32::try_from(d.as_millis()).unwrap_or(u32::MAX),
                    )
                })
                .collect(),
        }
    }
}

/// An open SCM or service handle, closed on drop.
struct ScHandle(SC_HANDLE);

impl Drop for ScHandle {
    fn drop(&mut self) {
        // SAFETY: the handle came from OpenSCManagerW or OpenServiceW and
        // is closed once.
        unsafe { CloseServiceHandle(self.0) };
    }
}

fn open_service(name: &str, access: u32) -> Result<ScHandle, ServiceError> {
    // SAFETY: null machine and database names mean this computer's active
    // database.
    let manager = unsafe { OpenSCManagerW(std::ptr::null(), std::ptr::null(), SC_MANAGER_CONNECT) };
    if manager.is_null() {
        return Err(config_error("OpenSCManagerW"));
    }
    let manager = ScHandle(manager);
    let name = wide(name);
    // SAFETY: `manager` is open; `name` is NUL-terminated and outlives the call.
    let service = unsafe { OpenServiceW(manager.0, name.as_ptr(), access) };
    if service.is_null() {
        return Err(config_error("OpenServiceW"));
    }
    Ok(ScHandle(service))
}

/// Set [`RecoveryActions::wanted`] on the service `name`, and make a stop
/// with a non-zero exit code count as a failure. Returns whether that last
/// part took: Windows (Vista and later) supports it; Wine's SCM answers
/// ERROR_INVALID_LEVEL, and there only crashes trigger the actions.
pub fn set_recovery_actions(name: &str) -> Result<bool, ServiceError> {
    // SC_ACTION_RESTART needs SERVICE_START besides SERVICE_CHANGE_CONFIG.
    let service = open_service(name, SERVICE_CHANGE_CONFIG | SERVICE_START)?;
    let wanted = RecoveryActions::wanted();
    let mut actions: Vec<SC_ACTION> = wanted
        .actions
        .iter()
        .map(|&(kind, delay)| SC_ACTION {
            Type: kind,
            Delay: delay,
        })
        .collect();
    let info = SERVICE_FAILURE_ACTIONSW {
        dwResetPeriod: wanted.reset_period_secs,
        // Null: leave the reboot message and command unchanged (none).
        lpRebootMsg: std::ptr::null_mut(),
        lpCommand: std::ptr::null_mut(),
        cActions: actions.len() as u32,
        lpsaActions: actions.as_mut_ptr(),
    };
    // SAFETY: `service` is open with SERVICE_CHANGE_CONFIG and
    // SERVICE_START; `info` and the actions it points to outlive the call.
    let ok = unsafe {
        ChangeServiceConfig2W(
            service.0,
            SERVICE_CONFIG_FAILURE_ACTIONS,
            (&info as *const SERVICE_FAILURE_ACTIONSW).cast(),
        )
    };
    if ok == 0 {
        return Err(config_error(
            "ChangeServiceConfig2W(SERVICE_CONFIG_FAILURE_ACTIONS)",
        ));
    }
    let flag = SERVICE_FAILURE_ACTIONS_FLAG {
        fFailureActionsOnNonCrashFailures: 1,
    };
    // SAFETY: as above; `flag` outlives the call.
    let ok = unsafe {
        ChangeServiceConfig2W(
            service.0,
            SERVICE_CONFIG_FAILURE_ACTIONS_FLAG,
            (&flag as *const SERVICE_FAILURE_ACTIONS_FLAG).cast(),
        )
    };
    if ok == 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(ERROR_INVALID_LEVEL as i32) {
            return Ok(false);
        }
        return Err(ServiceError::Config {
            what: "ChangeServiceConfig2W(SERVICE_CONFIG_FAILURE_ACTIONS_FLAG)",
            source: e,
        });
    }
    Ok(true)
}

/// The recovery actions the SCM holds for the service `name`
/// (`QueryServiceConfig2W`).
pub fn recovery_actions(name: &str) -> Result<RecoveryActions, ServiceError> {
    let service = open_service(name, SERVICE_QUERY_CONFIG)?;
    let mut needed = 0u32;
    // SAFETY: a null buffer of size 0 asks for the size needed.
    let ok = unsafe {
        QueryServiceConfig2W(
            service.0,
            SERVICE_CONFIG_FAILURE_ACTIONS,
            std::ptr::null_mut(),
            0,
            &mut needed,
        )
    };
    let e = io::Error::last_os_error();
    if ok == 0 && e.raw_os_error() == Some(ERROR_INVALID_LEVEL as i32) {
        return Err(ServiceError::QueryUnsupported);
    }
    if ok == 0 && e.raw_os_error() != Some(ERROR_INSUFFICIENT_BUFFER as i32) {
        return Err(ServiceError::Config {
            what: "QueryServiceConfig2W(SERVICE_CONFIG_FAILURE_ACTIONS)",
            source: e,
        });
    }
    // u64 units: aligned for the structure at its start.
    let words = (needed as usize)
        .max(std::mem::size_of::<SERVICE_FAILURE_ACTIONSW>())
        .div_ceil(8);
    let mut buffer = vec![0u64; words];
    // SAFETY: `buffer` holds `words * 8` writable bytes, at least `needed`.
    let ok = unsafe {
        QueryServiceConfig2W(
            service.0,
            SERVICE_CONFIG_FAILURE_ACTIONS,
            buffer.as_mut_ptr().cast(),
            (words * 8) as u32,
            &mut needed,
        )
    };
    if ok == 0 {
        return Err(config_error(
            "QueryServiceConfig2W(SERVICE_CONFIG_FAILURE_ACTIONS)",
        ));
    }
    // SAFETY: the call filled the buffer, 8-byte aligned, with a
    // SERVICE_FAILURE_ACTIONSW at its start.
    let info = unsafe { &*buffer.as_ptr().cast::<SERVICE_FAILURE_ACTIONSW>() };
    let actions = if info.lpsaActions.is_null() || info.cActions == 0 {
        Vec::new()
    } else {
        // SAFETY: the SCM points `lpsaActions` at `cActions` entries inside
        // the same buffer, which lives until the end of this function.
        unsafe { std::slice::from_raw_parts(info.lpsaActions, info.cActions as usize) }
            .iter()
            .map(|a| (a.Type, a.Delay))
            .collect()
    };
    Ok(RecoveryActions {
        reset_period_secs: info.dwResetPeriod,
        actions,
    })
}

fn config_error(what: &'static str) -> ServiceError {
    ServiceError::Config {
        what,
        source: io::Error::last_os_error(),
    }
}

/// A poisoned lock still holds usable state here (plain values).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `s` as a NUL-terminated UTF-16 string.
fn wide(s: &str) -> Vec<u16> {
    s.encode_utf16().chain(std::iter::once(0)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use windows_sys::Win32::System::Services::{
        CreateServiceW, DeleteService, SC_MANAGER_CREATE_SERVICE, SERVICE_ALL_ACCESS,
        SERVICE_DEMAND_START, SERVICE_ERROR_NORMAL,
    };

    #[test]
    fn statuses_seen_by_the_scm() {
        let start = SERVICE_STATUS::default();
        let pending = next_status(&start, SERVICE_START_PENDING, START_WAIT_HINT, 0);
        assert_eq!(pending.dwCheckPoint, 1);
        assert_eq!(pending.dwWaitHint, 30_000);
        assert_eq!(pending.dwControlsAccepted, 0);
        let running = next_status(&pending, SERVICE_RUNNING, Duration::ZERO, 0);
        assert_eq!(running.dwCheckPoint, 0);
        assert_eq!(
            running.dwControlsAccepted,
            SERVICE_ACCEPT_STOP | SERVICE_ACCEPT_SHUTDOWN | SERVICE_ACCEPT_PRESHUTDOWN
        );
        let stopping = next_status(&running, SERVICE_STOP_PENDING, STOP_WAIT_HINT, 0);
        let later = next_status(&stopping, SERVICE_STOP_PENDING, STOP_WAIT_HINT, 0);
        assert_eq!((stopping.dwCheckPoint, later.dwCheckPoint), (1, 2));
        assert!(
            u128::from(stopping.dwWaitHint) > crate::server::GRACE_PERIOD.as_millis(),
            "the wait hint covers the drain"
        );
        let clean = next_status(&later, SERVICE_STOPPED, Duration::ZERO, 0);
        assert_eq!((clean.dwWin32ExitCode, clean.dwCheckPoint), (NO_ERROR, 0));
        let failed = next_status(&later, SERVICE_STOPPED, Duration::ZERO, 78);
        assert_eq!(failed.dwWin32ExitCode, ERROR_SERVICE_SPECIFIC_ERROR);
        assert_eq!(failed.dwServiceSpecificExitCode, 78);
    }

    /// Wine's ntdll exports `wine_get_version`; Windows' does not.
    fn under_wine() -> bool {
        use windows_sys::Win32::System::LibraryLoader::{GetModuleHandleW, GetProcAddress};
        let ntdll = wide("ntdll.dll");
        // SAFETY: ntdll is loaded in every process; the names are
        // NUL-terminated and outlive the calls.
        unsafe {
            let module = GetModuleHandleW(ntdll.as_ptr());
            !module.is_null()
                && GetProcAddress(module, c"wine_get_version".as_ptr().cast()).is_some()
        }
    }

    /// A throw-away service, deleted on drop.
    struct TempService(ScHandle);

    impl Drop for TempService {
        fn drop(&mut self) {
            // SAFETY: the handle is open with SERVICE_ALL_ACCESS (DELETE).
            unsafe { DeleteService(self.0 .0) };
        }
    }

    fn create(name: &str) -> TempService {
        // SAFETY: null names mean this computer's active database.
        let manager = unsafe {
            OpenSCManagerW(
                std::ptr::null(),
                std::ptr::null(),
                SC_MANAGER_CONNECT | SC_MANAGER_CREATE_SERVICE,
            )
        };
        assert!(!manager.is_null(), "{}", io::Error::last_os_error());
        let manager = ScHandle(manager);
        let wname = wide(name);
        let binary = wide(r"C:\windows\system32\cmd.exe");
        // SAFETY: `manager` is open with SC_MANAGER_CREATE_SERVICE; every
        // string is NUL-terminated and outlives the call; the optional
        // ones are null.
        let service = unsafe {
            CreateServiceW(
                manager.0,
                wname.as_ptr(),
                wname.as_ptr(),
                SERVICE_ALL_ACCESS,
                SERVICE_WIN32_OWN_PROCESS,
                SERVICE_DEMAND_START,
                SERVICE_ERROR_NORMAL,
                binary.as_ptr(),
                std::ptr::null(),
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert!(!service.is_null(), "{}", io::Error::last_os_error());
        TempService(ScHandle(service))
    }

    /// Wine's service manager has failed a call with "invalid handle" when
    /// two tests talked to it at once: these tests take turns.
    static SCM: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn recovery_actions_hold() {
        let _turn = SCM.lock().unwrap_or_else(|e| e.into_inner());
        // Unique per run: Wine reuses small process ids, and a service left
        // by an interrupted run would make CreateServiceW fail.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!("kvm-manager-agent-test-{}-{nanos}", std::process::id());
        let _service = create(&name);
        let non_crash = set_recovery_actions(&name).unwrap();
        match recovery_actions(&name) {
            Ok(actions) => {
                assert_eq!(actions, RecoveryActions::wanted());
                assert!(non_crash, "Windows applies them to error exits too");
            }
            // Wine accepts the actions but can report neither them nor the
            // non-crash flag: the xtask step says so; real Windows checks.
            Err(ServiceError::QueryUnsupported) => {
                assert!(under_wine(), "only Wine lacks QueryServiceConfig2W's level");
                assert!(!non_crash);
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn recovery_actions_of_a_missing_service() {
        let _turn = SCM.lock().unwrap_or_else(|e| e.into_inner());
        let e = set_recovery_actions("kvm-manager-agent-no-such-service").unwrap_err();
        assert!(
            matches!(
                e,
                ServiceError::Config {
                    what: "OpenServiceW",
                    ..
                }
            ),
            "{e}"
        );
    }
}
